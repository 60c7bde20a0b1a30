"""C-LoRA for Vision Transformers: transformers ViT and timm VisionTransformer.

This module only *finds* the key/value projections of every self-attention
block and *translates* calls into the framework-free
:class:`clora_fast.controller.CLoRAController` (concepts/tasks, fold, penalty,
save/load, merge).  Supported layouts:

* transformers 5.x (5.17 and 5.24 have the same layout): ``ViTAttention`` with
  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears (``vit.layers.{i}.attention``).
* transformers 4.x: ``ViTSelfAttention`` with ``query``/``key``/``value`` linears
  (``vit.encoder.layer.{i}.attention.attention``).
* timm: ``timm.layers.Attention`` (used by ``VisionTransformer`` and friends) with
  one fused ``qkv`` linear ``[3*d, in]``.  Only the K rows ``[d:2d]`` and the
  V rows ``[2d:3d]`` are adapted; Q is computed densely from rows ``[0:d]`` of
  the untouched weight.

K and V of one attention block see the same input: they form one *group* and
are computed together in one grouped launch (``controller.project_group``).
For the transformers layouts the block calls ``k_proj(h)`` and ``v_proj(h)``
separately; the first of the two calls computes both (one launch) and hands
the other output to the second call if it gets the very same input tensor.

Patching never writes the model's weights and never changes its module tree:
the projections' ``forward`` is overridden on the instance, and
:func:`unpatch` deletes the overrides, so ``state_dict()`` keys and values are
unchanged while patched and after.  The controller is registered on the model
as the submodule ``clora_controller`` (so ``model.to(...)`` moves it and
``model.parameters()`` include the LoRA factors); :func:`unpatch` removes it.

Public API (the lead's :func:`clora_fast.patch` dispatches here when
:func:`can_patch` is true)::

    ctrl = patch(model, rank=16)          # -> CLoRAController
    ctrl.begin_concept("task0"); ...; loss = task_loss + ctrl.penalty(); ...; ctrl.end_concept()
    ctrl.save("bank_dir"); unpatch(model)
    ctrl = load(model, "bank_dir")        # patch + restore the saved concepts
"""
from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["can_patch", "patch", "unpatch", "load", "get_controller", "find_attention_blocks",
           "ViTAdapter", "AttentionBlock", "CONTROLLER_ATTR"]

#: attribute (registered submodule) under which the controller lives on a patched model
CONTROLLER_ATTR = "clora_controller"
_ADAPTER_ATTR = "_clora_vit_adapter"

#: transformers ``config.model_type`` values whose attention layout this module handles
_HF_MODEL_TYPES = ("vit",)


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------
@dataclass
class AttentionBlock:
    """One self-attention block found in the model."""
    name: str                      # qualified module name inside the model ("" for the root)
    module: nn.Module              # the attention module
    layout: str                    # "hf" (q_proj/k_proj/v_proj), "hf_legacy" (query/key/value), "timm" (qkv)
    linears: Dict[str, nn.Linear] = field(default_factory=dict)  # role -> linear ("q","k","v" or "qkv")


def _is_linear(m) -> bool:
    # exactly nn.Linear: subclasses (quantized, LoRA-wrapped, ...) may not compute x @ W.T + b
    return type(m) is nn.Linear


def _timm_attention_classes() -> tuple:
    try:
        from timm.layers import Attention  # type: ignore
    except Exception:  # timm missing or broken: nothing of timm can be in the model anyway
        return ()
    return (Attention,)


def _timm_attention_ok(mod: nn.Module) -> bool:
    """True for timm attention modules whose forward calls ``self.qkv(x)`` on a fused q|k|v linear."""
    classes = _timm_attention_classes()
    if not classes or not isinstance(mod, classes):
        return False
    qkv = getattr(mod, "qkv", None)
    if not _is_linear(qkv) or qkv.out_features % 3 != 0:
        return False
    # variants with separate q/v biases (BEiT-style) call F.linear(x, qkv.weight, ...) themselves
    if getattr(mod, "q_bias", None) is not None or getattr(mod, "v_bias", None) is not None:
        return False
    try:
        src = inspect.getsource(type(mod).forward)
    except (OSError, TypeError):  # pragma: no cover - source always available for timm
        return False
    return "self.qkv(" in src


def find_attention_blocks(model: nn.Module) -> Tuple[Optional[str], List[AttentionBlock]]:
    """Every adaptable self-attention block of ``model`` and the framework (``"transformers"``,
    ``"timm"`` or ``None`` when nothing was found). Order: ``model.named_modules()`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (transformers ViT or timm VisionTransformer), "
                        f"got {type(model).__module__}.{type(model).__name__}")
    blocks: List[AttentionBlock] = []
    framework = None
    for name, mod in model.named_modules():
        if _timm_attention_ok(mod):
            blocks.append(AttentionBlock(name, mod, "timm", {"qkv": mod.qkv}))
            framework = framework or "timm"
            continue
        cls_name = type(mod).__name__
        if not cls_name.endswith("Attention"):
            continue
        if all(_is_linear(getattr(mod, a, None)) for a in ("q_proj", "k_proj", "v_proj")) and \
                type(mod).__module__.startswith("transformers."):
            blocks.append(AttentionBlock(name, mod, "hf",
                                         {"q": mod.q_proj, "k": mod.k_proj, "v": mod.v_proj}))
            framework = framework or "transformers"
        elif all(_is_linear(getattr(mod, a, None)) for a in ("query", "key", "value")) and \
                type(mod).__module__.startswith("transformers."):
            blocks.append(AttentionBlock(name, mod, "hf_legacy",
                                         {"q": mod.query, "k": mod.key, "v": mod.value}))
            framework = framework or "transformers"
    return framework, blocks


def _is_hf_vit(obj) -> bool:
    try:
        from transformers import PreTrainedModel  # type: ignore
    except Exception:
        return False
    return isinstance(obj, PreTrainedModel) and \
        getattr(getattr(obj, "config", None), "model_type", None) in _HF_MODEL_TYPES


def _is_timm_model(obj) -> bool:
    return isinstance(obj, nn.Module) and type(obj).__module__.startswith("timm.")


def can_patch(obj) -> bool:
    """True for a transformers ViT (``config.model_type == "vit"``: ``ViTModel``,
    ``ViTForImageClassification``, ...) or a timm model (``VisionTransformer``, ...)
    that holds at least one adaptable self-attention block. Never raises."""
    try:
        if not (_is_hf_vit(obj) or _is_timm_model(obj)):
            return False
        return len(find_attention_blocks(obj)[1]) > 0
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# the adapter (protocol of docs/ARCHITECTURE.md)
# --------------------------------------------------------------------------------------------
class _GroupCall:
    """Computes K and V of one block in one grouped launch.

    transformers calls ``k_proj(h)`` and ``v_proj(h)`` one after the other with the same
    tensor ``h``: the first call computes both and keeps the other output for the second
    call, which gets it only if it receives the very same tensor object (else it
    recomputes). The kept output is dropped as soon as it is handed out."""

    def __init__(self, controller, group: str, n: int):
        self.controller = controller
        self.group = group
        self.n = n
        self._x = None
        self._outs = None
        self._pending: set = set()

    def __call__(self, slot: int, x):
        if self._outs is not None and x is self._x and slot in self._pending:
            out = self._outs[slot]
            self._pending.discard(slot)
            if not self._pending:
                self.clear()
            return out
        outs = self.controller.project_group(self.group, x)
        pending = set(range(self.n)) - {slot}
        if pending:
            self._x, self._outs, self._pending = x, outs, pending
        else:
            self.clear()
        return outs[slot]

    def clear(self):
        self._x = None
        self._outs = None
        self._pending = set()


class ViTAdapter:
    """Builds the :class:`Site` list of a ViT and installs/uninstalls the projection overrides."""

    def __init__(self, model: nn.Module, framework: str, blocks: List[AttentionBlock]):
        self.model = model
        self.framework = framework
        self.blocks = blocks
        self._installed: List[nn.Module] = []
        self._calls: List[_GroupCall] = []

    # -- sites -------------------------------------------------------------------------------
    def site_specs(self) -> List[Tuple[str, torch.Tensor, Optional[torch.Tensor], str]]:
        """(name, weight, bias, group) for every adapted projection: K then V of each block."""
        specs = []
        for blk in self.blocks:
            prefix = f"{blk.name}." if blk.name else ""
            if blk.layout == "timm":
                qkv = blk.linears["qkv"]
                d = qkv.out_features // 3
                bias = qkv.bias
                for role, lo in (("k", d), ("v", 2 * d)):
                    specs.append((f"{prefix}qkv.{role}", qkv.weight[lo:lo + d],
                                  None if bias is None else bias[lo:lo + d], blk.name or "attn"))
            else:
                attrs = ("k_proj", "v_proj") if blk.layout == "hf" else ("key", "value")
                for role, attr in zip(("k", "v"), attrs):
                    lin = blk.linears[role]
                    specs.append((f"{prefix}{attr}", lin.weight, lin.bias, blk.name or "attn"))
        return specs

    def sites(self):
        from clora_fast.controller import Site
        return [Site(name=n, weight=w, bias=b, group=g) for n, w, b, g in self.site_specs()]

    # -- install / uninstall -----------------------------------------------------------------
    def install(self, controller) -> None:
        if self._installed:
            raise RuntimeError("ViTAdapter.install: already installed")
        for blk in self.blocks:
            group = blk.name or "attn"
            call = _GroupCall(controller, group, 2)
            self._calls.append(call)
            if blk.layout == "timm":
                qkv = blk.linears["qkv"]
                d = qkv.out_features // 3

                def qkv_forward(x, _qkv=qkv, _d=d, _call=call):
                    # Q: dense from the untouched rows [0:d]; K, V: one grouped launch
                    q = F.linear(x, _qkv.weight[:_d], None if _qkv.bias is None else _qkv.bias[:_d])
                    k, v = _call.controller.project_group(_call.group, x)
                    return torch.cat([q, k.to(q.dtype), v.to(q.dtype)], dim=-1)

                qkv.forward = qkv_forward
                self._installed.append(qkv)
            else:
                for slot, role in enumerate(("k", "v")):
                    lin = blk.linears[role]

                    def proj_forward(x, _slot=slot, _call=call):
                        return _call(_slot, x)

                    lin.forward = proj_forward
                    self._installed.append(lin)

    def uninstall(self) -> None:
        """Remove every override; the model is then bit-identical to before :func:`patch`."""
        for mod in self._installed:
            if "forward" in mod.__dict__:
                del mod.__dict__["forward"]
        self._installed = []
        for c in self._calls:
            c.clear()
        self._calls = []

    # -- optional protocol hooks -------------------------------------------------------------
    def identity(self) -> str:
        """Hash of the base model's architecture and of its adapted (K/V) weights."""
        h = hashlib.sha256()
        h.update(f"{self.framework}:{type(self.model).__name__}".encode())
        for name, w, b, _ in self.site_specs():
            h.update(name.encode())
            h.update(str(tuple(w.shape)).encode())
            h.update(w.detach().float().cpu().contiguous().numpy().tobytes())
            if b is not None:
                h.update(b.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def on_begin_concept(self, name, idx) -> None:
        for c in self._calls:
            c.clear()

    def on_remove_concept(self, idx) -> None:
        for c in self._calls:
            c.clear()


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def get_controller(model: nn.Module):
    """The controller of a model patched by this module, or ``None``."""
    return getattr(model, CONTROLLER_ATTR, None) if isinstance(model, nn.Module) else None


def _check_rank(rank, specs) -> int:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be a positive int, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for name, w, _, _ in specs:
        out_f, in_f = w.shape
        if rank > min(out_f, in_f):
            raise ValueError(
                f"rank={rank} is larger than min(in, out) = {min(out_f, in_f)} of the projection "
                f"{name!r} (weight shape [out, in] = [{out_f}, {in_f}]); use rank <= {min(out_f, in_f)}")
    return rank


def _prepare(model, what: str) -> ViTAdapter:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be a torch.nn.Module (transformers ViT or timm "
                        f"VisionTransformer), got {type(model).__module__}.{type(model).__name__}")
    if get_controller(model) is not None or getattr(model, _ADAPTER_ATTR, None) is not None:
        raise RuntimeError(f"{what}: this {type(model).__name__} is already patched by clora_fast; "
                           f"call clora_fast.integrations.vit.unpatch(model) first")
    framework, blocks = find_attention_blocks(model)
    if not blocks:
        raise ValueError(
            f"{what}: found no self-attention layers to adapt in {type(model).__module__}."
            f"{type(model).__name__} (looked for transformers ViTAttention.{{q,k,v}}_proj, "
            f"ViTSelfAttention.{{query,key,value}} and timm Attention.qkv, all plain nn.Linear)")
    return ViTAdapter(model, framework, blocks)


def _controller_kwargs(rank, alpha, penalty_weight, backend) -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(rank=rank, alpha=alpha, backend=backend)
    if penalty_weight is not None:
        kw["penalty_weight"] = penalty_weight
    return kw


def _attach(model, adapter, controller) -> None:
    adapter.install(controller)
    setattr(model, CONTROLLER_ATTR, controller)  # registered submodule: moves with model.to()
    object.__setattr__(model, _ADAPTER_ATTR, adapter)


def patch(model: nn.Module, *, rank: int = 16, alpha: Optional[float] = None,
          penalty_weight: Optional[float] = None, backend: str = "auto"):
    """Adapt K and V of every self-attention block of a transformers ViT or timm ViT.

    ``penalty_weight=None`` uses the controller's default. Returns the
    :class:`~clora_fast.controller.CLoRAController` (also at ``model.clora_controller``).
    Raises ``ValueError`` when no attention layer is found or ``rank`` exceeds
    ``min(in, out)`` of a projection, ``RuntimeError`` when already patched."""
    adapter = _prepare(model, "patch")
    _check_rank(rank, adapter.site_specs())
    from clora_fast.controller import CLoRAController
    controller = CLoRAController(adapter.sites(), adapter=adapter,
                                 **_controller_kwargs(rank, alpha, penalty_weight, backend))
    _attach(model, adapter, controller)
    return controller


def unpatch(model: nn.Module) -> nn.Module:
    """Undo :func:`patch`: the model's modules, ``state_dict()`` and outputs are bit-identical to
    before patching (learned concepts are dropped; :meth:`CLoRAController.merge` first and copy the
    folded weights yourself if you want to keep them in a plain model). Returns ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    adapter = getattr(model, _ADAPTER_ATTR, None)
    if adapter is None:
        raise ValueError(f"unpatch: this {type(model).__name__} is not patched by "
                         f"clora_fast.integrations.vit (no {CONTROLLER_ATTR!r} found)")
    adapter.uninstall()
    if CONTROLLER_ATTR in model._modules:
        del model._modules[CONTROLLER_ATTR]
    object.__delattr__(model, _ADAPTER_ATTR)
    return model


def load(model: nn.Module, path, *, backend: str = "auto"):
    """Patch ``model`` and restore a controller saved with ``controller.save(path)``
    (safetensors + JSON): rank, alpha, penalty weight, every finished concept and the
    current one. The saved sites must match the model's K/V projections (names and shapes)."""
    adapter = _prepare(model, "load")
    from clora_fast.controller import CLoRAController
    controller = CLoRAController.load_state(path, adapter.sites(), adapter=adapter, backend=backend)
    _attach(model, adapter, controller)
    return controller
