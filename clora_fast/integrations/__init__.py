"""Framework integrations (diffusers, transformers / timm ViT) and what they share."""
from __future__ import annotations

import warnings

from ..controller import _TRACEABLE, TRACED_MIN, trace_kv  # noqa: F401 - the integrations' and tests' names


class UnmergedSaveWarning:
    """The instance-level ``save_pretrained`` of a patched model (a diffusers UNet, a transformers ViT) while
    patched: the model's ``state_dict`` holds the base weights ``W0`` only (patching never writes them), so a
    save with concepts that are not merged writes a model without them.  That may be intended (keeping the
    base), so it is a warning, not an error; then the class's own ``save_pretrained`` runs unchanged.
    ``controller_of``: a module-level function (picklable), model -> controller or None."""

    def __init__(self, model, controller_of):
        self.model, self.controller_of = model, controller_of

    def __call__(self, *args, **kwargs):
        model = self.model
        ctrl = self.controller_of(model)
        if ctrl is not None and not ctrl.merged and (ctrl.has_past or ctrl.active_concept is not None):
            warnings.warn(
                f"clora_fast: {type(model).__name__}.save_pretrained while patched writes the base weights W0 "
                f"only: the C-LoRA concepts (folded past{' and the active concept' if ctrl.active_concept is not None else ''}) "
                f"are not in them. Call controller.merge() first to save W0 + P (end_concept() if a concept is "
                f"active), or controller.save(path) to save the concept bank", UserWarning, stacklevel=2)
        return type(model).save_pretrained(model, *args, **kwargs)


def install_save_warning(model, controller_of):
    """Put :class:`UnmergedSaveWarning` on ``model`` when its class has ``save_pretrained``; returns what
    :func:`uninstall_save_warning` needs: ``(the instance attribute it replaced or None,)``, or None when
    nothing was installed."""
    if not callable(getattr(type(model), "save_pretrained", None)):
        return None
    prev = model.__dict__.get("save_pretrained")
    object.__setattr__(model, "save_pretrained", UnmergedSaveWarning(model, controller_of))
    return (prev,)


def uninstall_save_warning(model, token) -> None:
    if token is None:
        return
    prev = token[0]
    if isinstance(model.__dict__.get("save_pretrained"), UnmergedSaveWarning):
        if prev is None:
            model.__dict__.pop("save_pretrained", None)
        else:
            object.__setattr__(model, "save_pretrained", prev)
