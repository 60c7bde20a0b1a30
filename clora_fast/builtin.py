"""The builtin models: tiny Stable-Diffusion-shaped pipelines built offline.

``build_pipeline()`` assembles a ``StableDiffusionPipeline`` (``"builtin"``) or a
``StableDiffusionXLPipeline`` (``"builtin-xl"``) from the JSON configs shipped in
``clora_fast/configs/<name>/`` with random weights drawn
from a fixed seed (so two builds are bit-identical on CPU), plus a *real*
CLIP BPE tokenizer: the merges of OpenAI CLIP's ``bpe_simple_vocab_16e6``
(via the MIT-licensed ``open_clip`` package, see
``clora_fast/assets/LICENSE-open_clip.txt``) ship truncated to the 48,894
merges CLIP uses, and the 49,408-entry vocabulary is derived from them at load
time exactly as CLIP's ``simple_tokenizer`` builds it.

``load_pipeline(model)`` resolves a ``--model`` argument: ``"builtin"``, ``"builtin-xl"``
(the shipped config folders) or a local diffusers SD / SDXL pipeline folder.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
from pathlib import Path
from typing import Dict, List, Tuple

import torch

__all__ = [
    "build_pipeline",
    "load_pipeline",
    "clip_tokenizer",
    "clip_vocab_and_merges",
    "builtin_names",
    "CONFIG_DIR",
    "ASSET_DIR",
]

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ASSET_DIR = Path(__file__).resolve().parent / "assets"
MERGES_FILE = ASSET_DIR / "clip_merges.txt.gz"

#: sizes of the real CLIP BPE vocabulary
CLIP_NUM_MERGES = 49152 - 256 - 2  # 48,894
CLIP_VOCAB_SIZE = 49408


def _bytes_to_unicode() -> Dict[int, str]:
    """CLIP's / GPT-2's reversible byte -> printable unicode char table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(2 ** 8):
        if b not in bs:
            bs.append(b)
            cs.append(2 ** 8 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> Tuple[Dict[str, int], Tuple[str, ...]]:
    """(vocab, merges) of OpenAI CLIP's tokenizer, derived from the shipped merges.

    vocab: 49,408 entries (256 byte chars, the same + ``</w>``, one entry per
    merge, then ``<|startoftext|>`` = 49406 and ``<|endoftext|>`` = 49407).
    merges: the 48,894 merges as ``"a b"`` strings, in rank order.
    """
    if not MERGES_FILE.is_file():
        raise FileNotFoundError(
            f"clora_fast: the CLIP merges file {MERGES_FILE} is missing from the installation"
        )
    with gzip.open(MERGES_FILE, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    if not lines or not lines[0].startswith("#version"):
        raise ValueError(f"clora_fast: {MERGES_FILE} does not start with a '#version' header")
    merges = tuple(line for line in lines[1: 1 + CLIP_NUM_MERGES] if line)
    if len(merges) != CLIP_NUM_MERGES:
        raise ValueError(
            f"clora_fast: {MERGES_FILE} holds {len(merges)} merges, expected {CLIP_NUM_MERGES}"
        )
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    tokens += ["".join(m.split(" ")) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ValueError(f"clora_fast: derived CLIP vocab has {len(vocab)} entries, expected {CLIP_VOCAB_SIZE}")
    return vocab, merges


def clip_tokenizer_from(vocab: Dict[str, int], merges, **kwargs):
    """A ``transformers.CLIPTokenizer`` from an in-memory BPE vocabulary and merges (pairs or
    ``"a b"`` strings); ``kwargs`` go to the constructor.  transformers 5.x takes ``vocab=`` /
    ``merges=`` objects (its ``vocab_file=`` / ``merges_file=`` are silently ignored); 4.x takes
    only the files, written here to a temporary folder."""
    from transformers import CLIPTokenizer

    pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    try:
        return CLIPTokenizer(vocab=dict(vocab), merges=pairs, **kwargs)
    except TypeError:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            vocab_file, merges_file = os.path.join(d, "vocab.json"), os.path.join(d, "merges.txt")
            with open(vocab_file, "w", encoding="utf-8") as f:
                json.dump(dict(vocab), f)
            with open(merges_file, "w", encoding="utf-8") as f:   # 4.x skips the first ("#version") line
                f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in pairs))
            return CLIPTokenizer(vocab_file=vocab_file, merges_file=merges_file, **kwargs)


def clip_tokenizer(model_max_length: int = 77, pad_token=None):
    """A fresh ``transformers.CLIPTokenizer`` with the real CLIP vocabulary (offline), built by
    :func:`clip_tokenizer_from` and checked against CLIP's ids.  ``pad_token``: default CLIP's
    ``<|endoftext|>``; SDXL's second tokenizer pads with ``"!"``."""
    vocab, merges = clip_vocab_and_merges()
    kw = {} if pad_token is None else {"pad_token": pad_token}
    tok = clip_tokenizer_from(vocab, merges, model_max_length=model_max_length, **kw)
    # guard against a transformers version that builds something else silently
    probe = tok("a photo of a cat").input_ids
    if probe != [49406, 320, 1125, 539, 320, 2368, 49407]:
        raise RuntimeError(
            "clora_fast: this transformers version built a CLIPTokenizer that does not reproduce "
            f"CLIP's ids (got {probe} for 'a photo of a cat')"
        )
    return tok


def builtin_names() -> List[str]:
    """Names of the shipped builtin model configs (folders of clora_fast/configs/)."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(
        p.name for p in CONFIG_DIR.iterdir() if p.is_dir() and (p / "unet.json").is_file()
    )


def _read_config(folder: Path, component: str) -> dict:
    path = folder / f"{component}.json"
    try:
        with open(path, "r", encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"clora_fast: builtin config file {path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"clora_fast: builtin config file {path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"clora_fast: builtin config file {path} must hold a JSON object")
    return cfg


def _strip_meta(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


_PIPELINE_CLASSES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")


def build_pipeline(name: str = "builtin", device="cpu", dtype: torch.dtype = torch.float32, seed=None):
    """Build a tiny builtin pipeline (random weights, fixed seed).

    name: a folder of ``clora_fast/configs/``: ``"builtin"`` (a ``StableDiffusionPipeline``) or
    ``"builtin-xl"`` (a ``StableDiffusionXLPipeline``: two text encoders, added text/time
    conditioning).  The weights are drawn on the CPU in float32 from ``seed`` (default: the
    config's, 0) without touching the global RNG state, then moved to ``device``/``dtype``; two
    builds with the same seed are bit-identical.
    """
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if not isinstance(name, str) or not name:
        raise ValueError(f"clora_fast: builtin model name must be a non-empty string, got {name!r}")
    names = builtin_names()
    if name not in names:
        raise ValueError(f"clora_fast: unknown builtin model {name!r}; shipped: {names}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"clora_fast: dtype must be a floating torch.dtype, got {dtype!r}")
    folder = CONFIG_DIR / name
    meta = _read_config(folder, "pipeline")
    if seed is None:
        seed = int(meta.get("seed", 0))
    pipe_cls = meta.get("pipeline_class", "StableDiffusionPipeline")
    if pipe_cls not in _PIPELINE_CLASSES:
        raise ValueError(f"clora_fast: {folder / 'pipeline.json'} names pipeline_class {pipe_cls!r}; "
                         f"builtin models are one of {list(_PIPELINE_CLASSES)}")
    xl = pipe_cls == "StableDiffusionXLPipeline"

    unet_cfg = _strip_meta(_read_config(folder, "unet"))
    vae_cfg = _strip_meta(_read_config(folder, "vae"))
    te_cfg = _strip_meta(_read_config(folder, "text_encoder"))
    te2_cfg = _strip_meta(_read_config(folder, "text_encoder_2")) if xl else None
    sched_raw = _read_config(folder, "scheduler")
    sched_cls_name = sched_raw.get("_class_name", "DDIMScheduler")
    sched_cls = getattr(diffusers, sched_cls_name, None)
    if sched_cls is None:
        raise ValueError(f"clora_fast: scheduler class {sched_cls_name!r} not found in diffusers")

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**unet_cfg)
        vae = AutoencoderKL(**vae_cfg)
        text_encoder = CLIPTextModel(CLIPTextConfig(**te_cfg))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg)) if xl else None
    scheduler = sched_cls(**_strip_meta(sched_raw))
    max_len = int(meta.get("tokenizer_model_max_length", 77))
    tokenizer = clip_tokenizer(max_len)
    tokenizer_2 = clip_tokenizer(max_len, pad_token=meta.get("tokenizer_2_pad_token")) if xl else None
    for enc, tok in ((text_encoder, tokenizer), (text_encoder_2, tokenizer_2)):
        if enc is not None and enc.config.vocab_size != len(tok):
            raise ValueError(
                f"clora_fast: builtin text encoder vocab_size {enc.config.vocab_size} "
                f"!= tokenizer size {len(tok)}"
            )
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.eval()
    if xl:
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.set_progress_bar_config(disable=True)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    return pipe.to(device)


def load_pipeline(model: str, device="cpu", dtype: torch.dtype = torch.float32):
    """Resolve a ``--model`` argument to a ``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``.

    ``"builtin"`` / ``"builtin-xl"`` (or the name of another shipped config folder) ->
    :func:`build_pipeline`; a local folder holding a diffusers pipeline (``model_index.json``
    naming one of those two classes) -> ``from_pretrained(model, local_files_only=True)``
    (safetensors only, no safety checker, no watermarker).
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ValueError(f"clora_fast: --model must be 'builtin' or a local diffusers folder, got {model!r}")
    model = str(model)
    if model in builtin_names() and not os.path.isdir(model):
        return build_pipeline(model, device=device, dtype=dtype)
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(
            f"clora_fast: model {model!r} is neither a builtin model ({builtin_names()}) "
            "nor an existing local folder (nothing can be downloaded: give a local diffusers folder)"
        )
    index = path / "model_index.json"
    if not path.is_dir() or not index.is_file():
        raise ValueError(
            f"clora_fast: model path {model!r} is not a diffusers pipeline folder (no model_index.json)"
        )
    try:
        with open(index, "r", encoding="utf-8") as f:
            cls_name = json.load(f).get("_class_name")
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
        raise ValueError(f"clora_fast: {index} is not a JSON object: {e}") from None
    for sub in sorted(p for p in path.iterdir() if p.is_dir()):
        # diffusers < 0.31 falls back to pickle (.bin) weights even with use_safetensors=True: refuse here
        files = [f.name for f in sub.iterdir()]
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl"))]
        if pickles and not any(f.endswith(".safetensors") for f in files):
            raise ValueError(
                f"clora_fast: model {model!r}: {sub.name}/ holds its weights only as pickle ({pickles[0]}); model "
                f"folders are read from safetensors only, never pickle: convert the weights (from_pretrained, then "
                f"save_pretrained(..., safe_serialization=True))")
    if cls_name not in _PIPELINE_CLASSES:
        raise ValueError(
            f"clora_fast: model {model!r} is a {cls_name!r} (model_index.json); clora-fast trains and samples "
            f"{' and '.join(_PIPELINE_CLASSES)} folders (text-to-image Stable Diffusion 1.x / 2.x / XL)"
        )
    import diffusers

    import warnings

    kw = (dict(add_watermarker=False) if cls_name == "StableDiffusionXLPipeline"
          else dict(safety_checker=None, requires_safety_checker=False))
    with warnings.catch_warnings():
        # diffusers >= 0.36 renamed torch_dtype= to dtype=; the old name still works everywhere
        warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
        pipe = getattr(diffusers, cls_name).from_pretrained(
            str(path), local_files_only=True, use_safetensors=True, torch_dtype=dtype, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)
