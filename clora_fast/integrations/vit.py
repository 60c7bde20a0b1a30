"""C-LoRA for Vision Transformers: transformers ViT and timm VisionTransformer.

This module only *finds* the key/value projections of every self-attention
block and *translates* calls into the framework-free
:class:`clora_fast.controller.CLoRAController` (concepts/tasks, fold, penalty,
save/load, merge).  Supported layouts:

* transformers 5.x (5.17 and 5.24 have the same layout): ``ViTAttention`` with
  ``q_proj``/``k_proj``/``v_proj``/``o_proj`` linears (``vit.layers.{i}.attention``); the same layout in
  DeiT, DINOv2 (with registers), DINOv3 ViT, BEiT, CLIP / SigLIP vision towers, ViTMAE, ViTMSN, I-JEPA and Swin
  (``_HF_MODEL_TYPES``; Data2VecVision keeps ``query``/``key``/``value``). Other transformers models (a whole
  ``CLIPModel`` with its text tower, Swinv2, ...) are refused, naming what was found.
* transformers 4.x: ``ViTSelfAttention`` with ``query``/``key``/``value`` linears
  (``vit.encoder.layer.{i}.attention.attention``).
* timm: ``timm.layers.Attention`` (used by ``VisionTransformer`` and friends) with
  one fused ``qkv`` linear ``[3*d, in]``.  Only the K rows ``[d:2d]`` and the
  V rows ``[2d:3d]`` are adapted; Q is computed densely from rows ``[0:d]`` of
  the untouched weight. Other timm attention (EVA, BEiT's ``q_bias``/``v_bias``, Swin, CaiT, ...) is refused:
  never only some blocks of a model (``_unsupported_attention``). Attention *pooling* heads (``global_pool='map'``)
  are not self-attention blocks and stay as they are.

K and V of one attention block see the same input: they form one *group* and
are computed together in one grouped launch (``controller.project_group``).
For the transformers layouts the block calls ``k_proj(h)`` and ``v_proj(h)``
separately; the first of the two calls computes both (one launch) and hands
the other output to the second call if it gets the very same input tensor.

Patching never writes the model's weights and never changes its module tree:
the projections' ``forward`` is overridden on the instance (a projection that
already has an instance ``forward``, e.g. an accelerate offloading hook, is
refused), the input embedding gets one forward hook for reentrant gradient
checkpointing (:class:`_CheckpointInputRequiresGrad`), and :func:`unpatch`
removes them all, so ``state_dict()`` keys and values are unchanged while
patched and after.  The controller is *not* a submodule of the
model (the model's ``parameters()``/``state_dict()`` stay as they were): train
``controller.trainable_parameters()``; get it back with :func:`get_controller`.
It follows the base weights when the model is moved (``model.to(...)``).
``copy.deepcopy`` of a patched model gives an independent patched copy.

Public API (the lead's :func:`clora_fast.patch` dispatches here when
:func:`can_patch` is true)::

    ctrl = patch(model, rank=16)          # -> CLoRAController
    ctrl.begin_concept("task0"); ...; loss = task_loss + ctrl.penalty(); ...; ctrl.end_concept()
    ctrl.save("bank_dir"); unpatch(model)
    ctrl = load(model, "bank_dir")        # patch + restore the saved concepts
"""
from __future__ import annotations

import functools
import importlib
import inspect
import types
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from . import install_save_warning, trace_kv, uninstall_save_warning

__all__ = ["can_patch", "patch", "unpatch", "load", "get_controller", "find_attention_blocks",
           "ViTAdapter", "AttentionBlock"]

_ADAPTER_ATTR = "_clora_vit_adapter"

#: transformers ``config.model_type`` values whose attention layout this module handles: each family's attention
#: calls ``k_proj(h)``/``v_proj(h)`` (or ``key(h)``/``value(h)``) on the block's hidden states, and
#: tests/test_vit.py checks each against the model with its K/V weights set to W0 + P + s*B@A
_HF_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "dinov3_vit", "beit", "data2vec-vision",
                   "clip_vision_model", "siglip_vision_model", "vit_mae", "vit_msn", "ijepa", "swin")
#: the modeling modules of those families: attention classes defined anywhere else in transformers are not adapted
_HF_ATTENTION_MODULES = frozenset(f"transformers.models.{m}" for m in (
    "vit.modeling_vit", "deit.modeling_deit", "dinov2.modeling_dinov2",
    "dinov2_with_registers.modeling_dinov2_with_registers", "dinov3_vit.modeling_dinov3_vit", "beit.modeling_beit",
    "data2vec.modeling_data2vec_vision", "clip.modeling_clip", "siglip.modeling_siglip", "vit_mae.modeling_vit_mae",
    "vit_msn.modeling_vit_msn", "ijepa.modeling_ijepa", "swin.modeling_swin"))


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


@functools.lru_cache(maxsize=None)
def _timm_attention_classes() -> tuple:
    """timm's ViT ``Attention`` class: ``timm.layers`` since timm 1.0.1x, ``timm.models.vision_transformer``
    before (timm 1.0.9 has it only there)."""
    found = []
    for mod_name in ("timm.layers", "timm.models.vision_transformer"):
        try:
            cls = getattr(importlib.import_module(mod_name), "Attention")
        except Exception:  # noqa: BLE001 - timm missing, broken or laid out otherwise
            continue
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


def _timm_attention_ok(mod: nn.Module) -> bool:
    """True for timm attention modules whose forward calls ``self.qkv(x)`` on a fused q|k|v linear."""
    if not isinstance(mod, _timm_attention_classes()):     # () without timm: never
        return False
    qkv = getattr(mod, "qkv", None)
    if not _is_linear(qkv) or qkv.out_features % 3 != 0:
        return False
    # variants with separate q/v biases (BEiT-style) call F.linear(x, qkv.weight, ...) themselves
    if getattr(mod, "q_bias", None) is not None or getattr(mod, "v_bias", None) is not None:
        return False
    return _forward_calls_qkv(type(mod))


@functools.lru_cache(maxsize=None)
def _forward_calls_qkv(cls) -> bool:
    try:
        src = inspect.getsource(cls.forward)
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
        if type(mod).__module__ not in _HF_ATTENTION_MODULES:
            continue
        # K and V must be plain linears (they are adapted); Q is only computed, whatever wraps it
        if hasattr(mod, "q_proj") and all(_is_linear(getattr(mod, a, None)) for a in ("k_proj", "v_proj")):
            blocks.append(AttentionBlock(name, mod, "hf",
                                         {"q": mod.q_proj, "k": mod.k_proj, "v": mod.v_proj}))
            framework = framework or "transformers"
        elif hasattr(mod, "query") and all(_is_linear(getattr(mod, a, None)) for a in ("key", "value")):
            blocks.append(AttentionBlock(name, mod, "hf_legacy",
                                         {"q": mod.query, "k": mod.key, "v": mod.value}))
            framework = framework or "transformers"
    return framework, blocks


def _wrapped_projections(model: nn.Module) -> List[str]:
    """``"<module>.<attr> (<type>)"`` for every K/V (or timm qkv) projection that is not a plain ``nn.Linear``
    (e.g. wrapped by PEFT's LoRA or quantized): the reason such attention blocks are not adaptable."""
    out = []
    for name, mod in model.named_modules():
        attrs = ()
        if isinstance(mod, _timm_attention_classes()):
            attrs = ("qkv",)
        elif type(mod).__name__.endswith("Attention") and type(mod).__module__.startswith("transformers."):
            attrs = ("k_proj", "v_proj") if hasattr(mod, "k_proj") else ("key", "value")
        for a in attrs:
            sub = getattr(mod, a, None)
            if isinstance(sub, nn.Module) and not _is_linear(sub):
                out.append(f"{name}.{a} ({type(sub).__module__}.{type(sub).__name__})")
    return out


#: timm attention *pooling* heads (a learned latent query attending over the tokens, e.g. ``global_pool='map'``):
#: not self-attention blocks of the backbone, so they are left as they are and do not block patching
_NOT_SELF_ATTENTION = frozenset({"AttentionPoolLatent", "AttentionPoolPrr", "AttentionPool2d", "RotAttentionPool2d"})

_SUPPORTED = ("supported: timm ViTs whose blocks use timm.layers.Attention with its fused qkv linear (vit_*, deit_*, "
              "VisionTransformerDistilled, NaFlexVit, hybrid ViTs; not EVA/EVA-02, BEiT, Swin, CaiT, relpos, SAM, "
              "differential attention), and transformers models of model_type "
              f"{', '.join(repr(t) for t in _HF_MODEL_TYPES)} (ViT, DeiT, DINOv2, DINOv3 ViT, BEiT, "
              "Data2VecVision, CLIPVisionModel(WithProjection), SiglipVisionModel, ViTMAE, ViTMSN, I-JEPA, Swin)")


def _looks_like_attention(mod: nn.Module) -> bool:
    """A self-attention-like module: its class is named ``...Attention`` / ``...Attn`` or it holds a ``qkv``."""
    return (type(mod).__name__.lower().endswith(("attention", "attn"))
            or isinstance(getattr(mod, "qkv", None), (nn.Module, nn.Parameter)))


def _unsupported_attention(model: nn.Module, blocks: List[AttentionBlock]) -> List[str]:
    """``"<name> (<module>.<class>)"`` of every timm or transformers self-attention-like module of ``model`` that
    is not one of the adapted ``blocks`` (nor inside or around one), and of every transformers model in it whose
    ``model_type`` is not supported (e.g. a ``CLIPModel``: its text tower shares the vision tower's attention
    class): patching the rest would adapt only some blocks, and a model with nothing else would silently learn
    nothing, so :func:`patch` refuses both and names these."""
    try:
        from transformers import PreTrainedModel  # type: ignore
    except Exception:  # noqa: BLE001 - transformers missing or broken
        PreTrainedModel = None
    adapted = [blk.name for blk in blocks]

    def related(name):
        return any(name == a or not a or not name or name.startswith(a + ".") or a.startswith(name + ".")
                   for a in adapted)

    out = []
    for name, mod in model.named_modules():
        cls = type(mod)
        if PreTrainedModel is not None and isinstance(mod, PreTrainedModel):
            model_type = getattr(getattr(mod, "config", None), "model_type", None)
            if model_type not in _HF_MODEL_TYPES:
                out.append(f"{name or '<root>'} ({cls.__module__}.{cls.__name__}, model_type {model_type!r})")
                continue
        if (not cls.__module__.startswith(("timm.", "transformers.")) or cls.__name__ in _NOT_SELF_ATTENTION
                or not _looks_like_attention(mod) or related(name)):
            continue
        out.append(f"{name or '<root>'} ({cls.__module__}.{cls.__name__})")
    return out


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
    """True for a transformers ViT (``config.model_type`` in :data:`_HF_MODEL_TYPES`: ``ViTModel``,
    ``ViTForImageClassification``, ``DeiTForImageClassification``, ``Dinov2Model``, ``CLIPVisionModel``, ...) or a timm model (``VisionTransformer``, ...)
    that holds at least one adaptable self-attention block and no self-attention this module
    cannot adapt, or any model this module patched. Never raises."""
    try:
        if isinstance(obj, nn.Module) and getattr(obj, _ADAPTER_ATTR, None) is not None:
            return True  # patched by us (so clora_fast.unpatch/load find their way back)
        if not (_is_hf_vit(obj) or _is_timm_model(obj)):
            return False
        blocks = find_attention_blocks(obj)[1]
        return len(blocks) > 0 and not _unsupported_attention(obj, blocks)
    except Exception:
        return False


# --------------------------------------------------------------------------------------------
# the adapter (protocol of docs/ARCHITECTURE.md)
# --------------------------------------------------------------------------------------------
# Under torch.compile the K/V projections are traced into the graph where the torch allows it (see
# integrations.trace_kv), else they run as eager islands (one graph break per block).


def _refresh_sites(call: "_GroupCall") -> None:
    """Re-point the group's sites at the live parameters if the model was converted after
    patching (``model.to(device/dtype)`` gives timm's fused ``qkv`` new storage, so the row
    views taken at patch time would go stale; ``load_state_dict(assign=True)`` replaces
    parameters). Cheap identity/pointer checks; runs outside torch.compile tracing."""
    if call.sites is None:
        return
    if call.timm:
        qkv = call.linears[0]
        w = qkv.weight
        k_site = call.sites[0]
        if (k_site.weight.device == w.device and k_site.weight.dtype == w.dtype
                and k_site.weight.data_ptr() == w.data_ptr() + call.d * w.stride(0) * w.element_size()):
            return                                          # still rows d: of the live qkv weight (no view built)
        wd = w.detach()
        bd = None if qkv.bias is None else qkv.bias.detach()
        for site, lo in zip(call.sites, (call.d, 2 * call.d)):
            site.weight = wd[lo:lo + call.d]
            site.bias = None if bd is None else bd[lo:lo + call.d]
    else:
        for site, lin in zip(call.sites, call.linears):
            if site.weight is not lin.weight or site.bias is not lin.bias:
                site.weight, site.bias = lin.weight, lin.bias


_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)  # torch >= 2.5


def _refresh_and_project_eager(call: "_GroupCall", x):
    # checked here, where it always runs eagerly (directly, or through the torch.compiler.disable'd wrapper
    # below): evaluated inside a frame dynamo traces, these calls made torch 2.7's dynamo run _kv eagerly
    # and compile the controller's frames instead, which fails on their data-pointer cache checks
    if torch.jit.is_tracing() or _is_exporting():
        # the grouped projection (data-pointer cache, custom autograd) cannot be recorded into a graph:
        # torch.jit.trace / torch.export would fail deep inside with errors that do not say what to do
        raise RuntimeError(
            "clora_fast: torch.jit.trace / torch.export of a model with unmerged C-LoRA adapters is not "
            "supported (the adapted K/V projections cannot be recorded into a graph); for inference call "
            "controller.end_concept() (if a concept is active) and controller.merge() first: the merged model "
            "computes plain linears and traces/exports like an unpatched one (or clora_fast.unpatch(model))")
    _refresh_sites(call)
    return call.controller.project_group(call.group, x)


_refresh_and_project_compiled = torch.compiler.disable(_refresh_and_project_eager)


def _refuse_script():
    # torch.jit.script calls ``__prepare_scriptable__`` on every submodule before compiling anything; the
    # adapted modules' forwards call back into Python (and a script would compile the class's forward,
    # i.e. silently without the adapters), so refuse here with what to do instead
    raise RuntimeError(
        "clora_fast: torch.jit.script cannot compile a model patched by clora_fast (its adapted K/V projections "
        "call back into Python). Use torch.compile (supported), or torch.jit.trace / torch.export after "
        "controller.merge(); for a plain model with the finished concepts in its weights: controller.merge(), "
        "copy model.state_dict(), clora_fast.unpatch(model), then model.load_state_dict(that copy)")


def _kv(call: "_GroupCall", x):
    """K and V (all outputs of the group) for ``x``, after making sure the sites are live."""
    if trace_kv():
        return call.controller._project_group_traced(call.group, x, call.live_bases())
    if torch.compiler.is_compiling():
        return _refresh_and_project_compiled(call, x)
    return _refresh_and_project_eager(call, x)


class _GroupCall:
    """Computes K and V of one block in one grouped launch.

    transformers calls ``k_proj(h)`` and ``v_proj(h)`` one after the other with the same
    tensor ``h``: the first call computes both and keeps the other output for the second
    call, which gets it only if it receives the very same tensor object (else it
    recomputes). The kept output is dropped as soon as it is handed out."""

    def __init__(self, controller, group: str, linears: List[nn.Linear], timm: bool = False):
        self.controller = controller
        self.group = group
        self.linears = linears
        self.timm = timm
        self.d = linears[0].out_features // 3 if timm else None
        names = controller.group_sites(group)
        self.sites = [controller.sites[controller.site_index(n)] for n in names]
        self._x = None
        self._outs = None
        self._pending: set = set()

    def __call__(self, slot: int, x):
        ctrl = self.controller
        if ctrl.pristine:  # no concept, nothing folded (or merged into W0): the plain linear
            lin = self.linears[slot]
            return F.linear(x, lin.weight, lin.bias)
        if trace_kv():
            # in a torch.compile trace: this projection alone, nothing kept on self (inside a compiled checkpoint
            # region that would be a side effect dynamo refuses)
            return ctrl._project_group_traced(self.group, x, self.live_bases(), pos=slot)[0]
        if self._outs is not None and x is self._x and slot in self._pending:
            out = self._outs[slot]
            self._pending.discard(slot)
            if not self._pending:
                self.clear()
            return out
        outs = _kv(self, x)
        pending = set(range(len(self.linears))) - {slot}
        if pending:
            self._x, self._outs, self._pending = x, outs, pending
        else:
            self.clear()
        return outs[slot]

    def clear(self):
        self._x = None
        self._outs = None
        self._pending = set()

    def live_bases(self) -> List[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(weight, bias) of each site of the group as the model holds them now (timm: rows of the live fused
        ``qkv``): what a torch.compile trace folds the past into."""
        if self.timm:
            qkv, d = self.linears[0], self.d
            w, b = qkv.weight, qkv.bias
            return [(w[lo:lo + d], None if b is None else b[lo:lo + d]) for lo in (d, 2 * d)]
        return [(lin.weight, lin.bias) for lin in self.linears]


class _ProjForward:
    """Instance ``forward`` of a transformers K or V linear while patched (a plain callable
    object, not a closure, so ``copy.deepcopy`` of a patched model stays consistent)."""

    def __init__(self, call: _GroupCall, slot: int):
        self.call = call
        self.slot = slot

    def __call__(self, x):
        return self.call(self.slot, x)


class _QKVForward:
    """Instance ``forward`` of a timm fused ``qkv`` linear while patched: Q dense from the
    untouched rows ``[0:d]``, K and V of the block in one grouped launch."""

    def __init__(self, qkv: nn.Linear, call: _GroupCall):
        self.qkv = qkv
        self.d = qkv.out_features // 3
        self.call = call

    def __call__(self, x):
        qkv, d = self.qkv, self.d
        if self.call.controller.pristine:
            return F.linear(x, qkv.weight, qkv.bias)
        q = F.linear(x, qkv.weight[:d], None if qkv.bias is None else qkv.bias[:d])
        k, v = _kv(self.call, x)
        return torch.cat([q, k.to(q.dtype), v.to(q.dtype)], dim=-1)


_TIMM_REENTRANT: list = []      # [timm.layers.use_reentrant_ckpt or None], once looked up


def _timm_use_reentrant_ckpt():
    """timm's ``use_reentrant_ckpt`` (whether its ``checkpoint``/``checkpoint_seq`` are reentrant, set by
    ``timm.layers.set_reentrant_ckpt`` or ``TIMM_REENTRANT_CKPT``), or ``None`` for a timm without it (timm
    1.0.9 calls torch's checkpoint without ``use_reentrant``: torch's reentrant default).  Looked up once,
    at install (dynamo cannot trace the import in a compiled forward)."""
    if not _TIMM_REENTRANT:
        try:
            fn = getattr(importlib.import_module("timm.layers"), "use_reentrant_ckpt", None)
        except Exception:  # noqa: BLE001 - timm missing or broken
            fn = None
        _TIMM_REENTRANT.append(fn)
    return _TIMM_REENTRANT[0]


def _reentrant_checkpointing(ckpt_modules: List[nn.Module]) -> bool:
    """True when one of ``ckpt_modules`` (the modules carrying a checkpointing flag) would checkpoint now
    with torch's *reentrant* checkpoint, or may (unknown ``use_reentrant``: assumed reentrant)."""
    for m in ckpt_modules:
        if getattr(m, "gradient_checkpointing", False) and m.training:
            # transformers: _gradient_checkpointing_func = functools.partial(checkpoint, **kwargs); 4.x
            # defaults to use_reentrant=True, 5.x to False
            kw = getattr(getattr(m, "_gradient_checkpointing_func", None), "keywords", None)
            if not (isinstance(kw, dict) and kw.get("use_reentrant") is False):
                return True
        elif getattr(m, "grad_checkpointing", False):   # timm checkpoints in eval mode too
            fn = _timm_use_reentrant_ckpt()
            if fn is None or fn():
                return True
    return False


class _CheckpointInputRequiresGrad:
    """Forward hook on the model's input embedding (transformers: ``get_input_embeddings()``, the patch
    embedding; timm: ``patch_embed``) while patched.

    With a frozen backbone nothing that enters a checkpointed block requires grad, and torch's *reentrant*
    checkpoint then records no graph for the block at all: the adapters inside it get no gradient and the
    concept silently learns nothing (torch only warns "None of the inputs have requires_grad=True").
    transformers 4.x checkpoints reentrantly by default and calls ``enable_input_require_grads()`` only for
    PEFT models; timm does with ``set_reentrant_ckpt(True)``. So, only while a concept trains under reentrant
    checkpointing, the embedding output is made to require grad (what ``enable_input_require_grads`` does);
    otherwise nothing is done (it would cost the input gradient of the first block). A callable object,
    not a closure, so ``copy.deepcopy``/pickling of a patched model stay consistent."""

    def __init__(self, adapter: "ViTAdapter"):
        self.adapter = adapter

    def __call__(self, module, args, output):
        ctrl = self.adapter.controller
        if (torch.is_grad_enabled() and isinstance(output, torch.Tensor) and not output.requires_grad
                and ctrl is not None and ctrl.active_concept is not None
                and _reentrant_checkpointing(self.adapter._ckpt_modules)):
            output.requires_grad_(True)


def _checkpointing_modules(model: nn.Module) -> Tuple[List[nn.Module], List[nn.Module]]:
    """(input embeddings, modules carrying a checkpointing flag) of the transformers/timm models in
    ``model`` (the root or any submodule): see :class:`_CheckpointInputRequiresGrad`."""
    try:
        from transformers import PreTrainedModel  # type: ignore
    except Exception:  # noqa: BLE001 - transformers missing or broken
        PreTrainedModel = ()
    embeddings, flags = [], []
    for mod in model.modules():
        if hasattr(mod, "gradient_checkpointing") or hasattr(mod, "grad_checkpointing"):
            flags.append(mod)
        emb = None
        if hasattr(mod, "grad_checkpointing") and isinstance(getattr(mod, "patch_embed", None), nn.Module):
            emb = mod.patch_embed                                             # timm
        elif PreTrainedModel and isinstance(mod, PreTrainedModel):
            try:
                emb = mod.get_input_embeddings()
            except Exception:  # noqa: BLE001 - NotImplementedError, ... : no embedding to hook
                emb = None
        if isinstance(emb, nn.Module) and not any(e is emb for e in embeddings):
            embeddings.append(emb)
    return embeddings, flags


class ViTAdapter:
    """Builds the :class:`Site` list of a ViT and installs/uninstalls the projection overrides
    (the adapter protocol of docs/ARCHITECTURE.md)."""

    def __init__(self, model: nn.Module, framework: str, blocks: List[AttentionBlock]):
        self.model = model
        self.framework = framework
        self.blocks = blocks
        self.controller = None
        self._installed: List[nn.Module] = []
        self._rebind: List[nn.Module] = []   # had their class forward bound on the instance: put back on uninstall
        self._calls: List[_GroupCall] = []
        self._ckpt_modules: List[nn.Module] = []
        self._input_hooks: list = []      # RemovableHandles of the _CheckpointInputRequiresGrad hooks
        self._save_token = None           # install_save_warning's token for the model's save_pretrained

    @staticmethod
    def _group(blk: AttentionBlock) -> str:
        return blk.name or "attn"

    # -- sites -------------------------------------------------------------------------------
    def site_specs(self) -> List[Tuple[str, torch.Tensor, Optional[torch.Tensor], str]]:
        """(name, weight, bias, group) for every adapted projection: K then V of each block.
        timm K/V weights and biases are row views of the fused ``qkv`` parameters."""
        specs = []
        for blk in self.blocks:
            prefix = f"{blk.name}." if blk.name else ""
            if blk.layout == "timm":
                qkv = blk.linears["qkv"]
                d = qkv.out_features // 3
                # detached row views: share storage (and version counter) with the parameter,
                # but are leaves, so copy.deepcopy of the patched model works
                w = qkv.weight.detach()
                bias = None if qkv.bias is None else qkv.bias.detach()
                for role, lo in (("k", d), ("v", 2 * d)):
                    specs.append((f"{prefix}qkv.{role}", w[lo:lo + d],
                                  None if bias is None else bias[lo:lo + d], self._group(blk)))
            else:
                attrs = ("k_proj", "v_proj") if blk.layout == "hf" else ("key", "value")
                for role, attr in zip(("k", "v"), attrs):
                    lin = blk.linears[role]
                    specs.append((f"{prefix}{attr}", lin.weight, lin.bias, self._group(blk)))
        return specs

    def sites(self):
        from clora_fast.controller import Site
        return [Site(name=n, weight=w, bias=b, group=g) for n, w, b, g in self.site_specs()]

    # -- install / uninstall -----------------------------------------------------------------
    def install(self, controller) -> None:
        if self._installed:
            raise RuntimeError("ViTAdapter.install: already installed")
        self.controller = controller
        for blk in self.blocks:
            if blk.layout == "timm":
                qkv = blk.linears["qkv"]
                call = _GroupCall(controller, self._group(blk), [qkv], timm=True)
                self._rebind += [qkv] if _own_class_forward(qkv) else []
                qkv.forward = _QKVForward(qkv, call)
                qkv.__prepare_scriptable__ = _refuse_script
                self._installed.append(qkv)
            else:
                lins = [blk.linears["k"], blk.linears["v"]]
                call = _GroupCall(controller, self._group(blk), lins)
                for slot, lin in enumerate(lins):
                    self._rebind += [lin] if _own_class_forward(lin) else []
                    lin.forward = _ProjForward(call, slot)
                    lin.__prepare_scriptable__ = _refuse_script
                    self._installed.append(lin)
            self._calls.append(call)
        self._save_token = install_save_warning(self.model, get_controller)
        embeddings, self._ckpt_modules = _checkpointing_modules(self.model)
        if self._ckpt_modules:  # models that cannot checkpoint get no hook
            self._input_hooks = [e.register_forward_hook(_CheckpointInputRequiresGrad(self)) for e in embeddings]
            if any(hasattr(m, "grad_checkpointing") for m in self._ckpt_modules):
                _timm_use_reentrant_ckpt()                  # looked up now, not inside a torch.compile trace

    def uninstall(self) -> None:
        """Remove every override (unmerging first if merged): the model is then bit-identical
        to before :func:`patch`."""
        if self.controller is not None and self.controller.merged:
            self.controller.unmerge()
        for mod in self._installed:
            mod.__dict__.pop("forward", None)
            mod.__dict__.pop("__prepare_scriptable__", None)
        for mod in self._rebind:
            mod.forward = types.MethodType(type(mod).forward, mod)
        self._installed, self._rebind = [], []
        for h in self._input_hooks:
            h.remove()
        self._input_hooks, self._ckpt_modules = [], []
        uninstall_save_warning(self.model, self._save_token)
        self._save_token = None
        self.on_state_change()
        self._calls = []
        if self.controller is not None:
            self.controller._mark_unpatched()      # merge() etc. would now write / train a model that ignores it

    # -- optional protocol hooks -------------------------------------------------------------
    def identity(self) -> str:
        """Framework and layout of the patched model (the bank itself hashes the K/V weights)."""
        layouts = sorted({blk.layout for blk in self.blocks})
        return f"clora_fast.vit:{self.framework}:{'+'.join(layouts)}"

    def on_state_change(self) -> None:
        for c in self._calls:
            c.clear()

    def base_parameters(self) -> List[torch.Tensor]:
        """The model's parameters behind the sites (timm: the whole fused qkv weight and bias)."""
        return [p for blk in self.blocks for lin in blk.linears.values() for p in (lin.weight, lin.bias)
                if p is not None and lin in self._installed]

    def lora_tensors(self, factors) -> Dict[str, torch.Tensor]:
        """``controller.export_lora`` in PEFT's layout for this model: ``get_peft_model(model,
        LoraConfig(r=R, lora_alpha=R, target_modules=[...]))`` then ``set_peft_model_state_dict`` loads it and
        reproduces the adapted K/V.  transformers: ``k_proj``/``v_proj`` (or ``key``/``value``), R = rank x
        exported concepts; timm: the fused ``qkv`` (K and V side by side, zero rows for Q), R = twice that."""
        pre = "base_model.model."
        out = {}
        for blk in self.blocks:
            prefix = f"{blk.name}." if blk.name else ""
            if blk.layout == "timm":
                (ak, bk), (av, bv) = factors[f"{prefix}qkv.k"], factors[f"{prefix}qkv.v"]
                d, rk = bk.shape[0], ak.shape[0]
                B = bk.new_zeros((3 * d, rk + av.shape[0]))
                B[d:2 * d, :rk] = bk
                B[2 * d:, rk:] = bv
                out[f"{pre}{prefix}qkv.lora_A.weight"] = torch.cat([ak, av], 0)
                out[f"{pre}{prefix}qkv.lora_B.weight"] = B
            else:
                for attr in (("k_proj", "v_proj") if blk.layout == "hf" else ("key", "value")):
                    A, B = factors[f"{prefix}{attr}"]
                    out[f"{pre}{prefix}{attr}.lora_A.weight"] = A
                    out[f"{pre}{prefix}{attr}.lora_B.weight"] = B
        return out

    def lora_factors(self, tensors: Dict[str, torch.Tensor]):
        """The inverse of :meth:`lora_tensors` for ``controller.import_lora``: ``({site: (A, B)}, used keys, other
        adapted modules)`` from PEFT's layout (``[base_model.model.]<module>.lora_A.weight`` / ``.lora_B.weight``).
        timm: a LoRA on the fused ``qkv`` gives the K site its ``B`` rows ``[d:2d]`` and the V site ``[2d:3d]``
        (with the whole ``A``; the controller drops the rank columns a site does not use); ``B`` rows for Q that
        are not all zero are reported as another adapted module (``<block>.qkv (its Q rows)``): Q is not a site."""
        factors, used, other = {}, set(), []

        def pair(module):
            for pre in ("base_model.model.", ""):
                ka, kb = f"{pre}{module}.lora_A.weight", f"{pre}{module}.lora_B.weight"
                if ka in tensors and kb in tensors:
                    used.update((ka, kb))
                    return tensors[ka], tensors[kb]
            return None

        for blk in self.blocks:
            prefix = f"{blk.name}." if blk.name else ""
            if blk.layout == "timm":
                ab = pair(f"{prefix}qkv")
                if ab is None:
                    continue
                A, B = ab
                d = B.shape[0] // 3
                if B.dim() != 2 or B.shape[0] != 3 * d:
                    raise ValueError(f"import_lora: {prefix}qkv.lora_B.weight must be [3 * dim, r], got "
                                     f"{tuple(B.shape)}")
                if bool(B[:d].any()):
                    other.append(f"{prefix}qkv (its Q rows)")
                factors[f"{prefix}qkv.k"] = (A, B[d:2 * d])
                factors[f"{prefix}qkv.v"] = (A, B[2 * d:])
            else:
                for attr in (("k_proj", "v_proj") if blk.layout == "hf" else ("key", "value")):
                    ab = pair(f"{prefix}{attr}")
                    if ab is not None:
                        factors[f"{prefix}{attr}"] = ab
        return factors, used, other

    def refresh_sites(self) -> None:
        """Re-point every site at the live parameters (the controller calls this before merge,
        unmerge, begin_concept, remove_concept, penalty, save and load: not only the forward sees a converted model)."""
        for c in self._calls:
            _refresh_sites(c)


# --------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------
def get_controller(model: nn.Module):
    """The controller of a model patched by this module, or ``None``."""
    ad = getattr(model, _ADAPTER_ATTR, None) if isinstance(model, nn.Module) else None
    return None if ad is None else ad.controller


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


def _own_class_forward(mod: nn.Module) -> bool:
    """True if ``mod``'s instance ``forward`` is just its class's forward bound to it (what
    ``accelerate.hooks.remove_hook_from_module`` leaves behind): harmless, and put back by unpatch."""
    f = mod.__dict__.get("forward")
    return getattr(f, "__self__", None) is mod and getattr(f, "__func__", None) is type(mod).forward


def _overridden_linears(blk: AttentionBlock) -> List[Tuple[str, nn.Linear]]:
    """(attribute name, linear) of the projections whose forward :meth:`ViTAdapter.install` overrides."""
    if blk.layout == "timm":
        return [("qkv", blk.linears["qkv"])]
    attrs = ("k_proj", "v_proj") if blk.layout == "hf" else ("key", "value")
    return [(attr, blk.linears[role]) for attr, role in zip(attrs, ("k", "v"))]


def _prepare(model, what: str) -> ViTAdapter:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what}: model must be a torch.nn.Module (transformers ViT or timm "
                        f"VisionTransformer), got {type(model).__module__}.{type(model).__name__}")
    framework, blocks = find_attention_blocks(model)
    for blk in blocks:
        for lin in blk.linears.values():
            if isinstance(lin.__dict__.get("forward"), (_ProjForward, _QKVForward)):
                raise RuntimeError(
                    f"{what}: {type(model).__name__} contains attention layers that are already patched by "
                    f"clora_fast as part of another model (or a sub-model of it): patching them again would "
                    f"disconnect the first controller. Call clora_fast.unpatch(...) on that model first")
    for blk in blocks:
        prefix = f"{blk.name}." if blk.name else ""
        for attr, lin in _overridden_linears(blk):
            if "forward" in lin.__dict__ and not _own_class_forward(lin):
                # install() sets the instance forward and uninstall() deletes it: an accelerate hook
                # (device_map=..., cpu_offload, dispatch_model) or a user's wrapper there would be bypassed
                # while patched and lost on unpatch
                hook = getattr(lin, "_hf_hook", None)
                if hook is not None:
                    found = (f"an accelerate hook, {type(hook).__name__}, as device_map=..., cpu_offload or "
                             f"dispatch_model install")
                    fix = ("clora_fast does not support offloaded or dispatched models: load the model on one "
                           "device without device_map/offloading, or remove the hooks first "
                           "(accelerate.hooks.remove_hook_from_module(model, recurse=True))")
                else:
                    fwd = repr(lin.__dict__["forward"])
                    found = fwd if len(fwd) <= 100 else fwd[:97] + "..."
                    fix = ("remove it first (del module.forward); to observe or change the projection's output "
                           "use module.register_forward_hook(...), which patching keeps")
                raise RuntimeError(
                    f"{what}: {prefix}{attr} has its own forward ({found}): the C-LoRA adapter replaces the "
                    f"projection's forward, so it would bypass it while patched and delete it on unpatch; {fix}")
    unsupported = _unsupported_attention(model, blocks)
    if unsupported or not blocks:
        wrapped = _wrapped_projections(model)
        why = (f"; these projections are not plain nn.Linear (another adapter such as PEFT's LoRA, or "
               f"quantization, wraps them: merge/unload it first): {', '.join(wrapped[:4])}"
               f"{' ...' if len(wrapped) > 4 else ''}") if wrapped else ""
        model_name = f"{type(model).__module__}.{type(model).__name__}"
        if unsupported:
            listed = f"{', '.join(unsupported[:4])}{f' and {len(unsupported) - 4} more' if len(unsupported) > 4 else ''}"
            found = (f"{len(blocks)} adaptable attention block(s), but also " if blocks else "no adaptable attention "
                     f"block, only ")
            raise ValueError(
                f"{what}: {model_name} is not supported: found {found}self-attention that clora_fast cannot adapt: "
                f"{listed} (C-LoRA must adapt K and V of every self-attention block; {_SUPPORTED}){why}")
        raise ValueError(
            f"{what}: found no self-attention layers to adapt in {model_name} (looked for transformers "
            f"ViTAttention.{{k,v}}_proj, ViTSelfAttention.{{key,value}} and timm Attention.qkv, all plain "
            f"nn.Linear; {_SUPPORTED}){why}")
    return ViTAdapter(model, framework, blocks)


def _attach(model, adapter, controller) -> None:
    adapter.install(controller)
    # a plain attribute, not a submodule: the model's state_dict()/parameters() stay unchanged;
    # the controller follows the base weights' device by itself
    object.__setattr__(model, _ADAPTER_ATTR, adapter)


def patch(model: nn.Module, *, rank: int = 16, alpha: Optional[float] = None,
          penalty_weight: Optional[float] = None, backend: str = "auto"):
    """Adapt K and V of every self-attention block of a transformers ViT or timm ViT.

    ``penalty_weight=None`` uses :data:`clora_fast.controller.DEFAULT_PENALTY_WEIGHT`.
    Returns the :class:`~clora_fast.controller.CLoRAController` (also
    :func:`get_controller(model) <get_controller>`). Raises ``ValueError`` when no attention
    layer is found or ``rank`` exceeds ``min(in, out)`` of a projection, ``RuntimeError``
    when the model is already patched or a K/V (timm: qkv) projection has its own instance
    ``forward`` (an accelerate offloading hook, a user's wrapper), which patching would replace."""
    if get_controller(model) is not None:
        raise RuntimeError(f"patch: this {type(model).__name__} is already patched by clora_fast; "
                           f"call clora_fast.unpatch(model) first")
    adapter = _prepare(model, "patch")
    _check_rank(rank, adapter.site_specs())
    from clora_fast.controller import DEFAULT_PENALTY_WEIGHT, CLoRAController
    controller = CLoRAController(
        adapter.sites(), rank=rank, alpha=alpha,
        penalty_weight=DEFAULT_PENALTY_WEIGHT if penalty_weight is None else penalty_weight,
        backend=backend, adapter=adapter)
    _attach(model, adapter, controller)
    return controller


def unpatch(model: nn.Module) -> None:
    """Undo :func:`patch`: the model's modules, ``state_dict()`` and outputs are bit-identical to
    before patching (a merged controller is unmerged first; learned concepts are dropped, so
    ``controller.save(path)`` them first)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch: model must be a torch.nn.Module, got {type(model).__name__}")
    adapter = getattr(model, _ADAPTER_ATTR, None)
    if adapter is None:
        raise ValueError(f"unpatch: this {type(model).__name__} is not patched by clora_fast")
    adapter.uninstall()
    object.__delattr__(model, _ADAPTER_ATTR)


def load(model: nn.Module, path, *, backend: str = "auto"):
    """Patch ``model`` with the rank/alpha/penalty weight of the bank at ``path`` (written by
    ``controller.save(path)``: safetensors + JSON) and load its concepts (finished ones folded,
    the active one resumable). If ``model`` is already patched, the bank is loaded into its
    controller. The bank must match the model's K/V projections (names, shapes, weights);
    on any error nothing changes."""
    ctrl = get_controller(model)
    if ctrl is not None:
        ctrl.load_bank(path)
        return ctrl
    adapter = _prepare(model, "load")
    from clora_fast.controller import CLoRAController
    controller = CLoRAController.load_state(path, adapter.sites(), adapter=adapter, backend=backend)
    _attach(model, adapter, controller)
    return controller
