#!/usr/bin/env python
"""Op-level throughput: LoRA K/V projection (fwd, fwd+bwd) and the forgetting penalty (fwd+grad).

Compared, on the same tensors:
  dense            the frozen projection alone (two F.linear for K and V): the floor
  clora[triton]    clora_fast.ops with backend="triton"   (GPU only)
  clora[cuda]      clora_fast.ops with backend="cuda"     (GPU, when the extension is built)
  fused[triton]    the same with strategy="fused": the segmented Triton kernels instead of the merged-weight
                   library GEMMs that "auto" picks on CUDA for one layer's K/V (GPU only)
  clora[reference] clora_fast.ops with backend="reference" (the ops' code path with PyTorch launchers;
                   clora_fast.reference if ops is missing)
  eager            plain PyTorch autograd of the formula with P folded (clora_fast.reference functions):
                   F.linear chain for the projection, ((P * s*B@A)**2).sum() for the penalty
  peft             peft LoRA layers injected into the same nn.Linear, A/B copied in
  naive            naive C-LoRA: W0 + s*sum_t B_t@A_t (T stored past pairs) + s*B@A materialised every
                   call, then F.linear; penalty re-sums the past every call

Sections:
  kv_layer     one attention layer's K and V (SD-1.5 attn2: 77 tokens x batch, 768 -> 320/640/1280;
               ViT-B/16: 197 tokens x batch, 768 -> 768); clora[*] / fused[*] take the factors as a
               controller holds them (one flat A and B for K and V, split outputs: the ViT integration's
               call); every method hands its gradients back as torch.autograd.grad does (x stands for
               an activation; nothing accumulates into .grad between timed calls)
  unet_kv_all  all 32 SD-1.5 cross-attention K/V projections of one UNet forward: the grouped launch
               (segmented_lora_projection) against 32 separate ones, PEFT, naive and dense
  penalty      forgetting penalty fwd+grad, single layers and grouped over all SD / ViT-B projections;
               packed[*] is the controller's call (factors as row blocks of flat buffers, flat gradients)

On a GPU the target-bearing cases also get the kernels' own time (device_ms: torch.profiler, host time
and launch gaps excluded) next to the steady-state wall time.

Run: python benchmarks/bench_ops.py [--quick|--cpu] [--out DIR] [--plot] [--gpu-budget S]
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

PROJ_METHODS = ["dense", "clora[triton]", "fused[triton]", "clora[cuda]", "clora[reference]", "eager", "peft",
                "naive"]
ALL_METHODS = ["dense", "dense_cat", "grouped[triton]", "grouped[cuda]", "grouped[reference]",
               "separate[triton]", "separate[cuda]", "separate[reference]", "peft", "naive"]
PEN_METHODS = ["clora[triton]", "clora[cuda]", "clora[reference]", "eager", "naive"]
GPEN_METHODS = ["packed[triton]", "packed[cuda]", "packed[reference]", "grouped[triton]", "grouped[cuda]",
                "grouped[reference]", "separate[triton]", "separate[cuda]", "separate[reference]", "eager", "naive"]
# methods whose GPU kernel time (torch.profiler, host excluded) is also measured on the target cases
DEVICE_TIMED = {"dense", "clora[triton]", "fused[triton]", "peft", "dense_cat", "grouped[triton]",
                "packed[triton]"}
# timed again in alternating rounds on the target-bearing K/V cases (their median is the time)
ROUND_METHODS = ("dense", "clora[triton]", "fused[triton]", "clora[cuda]", "peft")
# methods also timed as one replayed CUDA graph (host launch work removed) on the target cases
GRAPH_TIMED = {"dense", "clora[triton]", "fused[triton]", "peft", "dense_cat", "grouped[triton]"}
# on a GPU these carry no target (PyTorch launchers, plain autograd): the first pass over the target cases
# leaves them out, a second pass over the same cases times them (budget permitting)
DEFERRED = {"clora[reference]", "grouped[reference]", "separate[reference]", "packed[reference]", "eager"}


# ---------------------------------------------------------------- profiles
def profile_settings(profile: str, sd_cfg: dict) -> dict:
    sd_outs = sorted({o for _, o, _ in C.sd_kv_shapes_from_config(sd_cfg)})
    k_in = sd_cfg["cross_attention_dim"]
    if profile == "gpu":
        return dict(tokens=77, sd_outs=sd_outs, k_in=k_in, sd_batches=[1, 2, 8], vit_tokens=197, vit_dim=768,
                    vit_batches=[64, 128], vit_layers=12, ranks=[16, 4, 64], dtypes=["bf16", "fp32"],
                    modes=["fwdbwd", "fwd"], all_batches=[2, 1, 8], pen_ranks=[16, 4, 64])
    if profile == "cpu":
        return dict(tokens=77, sd_outs=sd_outs, k_in=k_in, sd_batches=[1, 2], vit_tokens=197, vit_dim=768,
                    vit_batches=[2], vit_layers=12, ranks=[16, 4], dtypes=["fp32"], modes=["fwdbwd", "fwd"],
                    all_batches=[1], pen_ranks=[16, 4])
    return dict(tokens=8, sd_outs=sd_outs, k_in=k_in, sd_batches=[1], vit_tokens=17, vit_dim=64,
                vit_batches=[2], vit_layers=2, ranks=[4], dtypes=["fp32"], modes=["fwdbwd", "fwd"],
                all_batches=[1], pen_ranks=[4])


# ------------------------------------------------------------------ helpers
def make_factors(n_out, n_in, r, T, dtype, device, gen):
    """Current trainable (A, B) and T past pairs stacked as (Ap [T*r, in], Bp [out, T*r]); P = s*Bp@Ap."""
    a = (torch.randn(r, n_in, generator=gen, device=device) / math.sqrt(n_in)).to(dtype)
    b = (torch.randn(n_out, r, generator=gen, device=device) * 0.02).to(dtype)
    ap = (torch.randn(T * r, n_in, generator=gen, device=device) / math.sqrt(n_in)).to(dtype)
    bp = (torch.randn(n_out, T * r, generator=gen, device=device) * 0.02).to(dtype)
    return a.requires_grad_(), b.requires_grad_(), ap, bp


def fold(ap, bp, s):
    return (s * (bp.float() @ ap.float())).to(ap.dtype)


def peft_module(weights, loras, r, scale, names):
    """nn.Module with one nn.Linear per name (weights copied in), peft LoRA injected, A/B copied in."""
    from peft import LoraConfig, inject_adapter_in_model

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for n, w in zip(names, weights):
                lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
                with torch.no_grad():
                    lin.weight.copy_(w)
                setattr(self, n, lin)

    m = Holder().requires_grad_(False)
    cfg = LoraConfig(r=r, lora_alpha=scale * r, lora_dropout=0.0, bias="none", target_modules=list(names))
    m = inject_adapter_in_model(cfg, m)
    params = []
    for n, (a, b) in zip(names, loras):
        layer = getattr(m, n)
        la, lb = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        with torch.no_grad():
            la.copy_(a)
            lb.copy_(b)
        la.requires_grad_(True)
        lb.requires_grad_(True)
        params += [la, lb]
    for n, p in m.named_parameters():
        if "lora_" not in n:
            p.requires_grad_(False)
    return m, params


def run_fn(outs_fn, grads, backward: bool, inputs=()):
    """``(fn, inputs)`` for the timer: fn runs the forward (autograd recording) and, for fwd+bwd, the backward
    with fixed output grads, handing the gradients of ``inputs`` back as ``torch.autograd.grad`` does: x stands
    for a model's activation, whose gradient goes on to the layer before (not copied into a leaf's ``.grad``,
    which would have to match x's layout), and the parameters' gradients are taken as a training step with
    ``zero_grad(set_to_none=True)`` takes them (no accumulation from one timed call into the next)."""
    inputs = list(inputs)
    if backward:
        def fn():
            torch.autograd.grad(list(outs_fn()), inputs, list(grads), allow_unused=True)
    else:
        def fn():
            outs_fn()
    return fn, inputs


def proj_cost(M, K, Ns, r, es, backward, lora=True):
    """Minimal FLOPs and bytes of the K/V (or any multi-output) projection problem; x read once."""
    fl = sum(2 * M * K * N + (2 * M * K * r + 2 * M * r * N if lora else 0) for N in Ns)
    by = M * K + sum(N * K + M * N + ((r * K + N * r) if lora else 0) for N in Ns)
    if backward:
        fl += sum(2 * M * N * K + ((2 * M * N * r + 2 * M * r * K + 2 * r * M * K + 2 * N * M * r) if lora else 0)
                  for N in Ns)
        by += M * K + sum(M * N + ((r * K + N * r) if lora else 0) for N in Ns)  # dy read, dx/dA/dB written
    return fl, by * es


def pen_cost(layers, r, es):
    """layers: [(out, in)]; past read once, A/B read, dA/dB written."""
    fl = sum(6 * o * i * r + 4 * o * i for o, i in layers)
    by = sum(o * i * es + 2 * (r * i + o * r) * es for o, i in layers)
    return fl, by


# -------------------------------------------------------------- the sections
class Bench:
    def __init__(self, args, device, profile):
        self.args, self.device, self.profile = args, device, profile
        self.cl = C.Clora(interpret=args.interpret)
        self.timer = C.Timer(device, args.budget, args.quick)
        self.out = C.Output(args.out, "ops", args.tag)
        self.info = C.env_info(device)
        self.peaks = C.measure_peaks(device, self.timer, args.quick)
        C.print_flush("env:", self.info)
        C.print_flush("peaks:", {k: float(f"{v:.3g}") for k, v in self.peaks.items()})
        self.sd_cfg = C.sd_config(profile)
        self.st = profile_settings(profile, self.sd_cfg)
        if args.dtypes:
            self.st["dtypes"] = args.dtypes.split(",")
        if args.ranks:
            self.st["ranks"] = self.st["pen_ranks"] = [int(r) for r in args.ranks.split(",")]
        self.gen = torch.Generator(device=device).manual_seed(0)  # inputs drawn on the device
        self.results = []  # dicts (also written as JSON lines)
        self.T = args.naive_T
        self.scale = 1.0

    def record(self, **kw):
        kw.setdefault("device", str(self.device))
        self.results.append(kw)
        self.out.row(**kw)

    def ours(self, backend):
        return self.cl.backend_status(backend, self.device)

    def device_time(self, make, t, dt, r, mode, flush=False, method=None):
        """Kernel-only GPU time (ms) of a timed method on a target-bearing case, else None."""
        if (t is None or method not in DEVICE_TIMED or dt != self.st["dtypes"][0] or r != self.st["ranks"][0]
                or mode != "fwdbwd"):
            return None
        C.print_flush(f"  device time of {method}:")
        return C.try_device_time(self.timer, make, flush=flush)

    def graph_time(self, make, t, dt, r, mode, method):
        """ms per call replayed as a CUDA graph, for a timed method on a target-bearing case, else None."""
        if (t is None or method not in GRAPH_TIMED or dt != self.st["dtypes"][0] or r != self.st["ranks"][0]
                or mode != "fwdbwd"):
            return None
        return C.try_graph_time(self.timer, make)

    # .............................................................. kv_layer
    def kv_layer_cases(self):
        st = self.st
        cases = []
        for dt in st["dtypes"]:
            for r in st["ranks"]:
                for mode in st["modes"]:
                    for b in st["vit_batches"]:
                        cases.append(("vit_b16", b * st["vit_tokens"], st["vit_dim"], st["vit_dim"], b, r, dt, mode))
                    for o in st["sd_outs"]:
                        for b in st["sd_batches"]:
                            cases.append((f"sd_attn2_out{o}", b * st["tokens"], st["k_in"], o, b, r, dt, mode))
        # targets first: bf16 (or the first dtype), rank 16 (or first), fwd+bwd
        cases.sort(key=lambda c: (c[6] != st["dtypes"][0], c[5] != st["ranks"][0], c[7] != st["modes"][0]))
        return cases

    def all_cases(self, sections):
        """Every case of the requested sections as (priority, section, name, run) in measuring order; ``run(skip=(),
        only=None)`` measures the case's methods (less ``skip``; only ``only`` when given).  Priority 0 = a
        target case (first dtype, first rank, fwd+bwd: every shape a target line judges), in this order: the
        whole-UNet launch at the first batch, the penalty over all SD projections, the 11 per-layer K/V shapes
        (ViT-B, SD cross-attention), the other UNet batches.  Then the rest, the first dtype and rank first:
        fwd+bwd before fwd, the other ranks, the other dtypes."""
        st = self.st
        dt0, r0 = st["dtypes"][0], st["ranks"][0]
        out = []
        sec_order = {"unet_kv_all": 0, "penalty": 1, "kv_layer": 2}

        def prio(sec, dt, r, mode, target=None):
            if target is not None and dt == dt0 and r == r0 and mode == "fwdbwd":
                return (0, target)
            return (1, dt != dt0, r != r0, mode == "fwd", sec_order[sec])

        if "kv_layer" in sections:
            for c in self.kv_layer_cases():
                out.append((prio("kv_layer", c[6], c[5], c[7], 2), "kv_layer", f"kv_layer/{c[0]}/b{c[4]}",
                            (lambda c=c, **kw: self._kv_case(*c, **kw))))
        if "unet_kv_all" in sections:
            for dt in st["dtypes"]:
                for r in st["ranks"]:
                    for mode in st["modes"]:
                        for batch in st["all_batches"]:
                            first = batch == st["all_batches"][0]
                            out.append((prio("unet_kv_all", dt, r, mode, 0 if first else 3), "unet_kv_all",
                                        f"unet_kv_all/b{batch}",
                                        (lambda a=(dt, r, mode, batch), **kw: self._unet_case(*a, **kw))))
        if "penalty" in sections:
            sd = [(o, i) for _, o, i in C.sd_kv_shapes_from_config(self.sd_cfg)]
            vit = [(st["vit_dim"], st["vit_dim"])] * (2 * st["vit_layers"])
            groups = [(f"sd_all{len(sd)}", sd), (f"vit_all{len(vit)}", vit)]
            singles = [(f"sd_out{o}", [(o, st["k_in"])]) for o in st["sd_outs"]] + [("vit", [vit[0]])]
            for dt in st["dtypes"]:
                for r in st["pen_ranks"]:
                    for name, layers in groups:
                        target = 1 if (name.startswith("sd_all") and r == st["pen_ranks"][0]) else None
                        out.append((prio("penalty", dt, r, "fwdbwd", target), "penalty", f"penalty/{name}",
                                    (lambda a=(name, layers, r, dt, True), **kw: self._pen_case(*a, **kw))))
                    for name, layers in singles:
                        out.append((prio("penalty", dt, r, "fwdbwd") + (1,), "penalty", f"penalty/{name}",
                                    (lambda a=(name, layers, r, dt, False), **kw: self._pen_case(*a, **kw))))
        out.sort(key=lambda t: t[0])
        return out

    @staticmethod
    def _methods(all_methods, skip=(), only=None):
        return [m for m in all_methods if m not in skip and (only is None or m in only)]

    def _kv_case(self, model, M, K, N, batch, r, dt, mode, skip=(), only=None):
        dev, s, T = self.device, self.scale, self.T
        if True:
            dtype = C.DTYPES[dt]
            bwd = mode == "fwdbwd"
            x = torch.randn(M, K, generator=self.gen, device=dev).to(dtype).requires_grad_(bwd)
            w = [(torch.randn(N, K, generator=self.gen, device=dev) / math.sqrt(K)).to(dtype) for _ in range(2)]
            fac = [make_factors(N, K, r, T, dtype, dev, self.gen) for _ in range(2)]
            # folded frozen weights W0 + P of K and V, adjacent rows of one buffer (as the controller keeps them)
            wkv = torch.cat([w[i] + fold(fac[i][2], fac[i][3], s) for i in range(2)], 0)
            wf = [wkv[:N], wkv[N:]]
            gy = [torch.randn(M, N, generator=self.gen, device=dev).to(dtype) for _ in range(2)]
            ab = [p for f in fac for p in f[:2]]
            leaves = ([x] if bwd else []) + ab
            # ours takes the factors as a controller holds them (one flat A and one flat B per group: the
            # ViT integration's project_group, the SD per-layer project_pair) with the K/V outputs split
            a_flat = torch.cat([fac[0][0].detach(), fac[1][0].detach()]).requires_grad_()
            b_flat = torch.cat([fac[0][1].detach(), fac[1][1].detach()]).requires_grad_()
            fl_l, by_l = proj_cost(M, K, [N, N], r, C.ESIZE[dt], bwd)
            fl_d, by_d = proj_cost(M, K, [N, N], r, C.ESIZE[dt], bwd, lora=False)

            def mk_dense():
                return run_fn(lambda: (F.linear(x, wf[0]), F.linear(x, wf[1])), gy, bwd, [x] if bwd else [])

            def mk_ours(backend, strategy="auto"):
                def make():
                    why = self.ours(backend)
                    if why:
                        raise RuntimeError(why)
                    if self.cl.ops is not None:
                        op = self.cl.ops.segmented_lora_projection
                        kw = {} if strategy == "auto" else {"strategy": strategy}
                        f = lambda: op(x, wkv, a_flat, b_flat, (0, N, 2 * N), s, backend=backend,  # noqa: E731
                                       split=True, **kw)
                        return run_fn(f, gy, bwd, ([x] if bwd else []) + [a_flat, b_flat])
                    ref = self.cl.reference.lora_projection
                    f = lambda: (ref(x, wf[0], fac[0][0], fac[0][1], s),  # noqa: E731
                                 ref(x, wf[1], fac[1][0], fac[1][1], s))
                    return run_fn(f, gy, bwd, leaves)
                return make

            def mk_eager():
                ref = self.cl.reference.lora_projection
                return run_fn(lambda: (ref(x, wf[0], fac[0][0], fac[0][1], s),
                                       ref(x, wf[1], fac[1][0], fac[1][1], s)), gy, bwd, leaves)

            def mk_peft():
                m, params = peft_module(w, [(fac[0][0].detach(), fac[0][1].detach()),
                                            (fac[1][0].detach(), fac[1][1].detach())], r, s, ["to_k", "to_v"])
                with torch.no_grad():  # base weights = the folded ones, same as the other methods
                    m.to_k.base_layer.weight.copy_(wf[0])
                    m.to_v.base_layer.weight.copy_(wf[1])
                return run_fn(lambda: (m.to_k(x), m.to_v(x)), gy, bwd, ([x] if bwd else []) + params)

            def mk_naive():
                def f():
                    out = []
                    for i in range(2):
                        a, b, ap, bp = fac[i]
                        wt = w[i] + s * (bp @ ap) + s * (b @ a)
                        out.append(F.linear(x, wt))
                    return out
                return run_fn(f, gy, bwd, leaves)

            makers = {"dense": mk_dense, "clora[triton]": mk_ours("triton"),
                      "fused[triton]": mk_ours("triton", "fused"), "clora[cuda]": mk_ours("cuda"),
                      "clora[reference]": mk_ours("reference"), "eager": mk_eager, "peft": mk_peft,
                      "naive": mk_naive}
            case = f"kv_layer/{model}/b{batch}/{dt}/r{r}/{mode}"
            rows = {}
            for meth in self._methods(PROJ_METHODS, skip, only):
                t, why = C.try_time(self.timer, makers[meth])
                rows[meth] = dict(time_ms=t, status=why or "ok", rounds_ms=[t],
                                  device_ms=self.device_time(makers[meth], t, dt, r, mode, method=meth),
                                  graph_ms=self.graph_time(makers[meth], t, dt, r, mode, method=meth))
            # the methods the targets compare, timed again in alternating rounds (GPU: 4 more; the median
            # decides): one 40 ms window per method moved by up to 2x on the H100's host
            if dt == self.st["dtypes"][0] and r == self.st["ranks"][0] and mode == "fwdbwd":
                timed = [m for m in ROUND_METHODS if m in rows and rows[m]["time_ms"] is not None]
                for _ in range(4 if dev.type == "cuda" else 1):
                    for meth in timed:
                        rows[meth]["rounds_ms"].append(C.try_time(self.timer, makers[meth])[0])
                for meth in timed:
                    ts = sorted(x for x in rows[meth]["rounds_ms"] if x is not None)
                    rows[meth]["time_ms"] = ts[len(ts) // 2]
            for meth, row in rows.items():
                fl, by = (fl_d, by_d) if meth == "dense" else (fl_l, by_l)
                self.record(section="kv_layer", case=case, model=model, batch=batch, M=M, K=K, N=N, rank=r,
                            dtype=dt, mode=mode, method=meth, **row, naive_T=T if meth == "naive" else None,
                            **C.roofline(fl, by, row["time_ms"], self.peaks, dt))
            C.print_flush(self.line(case) + f"  [{self.timer.elapsed():.0f} s]")
            del x, w, fac, wf, gy

    # ........................................................... unet_kv_all
    def _unet_case(self, dt, r, mode, batch, skip=(), only=None):
        dev, s, T, st = self.device, self.scale, self.T, self.st
        shapes = C.sd_kv_shapes_from_config(self.sd_cfg)
        L = len(shapes)
        K = st["k_in"]
        Ns = [o for _, o, _ in shapes]
        offs = [0]
        for n in Ns:
            offs.append(offs[-1] + n)
        dtype = C.DTYPES[dt]
        bwd = mode == "fwdbwd"
        M = batch * st["tokens"]
        N = offs[-1]
        x = torch.randn(M, K, generator=self.gen, device=dev).to(dtype).requires_grad_(bwd)
        w = [(torch.randn(n, K, generator=self.gen, device=dev) / math.sqrt(K)).to(dtype) for n in Ns]
        fac = [make_factors(n, K, r, T, dtype, dev, self.gen) for n in Ns]
        wf = [w[i] + fold(fac[i][2], fac[i][3], s) for i in range(L)]
        wcat = torch.cat(wf, 0)
        acat = torch.cat([f[0].detach() for f in fac], 0).requires_grad_()
        bcat = torch.cat([f[1].detach() for f in fac], 0).requires_grad_()
        gy = [torch.randn(M, n, generator=self.gen, device=dev).to(dtype) for n in Ns]
        gycat = torch.cat(gy, 1)
        ab = [p for f in fac for p in f[:2]]
        xs = [x] if bwd else []
        fl_l, by_l = proj_cost(M, K, Ns, r, C.ESIZE[dt], bwd)
        fl_d, by_d = proj_cost(M, K, Ns, r, C.ESIZE[dt], bwd, lora=False)
        scales = tuple([s] * L)

        def mk_dense():
            return run_fn(lambda: [F.linear(x, wi) for wi in wf], gy, bwd, xs)

        def mk_dense_cat():
            return run_fn(lambda: (F.linear(x, wcat),), (gycat,), bwd, xs)

        def mk_grouped(backend):
            def make():
                why = self.ours(backend)
                if why:
                    raise RuntimeError(why)
                if self.cl.ops is not None:
                    op = self.cl.ops.segmented_lora_projection
                    f = lambda: (op(x, wcat, acat, bcat, tuple(offs), scales, backend=backend),)  # noqa: E731
                else:
                    ref = self.cl.reference.segmented_lora_projection
                    f = lambda: (ref(x, wcat, acat, bcat, offs, scales),)  # noqa: E731
                return run_fn(f, (gycat,), bwd, xs + [acat, bcat])
            return make

        def mk_separate(backend):
            def make():
                why = self.ours(backend)
                if why:
                    raise RuntimeError(why)
                op = self.cl.ops.lora_projection
                f = lambda: [op(x, wf[i], fac[i][0], fac[i][1], scale=s, backend=backend) for i in range(L)]  # noqa
                return run_fn(f, gy, bwd, xs + ab)
            return make

        def mk_peft():
            names = [f"p{i}" for i in range(L)]
            m, params = peft_module(wf, [(f[0].detach(), f[1].detach()) for f in fac], r, s, names)
            mods = [getattr(m, n) for n in names]
            return run_fn(lambda: [mod(x) for mod in mods], gy, bwd, xs + params)

        def mk_naive():
            def f():
                return [F.linear(x, w[i] + s * (fac[i][3] @ fac[i][2]) + s * (fac[i][1] @ fac[i][0]))
                        for i in range(L)]
            return run_fn(f, gy, bwd, xs + ab)

        makers = {"dense": mk_dense, "dense_cat": mk_dense_cat,
                  "grouped[triton]": mk_grouped("triton"), "grouped[cuda]": mk_grouped("cuda"),
                  "grouped[reference]": mk_grouped("reference"),
                  "separate[triton]": mk_separate("triton"), "separate[cuda]": mk_separate("cuda"),
                  "separate[reference]": mk_separate("reference"), "peft": mk_peft, "naive": mk_naive}
        case = f"unet_kv_all/sd{L}/b{batch}/{dt}/r{r}/{mode}"
        for meth in self._methods(ALL_METHODS, skip, only):
            t, why = C.try_time(self.timer, makers[meth])
            fl, by = (fl_d, by_d) if meth.startswith("dense") else (fl_l, by_l)
            dev_ms = self.device_time(makers[meth], t, dt, r, mode, method=meth)
            g_ms = self.graph_time(makers[meth], t, dt, r, mode, method=meth)
            self.record(section="unet_kv_all", case=case, model=f"sd_all{L}", batch=batch, M=M, K=K, N=N,
                        n_layers=L, rank=r, dtype=dt, mode=mode, method=meth, time_ms=t, status=why or "ok",
                        device_ms=dev_ms, graph_ms=g_ms,
                        naive_T=T if meth == "naive" else None, **C.roofline(fl, by, t, self.peaks, dt))
        C.print_flush(self.line(case) + f"  [{self.timer.elapsed():.0f} s]")

    # ............................................................... penalty
    def _pen_case(self, name, layers, r, dt, grouped, skip=(), only=None):
        dev, s, T = self.device, self.scale, self.T
        dtype = C.DTYPES[dt]
        fac = [make_factors(o, i, r, T, dtype, dev, self.gen) for o, i in layers]
        pasts = [fold(f[2], f[3], s) for f in fac]
        As = [f[0] for f in fac]
        Bs = [f[1] for f in fac]
        leaves = As + Bs
        fl, by = pen_cost(layers, r, C.ESIZE[dt])
        L = len(layers)

        def backward_fn(loss_fn):
            def fn():
                loss_fn().backward()
            return fn

        def mk_ours(backend, group_call):
            def make():
                why = self.ours(backend)
                if why:
                    raise RuntimeError(why)
                ops = self.cl.ops
                if ops is None:  # reference module only
                    ref = self.cl.reference
                    if group_call:
                        return backward_fn(lambda: ref.grouped_forgetting_penalty(pasts, As, Bs, [s] * L)), leaves
                    return backward_fn(lambda: sum(ref.forgetting_penalty(pasts[i], As[i], Bs[i], s)
                                                   for i in range(L))), leaves
                if group_call:
                    return backward_fn(lambda: ops.grouped_forgetting_penalty(pasts, As, Bs, scales=s,
                                                                              backend=backend)), leaves

                def loss():
                    tot = ops.forgetting_penalty(pasts[0], As[0], Bs[0], scale=s, backend=backend)
                    for i in range(1, L):
                        tot = tot + ops.forgetting_penalty(pasts[i], As[i], Bs[i], scale=s, backend=backend)
                    return tot
                return backward_fn(loss), leaves
            return make

        def mk_packed(backend):
            # the controller's layout: one flat A [L*r, in] and B [sum(out), r] when all layers share `in`
            def make():
                why = self.ours(backend)
                if why:
                    raise RuntimeError(why)
                ops = self.cl.ops
                if ops is None or not hasattr(ops, "packed_forgetting_penalty"):
                    raise RuntimeError("this clora_fast has no packed_forgetting_penalty")
                if len({i for _, i in layers}) != 1:
                    raise RuntimeError("layers of different input widths")
                fa = torch.cat([a.detach() for a in As]).requires_grad_()
                fb = torch.cat([b.detach() for b in Bs]).requires_grad_()
                lay, ob = [], 0
                for l, (o, _) in enumerate(layers):
                    lay.append((0, l * r, ob, r))
                    ob += o
                return backward_fn(lambda: ops.packed_forgetting_penalty(pasts, [fa], [fb], lay, scales=s,
                                                                         backend=backend)), [fa, fb]
            return make

        def mk_eager():
            ref = self.cl.reference

            def loss():
                tot = ref.forgetting_penalty(pasts[0], As[0], Bs[0], s)
                for i in range(1, L):
                    tot = tot + ref.forgetting_penalty(pasts[i], As[i], Bs[i], s)
                return tot
            return backward_fn(loss), leaves

        def mk_naive():
            def loss():
                tot = None
                for a, b, ap, bp in fac:
                    p = s * (bp @ ap)  # the past sum, re-summed from the T stored pairs every step
                    v = (p * (s * (b @ a))).pow(2).sum()
                    tot = v if tot is None else tot + v
                return tot
            return backward_fn(loss), leaves

        if grouped:
            makers = {"packed[triton]": mk_packed("triton"), "packed[cuda]": mk_packed("cuda"),
                      "packed[reference]": mk_packed("reference"),
                      "grouped[triton]": mk_ours("triton", True), "grouped[cuda]": mk_ours("cuda", True),
                      "grouped[reference]": mk_ours("reference", True),
                      "separate[triton]": mk_ours("triton", False), "separate[cuda]": mk_ours("cuda", False),
                      "separate[reference]": mk_ours("reference", False), "eager": mk_eager, "naive": mk_naive}
            methods = GPEN_METHODS
        else:
            makers = {"clora[triton]": mk_ours("triton", False), "clora[cuda]": mk_ours("cuda", False),
                      "clora[reference]": mk_ours("reference", False), "eager": mk_eager, "naive": mk_naive}
            methods = PEN_METHODS
        case = f"penalty/{name}/{dt}/r{r}"
        for meth in self._methods(methods, skip, only):
            t, why = C.try_time(self.timer, makers[meth], flush=True)
            dev_ms = (self.device_time(makers[meth], t, dt, r, "fwdbwd", flush=True, method=meth)
                      if grouped and r == self.st["pen_ranks"][0] else None)
            self.record(section="penalty", case=case, model=name, n_layers=L, rank=r, dtype=dt, mode="fwdgrad",
                        method=meth, time_ms=t, status=why or "ok", out=layers[0][0], K=layers[0][1],
                        device_ms=dev_ms, device_gbps=(by / (dev_ms * 1e-3) / 1e9) if dev_ms else None,
                        naive_T=T if meth == "naive" else None, **C.roofline(fl, by, t, self.peaks, dt))
        C.print_flush(self.line(case) + f"  [{self.timer.elapsed():.0f} s]")

    # ................................................................ report
    def rows_of(self, case):
        return {r["method"]: r for r in self.results if r["case"] == case}

    def line(self, case):
        rows = self.rows_of(case)
        return f"{case}: " + ", ".join(f"{m}={C.fmt_ms(r['time_ms'])}" for m, r in rows.items())

    def best_ours(self, rows, prefix):
        """Fastest of the GPU backends (triton, cuda); on CPU the reference backend stands for 'ours'."""
        cands = [f"{prefix}[triton]", f"{prefix}[cuda]"]
        if not C.gpu_backends_run(self.device, self.args):
            cands = [f"{prefix}[reference]"]
        got = [(rows[m]["time_ms"], m) for m in cands if m in rows and rows[m]["time_ms"] is not None]
        return min(got) if got else (None, None)


def ratio(a, b):
    return a / b if (a is not None and b is not None and b > 0) else None


def tm(rows, method):
    """A method's time in a case's rows; None when it was not timed (or not reached: the report is also
    written from a run cut short)."""
    return (rows.get(method) or {}).get("time_ms")


def cases_in_order(results, section):
    seen = []
    for r in results:
        if r["section"] == section and r["case"] not in seen:
            seen.append(r["case"])
    return seen


def report(bench: Bench, shapes) -> str:
    dev = bench.device
    who = "best of clora[triton]/clora[cuda]" if C.gpu_backends_run(dev, bench.args) else \
        "clora[reference] (CPU: no GPU backends)"
    md = [f"# bench_ops ({bench.profile} profile)\n\n", C.md_env(bench.info, bench.peaks),
          f"- 'ours' = {who}; times are medians in ms; naive C-LoRA keeps T={bench.T} past pairs; on the "
          f"K/V cases that carry targets, {', '.join(ROUND_METHODS)} are timed in alternating rounds (GPU: 5) "
          f"and the median of the rounds is their time.\n",
          "- fwd = forward with autograd recording; fwdbwd = forward + backward (dx, dA, dB); roofline = "
          "max(FLOPs/peak GEMM, bytes/copy bandwidth) / time, with the minimal FLOPs and bytes of the problem.\n"]
    notes = {}

    def dev_cells(rows, meths, key="device_ms"):
        vals = [(rows.get(k) or {}).get(key) if k else None for k in meths]
        return " / ".join(C.fmt_ms(v) if v else "-" for v in vals) if any(vals) else "-"

    def cell(rows, m):
        r = rows.get(m)
        if r is None:
            return "-"
        if r["time_ms"] is None:
            notes.setdefault(m, set()).add(r["status"])
            return "n/a"
        return C.fmt_ms(r["time_ms"])

    # kv_layer
    hdr = ["case"] + PROJ_METHODS + ["ours/dense", "peft/ours", "naive/ours", "ours roofline", "ours TFLOP/s",
                                     "ours GB/s", "GPU kernels ms: dense / ours / fused / peft",
                                     "CUDA graph ms: dense / ours / fused / peft"]
    rows_md = []
    for case in cases_in_order(bench.results, "kv_layer"):
        rows = bench.rows_of(case)
        t, m = bench.best_ours(rows, "clora")
        rl = rows[m].get("roofline_frac") if m else None
        tf = rows[m].get("tflops") if m else None
        gb = rows[m].get("gbps") if m else None
        rows_md.append([case] + [cell(rows, k) for k in PROJ_METHODS] + [
            C.fmt_ratio(ratio(t, tm(rows, "dense"))), C.fmt_ratio(ratio(tm(rows, "peft"), t)),
            C.fmt_ratio(ratio(tm(rows, "naive"), t)),
            f"{100 * rl:.3g}%" if rl else "n/a", C.fmt_num(tf), C.fmt_num(gb),
            dev_cells(rows, ["dense", m, "fused[triton]", "peft"]),
            dev_cells(rows, ["dense", m, "fused[triton]", "peft"], "graph_ms")])
    md += ["\n## kv_layer: one attention layer's K and V projections\n\n", C.md_table(hdr, rows_md)]

    hdr = ["case"] + ALL_METHODS + ["grouped/dense", "separate/grouped", "peft/grouped", "naive/grouped",
                                    "grouped roofline", "grouped TFLOP/s", "GPU kernels ms: dense_cat / grouped",
                                    "CUDA graph ms: dense_cat / grouped / peft"]
    rows_md = []
    for case in cases_in_order(bench.results, "unet_kv_all"):
        rows = bench.rows_of(case)
        tg, mg = bench.best_ours(rows, "grouped")
        ts, _ = bench.best_ours(rows, "separate")
        rl = rows[mg].get("roofline_frac") if mg else None
        rows_md.append([case] + [cell(rows, k) for k in ALL_METHODS] + [
            C.fmt_ratio(ratio(tg, tm(rows, "dense"))), C.fmt_ratio(ratio(ts, tg)),
            C.fmt_ratio(ratio(tm(rows, "peft"), tg)), C.fmt_ratio(ratio(tm(rows, "naive"), tg)),
            f"{100 * rl:.3g}%" if rl else "n/a", C.fmt_num(rows[mg].get("tflops") if mg else None),
            dev_cells(rows, ["dense_cat", mg]), dev_cells(rows, ["dense_cat", mg, "peft"], "graph_ms")])
    md += [f"\n## unet_kv_all: all {len(shapes)} SD cross-attention K/V projections of one UNet forward\n\n",
           C.md_table(hdr, rows_md)]

    for title, meths, pref in (("grouped over all K/V projections of the model", GPEN_METHODS, "packed"),
                               ("single layer", PEN_METHODS, "clora")):
        hdr = ["case"] + meths + ["naive/ours", "eager/ours", "ours GB/s", "ours % of copy BW", "ours roofline",
                                  "GPU kernels ms / GB/s / % of copy BW"]
        rows_md = []
        for case in cases_in_order(bench.results, "penalty"):
            rows = bench.rows_of(case)
            if not any(m.startswith(f"{pref}[") for m in rows):   # the other table's case
                continue
            t, m = bench.best_ours(rows, pref)
            r = rows[m] if m else {}
            bw = r.get("gbps")
            dms, dbw = r.get("device_ms"), r.get("device_gbps")
            rows_md.append([case] + [cell(rows, k) for k in meths] + [
                C.fmt_ratio(ratio(tm(rows, "naive"), t)), C.fmt_ratio(ratio(tm(rows, "eager"), t)),
                C.fmt_num(bw), f"{100 * bw / bench.peaks['copy_gbps']:.3g}%" if bw else "n/a",
                f"{100 * r['roofline_frac']:.3g}%" if r.get("roofline_frac") else "n/a",
                f"{C.fmt_ms(dms)} / {C.fmt_num(dbw)} / {100 * dbw / bench.peaks['copy_gbps']:.3g}%" if dbw else "-"])
        md += [f"\n## penalty, {title}: forward + gradient (dA, dB)\n\n", C.md_table(hdr, rows_md)]
    if notes:
        md.append("\n### n/a reasons\n\n")
        for m, why in notes.items():
            md.append(f"- {m}: " + "; ".join(sorted(why)) + "\n")
    return "".join(md)


def check_targets(bench: Bench, echo: bool = True) -> C.Targets:
    tg = C.Targets(bench.device, echo=echo)
    st = bench.st
    dt0, r0 = st["dtypes"][0], st["ranks"][0]

    def worst(section, pred, fn):
        vals = []
        for case in cases_in_order(bench.results, section):
            rows = bench.rows_of(case)
            any_row = next(iter(rows.values()))
            if pred(any_row):
                v = fn(rows)
                if v is not None:
                    vals.append((v, case))
        return vals

    base = lambda r: r["dtype"] == dt0 and r["rank"] == r0 and r["mode"] == "fwdbwd"  # noqa: E731

    def kernels(rows, m, ref="dense", inverse=False):
        """' (GPU kernels alone a.aax; CUDA graph b.bbx)' from the profiler's device times and the graph
        replays (host launch work removed), where both sides were measured."""
        out = []
        for key, what in (("device_ms", "GPU kernels alone"), ("graph_ms", "as one CUDA graph")):
            a, b = (rows.get(m) or {}).get(key), (rows.get(ref) or {}).get(key)
            if a and b:
                out.append(f"{what} {(b / a) if inverse else (a / b):.2f}x")
        return f" ({'; '.join(out)})" if out else ""

    def vs_peft(c):
        return kernels(bench.rows_of(c), bench.best_ours(bench.rows_of(c), "clora")[1], "peft", inverse=True)

    # how many shapes each target judges: its verdict needs every one of them measured (else N/A, partial)
    n_vit = len(st["vit_batches"])
    n_sd = len(st["sd_outs"]) * len(st["sd_batches"])
    n_unet = len(st["all_batches"])

    v = worst("kv_layer", lambda r: base(r) and r["model"] == "vit_b16",
              lambda rows: ratio(bench.best_ours(rows, "clora")[0], tm(rows, "dense")))
    tg.check("ViT-B K/V fwd+bwd <= 1.10x dense", (max(v)[0] <= 1.10) if v else None,
             ", ".join(f"{c}: {x:.2f}x" + kernels(bench.rows_of(c), bench.best_ours(bench.rows_of(c), "clora")[1])
                       for x, c in v) or "no data", covered=(len(v), n_vit))
    v = worst("kv_layer", lambda r: base(r) and r["model"] == "vit_b16",
              lambda rows: ratio(tm(rows, "peft"), bench.best_ours(rows, "clora")[0]))
    tg.check("ViT-B K/V fwd+bwd >= 1.5x faster than PEFT", (min(v)[0] >= 1.5) if v else None,
             ", ".join(f"{c}: {x:.2f}x" + vs_peft(c) for x, c in v) or "no data", covered=(len(v), n_vit))
    v = worst("kv_layer", lambda r: base(r) and r["model"].startswith("sd_"),
              lambda rows: ratio(tm(rows, "peft"), bench.best_ours(rows, "clora")[0]))
    tg.check("SD cross-attn K/V per layer fwd+bwd >= 3x faster than PEFT", (min(v)[0] >= 3.0) if v else None,
             (f"worst {min(v)[0]:.2f}x ({min(v)[1]}), best {max(v)[0]:.2f}x" if v else "no data")
             + ("; " + ", ".join(c + vs_peft(c) for _, c in v) if v else ""), covered=(len(v), n_sd))
    v = worst("unet_kv_all", base,
              lambda rows: ratio(bench.best_ours(rows, "separate")[0], bench.best_ours(rows, "grouped")[0]))
    tg.check("grouped whole-UNet K/V launch faster than 32 separate", (min(v)[0] > 1.0) if v else None,
             ", ".join(f"{c}: separate/grouped {x:.2f}x" for x, c in v) or "no data", covered=(len(v), n_unet))
    pen = [c for c in cases_in_order(bench.results, "penalty")
           if c.startswith("penalty/sd_all") and f"/{dt0}/r{st['pen_ranks'][0]}" in c]
    if not pen:     # the case never started (section left out, or the run was cut short): say so
        tg.check("penalty fwd+grad over all SD projections >= 10x faster than naive", None, "no data")
        tg.check("penalty >= 70% of HBM bandwidth roofline", None, "no data")
    for case in pen:
        rows = bench.rows_of(case)
        t, m = min(bench.best_ours(rows, "packed"), bench.best_ours(rows, "grouped"),
                   key=lambda tmm: (tmm[0] is None, tmm[0] or 0.0))
        sp = ratio(tm(rows, "naive"), t)
        spr = ratio(tm(rows, "eager"), t)
        tg.check("penalty fwd+grad over all SD projections >= 10x faster than naive",
                 (sp >= 10) if sp else None,
                 f"{case}: {C.fmt_ratio(sp)} vs naive (T={bench.T}), {C.fmt_ratio(spr)} vs eager torch with P folded")
        rl = rows[m].get("roofline_frac") if m else None
        bw = rows[m].get("gbps") if m else None
        dbw = rows[m].get("device_gbps") if m else None
        frac = (bw / bench.peaks["copy_gbps"]) if bw else None
        dfrac = (dbw / bench.peaks["copy_gbps"]) if dbw else None
        # the kernels' bandwidth (profiler time, host excluded) decides when it was measured (GPU)
        use = dfrac if dfrac is not None else frac
        tg.check("penalty >= 70% of HBM bandwidth roofline", (use >= 0.70) if use else None,
                 (f"{case} [{m}]: kernels {C.fmt_num(dbw)} GB/s = {100 * dfrac:.3g}% of measured copy "
                  f"{C.fmt_num(bench.peaks['copy_gbps'])} GB/s; wall (host included) {C.fmt_num(bw)} GB/s = "
                  f"{100 * frac:.3g}%" if dfrac is not None and frac else
                  f"{case} [{m}]: {C.fmt_num(bw)} GB/s = {100 * frac:.3g}% of measured copy "
                  f"{C.fmt_num(bench.peaks['copy_gbps'])} GB/s (roofline fraction {100 * rl:.3g}%)"
                  if frac and rl else "no data"))
    return tg


def plot(bench: Bench, path):
    cases = [c for c in cases_in_order(bench.results, "kv_layer") if c.endswith("fwdbwd")]
    dt0, r0 = bench.st["dtypes"][0], bench.st["ranks"][0]
    cases = [c for c in cases if f"/{dt0}/r{r0}/" in c]
    series = {}
    for i, case in enumerate(cases):
        for m, r in bench.rows_of(case).items():
            series.setdefault(m, []).append((i, r["time_ms"]))
    return C.save_plot(path, f"K/V projection fwd+bwd, {dt0}, r={r0} ({bench.device})", series, "shape",
                       xticklabels=[c.split("/", 1)[1].rsplit("/", 3)[0] for c in cases])


def main(argv=None):
    return C.run_keeping_threads(_main, argv)


def _main(argv):
    p = C.base_parser(__doc__.splitlines()[1], default_budget=140.0)
    p.add_argument("--naive-T", type=int, default=10, help="past concepts kept by the naive C-LoRA baseline")
    p.add_argument("--sections", default="kv_layer,unet_kv_all,penalty")
    p.add_argument("--dtypes", default=None, help="comma-separated dtypes (bf16,fp32,fp16), the first one "
                   "carries the targets (default by profile: GPU bf16,fp32; CPU fp32)")
    p.add_argument("--ranks", default=None, help="comma-separated ranks, the first carries the targets "
                   "(default by profile: GPU 16,4,64)")
    args = p.parse_args(argv)
    device = C.pick_device(args)
    C.configure_threads(args, device)
    profile = C.profile_of(args, device)
    C.seed_all(0)
    bench = Bench(args, device, profile)
    sections = args.sections.split(",")
    shapes = C.sd_kv_shapes_from_config(bench.sd_cfg)
    cases = bench.all_cases(sections)
    first = [c for c in cases if c[0][0] == 0]
    # GPU: the target cases first without the target-less variants, then those variants on the same cases,
    # then every other case (all methods), in one global order, so that a budget cut drops the least important
    later = DEFERRED if device.type == "cuda" else ()
    plan = [(c, dict(skip=later)) for c in first]
    if later:
        plan += [(c, dict(only=later)) for c in first]
    plan += [(c, {}) for c in cases if c[0][0] != 0]
    n_done = 0
    try:
        for (_, sec, name, run), kw in plan:
            C.guarded(name, run, **kw)
            n_done += 1
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if n_done == len(first):    # the target cases are in: an interim report, should the run be cut
                C.guarded("interim report", _write, bench, shapes, echo=False)
    finally:
        tg = C.guarded("report", _write, bench, shapes, echo=True)
        bench.out.close()
        if args.plot:
            C.guarded("plot", plot, bench, bench.out.png)
        n_na = sum(1 for line in tg.lines if line.startswith("N/A")) if tg else "?"
        C.print_flush(f"wrote {bench.out.jsonl} and {bench.out.md} ({bench.timer.elapsed():.1f} s; "
                      f"{n_done}/{len(plan)} case passes; {n_na} target lines N/A)")
    return 0


def _write(bench: Bench, shapes, echo: bool) -> C.Targets:
    """ops.md from the rows so far: the tables, then the target lines (printed when ``echo``)."""
    tg = check_targets(bench, echo=echo)
    bench.out.write_md(report(bench, shapes) + tg.md())
    return tg


if __name__ == "__main__":
    sys.exit(main())
