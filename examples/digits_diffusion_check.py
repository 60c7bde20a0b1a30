"""Real-data learning check of C-LoRA on the diffusers side (scikit-learn digits).

What it does (CPU only, no download):

1. Data: scikit-learn's 8x8 handwritten digits (1,797 real images), as RGB in [-1, 1].
2. A "pretrained" base model, standing in for Stable Diffusion (which knows general
   imagery and some named things): the builtin tiny SD pipeline
   (clora_fast/configs/builtin) with its VAE trained as an autoencoder on all digits and
   its UNet trained on all digits with the prompt "a photo of a digit" (plus, for the
   base classes 5-9 only, "a photo of the digit five", ...; 10% empty prompts). The
   text encoder stays random and frozen. Cached in --work (safetensors) for reruns.
3. Continual customization: each concept class (0, 1, 2, 3 by default) is a concept
   learned in order with ``clora_fast.patch`` + the CLI's training step
   (``clora_fast.cli.train_concept``): new token ``<dK>``, LoRA on every attn2 K/V,
   prompt "a photo of <dK>", few-shot (--shots training images per class).
   Runs: sequential LoRA (penalty_weight 0: same fold/stack, no penalty) and C-LoRA
   with a sweep of penalty_weight over several decades.
4. Measures, per concept, right after it is learned and after the last concept:
   - acc: the fraction of generated samples that a small CNN digit classifier (trained
     here on real digits; its test accuracy is reported) assigns to the concept's class;
   - MMD^2 (unbiased, RBF kernels at 3 bandwidths) between generated samples and all
     real images of that class, on the CNN's penultimate features and on raw pixels.
   Forgetting = acc right after - acc at the end (and MMD increase).
   References: the base model with the generic prompt (no customization), and the
   real-vs-real MMD floor (two halves of the class).

Usage:
    python examples/digits_diffusion_check.py --quick          # ~minutes on 2 cores
    python examples/digits_diffusion_check.py                  # the full sweep
    python examples/digits_diffusion_check.py --out-md examples/DIGITS_RESULTS.md
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# ----------------------------------------------------------------------------- data
def load_digits_tensor(resolution: int):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0          # [N, 8, 8] in [0, 1]
    x = x[:, None]
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1)                 # RGB in [-1, 1]
    y = torch.tensor(d.target, dtype=torch.long)
    return x, y


# ----------------------------------------------------------------------------- evaluator
class DigitCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.f1 = nn.Linear(32 * 4 * 4, 64)
        self.f2 = nn.Linear(64, 10)

    def features(self, x):                     # x: [N, 3, H, W] in [-1, 1]
        x = x.mean(1, keepdim=True)
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        h = F.relu(self.c1(x))
        h = F.max_pool2d(F.relu(self.c2(h)), 2)
        return F.relu(self.f1(h.flatten(1)))

    def forward(self, x):
        return self.f2(self.features(x))


def train_classifier(x, y, seed=0, epochs=30, log=print):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(x), generator=g)
    n_tr = int(0.8 * len(x))
    tr, te = perm[:n_tr], perm[n_tr:]
    torch.manual_seed(seed)
    net = DigitCNN()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for ep in range(epochs):
        p = tr[torch.randperm(len(tr), generator=g)]
        for i in range(0, len(p), 64):
            b = p[i:i + 64]
            # light augmentation: random 1-pixel shifts at 8x8 scale and noise, so that
            # slightly imperfect generated digits are still judged by their shape
            xb = x[b] + 0.1 * torch.randn(x[b].shape, generator=g)
            loss = F.cross_entropy(net(xb), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (net(x[te]).argmax(1) == y[te]).float().mean().item()
    log(f"evaluator CNN: test accuracy {acc:.3f} on {len(te)} held-out real digits")
    for p_ in net.parameters():
        p_.requires_grad_(False)
    return net, acc


def _sqdist(a, b):
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T


def mmd2(a, b, bandwidth):
    """Unbiased MMD^2 with a sum of RBF kernels at bandwidth * {0.5, 1, 2}."""
    a, b = a.double(), b.double()
    daa, dbb, dab = _sqdist(a, a), _sqdist(b, b), _sqdist(a, b)
    m, n = len(a), len(b)
    tot = 0.0
    for s in (0.5, 1.0, 2.0):
        gamma = 1.0 / (2 * (s * bandwidth) ** 2)
        kaa, kbb, kab = torch.exp(-gamma * daa), torch.exp(-gamma * dbb), torch.exp(-gamma * dab)
        tot += ((kaa.sum() - kaa.diag().sum()) / (m * (m - 1)) + (kbb.sum() - kbb.diag().sum()) / (n * (n - 1))
                - 2 * kab.mean()).item()
    return tot


def median_bandwidth(f):
    d = _sqdist(f.double(), f.double()).clamp_min(0).sqrt()
    return float(d[d > 0].median())


class Evaluator:
    def __init__(self, x, y, cnn):
        self.cnn = cnn
        self.real = {}
        with torch.no_grad():
            feats = cnn.features(x)
        pix = x.mean(1).flatten(1)
        self.bw_feat = median_bandwidth(feats[::4])
        self.bw_pix = median_bandwidth(pix[::4])
        for c in range(10):
            self.real[c] = (feats[y == c], pix[y == c])

    def __call__(self, images, c):
        """images [N, 3, H, W] in [-1, 1] -> dict(acc, mmd_feat, mmd_pix)."""
        with torch.no_grad():
            feats = self.cnn.features(images)
            pred = self.cnn.f2(feats).argmax(1)
        x = images
        if x.shape[-1] != 8:
            x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=True)
        pix = x.mean(1).flatten(1)
        rf, rp = self.real[c]
        return {
            "acc": float((pred == c).float().mean()),
            "pred_counts": torch.bincount(pred, minlength=10).tolist(),
            "mmd_feat": mmd2(feats, rf, self.bw_feat),
            "mmd_pix": mmd2(pix, rp, self.bw_pix),
        }

    def floor(self, c, seed=0):
        """real-vs-real MMD^2 (two random halves of class c)."""
        rf, rp = self.real[c]
        g = torch.Generator().manual_seed(seed)
        p = torch.randperm(len(rf), generator=g)
        h = len(p) // 2
        return {"mmd_feat": mmd2(rf[p[:h]], rf[p[h:]], self.bw_feat),
                "mmd_pix": mmd2(rp[p[:h]], rp[p[h:]], self.bw_pix)}


# ----------------------------------------------------------------------------- base model
def _base_key(cfg) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def build_base(cfg, x, y, work: Path, log=print):
    """The builtin pipeline with a trained VAE and UNet (cached as safetensors in ``work``)."""
    from safetensors.torch import load_file, save_file

    from clora_fast.builtin import build_pipeline

    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    key = _base_key(cfg)
    f_vae, f_unet, f_te, f_meta = (work / f"base-{key}-vae.safetensors", work / f"base-{key}-unet.safetensors",
                                   work / f"base-{key}-te.safetensors", work / f"base-{key}.json")
    if f_vae.is_file() and f_unet.is_file() and f_te.is_file() and f_meta.is_file():
        pipe.vae.load_state_dict(load_file(str(f_vae)))
        pipe.unet.load_state_dict(load_file(str(f_unet)))
        pipe.text_encoder.load_state_dict(load_file(str(f_te)))
        meta = json.loads(f_meta.read_text())
        pipe.vae.register_to_config(scaling_factor=meta["scaling_factor"])
        log(f"base model loaded from cache {f_unet.name} (scaling factor {meta['scaling_factor']:.4f})")
        return pipe
    g = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    t0 = time.time()
    # -- VAE as an autoencoder (small KL)
    vae = pipe.vae
    vae.train().requires_grad_(True)
    opt = torch.optim.Adam(vae.parameters(), lr=1e-3)
    for step in range(cfg["vae_steps"]):
        b = torch.randint(0, len(x), (64,), generator=g)
        dist = vae.encode(x[b]).latent_dist
        rec = vae.decode(dist.sample(generator=g)).sample
        loss = F.mse_loss(rec, x[b]) + cfg["kl_weight"] * dist.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == cfg["vae_steps"] - 1:
            log(f"  vae step {step}: recon+kl {loss.item():.4f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        lat = vae.encode(x).latent_dist
        mean, std = lat.mean, lat.std
        scaling = float(1.0 / mean.std())
        rec = vae.decode(mean).sample
    vae.register_to_config(scaling_factor=scaling)
    log(f"VAE trained in {time.time() - t0:.0f} s: recon MSE {F.mse_loss(rec, x).item():.4f}, "
        f"latent std {mean.std().item():.3f} -> scaling factor {scaling:.3f}")

    # -- UNet + text encoder on all digits, generic prompt + named base classes
    t0 = time.time()
    tok, te = pipe.tokenizer, pipe.text_encoder
    prompts = ["a photo of a digit", ""] + [f"a photo of the digit {NAMES[c]}" for c in range(10)]
    prompt_ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                     return_tensors="pt").input_ids
    base_classes = set(cfg["base_classes"])
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    unet = pipe.unet
    unet.train().requires_grad_(True)
    te.train().requires_grad_(True)
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["unet_lr"], weight_decay=0.0)
    total = cfg["unet_steps"]
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    ema = None
    bs = cfg["unet_batch"]
    for step in range(total):
        b = torch.randint(0, len(x), (bs,), generator=g)
        z = (mean[b] + std[b] * torch.randn(mean[b].shape, generator=g)) * scaling
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, sched.config.num_train_timesteps, (bs,), generator=g)
        u = torch.rand(bs, generator=g)
        which = torch.zeros(bs, dtype=torch.long)                 # generic
        for i in range(bs):
            c = int(y[b[i]])
            if u[i] < 0.1:
                which[i] = 1                                       # empty (for guidance)
            elif c in base_classes and u[i] < 0.1 + cfg["named_frac"]:
                which[i] = 2 + c
        ctx = te(prompt_ids)[0][which]
        pred = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lr_sched.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 250 == 0 or step == total - 1:
            log(f"  unet step {step}: loss (ema) {ema:.4f}  [{time.time() - t0:.0f} s]")
    te.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    log(f"UNet pretrained in {time.time() - t0:.0f} s")
    work.mkdir(parents=True, exist_ok=True)
    for f, sd in ((f_vae, vae.state_dict()), (f_unet, unet.state_dict()), (f_te, te.state_dict())):
        tmp = f.with_name(f.name + ".tmp")
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp))
        os.replace(tmp, f)
    tmp = f_meta.with_name(f_meta.name + ".tmp")
    tmp.write_text(json.dumps({"scaling_factor": scaling, "config": cfg}, indent=1))
    os.replace(tmp, f_meta)
    return pipe


def base_state(pipe):
    return ({k: v.clone() for k, v in pipe.unet.state_dict().items()},
            {k: v.clone() for k, v in pipe.vae.state_dict().items()},
            float(pipe.vae.config.scaling_factor),
            {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()})


def fresh_pipe(state):
    from clora_fast.builtin import build_pipeline

    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.load_state_dict(state[0])
    pipe.vae.load_state_dict(state[1])
    pipe.vae.register_to_config(scaling_factor=state[2])
    pipe.text_encoder.load_state_dict(state[3])
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):
        m.eval().requires_grad_(False)
    return pipe


@torch.no_grad()
def sample_images(pipe, prompt, n, steps, seed, resolution, guidance=1.0, negative=None):
    g = torch.Generator().manual_seed(seed)
    f = pipe.vae_scale_factor
    lat = torch.randn((n, pipe.unet.config.in_channels, resolution // f, resolution // f), generator=g)
    out = pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance, latents=lat,
               negative_prompt=[negative] * n if negative is not None and guidance > 1 else None,
               height=resolution, width=resolution, output_type="pt").images
    return out * 2 - 1                                           # [N, 3, H, W] in [-1, 1]


# ----------------------------------------------------------------------------- the sweep
def run_sequence(state, penalty, cfg, x, y, ev, log=print):
    import clora_fast.cli as cli
    from clora_fast.integrations.diffusers import patch

    pipe = fresh_pipe(state)
    # the LoRA init (A) and the token embedding rows draw from the global RNG: reseed so that
    # every run starts from the same state and differs only in penalty_weight
    torch.manual_seed(cfg["seed"])
    cl = patch(pipe, rank=cfg["rank"], penalty_weight=penalty, backend="reference")
    after, final, pen_trace, p_ms = {}, {}, {}, {}
    t0 = time.time()
    for k, c in enumerate(cfg["concepts"]):
        idx = torch.nonzero(y == c).flatten()[: cfg["shots"]]
        lat_mean, lat_std = cli.encode_images(pipe, x[idx])
        token = f"<d{c}>"
        cl.begin_concept(token)
        gen = torch.Generator().manual_seed(cfg["seed"] + 100 + k)
        pens = []
        cli.train_concept(pipe, cl, lat_mean, lat_std, f"a photo of {token}", steps=cfg["concept_steps"],
                          lr=cfg["concept_lr"], batch_size=cfg["concept_batch"], generator=gen,
                          on_step=lambda s, d, p, e: pens.append(p))
        cl.end_concept()
        pen_trace[c] = max(pens) if pens else 0.0
        # size of the folded past P: the penalty acts per element as a weight decay of strength
        # 2 * penalty_weight * P^2 on M = s*B@A, so its effect scales with mean(P^2)
        p2 = [float((cl.past(i).double() ** 2).mean()) for i in range(cl.num_sites) if cl.past(i) is not None]
        w2 = [float((site.weight.detach().double() ** 2).mean()) for site in cl.sites]
        p_ms[c] = float(np.mean(p2)) if p2 else 0.0
        w_ms = float(np.mean(w2))
        ims = sample_images(pipe, f"a photo of {token}", cfg["n_eval"], cfg["sample_steps"], 7 + c + 1000 * cfg["seed"],
                            cfg["resolution"], cfg["guidance"], "a photo of a digit")
        after[c] = ev(ims, c)
        log(f"  [lambda={penalty:g}] learned {token}: acc {after[c]['acc']:.2f} mmd_feat "
            f"{after[c]['mmd_feat']:.4f}  max penalty {pen_trace[c]:.3g}  mean(P^2) {p_ms[c]:.3g} "
            f"(base weights mean(W0^2) {w_ms:.3g})  [{time.time() - t0:.0f} s]")
    grid = []
    for c in cfg["concepts"]:
        ims = sample_images(pipe, f"a photo of <d{c}>", cfg["n_eval"], cfg["sample_steps"], 7 + c + 1000 * cfg["seed"],
                            cfg["resolution"], cfg["guidance"], "a photo of a digit")
        final[c] = ev(ims, c)
        grid.append(ims[:8])
    log(f"  [lambda={penalty:g}] final accs " + " ".join(f"{final[c]['acc']:.2f}" for c in cfg["concepts"]))
    return {"after": after, "final": final, "max_penalty": pen_trace, "p_mean_sq": p_ms, "w0_mean_sq": w_ms,
            "grid": torch.cat(grid)}


def summarize(res, concepts):
    a = [res["after"][c] for c in concepts]
    f = [res["final"][c] for c in concepts]
    m = lambda xs, k: float(np.mean([v[k] for v in xs]))  # noqa: E731
    return {
        "acc_after": m(a, "acc"), "acc_final": m(f, "acc"),
        "forget_acc": float(np.mean([res["after"][c]["acc"] - res["final"][c]["acc"] for c in concepts[:-1]]))
        if len(concepts) > 1 else 0.0,
        "mmd_after": m(a, "mmd_feat"), "mmd_final": m(f, "mmd_feat"),
        "mmd_increase": float(np.mean([res["final"][c]["mmd_feat"] - res["after"][c]["mmd_feat"]
                                       for c in concepts[:-1]])) if len(concepts) > 1 else 0.0,
        "pix_after": m(a, "mmd_pix"), "pix_final": m(f, "mmd_pix"),
    }


def save_grid(blocks, path, n_rows):
    """One block per run (side by side, 2 px gap): ``n_rows`` rows (concepts) of samples."""
    from PIL import Image

    imgs = []
    for t in blocks:
        t = ((t.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()   # [N, H, W, 3]
        per = len(t) // n_rows
        rows = [np.concatenate(list(t[r * per:(r + 1) * per]), axis=1) for r in range(n_rows)]
        imgs.append(np.concatenate(rows, axis=0))
    gap = np.full((imgs[0].shape[0], 2, 3), 128, dtype=np.uint8)
    out = np.concatenate([x for im in imgs for x in (im, gap)][:-1], axis=1)
    Image.fromarray(out).resize((out.shape[1] * 3, out.shape[0] * 3), Image.NEAREST).save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description="C-LoRA real-data learning check on scikit-learn digits")
    ap.add_argument("--quick", action="store_true", help="small budget (a few minutes on 2 cores)")
    ap.add_argument("--penalties", type=float, nargs="+", default=None,
                    help="penalty_weight values (0 = sequential LoRA)")
    ap.add_argument("--concepts", type=int, nargs="+", default=None, help="digit classes learned in order")
    ap.add_argument("--concept-steps", type=int, default=None)
    ap.add_argument("--concept-lr", type=float, default=None)
    ap.add_argument("--rank", type=int, default=None)
    ap.add_argument("--unet-steps", type=int, default=None)
    ap.add_argument("--n-eval", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the concept runs (LoRA/token init, batches, samples); the base model is fixed")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (1 on busy machines)")
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "clora_digits_check"),
                    help="cache folder for the pretrained base model")
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None, help="write the results table (markdown) here")
    ap.add_argument("--grid", default=None,
                    help="PNG of final samples: one block per penalty_weight (left to right), one row per concept")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    quick = args.quick
    cfg = {
        "seed": 0, "resolution": 8,
        "vae_steps": 100 if quick else 150, "kl_weight": 1e-4,
        "unet_steps": args.unet_steps or (300 if quick else 800), "unet_batch": 32, "unet_lr": 2e-3,
        "base_classes": [5, 6, 7, 8, 9], "named_frac": 0.6, "text_encoder": "trained",
    }
    run_cfg = {
        "seed": args.seed, "resolution": 8, "rank": args.rank or 4,
        "concepts": args.concepts or ([0, 1] if quick else [0, 1, 2, 3]),
        "shots": 32, "concept_steps": args.concept_steps or 150,
        "concept_lr": args.concept_lr or 3e-3, "concept_batch": 16,
        "n_eval": args.n_eval or (32 if quick else 96), "sample_steps": 20, "guidance": 1.0,
    }
    penalties = args.penalties or ([0.0, 1e3] if quick else [0.0, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4, 1e5])
    for c in run_cfg["concepts"]:
        if not 0 <= c <= 9:
            ap.error(f"--concepts: digit classes are 0..9, got {c}")
    if any(p < 0 or not math.isfinite(p) for p in penalties):
        ap.error("--penalties must be finite numbers >= 0")

    t_start = time.time()
    torch.manual_seed(0)
    x, y = load_digits_tensor(cfg["resolution"])
    cnn, cnn_acc = train_classifier(x, y)
    ev = Evaluator(x, y, cnn)
    pipe = build_base(cfg, x, y, Path(args.work))
    state = base_state(pipe)

    # references
    refs = {}
    for c in run_cfg["concepts"]:
        ims = sample_images(pipe, "a photo of a digit", run_cfg["n_eval"], run_cfg["sample_steps"], 7 + c,
                            run_cfg["resolution"])
        refs[c] = {"base_generic": ev(ims, c), "floor": ev.floor(c)}
    with torch.no_grad():
        vae_rec = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    rec_acc = float((cnn(vae_rec).argmax(1) == y).float().mean())
    named_acc = {}
    for c in cfg["base_classes"][:2]:
        ims = sample_images(pipe, f"a photo of the digit {NAMES[c]}", run_cfg["n_eval"], run_cfg["sample_steps"],
                            11 + c, run_cfg["resolution"])
        named_acc[c] = ev(ims, c)["acc"]
    print(f"references: VAE reconstruction classified correctly {rec_acc:.3f}; base model, named prompts "
          f"(base classes): acc {named_acc}; generic prompt: acc per concept class "
          + ", ".join(f"{c}: {refs[c]['base_generic']['acc']:.2f}" for c in run_cfg["concepts"]), flush=True)

    results = {}
    grids = []
    for lam in penalties:
        t0 = time.time()
        r = run_sequence(state, lam, run_cfg, x, y, ev)
        r["wall_s"] = time.time() - t0
        results[lam] = r
        grids.append(r.pop("grid"))
    total_s = time.time() - t_start

    concepts = run_cfg["concepts"]
    summary = {lam: summarize(results[lam], concepts) for lam in penalties}
    # recommendation: best mean final accuracy; ties (within 0.01) -> lower MMD at the end
    best = max(penalties, key=lambda l: (round(summary[l]["acc_final"], 2), -summary[l]["mmd_final"]))
    lines = []
    lines.append(f"| penalty_weight | acc just after | acc at end | forgetting (acc) | MMD² feat after | "
                 f"MMD² feat end | MMD² increase | MMD² pix after | MMD² pix end | max penalty | wall s |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for lam in penalties:
        s = summary[lam]
        name = "0 (sequential LoRA)" if lam == 0 else f"{lam:g}"
        lines.append(
            f"| {name} | {s['acc_after']:.3f} | {s['acc_final']:.3f} | {s['forget_acc']:+.3f} | "
            f"{s['mmd_after']:.4f} | {s['mmd_final']:.4f} | {s['mmd_increase']:+.4f} | {s['pix_after']:.4f} | "
            f"{s['pix_final']:.4f} | {max(results[lam]['max_penalty'].values()):.3g} | {results[lam]['wall_s']:.0f} |")
    per = ["| penalty_weight | " + " | ".join(f"<d{c}> after → end (acc)" for c in concepts) + " |",
           "|---|" + "---|" * len(concepts)]
    def _top(r):
        counts = r["pred_counts"]
        k = int(np.argmax(counts))
        return f"{k} ({counts[k] / max(1, sum(counts)):.0%})"

    for lam in penalties:
        per.append(f"| {lam:g} | " + " | ".join(
            f"{results[lam]['after'][c]['acc']:.2f} → {results[lam]['final'][c]['acc']:.2f} "
            f"[top: {_top(results[lam]['after'][c])} → {_top(results[lam]['final'][c])}]" for c in concepts) + " |")
    per.append("")
    per.append("(acc = fraction of samples the CNN assigns to the concept's class; [top: most frequent "
               "predicted class right after → at the end]. mean(P²) after the first concept: "
               + ", ".join(f"λ={lam:g}: {results[lam]['p_mean_sq'][concepts[0]]:.3g}" for lam in penalties[:1])
               + f"; base weights mean(W0²) {results[penalties[0]]['w0_mean_sq']:.3g}.)")
    ref_lines = ["| class | base model, generic prompt: acc | MMD² feat | real-vs-real MMD² feat floor |",
                 "|---|---|---|---|"]
    for c in concepts:
        ref_lines.append(f"| {c} | {refs[c]['base_generic']['acc']:.2f} | {refs[c]['base_generic']['mmd_feat']:.4f} "
                         f"| {refs[c]['floor']['mmd_feat']:.4f} |")
    text = "\n".join(lines)
    print("\n" + text + "\n\n" + "\n".join(per) + "\n\n" + "\n".join(ref_lines), flush=True)
    print(f"\nrecommended penalty_weight (best mean final accuracy): {best:g}   total {total_s:.0f} s", flush=True)

    out = {"mode": "quick" if quick else "full", "base_config": cfg, "run_config": run_cfg,
           "penalties": penalties, "cnn_test_acc": cnn_acc, "vae_recon_acc": rec_acc, "named_acc": named_acc,
           "references": {str(c): refs[c] for c in concepts},
           "results": {f"{lam:g}": {"after": {str(c): v for c, v in results[lam]["after"].items()},
                                    "final": {str(c): v for c, v in results[lam]["final"].items()},
                                    "max_penalty": {str(c): v for c, v in results[lam]["max_penalty"].items()},
                                    "p_mean_sq": {str(c): v for c, v in results[lam]["p_mean_sq"].items()},
                                    "w0_mean_sq": results[lam]["w0_mean_sq"],
                                    "wall_s": results[lam]["wall_s"]} for lam in penalties},
           "summary": {f"{lam:g}": summary[lam] for lam in penalties}, "recommended": best,
           "total_s": total_s, "torch_threads": torch.get_num_threads()}
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(out, indent=1))
    if args.grid:
        save_grid(grids, args.grid, len(run_cfg["concepts"]))
    if args.out_md:
        md = [f"<!-- generated by examples/digits_diffusion_check.py ({out['mode']} mode) -->",
              "", "### Summary (mean over concepts)", "", text, "", "### Per concept", "", *per, "",
              "### References", "", *ref_lines, "",
              f"Evaluator CNN test accuracy {cnn_acc:.3f}; VAE reconstructions classified correctly {rec_acc:.3f}; "
              f"base model with named prompts (base classes): {named_acc}.",
              f"Recommended penalty_weight by mean final accuracy: **{best:g}**. Total {total_s:.0f} s.",
              f"Config: {json.dumps(run_cfg)}; base: {json.dumps(cfg)}"]
        Path(args.out_md).write_text("\n".join(md) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
