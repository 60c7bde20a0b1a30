#!/usr/bin/env python
"""Host-side cost per call: kernel launches and host time, at shapes where the kernels take ~nothing.

At the SD cross-attention and ViT-B shapes a training step on an H100 is bound by the host, not by the
kernels (RESULTS.md: the dense K+V pair alone takes 0.25-0.49 ms of wall for 13-225 us of kernels), so
what decides the wall-time targets there is how many kernels a call launches and how much Python runs
around them.  This script measures both, on any machine:

  launches  kernels one call launches: ATen ops that reach a kernel + Triton launches
            (clora_fast._launches.count_launches; the same count on a CPU as on a GPU for PyTorch code)
  host_us   median wall time per call at tiny shapes, interleaved rounds (the kernels are trivial there,
            so this is host work: on a GPU the launch side of the real cost, on a CPU a proxy for it:
            a CPU op costs less to launch than a CUDA one)

Sections (each call = forward + backward with fixed output gradients):
  kv_layer     one attention layer's K and V: dense (two F.linear), ours (the controller's call:
               segmented_lora_projection on flat factors with split outputs; on a CPU with strategy="merged",
               what "auto" takes on CUDA), kv_op (lora_kv_projection with per-projection factors and biases, as
               a user holds them), fused (segmented Triton kernels; GPU, or counts under --interpret), peft (peft
               LoRA layers), naive (W0 + P + s*B@A materialised per call)
               - "sd": no bias (SD attn2 to_k/to_v); "vit": with bias (ViT key/value); "vit_bf16": a bf16
               model's layer with the controller's float32 factors: ours (handed over as they are), cast
               (cast to bf16 per call first, as before 2026-11-28), dense
  unet_kv_all  all 32 SD-1.5 cross-attention K/V projections (the config's output widths / 40, in 32):
               dense_cat (one F.linear), grouped (one segmented call: the controller's), per_layer
               (16 lora_kv_projection calls), peft (32 LoRA layers)
  penalty      the penalty over the same 32 projections: packed (the controller's call, through
               ops.PackedForgettingPenalty), naive (past re-summed from 10 stored pairs, autograd)
  sd_step      one training step (forward, loss, backward, AdamW) of an SD UNet built from its config
               (--quick: the tiny one; else SD-1.5, 8x8 latents, batch 1): none (only the text embedding
               trains: the same backward through every cross-attention), clora (clora_fast.patch, 2 past
               concepts, penalty), peft (LoRA on the same K/V); timed on a GPU only (a CPU computes there)
  vit_step     the same for a transformers ViT (ViT-B/16 blocks on 32x32 images; --quick: 2 small layers),
               the patch embedding trained in "none"

Run: python benchmarks/bench_host.py [--quick|--cpu] [--out DIR] [--interpret]
"""
from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402
from bench_ops import peft_module  # noqa: E402

KV_METHODS = ["dense", "ours", "kv_op", "fused", "peft", "naive"]
KV_BF16_METHODS = ["dense", "ours", "cast"]
UNET_METHODS = ["dense_cat", "grouped", "per_layer", "peft"]
PEN_METHODS = ["packed", "naive"]
STEP_METHODS = ["none", "clora", "peft"]
REF_NOTE = "reference backend: PyTorch launchers, not the GPU path; --interpret counts the Triton kernels"


def host_us(fns: dict, device: torch.device, rounds: int, calls: int) -> dict:
    """Median over interleaved rounds of the mean wall time per call (us) of each fn; a round times
    ``calls`` back-to-back calls of one fn (synchronised at the end on a GPU)."""
    times = {k: [] for k in fns}
    for f in fns.values():       # warm-up: allocator, lazy init, Triton compilation
        for _ in range(3):
            f()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(rounds):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            sync()
            times[k].append((time.perf_counter() - t0) / calls * 1e6)
    return {k: statistics.median(v) for k, v in times.items()}


def step_fn(outs_fn, grads, leaves):
    """Forward + backward, the gradients of ``leaves`` handed back as ``torch.autograd.grad`` does (x stands for
    an activation: its gradient is not copied into a leaf's ``.grad``; nothing accumulates between calls)."""
    leaves = list(leaves)

    def fn():
        torch.autograd.grad(list(outs_fn()), leaves, list(grads), allow_unused=True)
    return fn


class Bench:
    def __init__(self, args, device):
        self.args, self.device = args, device
        self.quick = args.quick
        self.gen = torch.Generator(device="cpu").manual_seed(0)
        self.out = C.Output(args.out, "host", args.tag)
        self.info = C.env_info(device)
        self.rows = []
        self.interpret = os.environ.get("TRITON_INTERPRET") == "1"
        self.t0 = time.perf_counter()
        self.budget = args.budget
        self.skipped = []       # sections not run: past --gpu-budget
        from clora_fast import ops
        from clora_fast._launches import count_launches
        self.ops, self.count = ops, count_launches
        self.triton = self.device.type == "cuda" or (self.interpret and self.device.type == "cpu")

    def randn(self, *shape, scale=1.0):
        return (torch.randn(*shape, generator=self.gen) * scale).to(self.device)

    def record(self, **kw):
        self.rows.append(kw)
        self.out.row(**kw)
        C.print_flush(f"{kw['section']}/{kw['case']}/{kw['method']}: launches {kw['launches']}, "
                      f"host {kw['host_us'] if kw['host_us'] is None else round(kw['host_us'], 1)} us "
                      f"({kw['status']})")

    def over_budget(self) -> bool:
        return time.perf_counter() - self.t0 > self.budget

    def measure(self, section, case, makers: dict, sequential: bool = False, rounds: int = 9, calls: int = 200):
        """Count launches of every method; time the ones whose time means something here (a maker returns
        ``(fn, True)``, or ``(fn, reason)`` when the time would not be host work).  The methods are timed in
        interleaved rounds, or one after the other right after their count (``sequential``: a maker that
        changes the model for the next one).  On a GPU fewer rounds and calls (a call there waits for its
        kernels: ~0.1-1 ms per op call, ~50-100 ms per SD-1.5 step); past ``--gpu-budget`` the methods are
        reported as n/a (budget)."""
        fns, counts, status, times = {}, {}, {}, {}
        if self.quick:
            rounds, calls = 3, 5
        elif self.device.type == "cuda":
            rounds, calls = min(rounds, 5), max(5, calls // 4)
        for m, mk in makers.items():
            if self.over_budget():
                counts[m], status[m] = None, "n/a (budget)"
                continue
            try:
                fn, timed = mk()
                fn()
                counts[m] = self.count(fn)
                why = timed or "Triton interpreter: its time is not host work"
                status[m] = "ok" if timed is True else f"counted only ({why})"
                if timed is True:
                    fns[m] = fn
                    if sequential:
                        times.update(host_us({m: fn}, self.device, rounds, calls))
            except Exception as e:  # noqa: BLE001 - a method not available here is reported, not fatal
                counts[m], status[m] = None, f"n/a ({C.describe_exc(e)})"
        if fns and not sequential:
            if self.over_budget():
                status.update({m: "counted only (not timed: budget)" for m in fns})
            else:
                times = host_us(fns, self.device, rounds, calls)
        for m in makers:
            n, ops = counts[m] if counts[m] is not None else (None, None)
            self.record(section=section, case=case, method=m, launches=n, ops=ops, host_us=times.get(m),
                        status=status[m], device=str(self.device))

    # ------------------------------------------------------------ one layer's K and V
    def kv_layer(self):
        ops, dev = self.ops, self.device
        M0, K, n, r, s = (2, 8), 32, 32, 4, 0.5
        for case, with_bias in (("sd", False), ("vit", True)):
            x = self.randn(*M0, K).requires_grad_()
            W = [self.randn(n, K, scale=K ** -0.5) for _ in range(2)]
            A = [self.randn(r, K, scale=K ** -0.5).requires_grad_() for _ in range(2)]
            B = [self.randn(n, r, scale=0.02).requires_grad_() for _ in range(2)]
            bias = [self.randn(n) for _ in range(2)] if with_bias else None
            past = [(self.randn(10 * r, K, scale=K ** -0.5), self.randn(n, 10 * r, scale=0.02)) for _ in range(2)]
            gy = [self.randn(*M0, n) for _ in range(2)]
            leaves = [x, *A, *B]
            bk = (lambda i: None) if bias is None else (lambda i: bias[i])
            on_cuda = dev.type == "cuda"

            # the factors and bias as a controller holds them (flat A and B, one bias marked frozen)
            A_flat, B_flat = (torch.cat([t.detach() for t in ts]).requires_grad_() for ts in (A, B))
            W_cat = torch.cat(W)
            b_cat = None if bias is None else torch.cat(bias)
            if b_cat is not None:
                ops.mark_frozen_bias(b_cat)

            def mk_ours(strategy, call="controller"):
                def make():
                    kw = {}
                    if strategy == "fused":
                        if not self.triton:
                            raise RuntimeError("the Triton kernels need a GPU (or --interpret)")
                        kw.update(backend="triton", strategy="fused")
                    elif not on_cuda:
                        kw.update(strategy="merged")     # what backend "auto" takes on CUDA
                    if call == "controller":
                        fn = step_fn(lambda: ops.segmented_lora_projection(x, W_cat, A_flat, B_flat, (0, n, 2 * n), s,
                                                                           bias=b_cat, split=True, **kw),
                                     gy, [x, A_flat, B_flat])
                    else:
                        fn = step_fn(lambda: ops.lora_kv_projection(x, W, A, B, scale=s, biases=bias, **kw), gy,
                                     leaves)
                    return fn, strategy != "fused" or on_cuda
                return make

            def mk_peft():
                m, params = peft_module(W, [(A[i].detach(), B[i].detach()) for i in range(2)], r, s, ["k", "v"])
                if bias is not None:
                    for i, name in enumerate("kv"):
                        lin = getattr(m, name).base_layer
                        lin.bias = torch.nn.Parameter(bias[i].clone(), requires_grad=False)
                return step_fn(lambda: (m.k(x), m.v(x)), gy, [x, *params]), True

            def mk_naive():
                def outs():
                    return [F.linear(x, W[i] + s * (past[i][1] @ past[i][0]) + s * (B[i] @ A[i]), bk(i))
                            for i in range(2)]
                return step_fn(outs, gy, leaves), True

            self.measure("kv_layer", case, {
                "dense": lambda: (step_fn(lambda: [F.linear(x, W[i], bk(i)) for i in range(2)], gy, [x]), True),
                "ours": mk_ours("auto"), "kv_op": mk_ours("auto", "kv_op"), "fused": mk_ours("fused"),
                "peft": mk_peft, "naive": mk_naive})
        self._kv_layer_bf16(M0, K, n, r, s)

    def _kv_layer_bf16(self, M0, K, n, r, s):
        """A bf16 model's K/V layer with the controller's float32 factors (mixed-precision masters): ours (the
        factors handed over as they are) vs the same call with the factors cast to bf16 first (what the
        controller did before 2026-11-28: four launches more) and the dense bf16 pair."""
        ops, bf = self.ops, torch.bfloat16
        x = self.randn(*M0, K).to(bf).requires_grad_()
        W = [self.randn(n, K, scale=K ** -0.5).to(bf) for _ in range(2)]
        bias = [self.randn(n).to(bf) for _ in range(2)]
        W_cat, b_cat = torch.cat(W), torch.cat(bias)
        ops.mark_frozen_bias(b_cat)
        A_flat = self.randn(2 * r, K, scale=K ** -0.5).requires_grad_()
        B_flat = self.randn(2 * n, r, scale=0.02).requires_grad_()
        gy = [self.randn(*M0, n).to(bf) for _ in range(2)]
        kw = {} if self.device.type == "cuda" else {"strategy": "merged"}     # what "auto" takes on CUDA

        def mk(cast):
            def outs():
                A, B = (A_flat.to(bf), B_flat.to(bf)) if cast else (A_flat, B_flat)
                return ops.segmented_lora_projection(x, W_cat, A, B, (0, n, 2 * n), s, bias=b_cat, split=True, **kw)
            return lambda: (step_fn(outs, gy, [x, A_flat, B_flat]), True)

        self.measure("kv_layer", "vit_bf16", {
            "dense": lambda: (step_fn(lambda: [F.linear(x, W[i], bias[i]) for i in range(2)], gy, [x]), True),
            "ours": mk(False), "cast": mk(True)})

    # ------------------------------------------------------------ all 32 SD K/V projections
    def unet_kv_all(self):
        ops = self.ops
        cfg = C.sd_config("gpu")
        outs = [max(4, o // 40) for _, o, _ in C.sd_kv_shapes_from_config(cfg)]      # 32 projections, K and V
        K, r, s = 32, 4, 0.5
        offs = [0]
        for o in outs:
            offs.append(offs[-1] + o)
        N = offs[-1]
        x = self.randn(1, 8, K).requires_grad_()
        W = self.randn(N, K, scale=K ** -0.5)
        A = self.randn(len(outs) * r, K, scale=K ** -0.5).requires_grad_()
        B = self.randn(N, r, scale=0.02).requires_grad_()
        gy = [self.randn(1, 8, o) for o in outs]
        Wl = [W[a:b] for a, b in zip(offs, offs[1:])]
        Al = [A.detach()[i * r:(i + 1) * r].clone().requires_grad_() for i in range(len(outs))]
        Bl = [B.detach()[a:b].clone().requires_grad_() for a, b in zip(offs, offs[1:])]
        on_cuda = self.device.type == "cuda"

        def mk_grouped():
            kw = {} if on_cuda else ({"backend": "triton"} if self.triton else {})
            fn = step_fn(lambda: ops.segmented_lora_projection(x, W, A, B, offs, s, split=True, **kw), gy, [x, A, B])
            return fn, on_cuda or (False if self.triton else REF_NOTE)

        def mk_per_layer():
            kw = {} if on_cuda else {"strategy": "merged"}

            def outs_fn():
                res = []
                for i in range(0, len(outs), 2):
                    res += ops.lora_kv_projection(x, (Wl[i], Wl[i + 1]), (Al[i], Al[i + 1]), (Bl[i], Bl[i + 1]),
                                                  scale=s, **kw)
                return res
            return step_fn(outs_fn, gy, [x, *Al, *Bl]), True

        def mk_peft():
            names = [f"p{i}" for i in range(len(outs))]
            m, params = peft_module(Wl, [(a.detach(), b.detach()) for a, b in zip(Al, Bl)], r, s, names)
            return step_fn(lambda: [getattr(m, nm)(x) for nm in names], gy, [x, *params]), True

        self.measure("unet_kv_all", f"sd32_k{K}", {
            "dense_cat": lambda: (step_fn(lambda: ops.split_columns(F.linear(x, W), offs), gy, [x]), True),
            "grouped": mk_grouped, "per_layer": mk_per_layer, "peft": mk_peft})

    # ------------------------------------------------------------ penalty over the 32 projections
    def penalty(self):
        ops = self.ops
        cfg = C.sd_config("gpu")
        outs = [max(4, o // 40) for _, o, _ in C.sd_kv_shapes_from_config(cfg)]
        K, r, s, T = 32, 4, 0.5, 10
        offs = [0]
        for o in outs:
            offs.append(offs[-1] + o)
        A = self.randn(len(outs) * r, K, scale=K ** -0.5).requires_grad_()
        B = self.randn(offs[-1], r, scale=0.02).requires_grad_()
        stored = [(self.randn(T * r, K, scale=K ** -0.5), self.randn(o, T * r, scale=0.02)) for o in outs]
        pasts = [s * (bp @ ap) for ap, bp in stored]
        layout = [(0, i * r, offs[i], r) for i in range(len(outs))]
        on_cuda = self.device.type == "cuda"

        def mk_packed():
            backend = "triton" if (self.triton and not on_cuda) else "auto"
            pen = ops.PackedForgettingPenalty(pasts, layout, scales=s, backend=backend)

            def fn():
                A.grad = B.grad = None
                pen([A], [B]).backward()
            return fn, on_cuda or (False if self.triton else REF_NOTE)

        def mk_naive():
            def fn():
                A.grad = B.grad = None
                loss = 0.0
                for i, (ap, bp) in enumerate(stored):
                    p = s * (bp @ ap)
                    d = s * (B[offs[i]:offs[i + 1]] @ A[i * r:(i + 1) * r])
                    loss = loss + ((p * d) ** 2).sum()
                loss.backward()
            return fn, True

        self.measure("penalty", f"sd32_k{K}", {"packed": mk_packed, "naive": mk_naive})


def _training_steps(bench: Bench, section: str, case: str, model, forward_loss, base_params, kv_names):
    """Launches (and, on a GPU, host-bound wall time) of whole training steps (forward, loss, backward,
    AdamW) of ``model``: none (only ``base_params`` train: the same backward through every layer), clora
    (clora_fast.patch, 2 past concepts, penalty), peft (LoRA on ``kv_names``); one after the other (each
    maker changes the model for the next)."""
    from bench_e2e import controller_with_past, inject_peft
    on_cuda = bench.device.type == "cuda"
    timed = True if on_cuda else "a CPU computes the step: its time is not host work"

    def make_step(m, params, extra=None):
        # foreach=True: what AdamW picks on a GPU by default (the CPU default loops per parameter)
        opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = forward_loss(m)
            if extra is not None:
                loss = loss + extra()
            loss.backward()
            opt.step()
        return step

    def mk_none():
        return make_step(model, base_params), timed

    def mk_clora():
        from clora_fast import patch
        backend = "triton" if (bench.triton and not on_cuda) else "auto"
        ctl = controller_with_past(patch(model, rank=4, backend=backend), 2)
        why = timed if (on_cuda or bench.triton) else REF_NOTE
        return make_step(model, base_params + list(ctl.trainable_parameters()), ctl.penalty), why

    def mk_peft():
        from clora_fast import unpatch
        unpatch(model)
        m, params = inject_peft(model, kv_names, 4)
        return make_step(m, base_params + params), timed

    bench.measure(section, case, {"none": mk_none, "clora": mk_clora, "peft": mk_peft},
                  sequential=True, rounds=5, calls=10)


def _record_na(bench: Bench, section: str, case: str, why: str):
    for m in STEP_METHODS:
        bench.record(section=section, case=case, method=m, launches=None, ops=None, host_us=None, status=why,
                     device=str(bench.device))


def sd_step(bench: Bench):
    """Whole SD UNet training steps (the tiny UNet with --quick, else SD-1.5; 8x8 latents, batch 1, 77 tokens)."""
    name = "tiny_unet.json" if bench.quick else "sd15_unet.json"
    case = name.split("_")[0] + "_unet"
    try:
        from diffusers import UNet2DConditionModel
    except Exception as e:  # noqa: BLE001
        return _record_na(bench, "sd_step", case, f"n/a (diffusers not importable: {C.describe_exc(e)})")
    cfg = C.load_json_config(name)
    dev = bench.device
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    C.seed_all(0)
    with torch.device(dev):
        unet = UNet2DConditionModel(**cfg)
    unet = unet.to(dtype=dt).requires_grad_(False).train()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, cfg["in_channels"], 8, 8, generator=g).to(dev, dt)
    noisy = torch.randn(1, cfg["in_channels"], 8, 8, generator=g).to(dev, dt)
    tsteps = torch.randint(0, 1000, (1,), generator=g).to(dev)
    emb = torch.nn.Parameter((torch.randn(1, 77, cfg["cross_attention_dim"], generator=g) * 0.5).to(dev, dt))
    kv = [n for n, _ in unet.named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))]
    _training_steps(bench, "sd_step", case, unet,
                    lambda m: F.mse_loss(m(noisy, tsteps, encoder_hidden_states=emb).sample.float(), noise.float()),
                    [emb], kv)


def vit_step(bench: Bench):
    """Whole ViT training steps (transformers; ViT-B/16 layers on 32x32 images - 5 tokens - or a 2-layer
    toy with --quick; batch 2), the patch embedding trained in 'none' so that backward runs through every
    block."""
    case = "vit_tiny" if bench.quick else "vit_b16_img32"
    try:
        from transformers import ViTConfig, ViTForImageClassification
    except Exception as e:  # noqa: BLE001
        return _record_na(bench, "vit_step", case, f"n/a (transformers not importable: {C.describe_exc(e)})")
    dev = bench.device
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    if bench.quick:
        cfg = ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=10)
    else:
        cfg = ViTConfig(image_size=32, patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, num_labels=10)
    C.seed_all(0)
    with torch.device(dev):
        vit = ViTForImageClassification(cfg)
    vit = vit.to(dtype=dt).requires_grad_(False).train()
    base = list(vit.vit.embeddings.parameters())
    for p_ in base:
        p_.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    pix = torch.randn(2, 3, 32, 32, generator=g).to(dev, dt)
    labels = torch.randint(0, 10, (2,), generator=g).to(dev)
    kv = [n for n, m in vit.named_modules() if isinstance(m, torch.nn.Linear)
          and n.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "key", "value")]
    _training_steps(bench, "vit_step", case, vit,
                    lambda m: F.cross_entropy(m(pixel_values=pix).logits.float(), labels), base, kv)


def report(bench: Bench) -> str:
    info = bench.info
    s = f"# bench_host ({bench.device})\n\n" + C.md_env(info, {})
    s += ("- per call: forward + backward with fixed output gradients; launches = ATen ops that reach a kernel "
          "+ Triton launches (clora_fast._launches); host us = median of interleaved rounds of the mean per call "
          "at tiny shapes (kernels ~free: host work).\n")
    if bench.skipped:
        s += f"- not run (past the {bench.budget:.0f} s budget): {', '.join(bench.skipped)}\n"
    by = {}
    for r in bench.rows:
        by.setdefault((r["section"], r["case"]), {})[r["method"]] = r
    for (sec, case), rows in by.items():
        s += f"\n## {sec} / {case}\n\n"
        ref = rows.get("peft")
        s += C.md_table(["method", "launches", "host us", "PEFT/this (launches)", "PEFT/this (host)", "status"], [
            [m, r["launches"] if r["launches"] is not None else "n/a",
             C.fmt_num(r["host_us"]),
             C.fmt_ratio(ref["launches"] / r["launches"]) if ref and ref["launches"] and r["launches"] else "n/a",
             C.fmt_ratio(ref["host_us"] / r["host_us"]) if ref and ref["host_us"] and r["host_us"] else "n/a",
             r["status"]] for m, r in rows.items()])
    return s


def check_targets(bench: Bench, echo: bool = True) -> C.Targets:
    """Host-side proxies of the wall-time targets (INFO: the targets themselves are GPU wall times)."""
    tg = C.Targets(bench.device, info="host-side proxies of GPU wall-time targets, shown as INFO", echo=echo)
    rows = {(r["section"], r["case"], r["method"]): r for r in bench.rows}

    def get(sec, case, m, key):
        r = rows.get((sec, case, m))
        return None if r is None else r.get(key)

    for case in ("sd", "vit"):
        lo, lp, ld = (get("kv_layer", case, m, "launches") for m in ("ours", "peft", "dense"))
        ho, hp, hd = (get("kv_layer", case, m, "host_us") for m in ("ours", "peft", "dense"))
        if lo and lp and ld:
            tg.check(f"K/V layer ({case}) host cost vs PEFT and dense", lp >= 1.5 * lo,
                     f"launches ours {lo} / PEFT {lp} / dense {ld} (PEFT/ours {lp / lo:.2f}x)"
                     + (f"; host us ours {ho:.0f} / PEFT {hp:.0f} / dense {hd:.0f} (PEFT/ours {hp / ho:.2f}x)"
                        if ho and hp and hd else ""))
    for section, what in (("sd_step", "SD UNet"), ("vit_step", "ViT")):
        case = next((c for (sec, c, _) in rows if sec == section), None)
        ln, lc, lp = (get(section, case, m, "launches") for m in STEP_METHODS)
        if ln and lc and lp and REF_NOTE not in get(section, case, "clora", "status"):
            hn, hc, hp = (get(section, case, m, "host_us") for m in STEP_METHODS)
            tg.check(f"{what} training step ({case}): clora launches vs no adapters and PEFT", lc < lp,
                     f"launches none {ln} / clora {lc} / PEFT {lp} (clora/none {lc / ln:.3f}x)"
                     + (f"; wall ms none {hn / 1e3:.2f} / clora {hc / 1e3:.2f} / PEFT {hp / 1e3:.2f}"
                        if hn and hc and hp else ""))
    lg, lp = get("unet_kv_all", "sd32_k32", "grouped", "launches"), get("unet_kv_all", "sd32_k32", "peft", "launches")
    if lg and lp:
        tg.check("whole-UNet K/V: one grouped call vs 32 PEFT layers", lg < lp,
                 f"launches grouped {lg} / per-layer {get('unet_kv_all', 'sd32_k32', 'per_layer', 'launches')} / "
                 f"PEFT {lp}")
    return tg


def main(argv=None):
    return C.run_keeping_threads(_main, argv)


def _main(argv):
    p = C.base_parser(__doc__.splitlines()[1], default_budget=60.0)
    p.add_argument("--sections", default="kv_layer,unet_kv_all,penalty,sd_step,vit_step")
    args = p.parse_args(argv)
    device = C.pick_device(args)
    C.configure_threads(args, device)
    C.seed_all(0)
    bench = Bench(args, device)

    def write(echo):
        bench.out.write_md(report(bench) + check_targets(bench, echo=echo).md())

    # each section on its own (an exception is logged, the next one runs); host.md is rewritten after each
    # section, and once more at the end (also on SIGTERM), so a run cut short still leaves its tables
    try:
        for sec in args.sections.split(","):
            if bench.over_budget():
                C.print_flush(f"section {sec}: skipped (budget)")
                bench.skipped.append(sec)
                continue
            C.guarded(sec, globals()[sec] if sec in ("sd_step", "vit_step") else getattr(bench, sec),
                      *((bench,) if sec in ("sd_step", "vit_step") else ()))
            C.guarded("interim report", write, False)
            C.print_flush(f"section {sec} done [{time.perf_counter() - bench.t0:.0f} s]")
    finally:
        C.guarded("report", write, True)
        bench.out.close()
        C.print_flush(f"wrote {bench.out.jsonl} and {bench.out.md} ({time.perf_counter() - bench.t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
