#!/usr/bin/env python
"""End-to-end training steps and inference: no adapters vs PEFT LoRA (K/V) vs clora_fast.

SD-1.5-shaped UNet built from benchmarks/configs/sd15_unet.json with random weights (64x64 latents = 512^2
images, bf16 on GPU), and ViT-B/16 (transformers, random weights, 224^2, bf16 on GPU).

Training step = forward, loss, backward, optimizer (AdamW) step:
  SD   the UNet is frozen; a trainable prompt embedding [1, 77, 768] (the personalized token's stand-in)
       is the encoder_hidden_states, so every variant back-propagates through the whole UNet.
         none   only the embedding trains (no adapters; textual-inversion-like)
         peft   + PEFT LoRA on every attn2.to_k / attn2.to_v (on a copy of the UNet: same weights)
         clora  + clora_fast.patch(unet): C-LoRA on the same projections, 2 past concepts folded, the
                forgetting penalty added to the loss
       none, clora and peft are timed in alternating rounds (5 on a GPU: each round times the three back to
       back); the SD targets take the median of the per-round ratios, which cancels the host's drift.
  ViT  frozen backbone, trainable classification head; peft / clora add LoRA on K and V of every block.
Inference: UNet forward (no grad) unpatched vs patched with the concepts merged (controller.merge()),
and with the past folded but not merged; and the whole ``pipe(prompt)`` (text encoder, denoising loop
with classifier-free guidance, VAE decode) the same three ways: on a GPU an SD-1.5-shaped pipeline
(UNet, VAE, CLIP text encoder from benchmarks/configs/sd15_*.json, random weights, 512x512, DDIM),
on a CPU the builtin tiny pipeline; the prompt names a personalized token when one exists.

Run: python benchmarks/bench_e2e.py [--quick|--cpu] [--out DIR] [--gpu-budget S] [--skip-sd] [--skip-vit]
     [--skip-pipe]
"""
from __future__ import annotations

import copy
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _common as C  # noqa: E402

TRAIN_VARIANTS = ["none", "peft", "clora", "none_repeat"]  # none_repeat: the baseline again (noise floor)
SD_TRAIN_VARIANTS = TRAIN_VARIANTS + ["clora_ungrouped"]  # + one launch per projection (patch(grouped=False))
INFER_VARIANTS = ["unpatched", "clora_merged", "clora_folded_unmerged"]
PIPE_PROMPT = "a photo of {}"


def settings(profile):
    if profile == "gpu":
        return dict(sd_cfg="sd15_unet.json", latent=64, sd_batch=2, tokens=77, vit="b16", image=224,
                    vit_batch=64, dtype="bf16", rank=16, n_past=2, infer_batch=2, pipe="sd15", pipe_res=512,
                    pipe_steps=10)
    if profile == "cpu":
        return dict(sd_cfg="sd15_unet.json", latent=8, sd_batch=1, tokens=77, vit="b16", image=224,
                    vit_batch=2, dtype="fp32", rank=16, n_past=2, infer_batch=1, pipe="builtin", pipe_res=32,
                    pipe_steps=4)
    return dict(sd_cfg="tiny_unet.json", latent=8, sd_batch=1, tokens=8, vit="tiny", image=32,
                vit_batch=2, dtype="fp32", rank=4, n_past=2, infer_batch=1, pipe="builtin", pipe_res=32,
                pipe_steps=2)


def peak_mem(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def resolved_backend(ctl, device):
    """The concrete backend behind the controller's setting ("auto" -> triton / cuda / reference)."""
    try:
        from clora_fast._validate import resolve_backend
        return resolve_backend(ctl.backend, device)
    except Exception as e:  # noqa: BLE001
        return f"{ctl.backend} (unresolved: {type(e).__name__})"


# the benchmarks fold random factors (never trained, so never with the penalty): end_concept() would say so
warnings.filterwarnings("ignore", message=r"clora_fast: concept \d+ .* was trained without the forgetting penalty")


def controller_with_past(ctl, n_past, gen_std=0.02):
    """Fold ``n_past`` concepts with random non-zero factors, then begin the trained one (B random too,
    so the LoRA path computes real numbers)."""
    for _ in range(n_past):
        ctl.begin_concept()
        with torch.no_grad():
            for b in ctl.lora_B:
                b.normal_(0, gen_std)
        ctl.end_concept()
    ctl.begin_concept()
    with torch.no_grad():
        for b in ctl.lora_B:
            b.normal_(0, gen_std)
    return ctl


def inject_peft(model, names, r):
    from peft import LoraConfig, inject_adapter_in_model
    cfg = LoraConfig(r=r, lora_alpha=r, lora_dropout=0.0, bias="none", target_modules=list(names))
    model = inject_adapter_in_model(cfg, model)
    params = []
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
            if "lora_B" in n:
                with torch.no_grad():
                    p.normal_(0, 0.02)
            params.append(p)
    return model, params


class Rounds:
    """Times of variants measured in alternating rounds (both sides of a comparison back to back in each
    round): per variant the times in round order, the first reason a round gave none, and the peak memory
    of the last timed round."""

    def __init__(self, variants):
        self.times = {v: [] for v in variants}
        self.whys, self.peaks = {}, {}

    def add(self, variant, t, why, peak) -> None:
        self.times[variant].append(t)
        self.whys.setdefault(variant, why)
        if t is not None:
            self.peaks[variant] = peak

    def fields(self, variant, why_missing=None) -> dict:
        """A result row's fields: the median time (None when no round timed it, the status then says why:
        ``why_missing`` when given, else the round's own reason), peak, sorted times and times by round."""
        ts = sorted(x for x in self.times[variant] if x is not None)
        t = ts[len(ts) // 2] if ts else None
        status = "ok" if t is not None else (f"n/a ({why_missing})" if why_missing
                                             else self.whys.get(variant) or "n/a")
        return dict(time_ms=t, status=status, peak_mib=self.peaks.get(variant), times_ms=ts,
                    rounds_ms=self.times[variant])


class E2E:
    def __init__(self, args, device, profile):
        self.args, self.device, self.profile = args, device, profile
        self.st = settings(profile)
        if args.dtype:
            self.st["dtype"] = args.dtype
        self.dtype = C.DTYPES[self.st["dtype"]]
        self.cl = C.Clora(interpret=args.interpret)
        self.timer = C.Timer(device, args.budget, args.quick)
        self.out = C.Output(args.out, "e2e", args.tag)
        self.info = C.env_info(device)
        self.rows = []
        self.peak_offset_mib = 0.0
        C.print_flush("env:", self.info)

    def record(self, **kw):
        kw.setdefault("device", str(self.device))
        kw.setdefault("dtype", self.st["dtype"])
        self.rows.append(kw)
        self.out.row(**kw)
        t = kw.get("time_ms")
        C.print_flush(f"{kw['model']}/{kw['kind']}/{kw['variant']}: "
                      + (f"{t:.2f} ms" if t else kw["status"])
                      + (f", peak {kw['peak_mib']:.0f} MiB" if kw.get("peak_mib") else ""))

    def time_step(self, step, rep_ms):
        """(ms, None) or (None, reason); the peak memory of one more step after the timing."""
        t, why = C.try_time(self.timer, lambda: (step, ()), warmup_ms=rep_ms / 4, rep_ms=rep_ms)
        peak = None
        if t is not None:
            reset_peak(self.device)
            step()
            peak = peak_mem(self.device)
            if peak is not None:        # a second model resident meanwhile (the rounds' PEFT copy) is left out
                peak -= self.peak_offset_mib
        return t, why, peak

    # ---------------------------------------------------------------- SD UNet
    def _sd_na(self, why):
        for v in SD_TRAIN_VARIANTS:
            self.record(model="sd_unet", kind="train", variant=v, time_ms=None, status=why)
        for v in INFER_VARIANTS:
            self.record(model="sd_unet", kind="infer", variant=v, time_ms=None, status=why)

    def run_sd(self):
        st, dev, dt = self.st, self.device, self.dtype
        cfg = C.load_json_config(st["sd_cfg"])
        try:
            from diffusers import UNet2DConditionModel
        except Exception as e:  # noqa: BLE001
            return self._sd_na(f"n/a (diffusers not importable: {C.describe_exc(e)})")
        C.seed_all(0)
        try:
            with torch.device(dev):
                unet = UNet2DConditionModel(**cfg)
            unet = unet.to(dtype=dt).requires_grad_(False)
        except Exception as e:  # noqa: BLE001
            return self._sd_na(f"n/a (building the UNet from {st['sd_cfg']} failed: {C.describe_exc(e)})")
        unet.train()
        B, S, cross = st["sd_batch"], st["latent"], cfg["cross_attention_dim"]
        gen = torch.Generator().manual_seed(0)
        noise = torch.randn(B, cfg["in_channels"], S, S, generator=gen).to(dev, dt)
        latents = torch.randn(B, cfg["in_channels"], S, S, generator=gen).to(dev, dt)
        noisy = (latents * 0.8 + noise * 0.6)
        tsteps = torch.randint(0, 1000, (B,), generator=gen).to(dev)
        emb = torch.nn.Parameter((torch.randn(1, st["tokens"], cross, generator=gen) * 0.5).to(dev, dt))
        kv_names = [n for n, m in unet.named_modules() if n.endswith("attn2.to_k") or n.endswith("attn2.to_v")]
        rep = 1500 if dev.type == "cuda" else (50 if self.args.quick else 3000)

        def make_step(params, extra_loss=None, model=None):
            opt = torch.optim.AdamW(params, lr=1e-4)
            m = unet if model is None else model

            def step():
                opt.zero_grad(set_to_none=True)
                pred = m(noisy, tsteps, encoder_hidden_states=emb.expand(B, -1, -1)).sample
                loss = F.mse_loss(pred.float(), noise.float())
                if extra_loss is not None:
                    loss = loss + extra_loss()
                loss.backward()
                opt.step()
            return step

        # 1 + 2 + 3. no adapters, clora_fast and PEFT, alternately (patch / unpatch each round; GPU: 5 rounds):
        # the targets compare clora with each of the other two, and a single pair of measurements drifted by
        # up to 15% on the H100. PEFT edits a model in place: it runs on its own copy of the UNet (same weights).
        rounds = 5 if dev.type == "cuda" else 1
        rep_round = rep * 3 // rounds if dev.type == "cuda" else rep     # the time of 3 rounds at `rep`
        timed = Rounds(("none", "clora", "peft"))
        backend = None
        why_patch = self.cl.has_patch()
        why_peft = step_peft = None
        try:
            unet_peft, params = inject_peft(copy.deepcopy(unet), kv_names, st["rank"])
            step_peft = make_step([emb] + params, model=unet_peft)
            # each variant's peak leaves out the other UNet's weights, resident meanwhile
            self.peak_offset_mib = sum(p.numel() * p.element_size() for p in unet.parameters()) / 2**20
        except Exception as e:  # noqa: BLE001
            why_peft, unet_peft = f"peft: {C.describe_exc(e)}", None
        for rnd in range(rounds):
            timed.add("none", *self.time_step(make_step([emb]), rep_round))
            if step_peft is not None:
                timed.add("peft", *self.time_step(step_peft, rep_round))
            if why_patch is not None:
                continue
            try:
                ctl = self.cl.pkg.patch(unet, rank=st["rank"], backend=self.args.clora_backend)
            except Exception as e:  # noqa: BLE001
                why_patch = f"clora_fast.patch(unet) failed: {C.describe_exc(e)}"
                continue
            try:
                controller_with_past(ctl, st["n_past"])
                timed.add("clora", *self.time_step(make_step([emb] + list(ctl.trainable_parameters()), ctl.penalty),
                                                 rep_round))
                backend = resolved_backend(ctl, dev)
            finally:
                self.cl.pkg.unpatch(unet)
            del ctl
        del step_peft, unet_peft
        self.peak_offset_mib = 0.0
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        for v in ("none", "clora", "peft"):
            row = timed.fields(v, {"clora": why_patch, "peft": why_peft}.get(v))
            extra = dict(backend=backend) if v == "clora" and row["time_ms"] is not None else {}
            self.record(model="sd_unet", kind="train", variant=v, batch=B, latent=S, n_kv=len(kv_names), **row,
                        **extra, **(dict(rank=st["rank"]) if v != "none" else {}))

        # inference: unpatched, patched with the past folded (not merged), merged -- in alternating rounds
        # (GPU: 3; patch / unpatch each round): a single pair of 35 ms forwards timed one after the other
        # differed by 35% on the H100 (same launches: the merged forward's ops equal the unpatched one's)
        x_inf = noisy[:1].expand(st["infer_batch"], -1, -1, -1).contiguous()
        e_inf = emb.detach().expand(st["infer_batch"], -1, -1).contiguous()

        def infer():
            with torch.no_grad():
                unet(x_inf, tsteps[:1].expand(st["infer_batch"]), encoder_hidden_states=e_inf)
        rounds = 3 if dev.type == "cuda" else 1
        rep_round = rep * 2 // (3 * rounds) if dev.type == "cuda" else rep // 2    # 3 rounds: 2x the time of one
        timed = Rounds(INFER_VARIANTS)
        for rnd in range(rounds):
            timed.add("unpatched", *self.time_step(infer, rep_round))
            if why_patch is not None:
                continue
            try:
                ctl = self.cl.pkg.patch(unet, rank=st["rank"], backend=self.args.clora_backend)
            except Exception as e:  # noqa: BLE001
                why_patch = f"clora_fast.patch(unet) failed: {C.describe_exc(e)}"
                continue
            try:
                controller_with_past(ctl, st["n_past"])
                ctl.end_concept()
                timed.add("clora_folded_unmerged", *self.time_step(infer, rep_round))
                ctl.merge()
                timed.add("clora_merged", *self.time_step(infer, rep_round))
            except Exception as e:  # noqa: BLE001
                why_patch = f"clora_fast inference failed: {C.describe_exc(e)}"
            finally:
                if ctl.merged:          # the base weights back bit for bit before the next round
                    ctl.unmerge()
                try:
                    self.cl.pkg.unpatch(unet)
                except Exception as e:  # noqa: BLE001
                    C.print_flush(f"unpatch failed ({C.describe_exc(e)}); the variants after it are skipped")
                    why_patch = why_patch or f"clora_fast.unpatch failed: {C.describe_exc(e)}"
            del ctl
        for v in INFER_VARIANTS:
            self.record(model="sd_unet", kind="infer", variant=v, batch=st["infer_batch"], latent=S,
                        **timed.fields(v, why_patch if v != "unpatched" else None))
        if why_patch is not None and why_patch.startswith("clora_fast.unpatch failed"):
            for v in ("clora_ungrouped", "none_repeat"):
                self.record(model="sd_unet", kind="train", variant=v, time_ms=None, status=f"n/a ({why_patch})")
            return

        # 2b. clora_fast with one launch per projection: what the grouped whole-UNet launch buys end to end
        why = self.cl.has_patch()
        t = pk = None
        if why is None:
            try:
                ctl = self.cl.pkg.patch(unet, rank=st["rank"], backend=self.args.clora_backend, grouped=False)
                try:
                    controller_with_past(ctl, st["n_past"])
                    t, why, pk = self.time_step(make_step([emb] + list(ctl.trainable_parameters()), ctl.penalty),
                                                rep)
                finally:
                    self.cl.pkg.unpatch(unet)
                del ctl
            except Exception as e:  # noqa: BLE001
                why = f"n/a (clora_fast.patch(unet, grouped=False): {C.describe_exc(e)})"
        else:
            why = f"n/a ({why})"
        self.record(model="sd_unet", kind="train", variant="clora_ungrouped", time_ms=t, status=why or "ok",
                    peak_mib=pk, batch=B, latent=S, n_kv=len(kv_names), rank=st["rank"])

        # 1b. the baseline again, after the clora variants: the noise floor
        t, why, pk = self.time_step(make_step([emb]), rep)
        self.record(model="sd_unet", kind="train", variant="none_repeat", time_ms=t, status=why or "ok",
                    peak_mib=pk, batch=B, latent=S, n_kv=len(kv_names))
        if self.args.compiled_sd:
            self.run_sd_compiled(unet, emb, lambda m, params, extra: make_step(params, extra, model=m), rep,
                                 dict(model="sd_unet", kind="train", batch=B, latent=S, n_kv=len(kv_names)))
        del unet
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def run_sd_compiled(self, unet, emb, make_step, rep, meta):
        """--compiled-sd: the UNet training step through torch.compile(fullgraph=True) without and with the
        adapters (grouped K/V pre-pass and penalty traced into the graph): CUDA graphs on a GPU remove the host
        time that spreads the eager rounds by +-10%."""
        self.time_compiled("none_compiled", unet, [emb], make_step, rep, meta)
        why = self.cl.has_patch()
        if why is not None:
            self.record(variant="clora_compiled", time_ms=None, status=f"n/a ({why})", **meta)
            return
        ctl = self.cl.pkg.patch(unet, rank=self.st["rank"], backend=self.args.clora_backend)
        try:
            controller_with_past(ctl, self.st["n_past"])
            self.time_compiled("clora_compiled", unet, [emb] + list(ctl.trainable_parameters()), make_step, rep,
                               dict(meta, rank=self.st["rank"]), ctl.penalty, backend=resolved_backend(ctl, self.device))
        finally:
            self.cl.pkg.unpatch(unet)

    # -------------------------------------------------------------------- ViT
    def build_vit(self):
        from transformers import ViTConfig, ViTForImageClassification
        st = self.st
        if st["vit"] == "b16":
            cfg = ViTConfig(image_size=224, patch_size=16, hidden_size=768, num_hidden_layers=12,
                            num_attention_heads=12, intermediate_size=3072, num_labels=10)
        else:
            cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=128, num_labels=10)
        C.seed_all(0)
        with torch.device(self.device):
            model = ViTForImageClassification(cfg)
        return model.to(dtype=self.dtype), cfg

    def run_vit(self):
        st, dev, dt = self.st, self.device, self.dtype
        if self.timer.over_budget():            # not even the model is built
            for v in TRAIN_VARIANTS:
                self.record(model="vit", kind="train", variant=v, time_ms=None, status="n/a (budget)")
            return
        try:
            model, cfg = self.build_vit()
        except Exception as e:  # noqa: BLE001
            for v in TRAIN_VARIANTS:
                self.record(model="vit", kind="train", variant=v, time_ms=None,
                            status=f"n/a (transformers ViT: {C.describe_exc(e)})")
            return
        B = st["vit_batch"]
        gen = torch.Generator().manual_seed(1)
        pix = torch.randn(B, 3, cfg.image_size, cfg.image_size, generator=gen).to(dev, dt)
        labels = torch.randint(0, cfg.num_labels, (B,), generator=gen).to(dev)
        kv_names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
                    and n.rsplit(".", 1)[-1] in ("k_proj", "v_proj", "key", "value")]
        rep = 1500 if dev.type == "cuda" else (50 if self.args.quick else 3000)

        def make_step(m, params, extra_loss=None):
            opt = torch.optim.AdamW(params, lr=1e-4)

            def step():
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(m(pixel_values=pix).logits.float(), labels)
                if extra_loss is not None:
                    loss = loss + extra_loss()
                loss.backward()
                opt.step()
            return step

        def head_params(m):
            m.requires_grad_(False)
            m.classifier.requires_grad_(True)
            return list(m.classifier.parameters())

        meta = dict(model="vit", kind="train", batch=B, image=cfg.image_size, n_kv=len(kv_names), rank=st["rank"])
        t, why, pk = self.time_step(make_step(model, head_params(model)), rep)
        self.record(variant="none", time_ms=t, status=why or "ok", peak_mib=pk, **meta)

        why = self.cl.has_patch()
        if why is None:
            try:
                ctl = self.cl.pkg.patch(model, rank=st["rank"], backend=self.args.clora_backend)
                controller_with_past(ctl, st["n_past"])
                t, why, pk = self.time_step(
                    make_step(model, head_params(model) + list(ctl.trainable_parameters()), ctl.penalty), rep)
                self.record(variant="clora", time_ms=t, status=why or "ok", peak_mib=pk,
                            backend=resolved_backend(ctl, dev), **meta)
                if self.args.compiled:
                    self.time_compiled("clora_compiled", model, head_params(model) + list(ctl.trainable_parameters()),
                                       make_step, rep, meta, ctl.penalty, backend=resolved_backend(ctl, dev))
                self.cl.pkg.unpatch(model)
                del ctl
            except Exception as e:  # noqa: BLE001
                self.record(variant="clora", time_ms=None, status=f"n/a (clora_fast.patch(vit): {C.describe_exc(e)})",
                            **meta)
                model, cfg = self.build_vit()  # fresh model for PEFT in case patch left it half-done
        else:
            self.record(variant="clora", time_ms=None, status=f"n/a ({why})", **meta)
        if self.args.compiled:
            self.time_compiled("none_compiled", model, head_params(model), make_step, rep, meta)
        t, why, pk = self.time_step(make_step(model, head_params(model)), rep)
        self.record(variant="none_repeat", time_ms=t, status=why or "ok", peak_mib=pk, **meta)
        try:
            hp = head_params(model)
            model, params = inject_peft(model, kv_names, st["rank"])
            t, why, pk = self.time_step(make_step(model, hp + params), rep)
        except Exception as e:  # noqa: BLE001
            t, why, pk = None, f"n/a (peft: {C.describe_exc(e)})", None
        self.record(variant="peft", time_ms=t, status=why or "ok", peak_mib=pk, **meta)
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    def time_compiled(self, variant, model, params, make_step, rep, meta, extra_loss=None, **extra):
        """Time ``variant``: the step with ``torch.compile(model, fullgraph=True)`` (inductor; mode
        "reduce-overhead", i.e. CUDA graphs, on a GPU), the compilation in the warm-up."""
        try:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            compiled = torch.compile(model, mode=mode, fullgraph=True)
            t, why, pk = self.time_step(make_step(compiled, params, extra_loss), rep)
        except Exception as e:  # noqa: BLE001
            t, why, pk = None, f"n/a (torch.compile: {C.describe_exc(e)})", None
        finally:
            torch._dynamo.reset()
        self.record(variant=variant, time_ms=t, status=why or "ok", peak_mib=pk, **extra, **meta)

    # --------------------------------------------------------- pipe() inference
    def build_pipe(self):
        """A ``StableDiffusionPipeline`` with random weights: the builtin tiny one, or (``pipe="sd15"``)
        the SD-1.5-shaped one assembled from benchmarks/configs with the builtin CLIP tokenizer, its
        modules built directly on the device."""
        st, dev, dt = self.st, self.device, self.dtype
        from clora_fast import builtin
        if st["pipe"] == "builtin":
            pipe = builtin.build_pipeline("builtin", device=dev, dtype=dt)
            for m in (pipe.unet, pipe.vae, pipe.text_encoder):
                m.requires_grad_(False)               # inference only (and no frozen-weights warning)
            return pipe
        import diffusers
        from transformers import CLIPTextConfig, CLIPTextModel
        C.seed_all(0)
        with torch.device(dev):
            unet = diffusers.UNet2DConditionModel(**C.load_json_config("sd15_unet.json"))
            vae = diffusers.AutoencoderKL(**C.load_json_config("sd15_vae.json"))
            text_encoder = CLIPTextModel(CLIPTextConfig(**C.load_json_config("sd15_text_encoder.json")))
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=builtin.clip_tokenizer(77), unet=unet,
            scheduler=diffusers.DDIMScheduler(**C.load_json_config("sd15_scheduler.json")), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        for m in (unet, vae, text_encoder):
            m.eval().requires_grad_(False)
        return pipe.to(dtype=dt)

    def run_pipe(self):
        """``pipe(prompt)`` unpatched, patched with 2 concepts folded (not merged), and merged; on a GPU in
        alternating rounds (patch / unpatch each round), the target on the per-round ratios."""
        st, dev = self.st, self.device
        meta = dict(model="sd_pipe", kind="infer", pipe=st["pipe"], resolution=st["pipe_res"], steps=st["pipe_steps"])
        if self.timer.over_budget():            # not even the pipeline is built
            for v in INFER_VARIANTS:
                self.record(variant=v, time_ms=None, status="n/a (budget)", **meta)
            return
        try:
            pipe = self.build_pipe()
        except Exception as e:  # noqa: BLE001
            for v in INFER_VARIANTS:
                self.record(variant=v, time_ms=None, status=f"n/a (building the {st['pipe']} pipeline: "
                            f"{C.describe_exc(e)})", **meta)
            return
        res = st["pipe_res"]
        lat = res // pipe.vae_scale_factor
        gen = torch.Generator().manual_seed(0)
        latents = torch.randn(1, pipe.unet.config.in_channels, lat, lat, generator=gen).to(dev, pipe.unet.dtype)

        def infer(prompt):
            def run():
                with torch.no_grad():
                    pipe(prompt, num_inference_steps=st["pipe_steps"], guidance_scale=7.5, latents=latents,
                         height=res, width=res, output_type="np")
            return run

        rounds = 2 if dev.type == "cuda" else 1
        rep = 1000 if dev.type == "cuda" else (20 if self.args.quick else 1000)
        timed = Rounds(INFER_VARIANTS)
        why_patch = self.cl.has_patch()
        for _ in range(rounds):
            timed.add("unpatched", *self.time_step(infer(PIPE_PROMPT.format("dog")), rep))
            if why_patch is not None:
                continue
            try:
                ctl = self.cl.pkg.patch(pipe, rank=st["rank"], backend=self.args.clora_backend)
            except Exception as e:  # noqa: BLE001
                why_patch = f"clora_fast.patch(pipe) failed: {C.describe_exc(e)}"
                continue
            try:
                controller_with_past(ctl, st["n_past"])
                ctl.end_concept()
                prompt = PIPE_PROMPT.format(f"<c{st['n_past'] + 1}>")      # the last concept's token
                for v in ("clora_folded_unmerged", "clora_merged"):
                    if v == "clora_merged":
                        ctl.merge()
                    timed.add(v, *self.time_step(infer(prompt), rep))
            except Exception as e:  # noqa: BLE001
                why_patch = f"clora_fast on the pipeline failed: {C.describe_exc(e)}"
            finally:
                if ctl.merged:          # the base weights back bit for bit before the next round
                    ctl.unmerge()
                self.cl.pkg.unpatch(pipe)
            del ctl
        for v in INFER_VARIANTS:
            self.record(variant=v, **timed.fields(v, why_patch if v != "unpatched" else None), **meta)
        del pipe
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------- report
    def get(self, model, kind, variant):
        for r in self.rows:
            if r["model"] == model and r["kind"] == kind and r["variant"] == variant:
                return r
        return None

    def report(self, echo: bool = True) -> str:
        st = self.st
        md = [f"# bench_e2e ({self.profile} profile)\n\n", C.md_env(self.info, {}),
              f"- SD UNet config {st['sd_cfg']}, latents {st['latent']}x{st['latent']}, batch {st['sd_batch']}, "
              f"{st['tokens']} tokens; ViT {st['vit']} {st['image']}^2 batch {st['vit_batch']}; {st['dtype']}; "
              f"rank {st['rank']}; clora with {st['n_past']} past concepts folded + penalty.\n",
              f"- sd_pipe: `pipe(prompt)` of the {st['pipe']} pipeline, {st['pipe_res']}x{st['pipe_res']}, "
              f"{st['pipe_steps']} DDIM steps, guidance 7.5 (two UNet rows per step), VAE decode included; ms per "
              "call.\n",
              "- median ms per training step (forward, loss, backward, AdamW step); peak = "
              "torch.cuda.max_memory_allocated over one step (GPU only).\n\n"]
        hdr = ["model", "kind", "variant", "ms/step", "steps/s", "vs none/unpatched", "peak MiB", "backend", "status"]
        rows = []
        for r in self.rows:
            base = self.get(r["model"], r["kind"], "none" if r["kind"] == "train" else "unpatched")
            t, tb = r.get("time_ms"), (base or {}).get("time_ms")
            rows.append([r["model"], r["kind"], r["variant"], C.fmt_ms(t), f"{1e3 / t:.2f}" if t else "n/a",
                         C.fmt_ratio(t / tb if t and tb else None),
                         f"{r['peak_mib']:.0f}" if r.get("peak_mib") else "n/a", r.get("backend", "-"), r["status"]])
        md.append(C.md_table(hdr, rows))
        tg = C.Targets(self.device, echo=echo)
        none, peft, ours = (self.get("sd_unet", "train", v) for v in ("none", "peft", "clora"))
        tn, tp, to = ((x or {}).get("time_ms") for x in (none, peft, ours))
        rounds_n, rounds_o = ((x or {}).get("rounds_ms") or [] for x in (none, ours))
        # each round times both variants back to back: the median of the per-round ratios cancels the
        # machine's slow drift, which moved whole rounds by up to +-10% on the H100
        ratio_sd, paired = C.paired_ratios(zip(rounds_n, rounds_o))
        if ratio_sd is not None:
            spread = (f"; median of {len(paired)} per-round ratios {C.fmt_ratio(ratio_sd)} (all: "
                      f"{', '.join(C.fmt_ratio(x) for x in paired)}); rounds none {', '.join(map(C.fmt_ms, rounds_n))}, "
                      f"clora {', '.join(map(C.fmt_ms, rounds_o))} ms")
        else:
            ratio_sd, spread = (to / tn if to and tn else None), ""
        tg.check("SD-1.5 training step within 3% of the no-adapter step", (ratio_sd <= 1.03) if ratio_sd else None,
                 f"clora {C.fmt_ms(to)} ms vs none {C.fmt_ms(tn)} ms ({C.fmt_ratio(to / tn if to and tn else None)})"
                 + spread)
        # the same per-round pairing against PEFT (timed in the same rounds, on its own copy of the UNet)
        rounds_p = (peft or {}).get("rounds_ms") or []
        ratio_p, paired_p = C.paired_ratios(zip(rounds_o, rounds_p))      # peft / clora per round
        if ratio_p is not None:
            spread_p = (f"; median of {len(paired_p)} per-round ratios peft/clora {C.fmt_ratio(ratio_p)} (all: "
                        f"{', '.join(C.fmt_ratio(x) for x in paired_p)}); rounds peft "
                        f"{', '.join(map(C.fmt_ms, rounds_p))} ms")
        else:
            ratio_p, spread_p = (tp / to if to and tp else None), ""
        tg.check("SD-1.5 training step faster than PEFT LoRA", (ratio_p > 1.0) if ratio_p else None,
                 f"clora {C.fmt_ms(to)} ms vs peft {C.fmt_ms(tp)} ms "
                 f"(peft/clora {C.fmt_ratio(tp / to if to and tp else None)})" + spread_p)
        tu_ = (self.get("sd_unet", "train", "clora_ungrouped") or {}).get("time_ms")
        tg.check("SD-1.5 training step: grouped K/V launch faster than per-projection launches (info)",
                 (to < tu_) if to and tu_ else None,
                 f"grouped {C.fmt_ms(to)} ms vs ungrouped {C.fmt_ms(tu_)} ms")
        for model, what, per_call in (("sd_unet", "merged inference within 3% of unpatched (zero overhead)", ""),
                                      ("sd_pipe", "pipe() with merged concepts within 3% of unpatched", " per call")):
            base, merged = (self.get(model, "infer", v) or {} for v in ("unpatched", "clora_merged"))
            tb, tmg = base.get("time_ms"), merged.get("time_ms")
            ratio, paired = C.paired_ratios(zip(base.get("rounds_ms") or [], merged.get("rounds_ms") or []))
            if ratio is None and tb and tmg:
                ratio = tmg / tb
            tg.check(what, (ratio <= 1.03) if ratio else None,
                     f"merged {C.fmt_ms(tmg)} ms vs unpatched {C.fmt_ms(tb)} ms{per_call}"
                     + (f"; per-round ratios {', '.join(C.fmt_ratio(x) for x in paired)}" if paired else ""))
        vn, vp, vo = ((self.get("vit", "train", v) or {}).get("time_ms") for v in ("none", "peft", "clora"))
        tg.check("ViT-B/16 training step: clora faster than PEFT (info)", (vo < vp) if vo and vp else None,
                 f"none {C.fmt_ms(vn)}, peft {C.fmt_ms(vp)}, clora {C.fmt_ms(vo)} ms")
        for model, name, bound, eager in (("vit", "ViT-B/16", 1.10, vo), ("sd_unet", "SD-1.5", 1.03, to)):
            compiled = [self.get(model, "train", v) for v in ("none_compiled", "clora_compiled")]
            tnc, toc = ((r or {}).get("time_ms") for r in compiled)
            if any(compiled):
                tg.check(f"{name} training step compiled (fullgraph, CUDA graphs on a GPU): clora within "
                         f"{round(100 * (bound - 1))}% of none compiled (info)",
                         (toc <= bound * tnc) if toc and tnc else None,
                         f"none {C.fmt_ms(tnc)}, clora {C.fmt_ms(toc)} ms compiled "
                         f"({C.fmt_ratio(toc / tnc if toc and tnc else None)}); eager clora {C.fmt_ms(eager)} ms")
        md.append(tg.md())
        return "".join(md)


def main(argv=None):
    return C.run_keeping_threads(_main, argv)


def _main(argv):
    p = C.base_parser(__doc__.splitlines()[1], default_budget=110.0)
    p.add_argument("--skip-sd", action="store_true")
    p.add_argument("--skip-vit", action="store_true")
    p.add_argument("--skip-pipe", action="store_true", help="no pipe() inference section")
    p.add_argument("--dtype", default=None, help="bf16 / fp32 / fp16 (default by profile: GPU bf16, CPU fp32)")
    p.add_argument("--clora-backend", default="auto", help="backend of the clora_fast controller (auto, triton, "
                   "cuda, reference)")
    p.add_argument("--compiled", action="store_true", help="also time the ViT steps with torch.compile(model, "
                   "fullgraph=True) (mode reduce-overhead: CUDA graphs, on a GPU; compilation in the warm-up, about a "
                   "minute each); variants none_compiled, clora_compiled")
    p.add_argument("--compiled-sd", action="store_true", help="also time the SD UNet training steps with "
                   "torch.compile(unet, fullgraph=True) (as --compiled; the SD-1.5 UNet's forward and backward take "
                   "minutes to compile); variants none_compiled, clora_compiled of sd_unet")
    args = p.parse_args(argv)
    device = C.pick_device(args)
    C.configure_threads(args, device)
    profile = C.profile_of(args, device)
    e = E2E(args, device, profile)
    # each section on its own (an exception is logged and the next one runs); the report is written whatever
    # happens, also on SIGTERM (gpu_check.sh's hard timeout): what was measured, the rest N/A
    try:
        for skip, name, fn in ((args.skip_sd, "sd", e.run_sd), (args.skip_vit, "vit", e.run_vit),
                               (args.skip_pipe, "pipe", e.run_pipe)):
            if not skip:
                C.guarded(name, fn)
                C.guarded("interim report", lambda: e.out.write_md(e.report(echo=False)))
                C.print_flush(f"section {name} done [{e.timer.elapsed():.0f} s]")
    finally:
        C.guarded("report", lambda: e.out.write_md(e.report()))
        e.out.close()
        if args.plot:
            def plot():
                series = {}
                labels = []
                for i, r in enumerate(e.rows):
                    labels.append(f"{r['model']}/{r['kind']}/{r['variant']}")
                    series.setdefault("ms per step", []).append((i, r.get("time_ms")))
                C.save_plot(e.out.png, f"end-to-end ({device})", series, "variant", xticklabels=labels)
            C.guarded("plot", plot)
        C.print_flush(f"wrote {e.out.jsonl} and {e.out.md} ({e.timer.elapsed():.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
