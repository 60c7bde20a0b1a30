"""clora_fast: fused Triton/CUDA kernels for C-LoRA continual customization.

    import clora_fast
    cl = clora_fast.patch(pipe_or_vit)        # diffusers pipeline / UNet, transformers ViT, timm ViT
    cl.begin_concept("<c1>"); loss = task_loss + cl.penalty(); ...; cl.end_concept()
    clora_fast.unpatch(pipe_or_vit)

Low-level fused operations live in :mod:`clora_fast.ops`.
"""
from __future__ import annotations

from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "available_backends", "patch", "unpatch", "load", "save_pipeline", "export_lora", "import_lora",
           "__version__"]


def available_backends() -> list:
    """Backends usable in this process, e.g. ``["reference", "triton"]``.

    ``triton`` is listed when Triton imports and either a CUDA device is present or the
    Triton interpreter is on (``TRITON_INTERPRET=1``); ``cuda`` when the csrc extension
    is built and a CUDA device is present.
    """
    import torch

    from ._validate import interpreting, triton_available
    out = ["reference"]
    if triton_available() and (torch.cuda.is_available() or interpreting()):
        out.append("triton")
    try:
        from . import _cuda
        if _cuda.is_available():
            out.append("cuda")
    except ImportError:
        pass
    return out


def _integration_for(obj):
    from .integrations import diffusers as _diffusers
    if _diffusers.can_patch(obj):
        return _diffusers
    from .integrations import vit as _vit
    if _vit.can_patch(obj) or _vit._is_hf_vit(obj) or _vit._is_timm_model(obj):
        return _vit          # a ViT with nothing adaptable gets the integration's own error: what it found
    if type(obj).__module__.startswith("peft."):
        raise TypeError(
            f"clora_fast.patch got a PEFT {type(obj).__name__}: patch the model itself (e.g. "
            f"peft_model.base_model.model), whose attention K/V projections must be plain nn.Linear (merge and "
            f"unload PEFT adapters on them first)")
    raise TypeError(
        f"clora_fast.patch does not know how to adapt a {type(obj).__module__}.{type(obj).__name__}: "
        "expected a diffusers pipeline with a .unet, a UNet2DConditionModel, a transformers vision transformer "
        "(ViT, DeiT, DINOv2/v3, BEiT, CLIP/SigLIP vision towers, ViTMAE, Swin, ...: see the README) or a timm "
        "VisionTransformer")


def patch(obj, **kwargs):
    """Add C-LoRA to a diffusers pipeline/UNet (cross-attention K/V) or a ViT (K/V of every block).

    Returns the :class:`clora_fast.controller.CLoRAController`. Keyword arguments
    (``rank``, ``alpha``, ``penalty_weight``, ``backend``, ...) go to the integration.
    """
    return _integration_for(obj).patch(obj, **kwargs)


def unpatch(obj) -> None:
    """Remove C-LoRA from ``obj``; the model is exactly as before :func:`patch`."""
    return _integration_for(obj).unpatch(obj)


def load(obj, path, **kwargs):
    """Patch ``obj`` and load a concept bank saved with ``controller.save(path)``."""
    return _integration_for(obj).load(obj, path, **kwargs)


def export_lora(obj, path, which="merged", *, dtype=None, **kwargs) -> None:
    """Write the concepts of a patched model (or of a controller) as a plain LoRA safetensors file: diffusers'
    format for a pipeline / UNet (``pipe.load_lora_weights``; ``layout="kohya"`` for kohya's keys, see
    :func:`clora_fast.integrations.diffusers.export_lora`), PEFT's for a ViT (``set_peft_model_state_dict``).
    ``which``: a concept index, or ``"merged"`` (every finished concept, rank T*r).  See
    :meth:`clora_fast.controller.CLoRAController.export_lora`."""
    from .controller import CLoRAController
    if isinstance(obj, CLoRAController):
        return obj.export_lora(path, which, dtype=dtype, **kwargs)
    integ = _integration_for(obj)
    if hasattr(integ, "export_lora"):
        return integ.export_lora(obj, path, which, dtype=dtype, **kwargs)
    ctrl = integ.get_controller(obj)
    if ctrl is None:
        raise ValueError(f"export_lora: this {type(obj).__name__} is not patched by clora_fast")
    ctrl.export_lora(path, which, dtype=dtype, **kwargs)


def import_lora(obj, path, name=None, **kwargs) -> int:
    """Add a LoRA trained elsewhere (a safetensors file: diffusers / PEFT / kohya keys for a pipeline, PEFT's for a
    ViT; what :func:`export_lora` writes) to a patched model as a finished concept, folded into the past so that
    the concepts learned next are kept off it.  Returns its index.  Keyword arguments: ``scale`` (a multiplier of
    the file's own scale), ``strict``,
    ``ignore_other_modules`` (:meth:`clora_fast.controller.CLoRAController.import_lora`) and, for a pipeline,
    ``textual_inversion`` (:func:`clora_fast.integrations.diffusers.import_lora`)."""
    from .controller import CLoRAController
    if isinstance(obj, CLoRAController):
        return obj.import_lora(path, name, **kwargs)
    integ = _integration_for(obj)
    if hasattr(integ, "import_lora"):
        return integ.import_lora(obj, path, name, **kwargs)
    ctrl = integ.get_controller(obj)
    if ctrl is None:
        raise ValueError(f"import_lora: this {type(obj).__name__} is not patched by clora_fast")
    return ctrl.import_lora(path, name, **kwargs)


def save_pipeline(pipe, path, **kwargs) -> None:
    """Save a patched diffusers pipeline with every finished concept baked in (merged UNet, the concepts'
    tokens in the tokenizer and text encoder): ``from_pretrained(path)`` needs no clora_fast.  See
    :func:`clora_fast.integrations.diffusers.save_pipeline`."""
    from .integrations import diffusers as _diffusers
    return _diffusers.save_pipeline(pipe, path, **kwargs)
