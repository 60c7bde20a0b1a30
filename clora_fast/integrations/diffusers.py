"""C-LoRA for diffusers' Stable Diffusion UNets (SD 1.x, SD 2.x, SDXL).

    import clora_fast
    cl = clora_fast.patch(pipe)            # or a bare UNet2DConditionModel
    idx = cl.begin_concept("<c1>")          # with a pipe: adds the token <c1>
    loss = diffusion_loss + cl.penalty()
    cl.end_concept(); cl.save("bank/"); cl.merge(); clora_fast.unpatch(pipe)

What is adapted: ``to_k`` and ``to_v`` of every cross-attention module (``...attn2``),
through diffusers' attention-processor API. Each ``attn2`` gets a plain-object processor
(not an ``nn.Module``: the UNet's ``state_dict`` and submodules are unchanged) that calls
the processor it replaced with a stand-in for the ``Attention`` module whose ``to_k`` and
``to_v`` are the controller's projections; everything else (SDPA or classic attention,
masks, ``norm_cross``, residual, ``rescale_output_factor``) is the replaced processor's own
code. While the controller is :attr:`~CLoRAController.pristine` (no concept, nothing folded,
or merged) the replaced processor is called with the real module: bit-identical outputs.
A processor set on an ``attn2`` after patching is wrapped the same way at the next UNet forward. A
processor call that does not call ``attn.to_k(x)`` and ``attn.to_v(x)`` (one that reads their ``.weight``
itself) gets W0 only for that projection: a warning says so.

Whole-UNet grouping: all ``attn2`` see the same ``encoder_hidden_states``. A forward
pre-hook on the UNet computes every layer's K and V in one segmented launch
(:meth:`CLoRAController.project_group`) *before* the UNet runs, i.e. outside any
gradient-checkpointed block, and keeps them; each processor takes its slice when it gets
that very tensor (same object and version, same controller state). The pre-hook result is
reused across UNet calls only under ``torch.no_grad`` with no concept active (denoising loops pass the
same ``prompt_embeds`` every step; an active concept's factors may be written through ``.data``, e.g. by
an EMA ``copy_to``, which no version counter sees). Otherwise (another tensor, e.g. under reentrant
checkpointing, ``norm_cross`` set, an ``encoder_hid_proj``, ``grouped=False``) each layer
computes its K and V in one launch of its own (:meth:`CLoRAController.project_pair`);
``logging.getLogger("clora_fast")`` says so at debug level.

Personalized tokens (pipelines with ``tokenizer``/``text_encoder``, and SDXL's
``tokenizer_2``/``text_encoder_2``): ``begin_concept("<c1>")`` adds the token to a copy of
the tokenizer that the pipeline uses while patched, and gives it an embedding row (random
normal, scaled to the mean norm of the existing rows) held as its own float32 parameter:
the text encoder's input embedding is replaced by :class:`PersonalizedEmbedding`, which
shares the original weight (``state_dict`` keys unchanged) and substitutes the rows of the
new tokens. Only the current concept's row trains. A removed concept's token is retired:
a prompt that uses it raises an error. :func:`unpatch` puts back the original tokenizer
object, embedding module and processors: the pipeline is exactly as before.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ..controller import _kohya_stem, _tensor_key, CLoRAController, Site
from ..ops import _compiling
from . import install_save_warning, trace_kv, uninstall_save_warning

logger = logging.getLogger("clora_fast")

__all__ = ["can_patch", "patch", "unpatch", "load", "get_controller", "get_adapter", "export_lora",
           "export_textual_inversion", "PersonalizedEmbedding", "DiffusersAdapter"]

# the adapter lives in the UNet's __dict__ (not a submodule: state_dict/modules unchanged), so a
# dropped UNet takes its adapter and controller with it
_ADAPTER_ATTR = "_clora_fast_adapter"


def _adapter_of(unet) -> Optional["DiffusersAdapter"]:
    return unet.__dict__.get(_ADAPTER_ATTR)

_TEXT_SLOTS = (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
# grouped K/V of earlier training forwards whose backward has not run yet: gradient checkpointing recomputes their
# attention blocks in that backward (two forwards, then one backward), with the K/V they used then
_PENDING_MAX = 4


def _unet_class():
    try:
        from diffusers import UNet2DConditionModel
    except Exception:  # diffusers missing or broken
        return None
    return UNet2DConditionModel


def _unwrap(m):
    """The module behind a ``torch.compile`` wrapper (``pipe.unet = torch.compile(pipe.unet)``, the usual
    diffusers idiom); anything else as it is."""
    while isinstance(m, nn.Module) and type(m).__name__ == "OptimizedModule" and isinstance(
            m.__dict__.get("_orig_mod", m._modules.get("_orig_mod")), nn.Module):
        m = m._orig_mod
    return m


def _resolve(obj) -> Tuple[Any, Optional[Any]]:
    """(unet, pipe or None) of a pipeline or a bare UNet (either may be a ``torch.compile`` wrapper);
    raises TypeError otherwise."""
    cls = _unet_class()
    if cls is None:
        raise TypeError("clora_fast.integrations.diffusers needs the diffusers package (pip install diffusers)")
    if isinstance(_unwrap(obj), cls):
        return _unwrap(obj), None
    unet = _unwrap(getattr(obj, "unet", None))
    if isinstance(unet, cls):
        return unet, obj
    raise TypeError(f"expected a diffusers pipeline with a .unet (UNet2DConditionModel) or a UNet2DConditionModel, "
                    f"got {type(obj).__module__}.{type(obj).__name__}")


def can_patch(obj) -> bool:
    """True for a diffusers pipeline whose ``.unet`` is a ``UNet2DConditionModel``, or such a UNet."""
    cls = _unet_class()
    if cls is None:
        return False
    return isinstance(_unwrap(obj), cls) or isinstance(_unwrap(getattr(obj, "unet", None)), cls)


def get_controller(obj) -> Optional[CLoRAController]:
    """The controller of a patched pipeline/UNet, or None."""
    try:
        unet, _ = _resolve(obj)
    except TypeError:
        return None
    ad = _adapter_of(unet)
    return None if ad is None else ad.controller


def get_adapter(obj) -> Optional["DiffusersAdapter"]:
    """The :class:`DiffusersAdapter` of a patched pipeline/UNet, or None (e.g. for
    ``token_embedding(idx)`` or to switch ``adapter.grouped`` at run time)."""
    try:
        unet, _ = _resolve(obj)
    except TypeError:
        return None
    return _adapter_of(unet)


# ------------------------------------------------------------------------------------ tokens
class PersonalizedEmbedding(nn.Embedding):
    """The text encoder's input embedding while patched: the original weight (the very same
    Parameter, so ``state_dict`` is unchanged) plus one separate row per personalized token.
    A prompt without personalized tokens gives bit-identical embeddings.

    It shares the replaced module's parameter dict (the dict object itself): a weight that
    ``load_state_dict(assign=True)`` or a conversion puts here is the replaced module's weight
    too, so :func:`unpatch`, :func:`save_pipeline` and new token rows use the live weight."""

    def __init__(self, base: nn.Embedding):
        nn.Module.__init__(self)
        self.__dict__["_parameters"] = base._parameters
        self.num_embeddings = base.num_embeddings
        self.embedding_dim = base.embedding_dim
        self.padding_idx = base.padding_idx
        self.max_norm = base.max_norm
        self.norm_type = base.norm_type
        self.scale_grad_by_freq = base.scale_grad_by_freq
        self.sparse = base.sparse
        object.__setattr__(self, "clora_base", base)          # not a submodule
        object.__setattr__(self, "clora_rows", {})            # token id -> Parameter [dim]
        object.__setattr__(self, "clora_retired", {})         # token id -> token string

    def _apply(self, fn, *args, **kwargs):
        # .to(device) / .cuda() / .half() of the text encoder or the pipeline: the token rows (not parameters of this
        # module) follow the weight's device; they stay float32 (master weights, cast at use, like A and B)
        out = super()._apply(fn, *args, **kwargs)
        self._follow_weight()
        return out

    def _follow_weight(self) -> None:
        """Move the token rows to the embedding weight's device, in place (the very Parameter objects that the
        adapter and an optimizer hold), with their gradients."""
        dev = self.weight.device
        for row in self.clora_rows.values():
            if row.device != dev:
                grad = None if row.grad is None else row.grad.to(dev)
                with torch.no_grad():
                    new = row.data.to(dev)
                    if torch._has_compatible_shallow_copy_type(row, new):      # cpu <-> cuda (as Module._apply)
                        row.grad = None
                        row.data = new
                    else:                                                     # e.g. to / from "meta"
                        torch.utils.swap_tensors(row, nn.Parameter(new, requires_grad=row.requires_grad))
                    row.grad = grad

    def _plain(self, ids):
        return nn.functional.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                       self.scale_grad_by_freq, self.sparse)

    def forward(self, input_ids: Tensor) -> Tensor:
        rows, retired = self.clora_rows, self.clora_retired
        if not rows and not retired:
            return self._plain(input_ids)
        self._follow_weight()           # weights moved without .to() (load_state_dict(assign=True), accelerate)
        special = torch.tensor(sorted(list(rows) + list(retired)), device=input_ids.device, dtype=input_ids.dtype)
        hit = torch.isin(input_ids, special)
        if not bool(hit.any()):
            return self._plain(input_ids)
        if retired:
            for tid, tok in retired.items():
                if bool((input_ids == tid).any()):
                    raise ValueError(f"the prompt uses the token {tok!r} (id {tid}) of a concept that was removed "
                                     f"(remove_concept): its token is retired")
        out = self._plain(input_ids.masked_fill(hit, 0))
        for tid, row in rows.items():
            m = (input_ids == tid).unsqueeze(-1)
            out = torch.where(m, row.to(device=out.device, dtype=out.dtype), out)
        return out


def _find_module_path(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise RuntimeError(f"could not locate the input embedding inside {type(root).__name__}")


def _set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, leaf, value)


class _TextSlot:
    """One (tokenizer, text encoder) pair of a pipeline."""

    def __init__(self, pipe, tok_attr: str, enc_attr: str):
        self.pipe = pipe
        self.tok_attr, self.enc_attr = tok_attr, enc_attr
        self.orig_tokenizer = getattr(pipe, tok_attr)
        self.encoder: nn.Module = getattr(pipe, enc_attr)
        base = self.encoder.get_input_embeddings()
        if not isinstance(base, nn.Embedding) or isinstance(base, PersonalizedEmbedding):
            raise TypeError(f"{enc_attr}.get_input_embeddings() must be a plain torch.nn.Embedding, got "
                            f"{type(base).__name__}")
        self.base = base
        self.path = _find_module_path(self.encoder, base)
        self.dim = base.embedding_dim
        self.tokenizer = None
        self.emb: Optional[PersonalizedEmbedding] = None

    def install(self) -> None:
        self.tokenizer = copy.deepcopy(self.orig_tokenizer)
        self.tokenizer.save_pretrained = _GuardedSave(self.tokenizer, len(self.orig_tokenizer))
        self.emb = PersonalizedEmbedding(self.base)
        _set_module(self.encoder, self.path, self.emb)
        setattr(self.pipe, self.tok_attr, self.tokenizer)

    def uninstall(self) -> None:
        _set_module(self.encoder, self.path, self.base)
        setattr(self.pipe, self.tok_attr, self.orig_tokenizer)

    def has_token(self, token: str) -> bool:
        return token in self.tokenizer.get_vocab()

    def token_id(self, token: str) -> int:
        return int(self.tokenizer.convert_tokens_to_ids(token))

    def check_new_token(self, token: str) -> None:
        if self.has_token(token) or len(self.tokenizer(token, add_special_tokens=False).input_ids) == 1:
            raise ValueError(f"the token {token!r} already exists in pipe.{self.tok_attr}; a concept needs a new "
                             f"token (e.g. '<c1>')")
        # diffusers' pipelines expand a prompt's added token "<x>" into "<x> <x>_1 <x>_2 ..." while "<x>_1", ... are
        # added tokens too (multi-vector textual inversion, maybe_convert_prompt): "<x>" next to "<x>_1" would make
        # the pipeline encode other prompts than training did
        m = re.fullmatch(r"(.+)_[0-9]+", token)
        for other in ([f"{token}_1"] + ([m.group(1)] if m else [])):
            if self.has_token(other):
                raise ValueError(f"the token {token!r} clashes with the existing token {other!r} of pipe.{self.tok_attr}: "
                                 f"diffusers pipelines expand '<x>' into '<x> <x>_1 ...' when '<x>_1' is a token "
                                 f"(multi-vector textual inversion); choose a name without that pattern")
        trial = copy.deepcopy(self.tokenizer)
        trial.add_tokens([token])
        tid = trial.convert_tokens_to_ids(token)
        ids = trial(token, add_special_tokens=False).input_ids
        if list(ids) != [tid]:
            raise ValueError(f"the token {token!r} does not tokenize to a single new id with pipe.{self.tok_attr} "
                             f"(got {list(ids)}); use a lower-case token without spaces such as '<c1>'")

    def add_token(self, token: str) -> int:
        if not self.has_token(token):
            self.tokenizer.add_tokens([token])
        return self.token_id(token)

    def new_row(self) -> nn.Parameter:
        w = self.base.weight.detach()
        mean_norm = w.float().norm(dim=1).mean()
        v = torch.randn(self.dim, dtype=torch.float32, device=w.device)
        v = v / v.norm() * mean_norm
        return nn.Parameter(v)


_TOKEN_SAVE_REFUSAL = (
    "this tokenizer holds clora_fast's personalized tokens, whose embeddings are not part of the text "
    "encoder's weights: saving it (e.g. pipe.save_pretrained) would write a pipeline that cannot encode "
    "them. Use clora_fast.save_pipeline(pipe, path) (every finished concept baked in: merged UNet, "
    "tokens in the tokenizer and text encoder), or export_lora + export_textual_inversion, or unpatch "
    "first")


def _holds_personalized_tokens(tok) -> bool:
    guard = getattr(tok, "__dict__", {}).get("save_pretrained")
    return isinstance(guard, _GuardedSave) and len(tok) != guard.base_len


class _GuardedPipeSave:
    """``save_pretrained`` of the patched pipeline itself: the tokenizer's own guard (below) would refuse only
    when the pipeline reaches it, after other components were written; this refuses before anything is."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __call__(self, *args, **kwargs):
        pipe = self.pipe
        if any(_holds_personalized_tokens(getattr(pipe, t, None)) for t, _ in _TEXT_SLOTS):
            raise RuntimeError(_TOKEN_SAVE_REFUSAL)
        return type(pipe).save_pretrained(pipe, *args, **kwargs)


class _GuardedSave:
    """``save_pretrained`` of a patched pipeline's tokenizer: refused once it holds personalized tokens, whose
    embeddings live outside the text encoder's weights (a ``pipe.save_pretrained`` would write a tokenizer
    the saved text encoder cannot encode: an IndexError at the first prompt with a concept's token).  A
    module-level class, so the tokenizer still pickles (DataLoader workers, multiprocessing)."""

    def __init__(self, tok, base_len: int):
        self.tok, self.base_len = tok, base_len

    def __call__(self, *args, **kwargs):
        tok = self.tok
        if len(tok) != self.base_len:
            raise RuntimeError(_TOKEN_SAVE_REFUSAL)
        return type(tok).save_pretrained(tok, *args, **kwargs)


class _SetDefaultProcessors:
    """``unet.set_default_attn_processor()`` of a patched UNet.  diffusers' method checks the processors' exact
    classes (a wrapper fails it: "Cannot call `set_default_attn_processor` when attention processors are of
    type ..."): the adapted ``attn2`` get their replaced processors back for that call, and the new default
    processors are wrapped again right after it (or the wrappers restored when diffusers refuses).  A
    module-level class, so the UNet still pickles."""

    def __init__(self, unet):
        self.unet = unet

    def __call__(self, *args, **kwargs):
        unet = self.unet
        method = type(unet).set_default_attn_processor
        ad = _adapter_of(unet)
        if ad is None:
            return method(unet, *args, **kwargs)
        return ad._set_default_processors(method, *args, **kwargs)


# ------------------------------------------------------------------------------------ processors
class _ProjFn:
    """What the replaced processor sees as ``attn.to_k`` / ``attn.to_v``."""
    __slots__ = ("_call", "_role", "_linear")

    def __init__(self, call, role: int, linear: nn.Linear):
        self._call, self._role, self._linear = call, role, linear

    def __call__(self, x):
        return self._call.kv(self._role, x)

    def __getattr__(self, name):  # weight, bias, in_features, out_features, ...
        if name in _ProjFn.__slots__:   # not set yet (an object built without __init__, e.g. by dynamo)
            raise AttributeError(name)
        return getattr(self._linear, name)


class _AttnProxy:
    """Stands in for the ``Attention`` module: everything is the real module's except to_k/to_v."""

    def __init__(self, attn, call):
        object.__setattr__(self, "_attn", attn)
        object.__setattr__(self, "to_k", _ProjFn(call, 0, attn.to_k))
        object.__setattr__(self, "to_v", _ProjFn(call, 1, attn.to_v))

    def __getattr__(self, name):
        return getattr(self.__dict__["_attn"], name)

    def __setattr__(self, name, value):
        setattr(self.__dict__["_attn"], name, value)


class _LayerCall:
    """K/V of one attn2 for one processor call: from the grouped cache, else both in one launch.  ``k_used`` /
    ``v_used``: whether the processor asked for K / V (plain flags: no integer arithmetic on ``role``, which
    torch.compile may trace as a symbolic int)."""
    __slots__ = ("adapter", "layer", "_x", "_pair", "k_used", "v_used")

    def __init__(self, adapter, layer):
        self.adapter, self.layer = adapter, layer
        self._x = None
        self._pair = None
        self.k_used = self.v_used = False

    def kv(self, role: int, x: Tensor) -> Tensor:
        if role:
            self.v_used = True
        else:
            self.k_used = True
        outs = self.adapter._cached(self.layer, x)
        if outs is not None:
            return outs[role]
        if trace_kv():          # per layer in a torch.compile trace: each projection folded and computed in the graph
            return self.adapter.controller._project_traced(self.layer.v_site if role else self.layer.k_site, x)
        if self._pair is None or x is not self._x:
            ctrl = self.adapter.controller
            self._pair = ctrl.project_pair(self.layer.k_site, self.layer.v_site, x)
            self._x = x
        return self._pair[role]


class CLoRAAttnProcessor:
    """Wraps the processor an ``attn2`` had; a plain object holding a reference to the adapter.

    The wrapper classes built by :func:`_processor_class` also subclass the replaced processor's class, so
    diffusers' own ``isinstance`` checks still see it (``pipe.set_ip_adapter_scale`` finds an IP-Adapter
    processor), and every attribute other than ``adapter``/``layer``/``inner`` is read from and written to
    the replaced processor (``proc.scale = [0.5]`` reaches the code that uses it)."""
    _OWN = ("adapter", "layer", "inner")

    def __init__(self, adapter, layer, inner):
        d = self.__dict__
        d["adapter"], d["layer"], d["inner"] = adapter, layer, inner

    def __call__(self, attn, *args, **kwargs):
        ad = self.adapter
        if ad.controller.pristine:
            return self.inner(attn, *args, **kwargs)
        call = _LayerCall(ad, self.layer)
        out = self.inner(_AttnProxy(attn, call), *args, **kwargs)
        if not (call.k_used and call.v_used):
            ad._warn_skipped(self.inner, self.layer, call.k_used, call.v_used)
        return out

    def __getattr__(self, name):
        # only reached for names this object does not hold: the replaced processor's attributes (and, while an
        # object is being unpickled or deep-copied, before its __dict__ is filled: nothing)
        inner = self.__dict__.get("inner")
        if inner is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(inner, name)

    def __setattr__(self, name, value):
        if name in CLoRAAttnProcessor._OWN or "inner" not in self.__dict__:
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["inner"], name, value)

    def __delattr__(self, name):
        if name in CLoRAAttnProcessor._OWN:
            del self.__dict__[name]
        else:
            delattr(self.__dict__["inner"], name)


def _after_gradients(tensors: List[Tensor], fn) -> None:
    """Call ``fn()`` in backward once the gradients of all of ``tensors`` (those the backward reaches) are
    computed: a pre-hook on the one autograd node they all come from (the grouped K/V's split: one hook, not one
    per tensor), else ``register_multi_grad_hook``."""
    nodes = {t.grad_fn for t in tensors}
    for _ in range(4):                      # per-tensor view nodes (reshape, ...) over one producer
        if len(nodes) == 1 or None in nodes or any(len(n.next_functions) != 1 for n in nodes):
            break
        nodes = {n.next_functions[0][0] for n in nodes}
    node = next(iter(nodes)) if len(nodes) == 1 else None
    if node is not None and hasattr(node, "register_prehook"):
        node.register_prehook(lambda grad_outputs: fn())
    else:
        torch.autograd.graph.register_multi_grad_hook(tensors, lambda grads: fn())


def _same_view(a: Tensor, b: Tensor) -> bool:
    """``b`` reads exactly the elements ``a`` does, unchanged since (an alias: ``a.detach()``, a saved and
    unpacked tensor): same memory, shape, strides, dtype and version."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device and not a.is_inference() and not b.is_inference()
            and a._version == b._version)


_PROCESSOR_CLASSES: Dict[type, type] = {}


def _processor_class(inner_cls: type) -> type:
    """A subclass whose ``__call__`` has the replaced processor's signature, so that
    ``Attention.forward`` forwards exactly the cross_attention_kwargs it did before."""
    cls = _PROCESSOR_CLASSES.get(inner_cls)
    if cls is None:
        def __call__(self, attn, *args, **kwargs):
            return CLoRAAttnProcessor.__call__(self, attn, *args, **kwargs)

        # inspect.signature follows __wrapped__ to the replaced __call__ (a Signature built at each call: a stored
        # __signature__ holds a mappingproxy, at which torch.compile breaks the graph)
        __call__.__wrapped__ = inner_cls.__call__
        name = f"CLoRA_{inner_cls.__name__}"     # e.g. CLoRA_AttnProcessor2_0 (never the base class's name)
        base = _ModuleProcessor if issubclass(inner_cls, nn.Module) else CLoRAAttnProcessor   # IP-Adapter: weights
        # also a subclass of the replaced class (diffusers' isinstance checks); our methods come first in the MRO
        bases = (base,) if issubclass(base, inner_cls) else (base, inner_cls)
        try:
            cls = type(name, bases, {"__call__": __call__, "__module__": __name__, "__qualname__": name})
        except TypeError:   # a class that cannot be mixed in (metaclass / layout conflict): the wrapper alone
            cls = type(name, (base,), {"__call__": __call__, "__module__": __name__, "__qualname__": name})
        _PROCESSOR_CLASSES[inner_cls] = cls
        globals()[name] = cls                  # pickle (torch.save of a patched UNet) finds the class by name
    return cls


def __getattr__(name: str):
    """Processor classes by name for unpickling in a process that has not built them yet."""
    if name.startswith("CLoRA_"):
        from diffusers.models import attention_processor as ap
        inner = getattr(ap, name[len("CLoRA_"):], None)
        if isinstance(inner, type):
            return _processor_class(inner)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _ModuleProcessor(CLoRAAttnProcessor, nn.Module):
    """The wrapper of a processor that is an ``nn.Module`` (``Attention.set_processor`` would drop a
    module processor's weights from the UNet for a plain object): it shares the replaced processor's
    parameter, buffer and submodule dicts (the very dict objects), so the UNet's ``state_dict()`` keys,
    ``parameters()``, ``.to()`` conversions and ``load_state_dict(assign=True)`` act on the replaced
    processor's own tensors, exactly as before patching."""

    def __init__(self, adapter, layer, inner):
        nn.Module.__init__(self)
        d = self.__dict__                      # plain attributes: not submodules of their own
        d["adapter"], d["layer"], d["inner"] = adapter, layer, inner
        for k in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
            d[k] = inner.__dict__[k]

    def __getattr__(self, name):
        return CLoRAAttnProcessor.__getattr__(self, name)

    def __setattr__(self, name, value):
        CLoRAAttnProcessor.__setattr__(self, name, value)

    def __delattr__(self, name):
        CLoRAAttnProcessor.__delattr__(self, name)


def _is_fused(proc) -> bool:
    """A processor of ``fuse_qkv_projections()`` (``FusedAttnProcessor2_0``...): it uses the fused ``to_kv`` /
    ``to_qkv`` module, a copy of the weights made when fusing, never ``to_k`` / ``to_v``."""
    return type(proc).__name__.startswith("Fused")


class _Layer:
    __slots__ = ("name", "attn", "k_site", "v_site", "group", "gpos", "orig_processor", "linears")

    def __init__(self, name, attn, k_site, v_site, group):
        self.name, self.attn, self.k_site, self.v_site, self.group = name, attn, k_site, v_site, group
        self.gpos = None
        self.orig_processor = None
        self.linears = (attn.to_k, attn.to_v)       # the adapted modules (replacing them is an error)


# ------------------------------------------------------------------------------------ adapter
def _ldm_block_names(unet) -> Dict[str, str]:
    """``{diffusers name: original name}`` of the attention blocks (``Transformer2DModel``) of a UNet laid out as
    diffusers' ``UNet2DConditionModel``: the names of the original Stable Diffusion (LDM / SGM) code, which
    kohya's SDXL LoRA files use (``lora_unet_input_blocks_4_1_...``).  The numbering follows the UNet's own
    structure, as the original code builds it: ``input_blocks.0`` is ``conv_in``, then each down block's layers
    (resnet ``.0``, attention ``.1``) one index each and its downsampler one more; ``middle_block.1`` is the mid
    block's (single) attention; ``output_blocks`` count the up blocks' layers (their upsamplers share the last
    layer's index).  ``down_blocks.1.attentions.0`` is ``input_blocks.4.1`` in SD 1.x and SDXL (two layers per
    block); ``up_blocks.1.attentions.2`` is ``output_blocks.5.1``.  Empty for other layouts."""
    names: Dict[str, str] = {}
    down, mid, up = (getattr(unet, a, None) for a in ("down_blocks", "mid_block", "up_blocks"))
    if not isinstance(down, nn.ModuleList) or not isinstance(up, nn.ModuleList):
        return names
    for side, blocks, first, sampler in (("down_blocks", down, 1, "downsamplers"), ("up_blocks", up, 0, None)):
        i = first
        for b, blk in enumerate(blocks):
            attns = getattr(blk, "attentions", None) or ()
            for layer in range(len(getattr(blk, "resnets", None) or ())):
                if layer < len(attns):
                    names[f"{side}.{b}.attentions.{layer}"] = \
                        f"{'input_blocks' if first else 'output_blocks'}.{i}.1"
                i += 1
            if sampler is not None and getattr(blk, sampler, None) is not None:
                i += 1
    if mid is not None and len(getattr(mid, "attentions", None) or ()) == 1:
        names["mid_block.attentions.0"] = "middle_block.1"
    return names


class DiffusersAdapter:
    """Finds the attn2 K/V projections of a UNet, installs the processors, the grouped pre-hook
    and the personalized tokens; implements the controller's adapter protocol."""

    lora_key_prefix = "unet."

    def __init__(self, obj, grouped: bool = True):
        self.unet, self.pipe = _resolve(obj)
        if _adapter_of(self.unet) is not None:
            raise RuntimeError("this UNet is already patched by clora_fast; call clora_fast.unpatch(...) first")
        if not isinstance(grouped, bool):
            raise TypeError(f"grouped must be a bool, got {grouped!r}")
        self.grouped = grouped
        from diffusers.models.attention_processor import Attention
        found = []
        for name, mod in self.unet.named_modules():
            if name.rsplit(".", 1)[-1] == "attn2" and isinstance(mod, Attention):
                found.append((name, mod))
        if not found:
            raise ValueError(f"found no cross-attention (attn2) modules in {type(self.unet).__name__}")
        self.sites: List[Site] = []
        self.layers: List[_Layer] = []
        in_dims = {}
        for name, attn in found:
            for proj in ("to_k", "to_v"):
                lin = getattr(attn, proj, None)
                if not isinstance(lin, nn.Linear) or not isinstance(lin.weight, Tensor) \
                        or not lin.weight.is_floating_point():
                    raise TypeError(f"{name}.{proj} must be a plain torch.nn.Linear with a floating weight to be "
                                    f"adapted, got {type(lin).__name__} (unload other LoRA/quantization first)")
            proc = attn.processor
            # the processor, not attn.fused_projections: diffusers' unfuse_qkv_projections() puts the unfused
            # processors back (they use to_k / to_v again) but leaves that flag True
            if _is_fused(proc):
                raise RuntimeError(f"{name} has fused projections ({type(proc).__name__}, fuse_qkv_projections); "
                                   f"call unet.unfuse_qkv_projections() before patching")
            if isinstance(proc, CLoRAAttnProcessor):
                raise RuntimeError(f"{name} already has a clora_fast processor")
            in_dims.setdefault(attn.to_k.in_features, []).append(name)
        multi = len(in_dims) > 1
        for name, attn in found:
            grp = None
            if attn.norm_cross is not None:
                logger.debug("clora_fast: %s has norm_cross: its K/V are computed per layer", name)
            elif not self.grouped:
                pass
            else:
                grp = "unet.attn2" + (f":{attn.to_k.in_features}" if multi else "")
            k = len(self.sites)
            self.sites.append(Site(f"{name}.to_k", attn.to_k.weight, attn.to_k.bias, grp))
            self.sites.append(Site(f"{name}.to_v", attn.to_v.weight, attn.to_v.bias, grp))
            self.layers.append(_Layer(name, attn, k, k + 1, grp))
        self.slots: List[_TextSlot] = []
        if self.pipe is not None:
            for tok_attr, enc_attr in _TEXT_SLOTS:
                if getattr(self.pipe, tok_attr, None) is not None and getattr(self.pipe, enc_attr, None) is not None:
                    self.slots.append(_TextSlot(self.pipe, tok_attr, enc_attr))
        self.controller: Optional[CLoRAController] = None
        self._hook = None
        self._cache = None                  # the grouped K/V of the last UNet forward (see _pre_hook)
        self._pending: List[dict] = []      # earlier training forwards' entries, until their backward ran
        self._prev_save = None              # the pipeline's own instance-level save_pretrained, if it had one
        self._uninstalling = False
        self._unet_save = None              # install_save_warning's token for the UNet's save_pretrained
        self._prev_set_default = None       # the UNet's own instance-level set_default_attn_processor, if any
        self._logged = set()
        # concept idx -> token string; per slot: concept idx -> row
        self.tokens: Dict[int, str] = {}
        self.rows: List[Dict[int, nn.Parameter]] = [dict() for _ in self.slots]
        self.retired: List[str] = []   # tokens of removed concepts (still in the tokenizer, unusable)

    def __getstate__(self):
        # copy.deepcopy / pickle of a patched UNet: the grouped K/V of the last forward are a per-call cache
        # (attached to that forward's autograd graph after a training step, which deepcopy refuses to copy)
        state = self.__dict__.copy()
        state["_cache"], state["_pending"] = None, []
        return state

    def lora_module_aliases(self) -> Dict[str, Tuple[str, ...]]:
        """``{site: (its module's original Stable Diffusion name,)}`` for ``controller.import_lora`` (see
        :func:`_ldm_block_names`): ``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`` is
        ``input_blocks.4.1.transformer_blocks.0.attn2.to_k`` in SDXL."""
        blocks = _ldm_block_names(self.unet)
        out = {}
        for s in self.sites:
            head, _, tail = s.name.partition(".transformer_blocks.")
            if tail and head in blocks:
                out[s.name] = (f"{blocks[head]}.transformer_blocks.{tail}",)
        return out

    def kohya_names(self, original: Optional[bool] = None) -> Dict[str, str]:
        """``{site: kohya's key stem}`` for ``controller.export_lora(layout="kohya")``: ``lora_unet_`` and the
        module's name with ``_`` for ``.``; the original Stable Diffusion name (:meth:`lora_module_aliases`) when
        ``original``, else diffusers'.  ``None``: as kohya's trainer writes them, the original names for an SDXL
        UNet (``addition_embed_type="text_time"``; also the names the web UIs map SDXL's keys by) and diffusers'
        for SD 1.x / 2.x (the names diffusers' SD-1 loader reads)."""
        if original is None:
            original = getattr(self.unet.config, "addition_embed_type", None) == "text_time"
        elif not isinstance(original, bool):
            raise TypeError(f"original_names must be a bool or None, got {original!r}")
        aliases = self.lora_module_aliases() if original else {}
        missing = [s.name for s in self.sites if original and s.name not in aliases]
        if missing:
            raise ValueError(f"export_lora: {type(self.unet).__name__} has no original Stable Diffusion names for "
                             f"{len(missing)} site(s) (e.g. {missing[0]!r}): pass original_names=False")
        return {s.name: _kohya_stem(aliases[s.name][0] if original else s.name) for s in self.sites}

    # -- install ---------------------------------------------------------------------------
    def install(self, controller: CLoRAController) -> None:
        self.controller = controller
        groups = {}
        for layer in self.layers:
            if layer.group is not None:
                names = groups.setdefault(layer.group, controller.group_sites(layer.group))
                layer.gpos = names.index(self.sites[layer.k_site].name), names.index(self.sites[layer.v_site].name)
        done, slots_done = [], []
        try:
            for layer in self.layers:
                self._wrap(layer, layer.attn.processor)
                done.append(layer)
            self._hook = self.unet.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            for slot in self.slots:
                slot.install()
                slots_done.append(slot)
            if self.slots:
                self._prev_save = self.pipe.__dict__.get("save_pretrained")
                object.__setattr__(self.pipe, "save_pretrained", _GuardedPipeSave(self.pipe))
            self._unet_save = install_save_warning(self.unet, get_controller)
            if callable(getattr(type(self.unet), "set_default_attn_processor", None)):
                self._prev_set_default = self.unet.__dict__.get("set_default_attn_processor")
                object.__setattr__(self.unet, "set_default_attn_processor", _SetDefaultProcessors(self.unet))
        except BaseException:
            for slot in slots_done:
                slot.uninstall()
            for layer in done:
                layer.attn.set_processor(layer.orig_processor)
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            self._restore_saves()
            raise
        object.__setattr__(self.unet, _ADAPTER_ATTR, self)

    def _restore_saves(self) -> None:
        """Take back the instance attributes install put on the pipeline and the UNet: the ``save_pretrained``
        guards and ``set_default_attn_processor``."""
        if isinstance(self.unet.__dict__.get("set_default_attn_processor"), _SetDefaultProcessors):
            if self._prev_set_default is None:
                self.unet.__dict__.pop("set_default_attn_processor")
            else:
                object.__setattr__(self.unet, "set_default_attn_processor", self._prev_set_default)
        uninstall_save_warning(self.unet, self._unet_save)
        self._unet_save = None
        if self.pipe is not None and isinstance(self.pipe.__dict__.get("save_pretrained"), _GuardedPipeSave):
            if self._prev_save is None:
                self.pipe.__dict__.pop("save_pretrained", None)
            else:
                object.__setattr__(self.pipe, "save_pretrained", self._prev_save)

    def uninstall(self) -> None:
        ctrl = self.controller
        if ctrl is not None and ctrl.merged:
            self._uninstalling = True       # unmerge into the adapted modules even if another LoRA wrapped them
            try:
                ctrl.unmerge()
            finally:
                self._uninstalling = False
        for layer in self.layers:
            if layer.orig_processor is not None:
                layer.attn.set_processor(layer.orig_processor)
        self._scrub_saved_processors()
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for slot in self.slots:
            slot.uninstall()
        self._restore_saves()
        self._cache, self._pending = None, []
        self.unet.__dict__.pop(_ADAPTER_ATTR, None)
        if ctrl is not None:
            ctrl._mark_unpatched()

    def _scrub_saved_processors(self) -> None:
        """``unet.fuse_qkv_projections()`` keeps the processors it replaced in ``unet.original_attn_processors`` and
        ``unfuse_qkv_projections()`` puts them back: after unpatch those must be the replaced processors, not this
        adapter's wrappers (which would apply the concepts again to the unpatched UNet)."""
        saved = self.unet.__dict__.get("original_attn_processors")
        if isinstance(saved, dict):
            for name, proc in list(saved.items()):
                if isinstance(proc, CLoRAAttnProcessor) and proc.adapter is self:
                    saved[name] = proc.inner

    def _warn_skipped(self, proc, layer: _Layer, k_used: bool, v_used: bool) -> None:
        """A processor call that never called ``attn.to_k(x)`` / ``attn.to_v(x)`` (one that reads their
        ``.weight`` itself, or skips cross-attention): that projection's adapters were not applied."""
        if self._first_time(("skipped", type(proc), k_used, v_used)):
            missing = " and ".join(n for n, used in (("attn.to_k", k_used), ("attn.to_v", v_used)) if not used)
            warnings.warn(f"clora_fast: the attention processor {type(proc).__name__} of {layer.name} did not "
                          f"call {missing}(x) (it reads the weight itself, or skips cross-attention): the C-LoRA "
                          f"adapters of that projection were not applied (no output change, no gradient). "
                          f"Use a processor that computes K and V with attn.to_k(x) / attn.to_v(x)",
                          UserWarning, stacklevel=2)

    def _first_time(self, key) -> bool:
        """True the first time ``key`` is seen (log lines and warnings said once per adapter)."""
        if key in self._logged:
            return False
        self._logged.add(key)
        return True

    def _log_once(self, key, msg, *args):
        if self._first_time(key):
            logger.debug(msg, *args)

    # -- grouped K/V ------------------------------------------------------------------------
    def refresh_sites(self) -> None:
        """Re-point the sites at the live ``to_k``/``to_v`` parameters (``load_state_dict(assign=True)`` or a
        conversion that replaces parameter objects); a replaced ``to_k``/``to_v`` module (e.g. PEFT's
        ``add_adapter`` / ``load_lora_weights`` wrapping it) is an error: its adapter would be skipped."""
        sites = self.sites
        for layer in self.layers:            # on every UNet forward: plain dict lookups, no nn.Module.__getattr__
            mods = layer.attn._modules
            k, v = mods.get("to_k"), mods.get("to_v")
            if (k is not layer.linears[0] or v is not layer.linears[1]) and self._uninstalling:
                k, v = layer.linears        # unpatch of a merged controller: restore W0 in the adapted modules
            elif k is not layer.linears[0] or v is not layer.linears[1]:
                proj, which = (k, "to_k") if k is not layer.linears[0] else (v, "to_v")
                raise RuntimeError(
                    f"{layer.name}.{which} was replaced after clora_fast.patch (now a "
                    f"{type(proj).__module__}.{type(proj).__name__}, e.g. by PEFT's add_adapter / load_lora_weights): "
                    f"it would be skipped. pipe.unload_lora_weights() (after pipe.fuse_lora() to keep that LoRA in the "
                    f"weights; not while merged) puts the plain module back; or call clora_fast.unpatch(...) first, "
                    f"then add the other adapter and patch again; or, to make that LoRA a past concept that the "
                    f"concepts learned next are kept off, unload it and clora_fast.import_lora(pipe, its_file)")
            for site_i, lin in ((layer.k_site, k), (layer.v_site, v)):
                params = lin._parameters
                w, b = params.get("weight"), params.get("bias")
                site = sites[site_i]
                if site.weight is not w or site.bias is not b:
                    site.weight, site.bias = w, b

    def _wrap(self, layer: _Layer, proc) -> None:
        """Put this adapter's wrapper around ``proc`` as ``layer``'s processor (``proc`` is what unpatch restores)."""
        layer.orig_processor = proc
        layer.attn.set_processor(_processor_class(type(proc))(self, layer, proc))

    def _set_default_processors(self, method, *args, **kwargs):
        unwrapped = []
        for layer in self.layers:
            proc = layer.attn.processor
            if isinstance(proc, CLoRAAttnProcessor) and proc.adapter is self:
                layer.attn.set_processor(proc.inner)
                unwrapped.append((layer, proc))
        try:
            out = method(self.unet, *args, **kwargs)
        except BaseException:
            for layer, proc in unwrapped:
                layer.attn.set_processor(proc)
            raise
        self._check_processors()            # wraps the new processors now (unet.attn_processors shows them)
        return out

    def _check_processors(self) -> None:
        """Before each UNet forward: an ``attn2`` processor replaced since the last one (``set_attn_processor``,
        ``enable_attention_slicing``, ``enable_xformers_memory_efficient_attention``, an IP-Adapter loaded after
        patching...) is wrapped like the processors found at patch time, and is what unpatch restores.  A
        fused-projection processor (``fuse_qkv_projections``) and another adapter's wrapper are errors."""
        self.refresh_sites()
        for layer in self.layers:
            proc = layer.attn.processor
            if isinstance(proc, CLoRAAttnProcessor) and proc.adapter is self:
                continue
            if _is_fused(proc):
                raise RuntimeError(
                    f"the attention processor of {layer.name} was replaced by {type(proc).__name__} "
                    f"(fuse_qkv_projections() after clora_fast.patch): its fused K/V projection holds W0 only, "
                    f"the C-LoRA adapters would be skipped. Call unet.unfuse_qkv_projections() (or "
                    f"pipe.unfuse_qkv_projections()) to put the clora_fast processors back (for inference "
                    f"without adapter overhead use controller.merge() instead of fusing)")
            if isinstance(proc, CLoRAAttnProcessor):
                raise RuntimeError(
                    f"the attention processor of {layer.name} is another patched UNet's clora_fast wrapper (set from "
                    f"that UNet's attn_processors?): it would apply that UNet's adapters. Set the processor it "
                    f"wraps instead (its .inner), or an unpatched UNet's processors")
            self._log_once(("adopt", type(proc)), "clora_fast: wrapping the %s set after patching",
                           type(proc).__name__)
            self._wrap(layer, proc)
        for slot in self.slots:
            if slot.encoder.get_input_embeddings() is not slot.emb:
                raise RuntimeError(
                    f"pipe.{slot.enc_attr}'s input embedding was replaced after clora_fast.patch (e.g. by "
                    f"resize_token_embeddings / load_textual_inversion): the personalized tokens would be wrong. "
                    f"Call clora_fast.unpatch(...) first, then patch again")

    @staticmethod
    def _version(x: Tensor):
        return None if x.is_inference() else x._version

    def _autocast_key(self, x: Tensor):
        dev = x.device.type
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return None

    def _pre_hook(self, module, args, kwargs):
        self._check_processors()
        ctrl = self.controller
        if not ctrl.pristine and "_hf_hook" in self.layers[0].linears[0].__dict__:
            # accelerate hooks on the projections themselves (pipe.enable_sequential_cpu_offload, device_map): they
            # bring the weights in around to_k.forward, which the adapters do not call (they read the weights)
            raise RuntimeError(
                f"{self.layers[0].name}.to_k has an accelerate hook ({type(self.layers[0].linears[0]._hf_hook).__name__}"
                f", e.g. from pipe.enable_sequential_cpu_offload() or a device_map): the C-LoRA adapters read the "
                f"weights directly, which such hooks keep offloaded. Use pipe.enable_model_cpu_offload(), or "
                f"controller.merge() for inference (merged, the hooked modules run as they are)")
        cak = kwargs.get("cross_attention_kwargs")
        if cak and cak.get("scale", 1.0) != 1.0 and not ctrl.pristine and "lora_scale" not in self._logged:
            self._logged.add("lora_scale")
            logger.warning("clora_fast: cross_attention_kwargs['scale'] = %s scales diffusers/PEFT LoRA layers only; "
                           "the C-LoRA concepts (folded past and the active adapter) apply at full strength",
                           cak.get("scale"))
        if ctrl.pristine or not self.grouped or not ctrl.groups:
            self._set_cache(None)
            return None
        x = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if not isinstance(x, Tensor):
            self._set_cache(None)
            return None
        if getattr(self.unet, "encoder_hid_proj", None) is not None:
            self._log_once("hid_proj", "clora_fast: the UNet has an encoder_hid_proj: cross-attention K/V are "
                                       "computed per layer")
            self._set_cache(None)
            return None
        if self.sites[0].weight.device != x.device:
            # accelerate's model offload (pipe.enable_model_cpu_offload) moves the UNet to the input's device in its
            # wrapped forward, i.e. after this pre-hook: the processors compute K/V per layer once it has
            self._log_once("offload", "clora_fast: the UNet's weights are not on encoder_hidden_states' device when "
                                      "its forward starts (model offload?): cross-attention K/V are computed per layer")
            self._set_cache(None)
            return None
        grad = torch.is_grad_enabled()
        if trace_kv():
            # a torch.compile trace: every group's K/V folded and computed in the graph (no reuse across UNet calls:
            # its checks read version counters, which dynamo cannot trace); the entry is never replayed by an eager
            # checkpoint (done) and is taken only inside a trace (key None, see _cached)
            outs = {group: ctrl._project_group_traced(group, x) for group in ctrl.groups
                    if x.shape[-1] == ctrl.group_in_features(group)}
            self._set_cache({"x": x, "key": None, "grad": grad, "outs": outs, "used": set(), "done": [True],
                             "weights": None})
            return None
        key = (self._version(x), ctrl.state_key(), self._autocast_key(x), x.device)
        c = self._cache
        if (c is not None and not grad and not c["grad"] and c["x"] is x and key[0] is not None
                and ctrl.active_concept is None and c["key"] == key and c["weights"] == self._weights_key()):
            # same prompt embeddings (not written in place: an inference tensor has no version, so it is never
            # reused), same adapters, same base weights and biases: reuse (denoising loop). Never while a concept
            # is active: its factors are trainable parameters, which an EMA copy_to / restore (or any write
            # through .data) changes without a version bump (a validation run would use stale K/V)
            return None
        outs = {}
        for group in ctrl.groups:
            bundle_in = ctrl.group_in_features(group)
            if x.shape[-1] != bundle_in:
                self._log_once(("dim", group), "clora_fast: encoder_hidden_states has %d features, group %s expects "
                                               "%d: per-layer K/V", x.shape[-1], group, bundle_in)
                continue
            outs[group] = ctrl.project_group(group, x)
        entry = {"x": x, "key": key, "grad": grad, "outs": outs, "used": set(), "done": [False],
                 "weights": None if grad else self._weights_key()}
        trained = [t for o in outs.values() for t in o if t.requires_grad]
        if trained and not _compiling():
            done = entry["done"]
            # once backward has produced the gradients of these K/V, no recomputation can ask for them again
            _after_gradients(trained, lambda: done.__setitem__(0, True))
        self._set_cache(entry)
        return None

    def _set_cache(self, entry: Optional[dict]) -> None:
        """Make ``entry`` the current grouped K/V.  The one it replaces stays available (``_pending``) while a
        backward may still recompute the attention blocks that used it: it came from a forward with grad enabled
        whose K/V have not received their gradients yet (gradient checkpointing replays the forward of each
        block in backward, and that replay must take the same K/V as the forward did, or
        ``torch.utils.checkpoint`` refuses the mismatched saved tensors).  Only an entry that some layer took
        with grad enabled can be replayed (reentrant checkpointing runs the blocks' forward without grad, and
        its replay computes K/V per layer).  At most ``_PENDING_MAX`` are kept (a forward whose graph is dropped
        without a backward never completes)."""
        old = self._cache
        pending = [e for e in self._pending if not e["done"][0]]
        if old is not None and old["used"] and not old["done"][0]:
            pending.append(old)
        self._pending = pending[-_PENDING_MAX:]
        self._cache = entry

    def _weights_key(self):
        """Identity and version of every adapted base weight and bias (computed only where a cache may be
        reused: a training forward never pays for it)."""
        return tuple(_tensor_key(t) for s in self.sites for t in (s.weight, s.bias))

    def _cached(self, layer: _Layer, x: Tensor):
        """(K, V) of ``layer`` from the grouped cache when it applies to ``x``, else None."""
        if layer.group is None or not self.grouped:
            return None
        c = self._entry_for(layer, x)
        if c is None or layer.group not in c["outs"]:
            logger.debug("clora_fast: %s got encoder_hidden_states other than the UNet's (or no grouped pre-pass "
                         "ran): per-layer K/V", layer.name)
            return None
        ctrl = self.controller
        if c["key"] is None:
            # computed in a torch.compile trace: valid in that trace only, and never replayed by an eager checkpoint
            # (no "used" bookkeeping: inside a compiled checkpoint region that would be a side effect it refuses)
            if not _compiling():
                return None
        elif c["key"] != (self._version(x), ctrl.state_key(), self._autocast_key(x), x.device):
            logger.debug("clora_fast: grouped K/V are stale for %s (weights or input changed): per-layer K/V",
                         layer.name)
            return None
        elif c["grad"] and torch.is_grad_enabled():
            c["used"].add(layer.name)
        outs = c["outs"][layer.group]
        return outs[layer.gpos[0]], outs[layer.gpos[1]]

    def _entry_for(self, layer: _Layer, x: Tensor) -> Optional[dict]:
        """The grouped-K/V entry computed from ``x``: the last forward's, or (a checkpointed block replayed in
        backward) a pending one.  Non-reentrant checkpointing under saved-tensor hooks (``save_on_cpu``,
        activation offloading) replays a block with a detached alias of its input: it matches when it is the
        same storage, shape and strides, and this layer took the entry's K/V with grad enabled in that forward
        (reentrant checkpointing runs its forward without grad: its replay computes K/V per layer, as it must,
        since it differentiates the replay's own graph)."""
        entries = [self._cache] + self._pending[::-1] if self._pending else [self._cache]
        for c in entries:
            if c is not None and c["x"] is x:
                return c
        if not torch.is_grad_enabled():
            return None
        for c in entries:
            if c is not None and layer.name in c["used"] and _same_view(c["x"], x):
                return c
        return None

    # -- adapter protocol -------------------------------------------------------------------
    def on_state_change(self) -> None:
        self._cache, self._pending = None, []

    def on_begin_concept(self, name: str, idx: int) -> None:
        if not self.slots:
            return
        for slot in self.slots:
            slot.check_new_token(name)
        for s, slot in enumerate(self.slots):
            slot.add_token(name)
            self.rows[s][idx] = slot.new_row()
            slot.emb.clora_rows[slot.token_id(name)] = self.rows[s][idx]
        self.tokens[idx] = name

    def on_end_concept(self, idx: int) -> None:
        for rows in self.rows:
            if idx in rows:
                rows[idx].requires_grad_(False)

    def on_remove_concept(self, idx: int) -> None:
        tok = self.tokens.pop(idx, None)
        if tok is None:
            return
        for s, slot in enumerate(self.slots):
            self.rows[s].pop(idx, None)
            tid = slot.token_id(tok)
            slot.emb.clora_rows.pop(tid, None)
            slot.emb.clora_retired[tid] = tok
        self.retired.append(tok)

    def trainable_parameters(self) -> List[nn.Parameter]:
        idx = self.controller.active_concept
        return [rows[idx] for rows in self.rows if idx in rows]

    def token_embedding(self, idx: int, slot: int = 0) -> Tensor:
        """The token embedding row of concept ``idx`` in text encoder ``slot`` (0, or 1 for SDXL's second)."""
        return self.rows[slot][idx]

    def export_textual_inversion(self, path, idx: int) -> None:
        """Write concept ``idx``'s token embedding(s) as a textual-inversion safetensors file:
        ``{token: [dim]}`` for one text encoder (``pipe.load_textual_inversion(path)`` accepts it),
        ``{"clip_l": [1, d1], "clip_g": [1, d2]}`` for SDXL's two (load each with
        ``load_textual_inversion(sd["clip_l"], token=..., text_encoder=..., tokenizer=...)``)."""
        from safetensors.torch import save
        from ..bank import atomic_write_bytes
        if not self.slots:
            raise ValueError("export_textual_inversion: a bare UNet has no token embeddings")
        if idx not in self.tokens:
            raise KeyError(f"concept {idx} has no personalized token (known: {sorted(self.tokens)})")
        rows = [r[idx].detach().float().cpu().contiguous() for r in self.rows]
        if len(rows) == 1:
            tensors = {self.tokens[idx]: rows[0]}
        else:
            tensors = {"clip_l": rows[0][None], "clip_g": rows[1][None]}
        atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))

    def extra_state(self, idx: int) -> Dict[str, Tensor]:
        return {f"token_embedding.{s}": rows[idx] for s, rows in enumerate(self.rows) if idx in rows}

    def extra_meta(self) -> Dict[str, Any]:
        return {"kind": "diffusers.unet",
                "text_slots": [{"tokenizer": s.tok_attr, "text_encoder": s.enc_attr, "dim": s.dim} for s in self.slots],
                "tokens": {str(k): v for k, v in self.tokens.items()},
                "retired_tokens": list(self.retired)}

    def _parse_meta(self, meta):
        from ..bank import BankError
        if meta is None:
            return [], {}, []
        try:
            slots = [(d["tokenizer"], d["text_encoder"], int(d["dim"])) for d in meta.get("text_slots", [])]
            tokens = {int(k): str(v) for k, v in meta.get("tokens", {}).items()}
            retired = [str(v) for v in meta.get("retired_tokens", [])]
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise BankError(f"bank manifest: the diffusers token section is malformed ({e})") from None
        return slots, tokens, retired

    def check_extra_state(self, meta, per_concept: Dict[int, Dict[str, Tensor]]) -> None:
        from ..bank import BankError
        slots, tokens, retired = self._parse_meta(meta)
        if not self.slots:
            if slots:
                logger.warning("clora_fast: the bank has personalized token embeddings but a bare UNet was given: "
                               "the tokens are not loaded (patch the pipeline to use them)")
            return
        if not slots:
            logger.warning("clora_fast: the bank has no token embeddings (saved from a bare UNet): the concepts "
                           "load without personalized tokens")
            return
        mine = [(s.tok_attr, s.enc_attr, s.dim) for s in self.slots]
        if slots != mine:
            raise BankError(f"the bank's text encoders {slots} do not match this pipeline's {mine}")
        ours = set(self.tokens.values()) | set(self.retired)
        for tok in list(tokens.values()) + list(retired):
            for slot in self.slots:
                if slot.has_token(tok) and tok not in ours:
                    raise BankError(f"the bank's token {tok!r} already exists in pipe.{slot.tok_attr} and was not "
                                    f"added by clora_fast")
        for idx, tok in tokens.items():
            t = per_concept.get(idx)
            if t is None:
                raise BankError(f"bank: token {tok!r} belongs to concept {idx}, which the bank does not hold")
            for s, slot in enumerate(self.slots):
                row = t.get(f"token_embedding.{s}")
                if row is None or tuple(row.shape) != (slot.dim,) or not bool(torch.isfinite(row).all()):
                    got = None if row is None else tuple(row.shape)
                    raise BankError(f"bank: concept {idx} token embedding {s} has shape {got}, expected ({slot.dim},)")

    def load_extra_state(self, meta, per_concept: Dict[int, Dict[str, Tensor]]) -> None:
        if not self.slots:
            return
        slots, tokens, retired = self._parse_meta(meta)
        if not slots:
            tokens, retired = {}, []
        # every token this adapter added before and the bank does not use stays retired
        keep = set(tokens.values())
        old = [t for t in list(self.tokens.values()) + list(self.retired) if t not in keep]
        for slot in self.slots:
            slot.emb.clora_rows.clear()
            slot.emb.clora_retired.clear()
        prev_tokens, prev_rows = self.tokens, self.rows
        self.tokens, self.retired = {}, []
        self.rows = [dict() for _ in self.slots]
        for tok in old + [t for t in retired if t not in old]:
            for slot in self.slots:
                slot.emb.clora_retired[slot.add_token(tok)] = tok
            self.retired.append(tok)
        active = self.controller.active_concept
        for idx in sorted(tokens):
            tok = tokens[idx]
            for s, slot in enumerate(self.slots):
                tid = slot.add_token(tok)
                slot.emb.clora_retired.pop(tid, None)
                t = per_concept[idx][f"token_embedding.{s}"].detach().float().to(slot.base.weight.device)
                row = prev_rows[s].get(idx) if idx == active and prev_tokens.get(idx) == tok else None
                if row is not None and row.shape == t.shape and row.dtype == t.dtype and row.device == t.device:
                    with torch.no_grad():      # a rollback of the concept being learned: the optimizer keeps
                        row.copy_(t)           # training this very parameter (as the controller's A and B)
                else:
                    row = nn.Parameter(t, requires_grad=(idx == active))
                self.rows[s][idx] = row
                slot.emb.clora_rows[tid] = row
            self.tokens[idx] = tok


# ------------------------------------------------------------------------------------ public API
def patch(obj, *, rank: int = 16, alpha: Optional[float] = None, penalty_weight: Optional[float] = None,
          backend: str = "auto", grouped: bool = True) -> CLoRAController:
    """Adapt ``to_k``/``to_v`` of every cross-attention (attn2) of a diffusers pipeline's UNet
    (or a bare ``UNet2DConditionModel``). ``penalty_weight=None`` means
    :data:`clora_fast.controller.DEFAULT_PENALTY_WEIGHT` (read now). ``grouped=False`` computes each
    layer's K/V separately (for comparison / debugging). Returns the controller."""
    adapter = DiffusersAdapter(obj, grouped=grouped)
    ctrl = CLoRAController(adapter.sites, rank=rank, alpha=alpha, penalty_weight=penalty_weight, backend=backend,
                           adapter=adapter)
    adapter.install(ctrl)
    logger.debug("clora_fast: patched %d attn2 layers (%d projections), groups %s%s", len(adapter.layers),
                 len(adapter.sites), ctrl.groups, "" if grouped else " (grouped=False: K/V per layer)")
    return ctrl


def unpatch(obj) -> None:
    """Undo :func:`patch`: processors, tokenizer(s), text-encoder embeddings and weights are
    exactly as before (a merged controller is unmerged first). Learned concepts are dropped
    (save them first)."""
    unet, pipe = _resolve(obj)
    ad = _adapter_of(unet)
    if ad is None:
        raise ValueError(f"this {type(obj).__name__} is not patched by clora_fast")
    ad.uninstall()
    if pipe is not None and pipe is not ad.pipe:
        # another pipeline over the patched components (e.g. from_pipe after patching) got the patched
        # tokenizer copies: it gets the originals back too
        for slot in ad.slots:
            if getattr(pipe, slot.tok_attr, None) is slot.tokenizer:
                setattr(pipe, slot.tok_attr, slot.orig_tokenizer)


def load(obj, path, *, backend: str = "auto", grouped: bool = True,
         replace_active: bool = False) -> CLoRAController:
    """Patch ``obj`` with the bank's rank/alpha/penalty weight and load the bank at ``path``.
    If ``obj`` is already patched, the bank is loaded into its controller (its rank must
    match; a concept being learned there is only replaced with ``replace_active=True``).
    On any error nothing changes (a patch made here is undone)."""
    from ..bank import read_manifest
    unet, _ = _resolve(obj)
    ad = _adapter_of(unet)
    if ad is not None:
        ad.controller.load_bank(path, replace_active=replace_active)
        return ad.controller
    m = read_manifest(path)
    ctrl = patch(obj, rank=m["rank"], alpha=float(m["alpha"]), penalty_weight=float(m["penalty_weight"]),
                 backend=backend, grouped=grouped)
    try:
        ctrl.load_bank(path)
    except BaseException:
        unpatch(obj)
        raise
    return ctrl


def export_lora(obj, path, which="merged", *, dtype: Optional[torch.dtype] = None, layout: str = "peft",
                original_names: Optional[bool] = None) -> None:
    """Write a LoRA safetensors file of one concept (``which`` = its index) or of all finished concepts
    (``"merged"``, rank T*r), which ``pipe.load_lora_weights(folder, weight_name=file_name)`` accepts (older
    diffusers need the ``weight_name`` form offline; newer ones also take the file's path).
    ``layout="peft"`` (or ``"diffusers"``): diffusers' PEFT keys ``unet.<module>.lora_A.weight`` / ``lora_B.weight``
    (the scale baked into B, so alpha = rank).  ``layout="kohya"``: kohya's ``lora_unet_<module>.lora_down.weight`` /
    ``.lora_up.weight`` / ``.alpha``, which the Stable Diffusion web UIs and ComfyUI read; module names as kohya's
    trainer writes them (SDXL: the original Stable Diffusion names, ``lora_unet_input_blocks_4_1_...``; SD 1.x /
    2.x: diffusers'), or as ``original_names`` says (see :meth:`DiffusersAdapter.kohya_names`).
    ``obj``: a patched pipeline/UNet or its controller."""
    ctrl = obj if isinstance(obj, CLoRAController) else get_controller(obj)
    if ctrl is None:
        raise ValueError(f"export_lora: {type(obj).__name__} is not patched by clora_fast")
    ctrl.export_lora(path, which, prefix=None if layout == "kohya" else "unet.", dtype=dtype, layout=layout,
                     original_names=original_names)


def import_lora(obj, path, name: Optional[str] = None, *, textual_inversion=None, scale: float = 1.0,
                strict: bool = True, ignore_other_modules: bool = False) -> int:
    """Add a LoRA trained elsewhere (diffusers / PEFT or kohya safetensors keys, e.g. :func:`export_lora`'s; kohya's
    also with the original Stable Diffusion module names, as SDXL's files have them) to a
    patched pipeline as a finished concept: its cross-attention K/V change is folded into the past, so the
    concepts learned next are kept off it (see :meth:`CLoRAController.import_lora` for the keys, ``scale``,
    ``strict`` and ``ignore_other_modules``).  ``name`` becomes the concept's token; ``textual_inversion``, a
    safetensors file as :func:`export_textual_inversion` writes (``{token: [dim]}``, or SDXL's ``clip_l`` /
    ``clip_g``) or the web UIs do (``{"emb_params": [1, dim]}``, the token in the file's name), gives that token
    its learned embedding (and, for one text encoder, its name when ``name`` is None; SDXL's file holds no
    token: pass ``name``).  Everything is checked before anything changes.  Returns
    the concept's index."""
    from ..controller import _read_lora_file
    unet, _ = _resolve(obj)
    ad = _adapter_of(unet)
    if ad is None:
        raise ValueError(f"import_lora: {type(obj).__name__} is not patched by clora_fast")
    rows = None
    if textual_inversion is not None:
        if not ad.slots:
            raise ValueError("import_lora: textual_inversion needs a patched pipeline (a bare UNet has no text encoder)")
        emb = _read_lora_file(textual_inversion)
        if len(ad.slots) == 2:
            keys = ["clip_l", "clip_g"]
        else:
            keys = [k for k in emb if k not in ("clip_l", "clip_g")]
            if len(keys) != 1:
                raise ValueError(f"import_lora: {str(textual_inversion)!r} must hold one token embedding "
                                 f"{{token: [dim]}}, got keys {sorted(emb)}")
            if name is None:
                # the web UIs' safetensors embeddings keep the vector under "emb_params" and the token in the file
                # name (the word a prompt uses)
                name = keys[0] if keys[0] != "emb_params" else \
                    f"<{os.path.basename(str(textual_inversion)).rsplit('.', 1)[0]}>"
        rows = []
        for key, slot in zip(keys, ad.slots):
            t = emb.get(key)
            if t is None or t.numel() != slot.dim or not bool(torch.isfinite(t).all()):
                raise ValueError(f"import_lora: {str(textual_inversion)!r} needs a finite [{slot.dim}] embedding "
                                 f"under {key!r} for pipe.{slot.enc_attr}, got "
                                 f"{None if t is None else tuple(t.shape)}")
            rows.append(t.detach().reshape(slot.dim).float())
    idx = ad.controller.import_lora(path, name, scale=scale, strict=strict, ignore_other_modules=ignore_other_modules)
    if rows is not None:
        with torch.no_grad():
            for s, t in enumerate(rows):
                ad.rows[s][idx].copy_(t)
    return idx


def export_textual_inversion(obj, path, which: int) -> None:
    """Write concept ``which``'s personalized token embedding(s) of a patched pipeline as a
    textual-inversion safetensors file (see :meth:`DiffusersAdapter.export_textual_inversion`).
    Together with :func:`export_lora` a plain pipeline reproduces the patched one:
    ``pipe.load_lora_weights(lora); pipe.load_textual_inversion(tokens)``."""
    unet, _ = _resolve(obj)
    ad = _adapter_of(unet)
    if ad is None:
        raise ValueError(f"export_textual_inversion: {type(obj).__name__} is not patched by clora_fast")
    ad.export_textual_inversion(path, which)


def save_pipeline(obj, path, **save_kwargs) -> None:
    """``pipe.save_pretrained(path, **save_kwargs)`` with every finished concept baked in: the UNet's K/V
    weights are ``W0 + P`` (merged), each finished concept's token is added to the tokenizer(s) and its
    learned embedding appended to the text encoder(s) (``vocab_size`` grown to match), so that
    ``DiffusionPipeline.from_pretrained(path)`` reproduces the patched pipeline without clora_fast (removed
    concepts' tokens are left out).  The patched pipeline is left exactly as it was, also when saving fails."""
    unet, pipe = _resolve(obj)
    ad = _adapter_of(unet)
    if ad is None:
        raise ValueError(f"save_pipeline: this {type(obj).__name__} is not patched by clora_fast")
    if pipe is None:
        raise TypeError("save_pipeline: pass the pipeline (a bare UNet has no tokenizer or text encoder; use "
                        "unet.save_pretrained after controller.merge())")
    ctrl = ad.controller
    if ctrl.active_concept is not None:
        raise RuntimeError(f"save_pipeline: concept {ctrl.active_concept} ({ctrl.active_name!r}) is still being "
                           f"learned: call end_concept() first (only finished concepts are baked in)")
    for slot in ad.slots:
        if getattr(pipe, slot.enc_attr, None) is not slot.encoder:
            raise RuntimeError(f"save_pipeline: pipe.{slot.enc_attr} is not the text encoder clora_fast patched (the "
                               f"personalized token embeddings live there): pass the pipeline that shares it")
    merged_here = False
    swapped = []
    try:
        if not ctrl.merged and ctrl.has_past:
            ctrl.merge()
            merged_here = True
        live = sorted(ad.tokens.items())
        for s, slot in enumerate(ad.slots):
            tok = copy.deepcopy(slot.orig_tokenizer)
            tok.add_tokens([t for _, t in live])
            base = slot.base
            ids = [tok.convert_tokens_to_ids(t) for _, t in live]
            n = max(base.num_embeddings, len(tok))
            emb = nn.Embedding(n, base.embedding_dim, padding_idx=base.padding_idx, device=base.weight.device,
                               dtype=base.weight.dtype)
            with torch.no_grad():
                emb.weight[:base.num_embeddings].copy_(base.weight)
                for (idx, _), tid in zip(live, ids):
                    emb.weight[tid].copy_(ad.rows[s][idx])
            cfg = slot.encoder.config
            swapped.append((slot, getattr(cfg, "vocab_size", None), getattr(pipe, slot.tok_attr, None)))
            _set_module(slot.encoder, slot.path, emb)
            if hasattr(cfg, "vocab_size"):
                cfg.vocab_size = n
            setattr(pipe, slot.tok_attr, tok)
        pipe.save_pretrained(path, **save_kwargs)
    finally:
        for slot, vocab, tok in swapped:
            _set_module(slot.encoder, slot.path, slot.emb)
            if vocab is not None:
                slot.encoder.config.vocab_size = vocab
            setattr(pipe, slot.tok_attr, tok)             # what this pipeline had (the patched copy, or not)
        if merged_here:
            ctrl.unmerge()
