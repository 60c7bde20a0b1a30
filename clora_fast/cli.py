"""``clora-fast``: command-line training and sampling with C-LoRA.

Subcommands::

    clora-fast train --model builtin --concepts DIR [DIR ...] --out BANK [options]
                                    (--model: builtin, builtin-xl, or an SD 1.x/2.x/XL folder)
    clora-fast sample --bank BANK [--model builtin] --prompt "a photo of <digit3>" --out img.png
    clora-fast export --bank BANK [--model builtin] --out DIR [--format pipeline|lora]
    clora-fast info BANK / clora-fast remove BANK CONCEPT
    clora-fast train-vit ...        (the ViT classifier trainer, clora_fast.vit_train)

``train`` learns the concept folders one after another (continual
customization): for each folder a new token ``<name>`` (the folder's name,
lower-cased) and new LoRA factors on every cross-attention K/V projection are
trained with the standard diffusion loss (VAE encode -> add noise -> UNet
predicts the noise or v, conditioned as the pipeline's own call conditions it,
SDXL's added text/time conditioning included -> MSE) plus the C-LoRA
forgetting penalty; then the concept is folded and the bank is saved,
atomically, before the next concept starts.  A rerun with the same ``--out`` resumes: concepts already in the bank
are skipped (their factors are never retrained or rewritten) and training
restarts at the first unfinished concept, from its last checkpoint (every
``--checkpoint-every`` steps, default 100; to the same bank as an
uninterrupted run) or else its first step.  After each concept (or every ``--sample-every``-th) a
sample grid of the concepts learned so far is written to ``<out>_samples/``.

Runs under ``accelerate`` (device and mixed precision come from the
``Accelerator``): ``accelerate launch -m clora_fast.cli train ...`` works, as
does ``python -m clora_fast.cli train ...``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

#: Test / fault-injection hook: called as ``hook(concept_position, step)`` after
#: every optimizer step (concept_position counts from 0 in --concepts order).
#: A test sets it to a function that raises to simulate a crash mid-concept.
#: The environment variable CLORA_FAST_CRASH_AT="<concept_position>:<step>" does
#: the same for subprocess runs.
STEP_HOOK: Optional[Callable[[int, int], None]] = None


class CLIError(Exception):
    """A user-facing error: printed as ``clora-fast: error: ...``, exit status 2."""


class SimulatedCrash(RuntimeError):
    """Raised by the CLORA_FAST_CRASH_AT fault injection (tests only)."""


class NonFiniteLoss(RuntimeError):
    """Training diverged (a NaN/inf loss): the concept is not saved; printed as one error line by the CLI."""


_MAX_SEED = 2**32 - 1


# --------------------------------------------------------------------------- helpers


def _api():
    """(patch, load, unpatch) of the diffusers integration."""
    import clora_fast

    if all(hasattr(clora_fast, n) for n in ("patch", "load", "unpatch")):
        return clora_fast.patch, clora_fast.load, clora_fast.unpatch
    from clora_fast.integrations import diffusers as integ

    return integ.patch, integ.load, integ.unpatch


def concept_token(folder: str) -> str:
    """The personalized token of a concept folder: ``<name>``, name lower-cased."""
    name = Path(folder).name
    clean = re.sub(r"[^a-z0-9_\-]+", "_", name.lower()).strip("_")
    if not clean:
        raise CLIError(f"concept folder {folder!r}: cannot derive a token from its name {name!r}")
    return f"<{clean}>"


def list_images(folder: str) -> List[Path]:
    p = Path(folder)
    if not p.exists():
        raise CLIError(f"concept folder {folder!r} does not exist")
    if not p.is_dir():
        raise CLIError(f"concept path {folder!r} is not a folder")
    files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise CLIError(
            f"concept folder {folder!r} holds no images (looked for {', '.join(IMAGE_EXTENSIONS)})"
        )
    return files


def load_images(files: Sequence[Path], resolution: int):
    """Images -> float tensor [N, 3, res, res] in [-1, 1] (center crop, bicubic resize)."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = min(w, h)
                left, top = (w - s) // 2, (h - s) // 2
                im = im.crop((left, top, left + s, top + s)).resize((resolution, resolution), Image.BICUBIC)
                arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot read image {str(f)!r}: {e}") from None
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out)


def parse_prompts_file(path: str) -> Dict[str, str]:
    """--prompts FILE: JSON object {dirname: prompt} or lines ``dirname: prompt``.

    Every prompt must contain ``{token}`` (replaced by the concept's token).
    """
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"--prompts file {path!r} does not exist")
    text = p.read_text(encoding="utf-8")
    prompts: Dict[str, str] = {}
    stripped = text.lstrip()
    if stripped.startswith("{"):
        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            dup = sorted({k for k in keys if keys.count(k) > 1})
            if dup:     # json.loads would keep the last silently (the line format refuses duplicates too)
                raise CLIError(f"--prompts file {path!r}: {dup} given more than once")
            return dict(pairs)

        try:
            data = json.loads(text, object_pairs_hook=no_duplicates)
        except json.JSONDecodeError as e:
            raise CLIError(f"--prompts file {path!r} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise CLIError(f"--prompts file {path!r} must hold a JSON object of strings {{dirname: prompt}}")
        prompts = dict(data)
    else:
        for n, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if ":" not in line:
                raise CLIError(f"--prompts file {path!r} line {n}: expected 'dirname: prompt', got {line!r}")
            k, v = line.split(":", 1)
            k, v = k.strip(), v.strip()
            if not k or not v:
                raise CLIError(f"--prompts file {path!r} line {n}: empty dirname or prompt in {line!r}")
            if k in prompts:
                raise CLIError(f"--prompts file {path!r} line {n}: {k!r} given twice")
            prompts[k] = v
    for k, v in prompts.items():
        try:
            filled = v.format(token="\x00")
        except (KeyError, IndexError, ValueError) as e:
            raise CLIError(f"--prompts file {path!r}: bad prompt template for {k!r}: {v!r} ({e})") from None
        if "\x00" not in filled:     # also '{{token}}', an escaped brace pair that formats to a literal '{token}'
            raise CLIError(f"--prompts file {path!r}: the prompt for {k!r} does not contain '{{token}}': {v!r}")
    return prompts


def _atomic_save_image(img, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        img.save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def grid_concepts(pos: int, max_rows: int) -> List[int]:
    """The concepts (positions) a sample grid after concept ``pos`` shows: all of ``0..pos`` when they are at most
    ``max_rows`` (or ``max_rows`` is 0), else ``max_rows`` of them spread evenly from the first to the newest
    (forgetting shows on the oldest), so that a grid's cost does not grow with the number of concepts."""
    if max_rows == 0 or pos + 1 <= max_rows:
        return list(range(pos + 1))
    if max_rows == 1:
        return [pos]
    return sorted({round(i * pos / (max_rows - 1)) for i in range(max_rows)})


def make_grid(rows: Sequence[Tuple[str, Sequence]], cell: int):
    """A labelled grid: one row per (label, [PIL images])."""
    from PIL import Image, ImageDraw

    ncol = max((len(ims) for _, ims in rows), default=1)
    label_w = 8 + 6 * max((len(lbl) for lbl, _ in rows), default=0)
    grid = Image.new("RGB", (label_w + ncol * cell, max(1, len(rows)) * cell), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (label, ims) in enumerate(rows):
        draw.text((4, r * cell + max(0, cell // 2 - 6)), label, fill=(0, 0, 0))
        for c, im in enumerate(ims):
            grid.paste(im.resize((cell, cell)), (label_w + c * cell, r * cell))
    return grid


def _crash_point() -> Optional[Tuple[int, int]]:
    spec = os.environ.get("CLORA_FAST_CRASH_AT")
    if not spec:
        return None
    try:
        a, b = spec.split(":")
        return int(a), int(b)
    except ValueError:
        raise CLIError(f"CLORA_FAST_CRASH_AT must be '<concept_position>:<step>', got {spec!r}") from None


@contextlib.contextmanager
def _seeded_rngs(seed: int):
    """Seed the global RNGs (torch CPU and CUDA, numpy, random) with ``seed`` for the block and
    restore their previous states afterwards (``main()`` may run in-process: tests, notebooks).
    The library draws from the global torch RNG where no generator is passed (the LoRA ``A``
    init in ``begin_concept``, a new token's embedding row, ancestral schedulers)."""
    import random

    import numpy as np
    import torch

    py_state, np_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        _seed_all(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_all(seed: int) -> None:
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def _seed_arg(s):
    """--seed: an int in [0, 2**32 - 1] (per-concept seeds add 1000 per concept: far from torch's 2**64 limit)."""
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--seed must be an integer, got {s!r}") from None
    if not 0 <= v <= _MAX_SEED:
        raise argparse.ArgumentTypeError(f"--seed must be in 0 .. {_MAX_SEED}, got {v}")
    return v


def _int_at_least(lo: int, name: str):
    """argparse type: an int >= ``lo``."""
    def conv(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{name} must be >= {lo}, got {v}")
        return v

    return conv


def _positive(name):
    return _int_at_least(1, name)


def _float_arg(name, lo=None, *, above=False):
    """argparse type: a finite float, ``>= lo`` (``> lo`` with ``above``) when ``lo`` is given."""
    bound = "" if lo is None else f" {'>' if above else '>='} {lo:g}"

    def conv(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {s!r}") from None
        if not math.isfinite(v) or (lo is not None and (v <= lo if above else v < lo)):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number{bound}, got {s!r}")
        return v

    return conv


def _nonneg_float(name):
    return _float_arg(name, 0.0)


def _nonneg_int(name):
    return _int_at_least(0, name)


def _check_backend(backend: str, device) -> None:
    """Refuse, before the model loads, a --backend that cannot run on ``device`` (cuda without the built
    extension or a GPU, triton on the CPU without TRITON_INTERPRET=1): the library raises only at the
    first projection.  The library's own resolution decides, so the CLI and the ops agree."""
    import torch

    from clora_fast._validate import resolve_backend

    device = torch.device(device)
    try:
        resolve_backend(backend, device)
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"--backend {backend} cannot run on this machine's {device.type} device: {e}") from None


def _check_output_path(flag: str, path: Path, *, folder: bool) -> None:
    """Refuse, before any work, an output path that cannot be written: an existing file where a folder
    goes or an existing folder where a file goes (--out x.png that is a folder), or a parent that is a
    file.  Missing parent folders are fine (they are created)."""
    if path.exists():
        if folder and not path.is_dir():
            raise CLIError(f"{flag} {str(path)!r} exists and is not a folder")
        if not folder and path.is_dir():
            raise CLIError(f"{flag} {str(path)!r} is an existing folder, not a file: choose a file name")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise CLIError(f"{flag} {str(path)!r} cannot be written: {str(parent)!r} is a file, not a folder")
    target = path if path.is_dir() else parent
    if not os.access(target, os.W_OK | os.X_OK):      # read-only file system, no permission
        raise CLIError(f"{flag} {str(path)!r} cannot be written: no write permission in {str(target)!r}")


# --------------------------------------------------------------------------- generation


def generate(pipe, prompts: Sequence[str], *, steps: int, seed: int, guidance_scale: float,
             resolution: Optional[int] = None, negative_prompt: Optional[str] = None):
    """PIL images for ``prompts`` (one each), deterministic in ``seed``; ``negative_prompt`` for every one (used
    by classifier-free guidance, ``guidance_scale > 1``)."""
    import torch

    device = pipe.unet.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    kw = {}
    if resolution is not None:
        kw = dict(height=resolution, width=resolution)
    if negative_prompt is not None:
        kw["negative_prompt"] = [negative_prompt] * len(prompts)
    # latents drawn on the CPU so the images do not depend on the device's RNG
    h = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    shape = (len(prompts), pipe.unet.config.in_channels, h // pipe.vae_scale_factor, h // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=pipe.unet.dtype)
    with torch.no_grad():
        out = pipe(
            list(prompts),
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            latents=latents,
            output_type="pil",
            **kw,
        )
    return out.images


# --------------------------------------------------------------------------- training step


def encode_images(pipe, images):
    """VAE posterior (mean, std) of images in [-1, 1] (float32, on the pipeline's device)."""
    import torch

    dev = pipe.vae.device
    means, stds = [], []
    with torch.no_grad():
        for chunk in images.split(32):
            dist = pipe.vae.encode(chunk.to(device=dev, dtype=pipe.vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


def _tokenizers(pipe) -> list:
    """The pipeline's tokenizers: ``[tokenizer]``, SDXL's ``[tokenizer, tokenizer_2]``."""
    return [pipe.tokenizer] + ([pipe.tokenizer_2] if _is_xl(pipe) else [])


def _is_xl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def prompt_inputs(pipe, prompt: str) -> list:
    """``(input_ids, attention_mask)``, each ``[1, max_length]``, for each of the pipeline's tokenizers (padded
    to ``model_max_length`` and truncated, as its ``encode_prompt`` does), on the UNet's device."""
    out = []
    for tok in _tokenizers(pipe):
        enc = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt")
        out.append((enc.input_ids.to(pipe.unet.device), enc.attention_mask.to(pipe.unet.device)))
    return out


def text_condition(pipe, inputs: Sequence, size: Tuple[int, int]):
    """``(encoder_hidden_states [1, L, D], added_cond_kwargs or None)``: what the pipeline's own call feeds
    the UNet for one prompt (no classifier-free guidance) at image size ``size = (height, width)``, with
    gradients (the concept's token embedding rows train).

    ``inputs``: :func:`prompt_inputs`.  SD 1.x / 2.x: the text encoder's last hidden state (with the attention
    mask where its config sets ``use_attention_mask``, as the pipeline does).  SDXL (as
    ``StableDiffusionXLPipeline.encode_prompt`` and ``__call__`` compute it): both encoders' penultimate hidden states concatenated, the second encoder's
    pooled projection as ``text_embeds`` and ``time_ids = (height, width, 0, 0, height, width)`` (original
    size = target size, no crop).  ``tests/test_cli.py`` compares both with what ``pipe()`` passes the UNet.
    """
    import torch

    if not _is_xl(pipe):
        ids, mask = inputs[0]
        masked = getattr(pipe.text_encoder.config, "use_attention_mask", False)
        return pipe.text_encoder(ids, attention_mask=mask if masked else None)[0], None
    states, pooled = [], None
    for enc, (ids, _) in zip((pipe.text_encoder, pipe.text_encoder_2), inputs):
        out = enc(ids, output_hidden_states=True)
        pooled = out[0]                         # the last encoder's: CLIPTextModelWithProjection's text_embeds
        states.append(out.hidden_states[-2])
    cond = torch.cat(states, dim=-1).to(pipe.text_encoder_2.dtype)
    time_ids = torch.tensor([[*size, 0, 0, *size]], dtype=cond.dtype, device=cond.device)
    return cond, {"text_embeds": pooled.to(cond.dtype), "time_ids": time_ids}


def train_concept(pipe, cl, lat_mean, lat_std, prompt: str, *, steps: int, lr: float, batch_size: int,
                  generator, accelerator=None, on_step=None, noise_scheduler=None,
                  gradient_checkpointing: bool = False, checkpoint_every: int = 0, on_checkpoint=None,
                  resume: Optional[dict] = None) -> float:
    """Train the active concept of ``cl`` for ``steps`` optimizer steps; returns the final
    (EMA) diffusion loss.

    Standard latent-diffusion training: latents ~ N(lat_mean, lat_std) (VAE posterior;
    pass ``lat_std=None`` for the posterior mean) times the VAE scaling factor, noise added
    at a uniform random timestep of the training (DDPM) schedule, the UNet predicts the
    noise (or v), MSE, plus ``cl.penalty()``.  Only ``cl.trainable_parameters()`` train
    (AdamW).  All randomness comes from ``generator`` (a CPU torch.Generator).
    ``on_step(step, diffusion_loss, penalty, ema_loss)`` is called after each step.
    ``gradient_checkpointing``: the UNet's blocks recompute their activations in backward (diffusers'
    ``enable_gradient_checkpointing``; the same gradients, less memory), for these steps only; the UNet
    runs in training mode meanwhile (diffusers < 0.33 checkpoints only then; SD UNets have no dropout).
    ``on_checkpoint(steps_done, optimizer, ema_loss)`` is called after every ``checkpoint_every``-th step
    (not after the last).  ``resume``: ``{"step", "optimizer", "ema"}`` from such a checkpoint (the caller
    restored the parameters and ``generator``): training goes on at step ``step`` with the optimizer's state
    (its ``state_dict()["state"]``) and the loss EMA it had, as if it had never stopped.
    """
    import torch

    params = [p for p in cl.trainable_parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("clora_fast: the controller returned no trainable parameters "
                           "(was begin_concept() called?)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if accelerator is not None:
        optimizer = accelerator.prepare(optimizer)
    if resume is not None:
        state = optimizer.state_dict()
        state["state"] = resume["optimizer"]
        optimizer.load_state_dict(state)
    sched = noise_scheduler if noise_scheduler is not None else _training_scheduler(pipe)
    scaling = float(getattr(pipe.vae.config, "scaling_factor", None) or 1.0)
    shift = getattr(pipe.vae.config, "shift_factor", None)
    ids = prompt_inputs(pipe, prompt)
    token = getattr(cl, "active_name", None)
    for tok, (tok_ids, _) in zip(_tokenizers(pipe), ids):
        tid = tok.get_vocab().get(token) if isinstance(token, str) else None
        if tid is not None and tid not in tok_ids[0].tolist():
            raise CLIError(_prompt_cut_message(prompt, token, tok, ""))
    size = tuple(int(d) * int(pipe.vae_scale_factor) for d in lat_mean.shape[-2:])
    unet, was_training = pipe.unet, pipe.unet.training
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    try:
        return _train_steps(pipe, cl, lat_mean, lat_std, ids, size, optimizer, sched, scaling, shift, steps=steps,
                            batch_size=batch_size, generator=generator, accelerator=accelerator, on_step=on_step,
                            checkpoint_every=checkpoint_every, on_checkpoint=on_checkpoint,
                            start=0 if resume is None else int(resume["step"]),
                            ema=None if resume is None else resume["ema"])
    finally:
        if gradient_checkpointing:
            unet.disable_gradient_checkpointing()
            unet.train(was_training)


def _train_steps(pipe, cl, lat_mean, lat_std, ids, size, optimizer, sched, scaling, shift, *, steps, batch_size,
                 generator, accelerator, on_step, checkpoint_every, on_checkpoint, start, ema) -> float:
    import torch
    import torch.nn.functional as F

    device = pipe.unet.device
    n = lat_mean.shape[0]
    num_t = sched.config.num_train_timesteps
    v_pred = sched.config.prediction_type == "v_prediction"
    for step in range(start, steps):
        pick = torch.randint(0, n, (batch_size,), generator=generator)
        lat = lat_mean[pick]
        if lat_std is not None:
            lat = lat + lat_std[pick] * torch.randn(lat.shape, generator=generator).to(device)
        if shift is not None:
            lat = lat - shift
        lat = lat * scaling
        noise = torch.randn(lat.shape, generator=generator).to(device)
        t = torch.randint(0, num_t, (batch_size,), generator=generator).to(device)
        noisy = sched.add_noise(lat, noise, t)
        target = sched.get_velocity(lat, noise, t) if v_pred else noise
        ctx = accelerator.autocast() if accelerator is not None else _nullcontext()
        with ctx:
            cond, added = text_condition(pipe, ids, size)
            cond = cond.expand(batch_size, -1, -1)
            if added is not None:
                added = {k: v.expand(batch_size, -1) for k, v in added.items()}
            pred = pipe.unet(noisy.to(pipe.unet.dtype), t, encoder_hidden_states=cond,
                             **({} if added is None else {"added_cond_kwargs": added})).sample
            diff = F.mse_loss(pred.float(), target.float())
            pen = cl.penalty()
            loss = diff + pen
        values = torch.stack([diff.detach().float(), pen.detach().float(), loss.detach().float()])
        several = accelerator is not None and accelerator.num_processes > 1
        if several:         # checked before backward: a process that stops must not have joined the all-reduce
            d, p = _finite_values(step, values)
        optimizer.zero_grad(set_to_none=True)
        if accelerator is not None:
            accelerator.backward(loss)
            if several:
                # the controller's parameters are not the UNet's: average their gradients over the processes
                # (every process takes part in every all-reduce, and processes out of step are an error)
                cl.all_reduce_grads()
        else:
            loss.backward()
        if not several:
            # one read of the step's numbers, once backward is queued (the host does not wait for the forward
            # before launching the backward), and before the optimizer step: a non-finite loss changes nothing
            d, p = _finite_values(step, values)
        optimizer.step()
        ema = d if ema is None else 0.9 * ema + 0.1 * d
        if on_step is not None:
            on_step(step, d, p, ema)
        if checkpoint_every and (step + 1) % checkpoint_every == 0 and step + 1 < steps and on_checkpoint is not None:
            on_checkpoint(step + 1, optimizer, ema)
    return float(ema)


def _finite_values(step: int, values) -> Tuple[float, float]:
    """(diffusion loss, penalty) of a step, read from the device tensor ``values`` = [diffusion, penalty,
    loss]; NonFiniteLoss when the loss is not finite."""
    diff, pen, loss = values.tolist()
    if not math.isfinite(loss):
        raise NonFiniteLoss(f"clora_fast: non-finite loss at step {step} (diffusion {diff}, penalty {pen}): lower "
                            f"--lr or --penalty-weight")
    return diff, pen


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- train


def _train_parser(sub):
    p = sub.add_parser(
        "train",
        help="learn concept folders one after another into a concept bank",
        description="Learn concept folders in order with C-LoRA (resumable: rerun with the same --out).",
    )
    p.add_argument("--model", default="builtin",
                   help="'builtin', 'builtin-xl' (tiny SDXL-shaped) or a local diffusers SD / SDXL pipeline folder")
    p.add_argument("--concepts", nargs="+", required=True, metavar="DIR",
                   help="concept image folders, learned in this order; token = <folder name>")
    p.add_argument("--out", required=True, help="the concept bank to write (and resume from)")
    p.add_argument("--steps", type=_positive("--steps"), default=150, help="optimizer steps per concept")
    p.add_argument("--rank", type=_positive("--rank"), default=None,
                   help="LoRA rank (default 16; on resume: the bank's)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (scale = alpha / rank; default scale 1)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--penalty-weight", type=_nonneg_float("--penalty-weight"), default=None,
                   help="C-LoRA forgetting penalty weight (default: the library's default)")
    p.add_argument("--resolution", type=_positive("--resolution"), default=None,
                   help="training image size (default: the model's native size)")
    p.add_argument("--batch-size", type=_positive("--batch-size"), default=4)
    p.add_argument("--random-flip", action="store_true",
                   help="augmentation: each training sample is its image or the image's mirror (horizontal flip), "
                        "with probability 1/2 (both encoded once per concept)")
    p.add_argument("--seed", type=_seed_arg, default=0,
                   help="seeds everything random (each concept's LoRA/token init, batches, noise, sample grids): "
                        "the same seed and settings give the same bank (0 .. 2**32-1)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cuda"])
    p.add_argument("--prompts", default=None,
                   help="JSON {dirname: prompt} or lines 'dirname: prompt', each with {token}")
    p.add_argument("--mixed-precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--sample-steps", type=_positive("--sample-steps"), default=20,
                   help="denoising steps for the per-concept sample grids")
    p.add_argument("--samples-per-concept", type=_nonneg_int("--samples-per-concept"), default=4,
                   help="images per concept in each sample grid (0: no grids)")
    p.add_argument("--sample-every", type=_positive("--sample-every"), default=1, metavar="K",
                   help="a sample grid after every K-th concept (and after the last one)")
    p.add_argument("--grid-rows", type=_nonneg_int("--grid-rows"), default=8, metavar="N",
                   help="concepts per sample grid: every one learned so far up to N, then N spread evenly "
                        "from the first to the newest (0: every one; a grid costs one row of samples each)")
    p.add_argument("--guidance-scale", type=_float_arg("--guidance-scale"), default=1.0,
                   help="guidance scale for the sample grids")
    p.add_argument("--samples-dir", default=None, help="where sample grids go (default: <out>_samples)")
    p.add_argument("--checkpoint-every", type=_nonneg_int("--checkpoint-every"), default=100, metavar="N",
                   help="save the concept's training state every N steps (default 100; 0: only the bank, at concept "
                        "ends); a rerun goes on from the last one, to the same bank as an uninterrupted run")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet's activations in backward: the same training, less memory (for "
                        "large models and resolutions), more compute per step")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    p.add_argument("--allow-new-settings", action="store_true",
                   help="resume a bank with settings (--steps, --lr, --seed, ...) other than those its concepts were "
                        "trained with (recorded in the bank folder's clora_fast_train.json); refused otherwise")
    _threads_option(p)
    return p


def _threads_option(p) -> None:
    p.add_argument("--threads", type=_positive("--threads"), default=None,
                   help="CPU threads for torch (torch.set_num_threads); default: 1 for the builtin "
                        "model on CPU, else torch's default")


def _bank_options(p) -> None:
    p.add_argument("--bank", required=True)
    p.add_argument("--model", default="builtin", help="the model the bank was trained on")


def _read_bank_names(cl) -> List[str]:
    """Names (tokens) of the finished concepts of a controller, in learning order."""
    return [c.name for c in cl.concepts]


def _bank_state(out: Path, flag: str = "--out") -> str:
    """'new' (nothing there, an empty folder, or only the data files of a first save killed before its
    manifest: that save never finished a bank), 'bank' (a bank folder) or raise."""
    from clora_fast.bank import only_data_files

    if not out.exists():
        return "new"
    if out.is_dir():
        if (out / "manifest.json").is_file():
            return "bank"
        if only_data_files(out):
            return "new"
        raise CLIError(f"{flag} {str(out)!r} is a folder that is not empty and holds no concept bank "
                       f"(no manifest.json): choose another {flag}")
    raise CLIError(f"{flag} {str(out)!r} exists and is not a folder (a concept bank is a folder)")


def cmd_train(args) -> int:
    try:
        with _seeded_rngs(args.seed), contextlib.ExitStack() as held:
            return _cmd_train(args, held)
    finally:
        _reset_accelerate_state()


#: the lock file of a running ``train`` in its --out folder (a dot file: not part of the bank's layout)
TRAIN_LOCK = ".clora_fast_train.lock"


@contextlib.contextmanager
def _train_lock(out: Path):
    """Hold an exclusive ``flock`` of ``out/.clora_fast_train.lock`` for a whole ``train`` run, or refuse at once
    with a :class:`CLIError` when another run holds it.  Two runs on one --out each trained every remaining
    concept and saved over the other's bank (the last save won, the other run's work was lost, and a run
    starting during the other's first save was refused as 'not a concept bank').  The lock file is removed
    before the lock is released (as the bank's save lock: a run that opened it meanwhile sees that and locks
    again).  Without ``fcntl`` (Windows) or on a file system that cannot lock, runs are not serialised."""
    from .bank import LockBusy, _flock

    created = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = out / TRAIN_LOCK
        with contextlib.ExitStack() as stack:
            try:
                fd = stack.enter_context(_flock(lock, blocking=False))
            except LockBusy:
                try:
                    who = f" (process {int(lock.read_text().split()[0])})"
                except (OSError, ValueError, IndexError):
                    who = ""
                raise CLIError(f"another clora-fast train is running on --out {str(out)!r}{who}: two runs on one "
                               f"bank would each learn the remaining concepts and save over each other. Wait for it "
                               f"to finish (rerunning then resumes after its last concept) or choose another --out"
                               ) from None
            if fd is not None:
                try:
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()}\n".encode())
                except OSError:
                    pass
            yield
    finally:
        if created:              # a run that failed before writing anything leaves no empty --out behind
            try:
                out.rmdir()
            except OSError:
                pass


def _reset_accelerate_state() -> None:
    """Forget accelerate's process-wide state so that ``main()`` can run again in the same
    process with other settings (accelerate refuses to change mixed precision otherwise)."""
    try:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(True)
    except Exception:  # older/newer accelerate without this private helper: nothing to reset
        pass


def _cmd_train(args, held: Optional[contextlib.ExitStack] = None) -> int:
    import torch
    from accelerate import Accelerator

    from clora_fast.controller import DistributedGradientsWarning

    # ---- validate everything before any heavy work
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise CLIError(f"--lr must be a positive number, got {args.lr}")
    folders = [str(c) for c in args.concepts]
    files = {f: list_images(f) for f in folders}
    tokens = [concept_token(f) for f in folders]
    dup = sorted({t for t in tokens if tokens.count(t) > 1})
    if dup:
        raise CLIError(f"two --concepts folders map to the same token {dup}: rename one folder")
    prompts_cfg = parse_prompts_file(args.prompts) if args.prompts else {}
    known = {Path(f).name for f in folders}
    unknown = sorted(set(prompts_cfg) - known)
    if unknown:
        raise CLIError(f"--prompts file names folders that are not in --concepts: {unknown}")
    prompts = [
        prompts_cfg.get(Path(f).name, "a photo of {token}").format(token=tok)
        for f, tok in zip(folders, tokens)
    ]
    # absolute and normalised: '--out .' or 'x/..' name a folder too (the grids go beside it)
    out = Path(os.path.abspath(args.out))
    if not out.name:
        raise CLIError(f"--out {args.out!r} is the file system root: choose a folder for the concept bank")
    state = _bank_state(out)
    _check_output_path("--out", out, folder=True)
    samples_dir = Path(args.samples_dir) if args.samples_dir else out.with_name(out.name + "_samples")
    if args.samples_per_concept > 0:      # else never written
        _check_output_path("--samples-dir" if args.samples_dir else "--samples-dir (default <out>_samples)",
                           samples_dir, folder=True)
    crash_at = _crash_point()

    try:
        accelerator = Accelerator(mixed_precision=args.mixed_precision)
    except ValueError as e:
        raise CLIError(f"--mixed-precision {args.mixed_precision}: {e}") from None
    device = accelerator.device
    if args.mixed_precision == "fp16" and device.type == "cpu":
        # accelerate turns fp16 autocast off on the CPU without a word: the run would be plain fp32
        raise CLIError("--mixed-precision fp16 does not run on the CPU (accelerate disables fp16 autocast there, "
                       "so the run would silently be fp32): use --mixed-precision bf16 or no")
    _check_backend(args.backend, device)
    is_main = accelerator.is_main_process
    log = (lambda *a: print(*a, flush=True)) if is_main else (lambda *a: None)
    if is_main:
        # one run per --out at a time, held to the end of the run (the other processes of this run only read the
        # bank before training: a launcher stops them when this one fails); the state is read again under it
        lock = _train_lock(out)
        if held is not None:
            held.enter_context(lock)
        else:
            with lock:
                pass
        state = _bank_state(out)

    pipe = _load_model(args.model, device)
    pipe.set_progress_bar_config(disable=True)
    if pipe.text_encoder is None or pipe.tokenizer is None:
        raise CLIError(f"model {args.model!r} has no text_encoder / tokenizer (e.g. an SDXL refiner): clora-fast "
                       f"trains text-to-image pipelines that have one")
    for m in (pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if m is None:
            continue
        m.requires_grad_(False)
        m.eval()
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if resolution % pipe.vae_scale_factor:
        raise CLIError(f"--resolution {resolution} must be a multiple of the VAE factor {pipe.vae_scale_factor}")
    if args.samples_per_concept > 0 and resolution % _sample_multiple(pipe):
        raise CLIError(f"--resolution {resolution}: the sample grids need a multiple of {_sample_multiple(pipe)} "
                       f"(or pass --samples-per-concept 0)")
    if args.samples_per_concept > 0:
        _check_denoising_steps("--sample-steps", args.sample_steps, pipe, args.model)

    patch, load, _unpatch = _api()
    if state == "bank":
        try:
            cl = load(pipe, str(out), backend=args.backend)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise CLIError(f"cannot resume from the bank {args.out!r} with model {args.model!r}: {e}") from None
        if cl.active_concept is not None:
            raise CLIError(f"the bank {args.out!r} holds an unfinished concept {cl.active_name!r} "
                           f"(saved mid-training by another program); this CLI resumes only at concept "
                           f"boundaries: finish or drop it first")
        done = [c.name for c in cl.concepts if c.source is None]      # (imported concepts: not in --concepts)
        imported = [c.name for c in cl.concepts if c.source is not None]
        if done != tokens[: len(done)]:
            raise CLIError(
                f"the bank {args.out!r} holds concepts {done}, which are not the first concepts of "
                f"--concepts {tokens}: give the same folders in the same order (or a new --out)"
            )
        if args.rank is not None and cl.rank != args.rank:
            raise CLIError(f"the bank {args.out!r} was trained with --rank {cl.rank}, not {args.rank}")
        if args.alpha is not None and cl.alpha != float(args.alpha):
            raise CLIError(f"the bank {args.out!r} was trained with --alpha {cl.alpha}, not {args.alpha}")
        if args.penalty_weight is not None:
            cl.penalty_weight = float(args.penalty_weight)
        log(f"resuming from {args.out}: {len(done)} of {len(tokens)} concepts already learned {done}"
            + (f" (and imported: {imported})" if imported else ""))
    else:
        kw = dict(rank=args.rank or 16, alpha=args.alpha, backend=args.backend)
        if args.penalty_weight is not None:
            kw["penalty_weight"] = args.penalty_weight
        try:
            cl = patch(pipe, **kw)
        except ValueError as e:
            raise CLIError(str(e)) from None
        done = []

    def settings(pos):
        values = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
                  "resolution": resolution, "mixed_precision": args.mixed_precision,
                  "penalty_weight": cl.penalty_weight, "prompt": prompts[pos]}
        if args.random_flip:        # (absent when off: what banks and checkpoints from before the option hold)
            values["random_flip"] = True
        return values

    _check_new_tokens(cl, pipe, folders[len(done):], tokens[len(done):], args.out)
    for tokenizer in _tokenizers(pipe):
        _check_prompts_fit(tokenizer, folders[len(done):], tokens[len(done):], prompts[len(done):])
    _check_settings(out, tokens, done, settings, args.allow_new_settings)
    from tqdm.auto import tqdm

    def grid_path(pos):
        return samples_dir / f"after_{pos + 1:02d}_{tokens[pos].strip('<>')}.png"

    def grid_due(pos):
        return args.samples_per_concept > 0 and ((pos + 1) % args.sample_every == 0 or pos == len(folders) - 1)

    def write_grid(pos):
        # "after concept pos": one row per concept learned so far (at most --grid-rows of them, always the first
        # and the newest), each from its own prompt and seed
        rows = []
        for j in grid_concepts(pos, args.grid_rows):
            ims = generate(pipe, [prompts[j]] * args.samples_per_concept, steps=args.sample_steps,
                           seed=args.seed + j, guidance_scale=args.guidance_scale, resolution=resolution)
            rows.append((tokens[j], ims))
        _atomic_save_image(make_grid(rows, resolution), grid_path(pos))
        return grid_path(pos)

    if done and is_main and grid_due(len(done) - 1):
        # a run stopped between saving a concept and writing its grid: the model is exactly in the
        # state "after" that last saved concept now, so its grid can still be made (earlier ones cannot)
        last = len(done) - 1
        if not grid_path(last).exists():
            log(f"sample grid: {write_grid(last)} (missing from the run that learned {tokens[last]})")

    for pos in range(len(done), len(folders)):
        folder, token, prompt = folders[pos], tokens[pos], prompts[pos]
        t0 = time.time()
        seed = args.seed + 1000 * pos + accelerator.process_index
        gen = torch.Generator(device="cpu").manual_seed(seed)
        images = load_images(files[folder], resolution)
        if args.random_flip:        # drawing one of 2n uniformly = an image, then its mirror with probability 1/2
            images = torch.cat([images, images.flip(-1)])
        lat_mean, lat_std = encode_images(pipe, images)

        # the new concept's random init (LoRA A, token embedding row) comes from the global RNG:
        # seeded per concept, the same on every process, so that a resumed run starts each
        # concept exactly as an uninterrupted run with the same --seed does
        _seed_all(args.seed + 1000 * pos)
        with warnings.catch_warnings():         # "call all_reduce_grads()": train_concept does, every step
            warnings.filterwarnings("ignore", category=DistributedGradientsWarning)
            cl.begin_concept(token)
        params = [p for p in cl.trainable_parameters() if p.requires_grad]
        bank_sig = _manifest_sig(out)
        resume = None
        if pos == len(done) and (out / RESUME_FILE).is_file():
            # every process reads it (each takes its own data generator's state from it)
            resume = _read_resume(out, pos=pos, token=token, settings=settings(pos), params=params,
                                  allow_new=args.allow_new_settings, log=log,
                                  process=(accelerator.process_index, accelerator.num_processes))
        if resume is not None:
            with torch.no_grad():
                for p, t in zip(params, resume["params"]):
                    p.copy_(t)
            gen.set_state(resume["generator"])
            if resume["scaler"] and getattr(accelerator, "scaler", None) is not None:
                accelerator.scaler.load_state_dict(resume["scaler"])
            log(f"resuming {token} at step {resume['step']} of {args.steps} from its checkpoint")
        bar = tqdm(total=args.steps, initial=0 if resume is None else resume["step"],
                   desc=f"concept {pos + 1}/{len(folders)} {token}", disable=args.no_progress or not is_main,
                   leave=True)

        def on_step(step, diff, pen, ema, _pos=pos):
            bar.update(1)
            bar.set_postfix(loss=f"{ema:.4f}", penalty=f"{pen:.3g}")
            if STEP_HOOK is not None:
                STEP_HOOK(_pos, step)
            if crash_at is not None and crash_at == (_pos, step):
                raise SimulatedCrash(f"simulated crash at concept {_pos} step {step} (CLORA_FAST_CRASH_AT)")

        def on_checkpoint(steps_done, optimizer, ema, _pos=pos, _token=token, _params=params, _gen=gen,
                          _sig=bank_sig):
            # on every process: the factors and the optimizer's state are the same on all of them (averaged
            # gradients), the data generators are not: the main process writes every process's
            generators = _gather_generator_states(accelerator, _gen)
            if is_main:
                _write_resume(out, pos=_pos, token=_token, steps_done=steps_done, ema=ema, params=_params,
                              optimizer=optimizer, generators=generators, settings=settings(_pos), bank=_sig,
                              scaler=getattr(accelerator, "scaler", None))

        try:
            ema = train_concept(
                pipe, cl, lat_mean, lat_std, prompt, steps=args.steps, lr=args.lr,
                batch_size=args.batch_size, generator=gen, accelerator=accelerator, on_step=on_step,
                gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
                on_checkpoint=on_checkpoint, resume=resume,
            )
        finally:
            bar.close()
        cl.end_concept()
        accelerator.wait_for_everyone()
        if is_main:
            cl.save(str(out))
            _record_settings(out, token, settings(pos))     # (a crash in between: that concept is not checked)
            (out / RESUME_FILE).unlink(missing_ok=True)
        accelerator.wait_for_everyone()
        log(f"learned {token} from {folder} ({len(files[folder])} images, {args.steps} steps, "
            f"final loss {ema:.4f}, {time.time() - t0:.1f} s); bank saved to {out}")

        if is_main and grid_due(pos):
            log(f"sample grid: {write_grid(pos)}")
    if len(done) == len(folders):
        log(f"all {len(folders)} concepts are already in {out}: nothing to train")
    return 0


def _check_new_tokens(cl, pipe, folders, tokens, out_arg) -> None:
    """Every concept still to learn gets a token that is new to the pipeline's tokenizer(s) and was not used by a
    concept removed from the bank (begin_concept would refuse it, after the earlier concepts had trained)."""
    retired = {r["name"]: r["idx"] for r in cl.retired_concepts}
    held = {c.name: c for c in cl.concepts}
    for folder, token in zip(folders, tokens):
        if token in held:       # (an imported concept: the learned ones are the first --concepts)
            c = held[token]
            src = f" (imported from {c.source})" if c.source else ""
            raise CLIError(f"concept folder {folder!r}: the token {token!r} is the name of concept {c.idx} of the bank "
                           f"{out_arg!r}{src}: rename the folder")
        if token in retired:
            raise CLIError(f"concept folder {folder!r}: the token {token!r} belonged to concept {retired[token]}, which "
                           f"was removed from the bank {out_arg!r} (a removed concept's token is retired for good): "
                           f"rename the folder or use a new --out")
        for attr in ("tokenizer", "tokenizer_2"):
            tok = getattr(pipe, attr, None)
            if tok is not None and token in tok.get_vocab():
                raise CLIError(f"concept folder {folder!r}: the token {token!r} already exists in the model's {attr} "
                               f"(e.g. a pipeline saved with its concepts baked in): rename the folder")


# --------------------------------------------------------------------------- mid-concept checkpoints

#: A concept's training state at its last checkpoint (--checkpoint-every): the trainable tensors, the optimizer's
#: state (the same on every process), each process's data/noise generator, the step and the loss EMA.  A dot file in the bank folder (a first concept's
#: checkpoint precedes the bank's first save, which accepts only data files and dot files in its folder); written
#: atomically, removed once the concept is saved in the bank.  The bank itself changes only at concept ends.
RESUME_FILE = ".clora_fast_resume.safetensors"
_RESUME_FORMAT = "clora_fast.train_resume"


def _manifest_sig(out: Path) -> str:
    """Which bank a checkpoint was made on top of: the sha256 of its manifest ('' before the first save)."""
    import hashlib

    try:
        return hashlib.sha256((out / "manifest.json").read_bytes()).hexdigest()
    except FileNotFoundError:
        return ""


def _gather_generator_states(accelerator, generator) -> list:
    """Every process's data generator state (a collective: call it on every process)."""
    state = generator.get_state()
    if accelerator is None or accelerator.num_processes == 1:
        return [state]
    every = accelerator.gather(state.to(accelerator.device)).cpu()
    return list(every.view(accelerator.num_processes, -1))


def _write_resume(out: Path, *, pos: int, token: str, steps_done: int, ema: float, params, optimizer, generators,
                  settings: Dict[str, object], bank: str, scaler=None) -> None:
    import torch
    from safetensors.torch import save
    from .bank import atomic_write_bytes

    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    for i, state in optimizer.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"optim.{i}.{k}"] = (v.detach().cpu().contiguous() if isinstance(v, torch.Tensor)
                                         else torch.tensor(v))
    for k, g in enumerate(generators):
        tensors[f"generator.{k}"] = g.contiguous()
    meta = {"format": _RESUME_FORMAT, "version": "1", "position": str(pos), "token": token, "step": str(steps_done),
            "processes": str(len(generators)),
            "ema": repr(float(ema)), "settings": json.dumps(settings, sort_keys=True), "bank": bank,
            "params": str(len(params)),
            # fp16's loss scaler (accelerate's GradScaler): its scale and growth tracker decide the next steps too
            "scaler": json.dumps(scaler.state_dict() if scaler is not None else None)}
    atomic_write_bytes(out / RESUME_FILE, save(tensors, metadata=meta))


def _open_resume(f: Path, *, tensors: bool):
    """``(metadata, {name: tensor} or None)`` of a checkpoint file; raises when it is not one."""
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        meta = sf.metadata() or {}
        data = {k: sf.get_tensor(k) for k in sf.keys()} if tensors else None
    if meta.get("format") != _RESUME_FORMAT or meta.get("version") != "1":
        raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
    return meta, data


def _read_resume(out: Path, *, pos: int, token: str, settings: Dict[str, object], params, allow_new: bool,
                 log, process: Tuple[int, int] = (0, 1)) -> Optional[dict]:
    """The checkpoint of concept ``pos`` (``token``) to go on from, or None (none there, or one that cannot be
    used: a note says why, and the concept starts from its first step).  Other settings than the checkpoint's
    are refused unless ``allow_new`` (then it is not used).  ``process``: (this process's index, the number of
    processes), which must be the checkpointing run's number: each process takes its own generator state."""
    f = out / RESUME_FILE
    if not f.is_file():
        return None
    try:
        meta, tensors = _open_resume(f, tensors=True)
        at, name, step = int(meta["position"]), meta["token"], int(meta["step"])
        ema, saved, bank, n = float(meta["ema"]), json.loads(meta["settings"]), meta["bank"], int(meta["params"])
        scaler = json.loads(meta["scaler"])
        processes = int(meta["processes"])
    except Exception as e:         # noqa: BLE001 - any damage: the checkpoint is not used, training is not lost
        log(f"note: the checkpoint {str(f)!r} cannot be read ({type(e).__name__}: {e}): {token} starts from its "
            f"first step")
        return None
    if (at, name) != (pos, token):
        return None             # a concept that finished after it (the run stopped before removing it): stale
    why = None
    if bank != _manifest_sig(out):
        why = "the bank changed since it was written"
    elif saved != json.loads(json.dumps(settings, sort_keys=True)):
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if not allow_new:
            raise CLIError(f"the bank {str(out)!r} holds a checkpoint of {token} at step {step}, trained with other "
                           f"settings ({', '.join(f'{k}: {saved.get(k)!r}' for k in changed)}): rerun with those, "
                           f"or pass --allow-new-settings to train {token} again from its first step")
        why = f"other settings ({', '.join(changed)})"
    elif n != len(params) or any(f"param.{i}" not in tensors or tensors[f"param.{i}"].shape != p.shape
                                 for i, p in enumerate(params)):
        why = "its tensors do not fit this model's adapters"
    elif processes != process[1]:
        why = f"made by a run of {processes} process(es), this one has {process[1]}"
    elif not 0 < step < int(settings["steps"]) or f"generator.{process[0]}" not in tensors:
        why = f"step {step} out of range"
    if why is not None:
        log(f"note: the checkpoint of {token} at step {step} is not used ({why}): {token} starts from its first step")
        return None
    optim: Dict[int, Dict[str, object]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, key = k.split(".", 2)
            optim.setdefault(int(i), {})[key] = v
    return {"step": step, "ema": ema, "optimizer": optim, "generator": tensors[f"generator.{process[0]}"],
            "scaler": scaler,
            "params": [tensors[f"param.{i}"] for i in range(n)]}


# settings that decide what a concept learns: a resumed run must use the same ones (--allow-new-settings)
SETTINGS_FILE = "clora_fast_train.json"
_SETTING_KEYS = ("steps", "lr", "batch_size", "seed", "resolution", "mixed_precision", "penalty_weight", "prompt",
                 "random_flip")
# the value of a setting that a record leaves out (one added after banks were written with records without it)
_SETTING_DEFAULTS = {"random_flip": False}


def _read_settings(out: Path) -> Dict[str, Dict[str, object]]:
    f = out / SETTINGS_FILE
    if not f.is_file():
        return {}
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise CLIError(f"{str(f)!r} (the training settings of the bank's concepts) cannot be read: {e}") from None
    return data if isinstance(data, dict) else {}


def _check_settings(out: Path, tokens, done, settings, allow: bool) -> None:
    """Refuse a resume whose settings differ from those the bank's last concept was trained with (the prompt is
    per concept: recorded, not compared)."""
    if not done or len(done) == len(tokens):
        return
    recorded = _read_settings(out).get(done[-1])
    if recorded is None:
        print(f"clora-fast: note: {out} has no record of the settings its concepts were trained with (saved by "
              f"another program or an older version): not checked", file=sys.stderr)
        return
    now = settings(len(done))

    def value(d, k):
        return d.get(k, _SETTING_DEFAULTS.get(k))

    changed = [f"{k} {value(recorded, k)!r} -> {value(now, k)!r}" for k in _SETTING_KEYS
               if k != "prompt" and (k in recorded or k in _SETTING_DEFAULTS) and value(recorded, k) != value(now, k)]
    if changed and not allow:
        raise CLIError(f"the bank {str(out)!r} was trained with other settings than this run's ({'; '.join(changed)}):"
                       f" the same --seed and settings give the same bank only unchanged. Rerun with the bank's "
                       f"settings, or pass --allow-new-settings to learn the remaining concepts with these")


def _record_settings(out: Path, token: str, values: Dict[str, object]) -> None:
    """Add ``token``'s settings to the bank folder's settings file (atomically)."""
    from clora_fast.bank import atomic_write_bytes

    data = _read_settings(out)
    data[token] = values
    atomic_write_bytes(out / SETTINGS_FILE, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())


def _prompt_cut_message(prompt: str, token: str, tokenizer, where: str) -> str:
    n = len(tokenizer(prompt, truncation=False, verbose=False).input_ids)
    return (f"the training prompt {prompt!r}{where} is {n} tokens long: the text encoder reads only the first "
            f"{tokenizer.model_max_length}, so the concept's token {token!r} would be cut off and never "
            f"trained; shorten the prompt or put {{token}} earlier (--prompts)")


def _check_prompts_fit(tokenizer, folders: Sequence[str], tokens: Sequence[str], prompts: Sequence[str]) -> None:
    """Refuse (before any training) a prompt whose concept token falls in the part that the
    tokenizer's truncation to ``model_max_length`` cuts off."""
    import copy

    tok = copy.deepcopy(tokenizer)                # the concepts' tokens are not added yet
    tok.add_tokens([t for t in tokens if t not in tok.get_vocab()])
    for folder, token, prompt in zip(folders, tokens, prompts):
        tid = tok.convert_tokens_to_ids(token)
        ids = tok(prompt, truncation=True, max_length=tok.model_max_length).input_ids
        if tid not in ids:
            raise CLIError(_prompt_cut_message(prompt, token, tok, f" of concept folder {folder!r}"))


def _check_denoising_steps(flag: str, steps: int, pipe, model: str) -> None:
    """A denoising loop cannot take more steps than the scheduler has training timesteps (diffusers raises
    only once generation starts: for the grids, after a concept was trained)."""
    n = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if n is not None and steps > int(n):
        raise CLIError(f"{flag} {steps} is more than the {n} timesteps of model {model!r}'s scheduler")


def _load_model(model: str, device):
    from clora_fast.builtin import load_pipeline

    try:
        pipe = load_pipeline(model, device=device)
    except (ValueError, OSError) as e:
        msg = str(e).replace("clora_fast: ", "")
        raise CLIError(msg if msg.startswith("model ") else f"model {model!r}: {msg}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _training_scheduler(pipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


# --------------------------------------------------------------------------- sample


def _sample_parser(sub):
    p = sub.add_parser(
        "sample", help="generate images with every concept of a bank merged in",
        description="Generate images with every finished concept of a bank merged into the model. "
                    "A bank saved mid-training (with an unfinished concept) samples with its finished "
                    "concepts only (a note says so); a prompt that uses the token of the unfinished "
                    "concept, or of a concept removed from the bank, is an error.")
    _bank_options(p)
    p.add_argument("--prompt", required=True, help="e.g. 'a photo of <digit3>'")
    p.add_argument("--out", required=True, help="PNG to write (a grid when --num-images > 1)")
    p.add_argument("--steps", type=_positive("--steps"), default=25)
    p.add_argument("--seed", type=_seed_arg, default=0,
                   help="seeds the initial noise (and any other randomness); 0 .. 2**32-1")
    p.add_argument("--num-images", type=_positive("--num-images"), default=1)
    p.add_argument("--guidance-scale", type=_float_arg("--guidance-scale"), default=1.0)
    p.add_argument("--negative-prompt", default=None,
                   help="what to guide away from (classifier-free guidance: needs --guidance-scale above 1)")
    p.add_argument("--after", default=None, metavar="TOKEN",
                   help="sample the model as it was right after this concept was learned: the bank's concepts up "
                        "to it (e.g. to see what a concept looked like then, and compare with the end of the "
                        "sequence: forgetting)")
    p.add_argument("--scheduler", default="model", choices=sorted(_SAMPLERS),
                   help="the denoising scheduler (default: the model's own), built from the model's scheduler "
                        "config (its noise schedule and prediction type)")
    p.add_argument("--resolution", type=_positive("--resolution"), default=None,
                   help="image size, a multiple of 8 and of the model's VAE factor (default: the model's "
                        "native size)")
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "cuda"])
    _threads_option(p)
    return p


# clora-fast sample --scheduler: diffusers scheduler classes by name ("model": the pipeline's own)
_SAMPLERS = {"model": None, "ddim": "DDIMScheduler", "pndm": "PNDMScheduler", "euler": "EulerDiscreteScheduler",
             "euler-ancestral": "EulerAncestralDiscreteScheduler", "dpm++2m": "DPMSolverMultistepScheduler",
             "unipc": "UniPCMultistepScheduler", "lms": "LMSDiscreteScheduler", "heun": "HeunDiscreteScheduler"}


def _set_sampler(pipe, name: str) -> None:
    """``pipe.scheduler`` replaced by the :data:`_SAMPLERS` class ``name`` made from the model's scheduler config
    (``"model"``: left as it is)."""
    if _SAMPLERS[name] is None:
        return
    import diffusers
    cls = getattr(diffusers, _SAMPLERS[name], None)
    if cls is None:
        raise CLIError(f"--scheduler {name}: this diffusers {diffusers.__version__} has no {_SAMPLERS[name]}")
    # PNDM as Stable Diffusion's own configs set it up (its Runge-Kutta warm-up steps fail at a few steps)
    extra = {"skip_prk_steps": True} if name == "pndm" else {}
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)


def _prompt_token_ids(tokenizer, prompt: str) -> Tuple[List[int], List[int]]:
    """(ids the text encoder sees: truncated to the model's length as the pipeline does, all ids)."""
    full = list(tokenizer(prompt, truncation=False, verbose=False).input_ids)
    kept = list(tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids)
    return kept, full


def _sample_multiple(pipe) -> int:
    """Image sizes a Stable Diffusion pipeline call accepts are multiples of this (its
    ``check_inputs`` wants multiples of 8; the latents need multiples of the VAE factor)."""
    return math.lcm(8, int(pipe.vae_scale_factor))


def _load_finished(pipe, args):
    """``(controller, unfinished name or None)``: the bank ``args.bank`` loaded onto ``pipe``; a concept saved
    mid-training is dropped here in memory (its token becomes unusable), the bank on disk is not changed."""
    _patch, load, _unpatch = _api()
    try:
        cl = load(pipe, str(args.bank), backend=getattr(args, "backend", "auto"))
    except (ValueError, KeyError, FileNotFoundError) as e:
        raise CLIError(f"cannot load the bank {args.bank!r} onto model {args.model!r}: {e}") from None
    unfinished = cl.active_name
    if unfinished is not None:
        cl.discard_concept()                           # P and the finished concepts as they are: no fold, no refold
    return cl, unfinished


def cmd_sample(args) -> int:
    with _seeded_rngs(args.seed):
        return _cmd_sample(args)


def _cmd_sample(args) -> int:
    import torch

    bank = Path(args.bank)
    if not bank.exists():
        raise CLIError(f"--bank {args.bank!r} does not exist")
    if not args.out.lower().endswith(".png"):
        raise CLIError(f"--out must be a .png file, got {args.out!r}")
    _check_output_path("--out", Path(args.out), folder=False)
    if args.negative_prompt is not None and not args.guidance_scale > 1:
        raise CLIError(f"--negative-prompt needs --guidance-scale above 1 (classifier-free guidance), got "
                       f"{args.guidance_scale:g}: the pipeline would ignore it")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    _check_backend(args.backend, device)
    pipe = _load_model(args.model, device)
    _set_sampler(pipe, args.scheduler)
    _check_denoising_steps("--steps", args.steps, pipe, args.model)
    if args.resolution is not None and args.resolution % _sample_multiple(pipe):
        raise CLIError(f"--resolution {args.resolution} must be a multiple of {_sample_multiple(pipe)} (the "
                       f"pipeline needs a multiple of 8, the VAE of model {args.model!r} one of "
                       f"{pipe.vae_scale_factor})")
    cl, unfinished = _load_finished(pipe, args)
    names = _read_bank_names(cl)
    tok = pipe.tokenizer
    kept, full = _prompt_token_ids(tok, args.prompt)
    negative = [] if args.negative_prompt is None else _prompt_token_ids(tok, args.negative_prompt)[1]
    # compare token ids, not strings: the tokenizer lower-cases ('<Digit3>' is '<digit3>'); a
    # concept is in a prompt through its personalized token (one the adapter added to the tokenizer)
    added = tok.get_added_vocab()
    if args.after is not None:
        lowered = [n.lower() for n in names]        # (the tokenizer lower-cases: '<Alpha>' is '<alpha>')
        if args.after.lower() not in lowered:
            raise CLIError(f"--after {args.after!r} is not a finished concept of the bank {args.bank!r} (it holds "
                           f"{names})")
        pos = lowered.index(args.after.lower())
        later = cl.concepts[pos + 1:]
        for c in later:
            tid = added.get(c.name)
            if tid is not None and (tid in full or tid in negative):
                raise CLIError(f"the prompt uses {c.name!r}, which was learned after --after {names[pos]!r}: the "
                               f"model then did not know it")
        cl.remove_concepts([c.idx for c in later])          # in memory only: the bank on disk is not changed
        names = names[:pos + 1]
    removed = [r["name"] for r in cl.retired_concepts if r["name"] != unfinished]
    for name, why in [(n, "was removed from the bank") for n in removed] + \
                     ([(unfinished, "is unfinished in the bank (saved mid-training)")] if unfinished else []):
        tid = added.get(name)
        for flag, text, ids in (("prompt", args.prompt, full), ("negative prompt", args.negative_prompt, negative)):
            if tid is not None and tid in ids:
                raise CLIError(f"the {flag} {text!r} uses the token {name!r} of a concept that {why}; "
                               f"the bank's usable concepts are {names}")
    if unfinished is not None:
        print(f"clora-fast: note: the bank {args.bank!r} holds an unfinished concept {unfinished!r} (saved "
              f"mid-training): it is not used, sampling with the {len(names)} finished concept(s)",
              file=sys.stderr)
    ids = {n: added.get(n) for n in names}
    used = [n for n in names if ids[n] is not None and ids[n] in kept]
    cut = [n for n in names if ids[n] is not None and ids[n] in full and n not in used]
    if cut:
        print(f"clora-fast: warning: the prompt is longer than the model's {tok.model_max_length} tokens: "
              f"{cut} fall in the part that is cut off and are not used", file=sys.stderr)
    known = {n.lower() for n in names} | {n.lower() for n in removed}
    unknown = sorted(set(re.findall(r"<[a-z0-9_\-]+>", args.prompt.lower())) - known)
    if unknown:
        print(f"clora-fast: warning: prompt tokens {unknown} are not in the bank (it holds {names})",
              file=sys.stderr)
    cl.merge()
    ims = generate(pipe, [args.prompt] * args.num_images, steps=args.steps, seed=args.seed,
                   guidance_scale=args.guidance_scale, resolution=args.resolution,
                   negative_prompt=args.negative_prompt)
    out = Path(args.out)
    if len(ims) == 1:
        img = ims[0]
    else:
        img = make_grid([("", ims)], ims[0].size[0])
    _atomic_save_image(img, out)
    print(f"wrote {out} ({len(ims)} image(s); concepts used: {used or 'none'})")
    return 0


# --------------------------------------------------------------------------- export


def _export_parser(sub):
    p = sub.add_parser(
        "export", help="a bank's concepts for use without clora_fast (a diffusers pipeline, or LoRA files)",
        description="Write every finished concept of a bank in formats other tools read, without clora_fast: "
                    "--format pipeline (default) saves the model as a diffusers pipeline with the concepts merged "
                    "into its weights and their tokens in its tokenizer(s) and text encoder(s); --format lora "
                    "writes the merged concepts as one diffusers LoRA file (pytorch_lora_weights.safetensors, "
                    "rank T*r) and each concept's token embedding as a textual-inversion file, with "
                    "concepts.json listing them; --format kohya does the same with the LoRA in kohya's keys "
                    "(kohya_lora.safetensors: lora_unet_<module>.lora_down / lora_up / alpha; SDXL's modules under "
                    "their original Stable Diffusion names), which the Stable Diffusion web UIs and ComfyUI read. "
                    "--out must be a new (or empty) folder; it is written whole or not at all.")
    _bank_options(p)
    p.add_argument("--out", required=True, help="the folder to write (new or empty)")
    p.add_argument("--format", choices=["pipeline", "lora", "kohya"], default="pipeline")
    p.add_argument("--per-concept", action="store_true",
                   help="with --format lora / kohya: also write each concept's own LoRA (loras/<token>.safetensors, "
                        "listed in concepts.json), so that a pipeline can load them as separate adapters and weigh "
                        "each concept (diffusers' set_adapters; their sum at weight 1 is the merged file)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default=None,
                   help="dtype of the written weights (default: the model's, fp32 for the LoRA factors)")
    _threads_option(p)
    return p


def _token_file_stem(token: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", token.strip("<>")).strip("._")
    return stem or "concept"


def cmd_export(args) -> int:
    import shutil
    import tempfile

    import torch

    import clora_fast
    from clora_fast.integrations.diffusers import export_textual_inversion, get_adapter

    if not Path(args.bank).exists():
        raise CLIError(f"--bank {args.bank!r} does not exist")
    if args.per_concept and args.format == "pipeline":
        raise CLIError("--per-concept writes LoRA files: use it with --format lora or kohya")
    out = Path(os.path.abspath(args.out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CLIError(f"--out {args.out!r} exists and is not an empty folder: export writes a new folder")
    _check_output_path("--out", out, folder=True)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}[args.dtype]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = _load_model(args.model, device)
    cl, unfinished = _load_finished(pipe, args)
    names = _read_bank_names(cl)
    if unfinished is not None:
        print(f"clora-fast: note: the bank {args.bank!r} holds an unfinished concept {unfinished!r} (saved "
              f"mid-training): it is not exported", file=sys.stderr)
    if not names:
        raise CLIError(f"the bank {args.bank!r} holds no finished concept: nothing to export")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=str(out.parent)))
    try:
        if args.format == "pipeline":
            if dtype is not None:
                pipe.to(dtype=dtype)
            clora_fast.save_pipeline(pipe, tmp, safe_serialization=True)
            what = f"a diffusers pipeline ({type(pipe).__name__}.from_pretrained({str(out)!r}))"
        else:
            lora, layout = ("kohya_lora", "kohya") if args.format == "kohya" else ("pytorch_lora_weights", "peft")
            clora_fast.export_lora(pipe, tmp / f"{lora}.safetensors", "merged", dtype=dtype, layout=layout)
            listing, taken = [], {lora, "concepts", "loras"}
            tokens = get_adapter(pipe.unet).tokens
            if args.per_concept:
                (tmp / "loras").mkdir()
            for c in cl.concepts:
                stem = _token_file_stem(c.name)
                stem = stem if stem not in taken else f"{stem}-{c.idx}"
                taken.add(stem)
                entry = {"token": c.name, "file": None}
                if c.idx in tokens:                            # (a bank trained on a bare UNet has no tokens)
                    entry["file"] = f"{stem}.safetensors"
                    export_textual_inversion(pipe, tmp / entry["file"], c.idx)
                if args.per_concept:
                    entry["lora"] = f"loras/{stem}.safetensors"
                    clora_fast.export_lora(pipe, tmp / entry["lora"], c.idx, dtype=dtype, layout=layout)
                listing.append(entry)
            listing = {"lora": f"{lora}.safetensors", "scale": 1.0, "concepts": listing,
                       "text_encoders": 2 if _is_xl(pipe) else 1}
            (tmp / "concepts.json").write_text(json.dumps(listing, indent=1) + "\n")
            what = (f"{lora}.safetensors (pipe.load_lora_weights{', kohya keys' if args.format == 'kohya' else ''})"
                    + (", each concept's own LoRA in loras/ (one adapter per concept)" if args.per_concept else "")
                    + " and a textual-inversion file per concept (pipe.load_textual_inversion; listed in "
                      "concepts.json)")
        from clora_fast.bank import _umask

        os.chmod(tmp, 0o777 & ~_umask())                       # mkdtemp's folder is private (0700)
        if out.exists():
            out.rmdir()                                        # empty (checked above)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out}: {what}; concepts {names}")
    return 0


# --------------------------------------------------------------------------- info


def _info_parser(sub):
    p = sub.add_parser(
        "info", help="what a concept bank holds (and, with --verify, whether it is intact)",
        description="List a concept bank's concepts (index, name, token, scale, size; a concept saved "
                    "mid-training is marked active) and its settings, from its manifest: no model is "
                    "loaded. --verify also checks every file's size and sha256, the tensors' shapes and "
                    "finiteness, and that the stored past is the fold of the concepts' factors (what a load "
                    "checks, except that the bank fits a given model). Exit status 1 when the folder is not "
                    "a bank or the check fails.")
    p.add_argument("bank", help="the bank folder")
    p.add_argument("--verify", action="store_true", help="read and check every file (slower: reads the bank)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def _size(n) -> str:
    if n is None:
        return "?"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


def cmd_info(args) -> int:
    from clora_fast.bank import BankError, inspect_bank
    try:
        info = inspect_bank(args.bank, verify=args.verify)
    except BankError as e:
        ck = _checkpoint_info(Path(args.bank)) if Path(args.bank).is_dir() else None
        if ck is not None and "step" in ck and not (Path(args.bank) / "manifest.json").exists():
            # a first concept stopped before the bank's first save: only its checkpoint is there
            raise CLIError(f"{e}; it holds a training checkpoint of {ck['token']} at step {ck['step']} of "
                           f"{ck['steps']} (no concept finished yet: clora-fast train goes on from it)") from None
        raise
    info["checkpoint"] = _checkpoint_info(Path(args.bank))
    if args.json:
        print(json.dumps(info))
        return 0
    finished = [c for c in info["concepts"] if not c["active"]]
    active = [c for c in info["concepts"] if c["active"]]
    print(f"{info['path']}: {info['producer'] or 'clora_fast'}" + (f", {info['kind']}" if info["kind"] else ""))
    print(f"  rank {info['rank']}, alpha {info['alpha']:g}, penalty weight {info['penalty_weight']:g}, "
          f"{info['sites']} adapted projections")
    print(f"  {len(finished)} finished concept(s)" + (", 1 being learned (saved mid-training)" if active else "")
          + f", {len(info['retired'])} removed; {info['files']} files, {_size(info['bytes'])}")
    if info["concepts"]:
        rows = [("idx", "name", "token", "scale", "size", "")] + [
            (str(c["idx"]), c["name"], c["token"] or "-", f"{c['scale']:g}", _size(c["bytes"]),
             "active" if c["active"] else (f"imported from {c['source']}" if c.get("source") else ""))
            for c in info["concepts"]]
        widths = [max(len(r[k]) for r in rows) for k in range(5)]
        for r in rows:
            print("  " + "  ".join(v.rjust(w) if k in (0, 3, 4) else v.ljust(w)
                                   for k, (v, w) in enumerate(zip(r, widths))) + (f"  {r[5]}" if r[5] else ""))
    if info["retired"]:
        print("  removed: " + ", ".join(f"{r['idx']} {r['name']}" for r in info["retired"]))
    print("  verified: sizes, sha256 checksums, shapes, the folded past" if info["verified"]
          else "  not verified (--verify reads every file and checks it)")
    ck = info["checkpoint"]
    if ck is not None and "error" in ck:
        print(f"  training checkpoint: unreadable ({ck['error']})")
    elif ck is not None:
        print(f"  training checkpoint: {ck['token']} (concept {ck['position'] + 1} of the train run) at step "
              f"{ck['step']} of {ck['steps']}")
    return 0


def _checkpoint_info(bank: Path) -> Optional[Dict[str, object]]:
    """What the bank folder's --checkpoint-every file says (token, position, step, steps), None when there is none;
    ``{"error": ...}`` when it cannot be read."""
    f = bank / RESUME_FILE
    if not f.is_file():
        return None
    try:
        meta, _ = _open_resume(f, tensors=False)
        return {"token": meta["token"], "position": int(meta["position"]), "step": int(meta["step"]),
                "steps": int(json.loads(meta["settings"])["steps"])}
    except Exception as e:         # noqa: BLE001 - reported, never fatal here
        return {"error": f"{type(e).__name__}: {e}"}


def _remove_parser(sub):
    p = sub.add_parser(
        "remove", help="forget one concept of a bank (no model needed)",
        description="Forget one concept of a concept bank: the past P is refolded from the remaining "
                    "concepts and the concept's name (and token) is retired, exactly as loading the bank onto its "
                    "model, remove_concept() and save() would do, computed from the bank alone. A concept saved "
                    "mid-training (unfinished) is dropped as discard_concept() would (P untouched), with its "
                    "--checkpoint-every checkpoint. The bank is verified first; refused while a clora-fast train "
                    "runs on that folder. Exit status 1 when the bank has no such concept or fails the check "
                    "(the bank is then unchanged).")
    p.add_argument("bank", help="the bank folder")
    p.add_argument("concept", help="the concept's index (digits) or its name, e.g. '<digit5>'")
    return p


def cmd_remove(args) -> int:
    from clora_fast.bank import remove_from_bank
    concept = int(args.concept) if args.concept.isdigit() else args.concept
    bank = Path(args.bank)
    if not bank.is_dir():
        raise CLIError(f"no concept bank at {args.bank!r}: not a folder")
    with _train_lock(bank):
        gone = remove_from_bank(bank, concept)
        if gone["unfinished"]:
            (bank / RESUME_FILE).unlink(missing_ok=True)     # its mid-concept checkpoint goes with it
    print(f"removed concept {gone['idx']} {gone['name']!r}{' (unfinished)' if gone['unfinished'] else ''} "
          f"from {args.bank}")
    return 0


# --------------------------------------------------------------------------- import


def _import_parser(sub):
    p = sub.add_parser(
        "import", help="add a LoRA trained elsewhere to a bank as a past concept",
        description="Add a LoRA trained with another tool to a concept bank as a finished concept: its "
                    "cross-attention K/V change is folded into the past, so the concepts that clora-fast train "
                    "learns next are kept off the weights it uses, and sample / export / remove treat it as any "
                    "other concept. Keys read: diffusers / PEFT (unet.<module>.lora_A.weight, what "
                    "save_lora_weights and export --format lora write) and kohya (lora_unet_<module>.lora_down."
                    "weight with .alpha; modules named as in diffusers or as in the original Stable Diffusion "
                    "code, as SDXL's files are: lora_unet_input_blocks_4_1_...). A file that also adapts other "
                    "modules (self-attention, Q, out, feed-forward, a text encoder) is refused unless "
                    "--ignore-other-modules. The bank is created "
                    "(--rank, --alpha) when it does not exist; refused while a clora-fast train runs on it. "
                    "Safetensors files only.")
    p.add_argument("bank", help="the bank folder (created when it does not exist)")
    p.add_argument("lora", help="the LoRA file (.safetensors), or the folder that diffusers' save_lora_weights / "
                                "PEFT's save_pretrained wrote")
    p.add_argument("--name", default=None,
                   help="the concept's name and token (default: the --textual-inversion file's token, else "
                        "<the LoRA file's name>)")
    p.add_argument("--textual-inversion", default=None, metavar="FILE",
                   help="the token's embedding ({token: [dim]} safetensors, as export --format lora writes)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiplies the file's own scale (kohya's alphas, the LoRA config that diffusers stores in "
                        "the header; a PEFT file without it carries no alpha: lora_alpha / r; default 1)")
    p.add_argument("--model", default="builtin", help="the model the bank is (or will be) trained on")
    p.add_argument("--rank", type=_positive("--rank"), default=None,
                   help="rank of a new bank (default 16; the LoRA's rank must not exceed it)")
    p.add_argument("--alpha", type=float, default=None, help="alpha of a new bank (default: its rank)")
    p.add_argument("--ignore-other-modules", action="store_true",
                   help="import the K/V part of a LoRA that also adapts other modules")
    p.add_argument("--partial", action="store_true",
                   help="allow a LoRA that covers only some of the adapted projections (the others get no change)")
    _threads_option(p)
    return p


def cmd_import(args) -> int:
    import torch

    import clora_fast

    lora = Path(args.lora)
    if not lora.exists():
        raise CLIError(f"no LoRA file or folder at {args.lora!r}")
    if args.textual_inversion is not None and not Path(args.textual_inversion).is_file():
        raise CLIError(f"--textual-inversion {args.textual_inversion!r}: no such file")
    if not (math.isfinite(args.scale) and args.scale > 0):
        raise CLIError(f"--scale must be a positive number, got {args.scale}")
    bank = Path(os.path.abspath(args.bank))
    _bank_state(bank, "bank")
    _check_output_path("bank", bank, folder=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    patch, load, _unpatch = _api()
    with _train_lock(bank):
        state = _bank_state(bank, "bank")
        pipe = _load_model(args.model, device)
        if state == "bank":
            try:
                cl = load(pipe, str(bank))
            except (ValueError, KeyError, FileNotFoundError) as e:
                raise CLIError(f"cannot load the bank {args.bank!r} onto model {args.model!r}: {e}") from None
            if cl.active_concept is not None:
                raise CLIError(f"the bank {args.bank!r} holds an unfinished concept {cl.active_name!r} (saved "
                               f"mid-training): finish it (rerun its clora-fast train) or remove it first")
            for flag, want, have in (("--rank", args.rank, cl.rank), ("--alpha", args.alpha, cl.alpha)):
                if want is not None and float(want) != float(have):
                    raise CLIError(f"the bank {args.bank!r} has {flag} {have:g}, not {want:g} (a bank keeps its own)")
        else:
            try:
                cl = patch(pipe, rank=args.rank or 16, alpha=args.alpha)
            except ValueError as e:
                raise CLIError(str(e)) from None
        name = args.name
        if name is None and args.textual_inversion is None:
            name = f"<{_token_file_stem(lora.name.rsplit('.', 1)[0])}>"
        try:
            idx = clora_fast.import_lora(pipe, str(lora), name, textual_inversion=args.textual_inversion,
                                         scale=args.scale, strict=not args.partial,
                                         ignore_other_modules=args.ignore_other_modules)
        except (ValueError, KeyError, FloatingPointError, FileNotFoundError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
            msg = msg.replace("Pass ignore_other_modules=True", "Pass --ignore-other-modules").replace(
                "(strict=False imports", "(--partial imports")
            too_big = re.search(r"; patch with rank >= (\d+) to import it$", msg)
            if too_big:             # a bank's rank is fixed when it is created
                msg = msg[:too_big.start()] + (
                    f": import it into a new bank made with --rank {too_big.group(1)} or more"
                    if state == "bank" else f"; create the bank with --rank {too_big.group(1)} or more")
            raise CLIError(msg) from None
        cl.save(str(bank))
    c = cl.concept(idx)
    print(f"imported {args.lora} into {args.bank} as concept {idx} {c.name!r} (scale {c.scale:g}); the bank holds "
          f"{[k.name for k in cl.concepts]}")
    return 0


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clora-fast", description="C-LoRA continual customization")
    sub = parser.add_subparsers(dest="command", metavar="{train,sample,export,import,info,remove,train-vit}")
    _train_parser(sub)
    _sample_parser(sub)
    _export_parser(sub)
    _import_parser(sub)
    _info_parser(sub)
    _remove_parser(sub)
    sub.add_parser("train-vit", help="continual ViT classifier training (clora_fast.vit_train)", add_help=False)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train-vit":
        try:
            from clora_fast import vit_train
        except ImportError as e:
            print(f"clora-fast: error: train-vit needs clora_fast.vit_train, which cannot be imported: {e}",
                  file=sys.stderr)
            return 2
        return int(vit_train.cli_main(argv[1:]) or 0)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from clora_fast.bank import BankError

    if args.command in ("info", "remove"):
        try:
            return cmd_info(args) if args.command == "info" else cmd_remove(args)
        except (CLIError, BankError, OSError) as e:     # not a bank, no such concept, or a failed check
            print(f"clora-fast: error: {e}", file=sys.stderr)
            return 1
    import torch

    prev_threads = torch.get_num_threads()
    threads = args.threads
    if threads is None and not torch.cuda.is_available() and args.model in _builtin_names():
        # the builtin model's ops are far too small for intra-op threads to pay off, and on a
        # busy machine OpenMP spin-waiting makes 2 threads 10-40x slower than 1 (measured)
        threads = 1
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if args.command == "train":
            return cmd_train(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "import":
            return cmd_import(args)
        return cmd_sample(args)
    except (CLIError, BankError) as e:      # BankError: a corrupt / incompatible bank (a ValueError)
        print(f"clora-fast: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:               # the concept being trained is not saved; earlier ones are
        print(f"clora-fast: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:                     # a file system refusal met after the up-front checks (disk full, ...)
        print(f"clora-fast: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:                # Ctrl-C: one line, not a traceback; saves are atomic, so the bank
        if args.command == "train":          # holds exactly the concepts finished before it
            info = _checkpoint_info(Path(os.path.abspath(args.out)))
            ck = (f" ({info['token']} goes on from its checkpoint at step {info['step']} of {info['steps']})"
                  if info is not None and "step" in info else "")
            print(f"\nclora-fast: interrupted; the bank {args.out!r} holds the concepts finished before the "
                  f"interrupt: run the same command again to resume{ck}", file=sys.stderr)
        else:
            print("\nclora-fast: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(prev_threads)   # main() may be called in-process (tests, notebooks)


def _builtin_names() -> List[str]:
    from clora_fast.builtin import builtin_names

    return builtin_names()


if __name__ == "__main__":
    sys.exit(main())
