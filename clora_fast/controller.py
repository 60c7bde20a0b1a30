"""The C-LoRA controller: concepts, fold, forgetting penalty, merge, save/load.

It knows no framework. An integration (``clora_fast.integrations.*``) builds a list
of :class:`Site` (one per adapted projection), creates a :class:`CLoRAController`
over them and routes the model's projections through :meth:`CLoRAController.project`
(one site), :meth:`CLoRAController.project_pair` (K and V of one layer in one launch)
or :meth:`CLoRAController.project_group` (every site of a group, one launch).

Math (docs/ARCHITECTURE.md; the method: README.md), per site with frozen base weight ``W0``:

    W_t = W0 + P_t + s * B_t @ A_t          P_{t+1} = P_t + s * B_t @ A_t      s = alpha / rank

* ``A`` ``[r, in]`` is Kaiming-uniform initialised like PEFT (``a=sqrt(5)``), ``B``
  ``[out, r]`` is zero, so a fresh concept changes nothing.
* ``P`` (the folded past) is kept in **float32** whatever the model dtype: it is a sum
  of many small updates, fp32 keeps the fold exact enough that removing a concept
  (refolding the others from their stored factors, in order) gives the same bits as
  having folded only those. Folding is done in fp32. The frozen folded weight
  ``Wf = W0 + P`` is materialised in the weight's dtype (``(W0.float() + P).to(dtype)``),
  separately: ``W0`` is never written, except by :meth:`merge`, which keeps an exact copy
  and :meth:`unmerge` restores it bit for bit.
* Penalty ``penalty_weight * sum_sites || P ⊙ (s B A) ||_F^2``, exactly 0 while P = 0.

Adapter protocol (every hook optional except ``uninstall`` which the integration calls):
``on_begin_concept(name, idx)``, ``on_end_concept(idx)``, ``on_remove_concept(idx)``,
``on_state_change()``, ``trainable_parameters()``, ``identity()`` (str),
``extra_state(idx) -> dict[str, Tensor]`` (per concept tensors saved in the bank, e.g. a
token embedding), ``extra_meta() -> dict`` (JSON), ``check_extra_state(meta, per_concept)``
(raise if the bank's extra state cannot be loaded; must not change anything) and
``load_extra_state(meta, per_concept)``.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from . import ops

logger = logging.getLogger("clora_fast")

#: Provisional default of the forgetting-penalty weight (lambda). The penalty is tiny in
#: absolute terms: after training a concept, entries of P and of M = s*B@A are ~1e-3..1e-2,
#: so P^2*M^2 is ~1e-12..1e-8 per element; SD 1.x has ~2e7 adapted elements (32 projections),
#: giving an unweighted sum of ~2e-5..2e-1 at full overlap. Per element the penalty acts as a
#: weight decay on M of strength 2*lambda*P^2 (~1e-5..1e-4 * lambda). With lambda = 1e3 the
#: weighted penalty is comparable to a diffusion loss (~0.1) when the new update overlaps the
#: past strongly and negligible when it does not. A real-data sweep may change this constant.
DEFAULT_PENALTY_WEIGHT = 1e3

_BACKENDS = ("auto", "reference", "triton", "cuda")


@dataclass
class Site:
    """One adapted projection ``y = x @ weight.T + bias``."""
    name: str                       # stable unique key (module path)
    weight: Tensor                  # frozen base weight W0 [out, in]; never written (except merge)
    bias: Optional[Tensor] = None   # base bias [out] or None
    group: Optional[str] = None     # sites of one group see the same input: one grouped launch

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])


@dataclass
class Concept:
    """A finished concept: its factors per site (detached, float32, in host memory: read only by
    ``remove_concept``, export and save, they do not take GPU memory that grows with the concepts) and
    metadata."""
    idx: int
    name: str
    scale: float
    lora_A: List[Tensor]            # per site [r, in]
    lora_B: List[Tensor]            # per site [out, r]
    meta: Dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> Optional[str]:
        """Where an imported concept came from (:meth:`CLoRAController.import_concept`); None if learned here."""
        return self.meta.get("source")


class _Bundle:
    """Sites computed together: a group, or one ungrouped site. Owns the flat A/B of the
    current concept (per-site A/B are row views) and the concatenated folded weight."""

    def __init__(self, key: str, site_ids: List[int], sites: List[Site]):
        self.key = key
        self.site_ids = site_ids
        outs = [sites[i].out_features for i in site_ids]
        self.offsets = tuple([0] + list(_cumsum(outs)))
        self.n_out = self.offsets[-1]
        self.in_features = sites[site_ids[0]].in_features
        self.pos = {sid: p for p, sid in enumerate(site_ids)}
        self.has_bias = any(sites[i].bias is not None for i in site_ids)
        self.wcat: Optional[Tensor] = None     # [N, in] folded weights (weight dtype)
        self.bcat: Optional[Tensor] = None     # [N] biases (zeros where a site has none)
        self.wcat_key = None
        self.wcast: Optional[tuple] = None     # (dtype, wcat it was cast from, wcat, bcat) under autocast


class DistributedGradientsWarning(UserWarning):
    """:meth:`CLoRAController.begin_concept` under ``torch.distributed`` with several processes: the controller's
    parameters are not the model's, so DDP / accelerate leave their gradients unsynchronized; the training loop
    must call :meth:`CLoRAController.all_reduce_grads`.  A loop that does can silence it by category:
    ``warnings.filterwarnings("ignore", category=DistributedGradientsWarning)``."""


def _positive_scale(what: str, scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"{what}: scale must be a positive finite number, got {scale!r}")
    return float(scale)


# the LoRA file of a folder: diffusers' save_lora_weights, then PEFT's save_pretrained
_LORA_FILE_NAMES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")


def _lora_file(path) -> str:
    """``path`` itself, or for a folder the LoRA file in it: :data:`_LORA_FILE_NAMES` in that order, else the
    folder's only ``.safetensors`` file (several, or none: an error naming what is there)."""
    p = str(path)
    if not os.path.isdir(p):
        return p
    for n in _LORA_FILE_NAMES:
        if os.path.isfile(os.path.join(p, n)):
            return os.path.join(p, n)
    found = sorted(f for f in os.listdir(p) if f.endswith(".safetensors") and os.path.isfile(os.path.join(p, f)))
    if len(found) == 1:
        return os.path.join(p, found[0])
    pickles = sorted(f for f in os.listdir(p) if f.endswith((".bin", ".pt", ".pth", ".ckpt")))
    raise FileNotFoundError(
        f"{p!r} is a folder without {' or '.join(_LORA_FILE_NAMES)} and with "
        + (f"{len(found)} other .safetensors files ({found[:4]}): pass the LoRA file's path" if found else
           "no .safetensors file" + (f" (only {pickles[:3]}: clora_fast reads LoRA weights from safetensors "
                                     f"only, never pickle)" if pickles else "")))


def _read_lora_file(path, with_metadata: bool = False):
    """The tensors of a safetensors file (anything else, e.g. a pickled ``.bin`` / ``.pt``, is refused); with
    ``with_metadata``, ``(tensors, the header's metadata dict)``.  The file is opened once."""
    from safetensors import SafetensorError, safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no LoRA file at {str(path)!r}")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            return (tensors, dict(f.metadata() or {})) if with_metadata else tensors
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{str(path)!r} is not a safetensors file ({e}); clora_fast reads LoRA weights from "
                         f"safetensors only (never pickle)") from None


def _metadata_scale(metadata: Dict[str, str], prefix: str, where: str, folder: str) -> float:
    """The file's scale from its LoRA config: diffusers' ``lora_adapter_metadata`` in the header (the LoraConfig
    that ``save_lora_weights(..., unet_lora_adapter_metadata=...)`` stores, keys ``<prefix>r``,
    ``<prefix>lora_alpha``), else the ``adapter_config.json`` beside the file (PEFT's ``save_pretrained``):
    ``lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``); 1 without either."""
    import json
    raw = metadata.get("lora_adapter_metadata")
    side = os.path.join(folder, "adapter_config.json")
    try:
        if raw:
            cfg, what = json.loads(raw), "its lora_adapter_metadata"
        elif os.path.isfile(side):
            with open(side) as f:
                cfg, what = json.load(f), "the adapter_config.json beside it"
        else:
            return 1.0
    except ValueError:
        label = "its lora_adapter_metadata" if raw else repr(side)
        raise ValueError(f"{where}: {label} is not JSON") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{where}: {what} is not a JSON object")
    for pre in dict.fromkeys((prefix, "")):
        r, alpha = cfg.get(f"{pre}r"), cfg.get(f"{pre}lora_alpha")
        if r is None or alpha is None:
            continue
        if cfg.get(f"{pre}rank_pattern") or cfg.get(f"{pre}alpha_pattern"):
            raise ValueError(f"{where}: {what} gives some modules their own rank or alpha (rank_pattern / "
                             f"alpha_pattern), which import_lora does not apply: convert the file to one scale")
        if cfg.get(f"{pre}use_dora"):
            raise ValueError(f"{where}: {what} says DoRA (use_dora): its magnitude vectors are not a B @ A change")
        if not (isinstance(r, (int, float)) and isinstance(alpha, (int, float)) and r > 0
                and math.isfinite(alpha / r)):
            raise ValueError(f"{where}: {what} has r = {r!r}, lora_alpha = {alpha!r}")
        return float(alpha) / (math.sqrt(r) if cfg.get(f"{pre}use_rslora") else float(r))
    return 1.0


# what follows a module's name in the LoRA keys of the layouts read here (to name the modules a file adapts)
_LORA_SUFFIX = re.compile(r"(\.lora_[AB]\.weight|\.lora\.(down|up)\.weight|_lora\.(down|up)\.weight|"
                          r"\.lora_(down|up)\.weight|\.alpha|\.lora_magnitude_vector(\.weight)?|\.dora_scale)$")
# DoRA's magnitude vectors (PEFT's, kohya's): a module with one is not changed by B @ A alone
_DORA_SUFFIX = re.compile(r"(\.lora_magnitude_vector(\.weight)?|\.dora_scale)$")


def _kohya_stem(module: str) -> str:
    """kohya's key stem of a UNet module: ``lora_unet_`` and the module's dotted name with ``_`` for ``.``."""
    return "lora_unet_" + module.replace(".", "_")


def _lora_key_candidates(site: str, prefix: str, aliases: Sequence[str] = ()):
    """``(down / A key, up / B key, alpha key or None)`` of one site in the LoRA file layouts read here: PEFT /
    diffusers (``<site>.lora_A.weight``), diffusers' older ``<site>.lora.down.weight`` (with ``.alpha``) and
    attention-processor ``<attention>.processor.<proj>_lora.down.weight`` (each with or without ``prefix``), and
    kohya's ``lora_unet_<name, dots as _>.lora_down.weight`` (with ``.alpha``), for the site's name and then for
    each of ``aliases`` (other names of the same module, e.g. the original Stable Diffusion ones)."""
    mod, _, proj = site.rpartition(".")
    for pre in dict.fromkeys((prefix, "")):
        yield f"{pre}{site}.lora_A.weight", f"{pre}{site}.lora_B.weight", None
        yield f"{pre}{site}.lora.down.weight", f"{pre}{site}.lora.up.weight", f"{pre}{site}.alpha"
        if mod:
            yield f"{pre}{mod}.processor.{proj}_lora.down.weight", f"{pre}{mod}.processor.{proj}_lora.up.weight", None
    for name in (site, *aliases):
        k = _kohya_stem(name)
        yield f"{k}.lora_down.weight", f"{k}.lora_up.weight", f"{k}.alpha"


def _lora_factors_by_name(tensors: Dict[str, Tensor], sites: Sequence[str], prefix: str,
                          aliases: Optional[Dict[str, Sequence[str]]] = None):
    """``({site: (A, B)}, used keys)`` from the layouts of :func:`_lora_key_candidates` (``aliases``: ``{site:
    other names of its module}``; an ``alpha``'s ``alpha / rank`` goes into B; kohya's 1x1-convolution factors
    are flattened)."""
    factors: Dict[str, Tuple[Tensor, Tensor]] = {}
    used = set()
    aliases = aliases or {}
    for site in sites:
        for kd, ku, kal in _lora_key_candidates(site, prefix, aliases.get(site, ())):
            if kd not in tensors or ku not in tensors:
                continue
            down, up = tensors[kd], tensors[ku]
            if down.dim() == 4 and down.shape[2:] == (1, 1):        # 1x1 convolutions (kohya's conv form)
                down, up = down.flatten(1), up.flatten(1)
            used |= {kd, ku}
            if kal is not None and kal in tensors:
                up = up.double() * (float(tensors[kal]) / down.shape[0])
                used.add(kal)
            factors[site] = (down, up)
            break
    return factors, used


def _cumsum(xs):
    t = 0
    for x in xs:
        t += x
        yield t


def _fmt(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _rows(t: Tensor, start: int, stop: int) -> Tensor:
    """``t[start:stop]``, or ``t`` itself when that is all of it (no view, no slice node in autograd)."""
    return t if start == 0 and stop == t.shape[0] else t[start:stop]


def _factor(t: Tensor, dt: torch.dtype) -> Tensor:
    """A factor for a projection computing in ``dt``: float32 factors of a float16 / bfloat16 call as they are (the
    ops take float32 masters: the merged strategy rounds them where it writes them anyway, no separate cast
    launches, and hands back float32 gradients), others cast to ``dt``."""
    return t if t.dtype == torch.float32 and dt in (torch.float16, torch.bfloat16) else t.to(dt)


def _world_size(group=None) -> int:
    """Processes in ``torch.distributed``'s (default) group; 1 without an initialized process group."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _tensor_key(t: Optional[Tensor]):
    if t is None:
        return None
    return (t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))


# Under torch.compile the adapted K/V projections (and the penalty) are traced into the graph (no graph break:
# fullgraph=True and CUDA graphs, mode="reduce-overhead", work): the controller folds W0 + P in the graph from the live
# base weights (_project_group_traced) instead of using its eager caches, whose checks compare data pointers and
# version counters, which dynamo cannot trace.  The dynamo of torch older than TRACED_MIN cannot trace that path
# (checked: 2.4 fails, 2.7, 2.11 and 2.14 pass): there they run as eager islands (graph breaks).
TRACED_MIN = (2, 7)
_TRACEABLE = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= TRACED_MIN


def trace_kv() -> bool:
    """True inside a torch.compile trace (not torch.export's) on a torch whose dynamo traces the traced paths.
    (``torch.compiler.is_exporting()`` reads True in any dynamo trace on torch 2.11; the flag behind it does not.)"""
    return (_TRACEABLE and torch.compiler.is_compiling()
            and not getattr(torch.compiler, "_is_exporting_flag", False))


class _ZeroOf(torch.autograd.Function):
    """A float32 0-dim zero that supports ``.backward()``: differentiable in ``t``, with a zero gradient."""

    @staticmethod
    def forward(ctx, t):
        ctx.like = (t.shape, t.dtype)
        return t.new_zeros((), dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad):
        return grad.new_zeros(ctx.like[0], dtype=ctx.like[1])


def _autocasts(w: Tensor, autocast: Optional[torch.dtype]) -> bool:
    """Whether an enabled autocast region of dtype ``autocast`` casts ``w`` for a linear (floating, not float64)."""
    return autocast is not None and w.dtype not in (autocast, torch.float64) and w.is_floating_point()


@torch.compiler.disable
def _sync_eagerly(ctrl: "CLoRAController") -> None:
    """Re-point the sites and follow a moved model (run outside a torch.compile graph: identity and device
    checks with side effects)."""
    ctrl._refresh_sites()
    ctrl._sync_device()


class CLoRAController(nn.Module):
    """Continual LoRA over a fixed set of projections (:class:`Site`).

    ``rank`` r, ``alpha`` (default r, so s = alpha/r = 1), ``penalty_weight`` (lambda;
    None = :data:`DEFAULT_PENALTY_WEIGHT` read at construction), ``backend`` for :mod:`clora_fast.ops`
    ("auto", "reference", "triton", "cuda"), ``adapter`` the integration object.
    The current concept's factors are float32 parameters (``param_dtype``), cast to the
    compute dtype at use (autocast or the input's dtype).
    """

    _unpatched = False      # class default: also for controllers pickled before the attribute existed
    _dist_checked = None    # all_reduce_grads: the state whose parameters were found equal on every process

    def __init__(self, sites: Sequence[Site], *, rank: int = 16, alpha: Optional[float] = None,
                 penalty_weight: Optional[float] = None, backend: str = "auto", adapter=None,
                 param_dtype: torch.dtype = torch.float32):
        super().__init__()
        sites = list(sites) if not isinstance(sites, Site) else [sites]
        if not sites:
            raise ValueError("sites is empty: the controller needs at least one projection to adapt")
        names = set()
        for i, s in enumerate(sites):
            if not isinstance(s, Site):
                raise TypeError(f"sites[{i}] must be a clora_fast.controller.Site, got {type(s).__name__}")
            if not isinstance(s.name, str) or not s.name:
                raise ValueError(f"sites[{i}].name must be a non-empty str, got {s.name!r}")
            if s.name in names:
                raise ValueError(f"duplicate site name {s.name!r}")
            names.add(s.name)
            if not isinstance(s.weight, Tensor) or s.weight.dim() != 2 or not s.weight.is_floating_point():
                got = _fmt(s.weight) if isinstance(s.weight, Tensor) else type(s.weight).__name__
                raise ValueError(f"site {s.name!r}: weight must be a 2-D floating tensor [out, in], got {got}")
            if s.bias is not None and (not isinstance(s.bias, Tensor) or tuple(s.bias.shape) != (s.out_features,)):
                got = _fmt(s.bias) if isinstance(s.bias, Tensor) else type(s.bias).__name__
                raise ValueError(f"site {s.name!r}: bias must be None or a tensor of shape [{s.out_features}], "
                                 f"got {got}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        for s in sites:
            if rank > min(s.out_features, s.in_features):
                raise ValueError(f"rank={rank} exceeds min(out, in) = {min(s.out_features, s.in_features)} of site "
                                 f"{s.name!r} (weight {tuple(s.weight.shape)})")
        if alpha is None:
            alpha = float(rank)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be a positive finite number or None (= rank), got {alpha!r}")
        if penalty_weight is None:   # looked up at call time: a sweep may change the module constant
            penalty_weight = DEFAULT_PENALTY_WEIGHT
        if (isinstance(penalty_weight, bool) or not isinstance(penalty_weight, (int, float))
                or not math.isfinite(penalty_weight) or penalty_weight < 0):
            raise ValueError(f"penalty_weight must be a finite number >= 0, got {penalty_weight!r}")
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if param_dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            raise ValueError(f"param_dtype must be a floating dtype, got {param_dtype!r}")
        if param_dtype == torch.float64 and backend in ("triton", "cuda"):
            raise ValueError(f"param_dtype=torch.float64 needs backend 'reference' (or 'auto', which takes it for "
                             f"float64): the {backend!r} kernels compute in fp32/fp16/bf16")

        self.sites: List[Site] = sites
        self._index = {s.name: i for i, s in enumerate(sites)}
        self.rank = rank
        self.alpha = float(alpha)
        self.scale = self.alpha / rank
        self.penalty_weight = float(penalty_weight)
        self.backend = backend
        self.adapter = adapter
        self.param_dtype = param_dtype

        # bundles: one per group (in order of first appearance), one per ungrouped site
        groups: Dict[str, List[int]] = {}
        bundle_keys: List[str] = []
        self._site_bundle: List[Tuple[int, int]] = [None] * len(sites)  # site -> (bundle, position)
        for i, s in enumerate(sites):
            key = f"group:{s.group}" if s.group is not None else f"site:{s.name}"
            if key not in groups:
                groups[key] = []
                bundle_keys.append(key)
            groups[key].append(i)
        self._bundles: List[_Bundle] = []
        self._group_bundle: Dict[str, int] = {}
        for b, key in enumerate(bundle_keys):
            ids = groups[key]
            first = sites[ids[0]]
            for i in ids[1:]:
                s = sites[i]
                if s.in_features != first.in_features or s.weight.dtype != first.weight.dtype \
                        or s.weight.device != first.weight.device:
                    raise ValueError(
                        f"sites of group {first.group!r} must share in_features, dtype and device: "
                        f"{first.name!r} has weight {_fmt(first.weight)} but {s.name!r} has {_fmt(s.weight)}")
            bundle = _Bundle(key, ids, sites)
            self._bundles.append(bundle)
            if first.group is not None:
                self._group_bundle[first.group] = b
            for i in ids:
                self._site_bundle[i] = (b, bundle.pos[i])

        # state
        self._past: List[Optional[Tensor]] = [None] * len(sites)   # fp32 P per site (None = 0)
        self.concepts: List[Concept] = []
        self._retired: List[Dict[str, Any]] = []   # removed concepts: {"idx", "name"}
        self._next_idx = 0
        self._active: Optional[Tuple[int, str]] = None
        self._penalized = True             # penalty() computed (with a past to act on) since begin_concept
        self.lora_A = nn.ParameterList()   # one flat [L*r, in] per bundle while a concept is active
        self.lora_B = nn.ParameterList()   # one flat [N, r] per bundle
        self._merged_backup: Optional[List[Tensor]] = None
        self._version = 0
        self._penalty_layout = None     # (state key, ops.PackedForgettingPenalty) of penalty()
        self._dev_key = None
        self._factor_cache = None       # (lora_A, lora_B, [A per bundle], [B per bundle]): see _flat_factors
        self._unpatched = False         # set by the integration's unpatch(): the model no longer calls us

    # ------------------------------------------------------------------ properties
    @property
    def num_sites(self) -> int:
        return len(self.sites)

    @property
    def site_names(self) -> List[str]:
        return [s.name for s in self.sites]

    @property
    def groups(self) -> List[str]:
        return list(self._group_bundle)

    @property
    def active_concept(self) -> Optional[int]:
        """Index of the concept being learned, or None."""
        return None if self._active is None else self._active[0]

    @property
    def active_name(self) -> Optional[str]:
        return None if self._active is None else self._active[1]

    @property
    def merged(self) -> bool:
        return self._merged_backup is not None

    @property
    def has_past(self) -> bool:
        return any(p is not None for p in self._past)

    @property
    def retired_concepts(self) -> List[Dict[str, Any]]:
        """The removed (or discarded) concepts, oldest first: ``{"idx": int, "name": str}`` each.  Their
        names stay taken: :meth:`begin_concept` refuses them (a bank's history keeps one meaning per name)."""
        return [dict(r) for r in self._retired]

    @property
    def pristine(self) -> bool:
        """True when every projection computes exactly ``x @ W0.T + bias`` through the base
        weight (no concept active and nothing folded, or everything merged into W0)."""
        return self._active is None and (self.merged or not self.has_past)

    def state_key(self):
        """Changes whenever what :meth:`project` computes may change (for caches)."""
        pv = tuple(p._version for p in self.lora_A) + tuple(p._version for p in self.lora_B)
        return (self._version, pv)

    def site_index(self, site: Union[int, str]) -> int:
        if isinstance(site, str):
            if site not in self._index:
                raise KeyError(f"unknown site {site!r}; known sites: {self.site_names[:4]}"
                               f"{' ...' if self.num_sites > 4 else ''}")
            return self._index[site]
        if isinstance(site, bool) or not isinstance(site, int) or not 0 <= site < self.num_sites:
            raise IndexError(f"site index must be an int in [0, {self.num_sites}), got {site!r}")
        return site

    def past(self, site: Union[int, str]) -> Tensor:
        """The folded past P of ``site`` (float32, zeros when nothing is folded)."""
        i = self.site_index(site)
        p = self._past[i]
        if p is None:
            w = self.sites[i].weight
            return torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        return p

    def folded_weight(self, site: Union[int, str]) -> Tensor:
        """``Wf = W0 + P`` of ``site`` in the weight's dtype (W0 itself when P = 0)."""
        i = self.site_index(site)
        if self._past[i] is None and not self.merged:
            return self.sites[i].weight.detach()
        b, pos = self._site_bundle[i]
        bundle = self._bundles[b]
        wcat, _ = self._bundle_weights(bundle)
        return wcat[bundle.offsets[pos]:bundle.offsets[pos + 1]]

    def current_factors(self, site: Union[int, str]) -> Tuple[Tensor, Tensor]:
        """(A [r, in], B [out, r]) of the active concept at ``site`` (views of the parameters)."""
        if self._active is None:
            raise RuntimeError("no concept is active: call begin_concept() first")
        i = self.site_index(site)
        b, pos = self._site_bundle[i]
        bundle = self._bundles[b]
        r = self.rank
        As, Bs = self._flat_factors()
        return _rows(As[b], pos * r, (pos + 1) * r), _rows(Bs[b], bundle.offsets[pos], bundle.offsets[pos + 1])

    def _flat_factors(self) -> Tuple[List[Tensor], List[Tensor]]:
        """The flat A and B parameters per bundle as plain lists (``ParameterList`` indexing costs
        microseconds of host time per access, on the hot path of every projection).  The lists are
        rebuilt whenever ``lora_A`` / ``lora_B`` are replaced (they are never changed in place)."""
        c = self._factor_cache
        la, lb = self.lora_A, self.lora_B
        pa, pb = la._parameters, lb._parameters
        # the lists themselves, and the parameters in them (load_state_dict(assign=True), a conversion with
        # overwrite_module_params_on_conversion, or `lora_B[0] = nn.Parameter(...)` replace those in place)
        if (c is None or c[0] is not la or c[1] is not lb or len(pa) != len(c[2]) or len(pb) != len(c[3])
                or any(p is not q for p, q in zip(pa.values(), c[2]))
                or any(p is not q for p, q in zip(pb.values(), c[3]))):
            c = self._factor_cache = (la, lb, list(pa.values()), list(pb.values()))
        return c[2], c[3]

    def concept(self, idx: int) -> Concept:
        for c in self.concepts:
            if c.idx == idx:
                return c
        if self._active is not None and self._active[0] == idx:
            raise KeyError(f"concept {idx} is still being learned (call end_concept() first)")
        if any(r["idx"] == idx for r in self._retired):
            raise KeyError(f"concept {idx} was removed")
        raise KeyError(f"no concept with index {idx}; known: {[c.idx for c in self.concepts]}")

    # ------------------------------------------------------------------ device / weights
    def _refresh_sites(self) -> None:
        """Re-point the sites at the model's live parameters (the adapter's ``refresh_sites`` hook):
        after ``load_state_dict(assign=True)``, a conversion that replaces parameters, or timm's fused
        ``qkv`` moved to new storage, the tensors taken at patch time would be stale - merge() would
        write into dead storage and the projections would use the old weights.  Identity checks only."""
        hook = getattr(self.adapter, "refresh_sites", None)
        if hook is not None:
            hook()

    def _device(self) -> torch.device:
        return self.sites[0].weight.device

    def _sync_bundle_device(self, b: int) -> None:
        """:meth:`_sync_device` when bundle ``b``'s weights are not where they were at the last sync
        (the hot path's check: one device comparison instead of one per bundle)."""
        key = self._dev_key
        if key is None or self.sites[self._bundles[b].site_ids[0]].weight.device != key[b]:
            self._sync_device()

    def _sync_device(self) -> None:
        """Follow the base weights when the model was moved after patching."""
        key = tuple(self.sites[b.site_ids[0]].weight.device for b in self._bundles)
        if key == self._dev_key:
            return
        for i, s in enumerate(self.sites):
            p = self._past[i]
            if p is not None and p.device != s.weight.device:
                self._past[i] = p.to(s.weight.device)
        for b, bundle in enumerate(self._bundles):
            dev = self.sites[bundle.site_ids[0]].weight.device
            if len(self.lora_A) > b and self.lora_A[b].device != dev:
                with torch.no_grad():
                    self.lora_A[b].data = self.lora_A[b].data.to(dev)
                    self.lora_B[b].data = self.lora_B[b].data.to(dev)
        self._dev_key = key

    def _base_weight(self, i: int) -> Tensor:
        """W0 of site i (the merge backup while merged)."""
        if self._merged_backup is not None:
            return self._merged_backup[i]
        return self.sites[i].weight.detach()

    def _folded(self, i: int) -> Tensor:
        p = self._past[i]
        w0 = self._base_weight(i)
        return w0 if p is None else self._merged_value(w0, p)

    def _bundle_weights(self, bundle: _Bundle, autocast: Optional[torch.dtype] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """Concatenated folded weights and biases of a bundle, rebuilt when P or W0 changed.  ``autocast``: the
        dtype of an enabled torch.autocast region; the tensors come cast to it as autocast's rule for linear
        layers would (floating, not float64), cast once per rebuild instead of at every call (autocast caches
        only leaves that require grad: a frozen folded weight would be cast again at every forward)."""
        wcat, bcat = self._bundle_folded(bundle)
        if not _autocasts(wcat, autocast):
            return wcat, bcat
        c = bundle.wcast
        if c is None or c[0] != autocast or c[1] is not wcat:
            with torch.inference_mode(False), torch.no_grad():
                wc = wcat.to(autocast)
                bc = None if bcat is None else bcat.to(autocast)
            if bc is not None:
                ops.mark_frozen_bias(bc)
            c = bundle.wcast = (autocast, wcat, wc, bc)
        return c[2], c[3]

    def _autocast_dtype(self, x: Tensor) -> Optional[torch.dtype]:
        dev = x.device.type
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            return torch.get_autocast_dtype(dev)
        return None

    def _bundle_folded(self, bundle: _Bundle) -> Tuple[Tensor, Optional[Tensor]]:
        key = (self._version, tuple(_tensor_key(self.sites[i].weight) for i in bundle.site_ids),
               tuple(_tensor_key(self.sites[i].bias) for i in bundle.site_ids))
        if bundle.wcat is None or bundle.wcat_key != key:
            # normal tensors even when the first forward after a change runs under torch.inference_mode
            # (an evaluation before training): inference tensors could not be saved for backward later
            with torch.inference_mode(False), torch.no_grad():
                ws = [self._folded(i) for i in bundle.site_ids]
                bundle.wcat = ws[0] if len(ws) == 1 else torch.cat(ws, 0)
                if bundle.has_bias:
                    w0 = ws[0]
                    bundle.bcat = torch.cat([
                        self.sites[i].bias.detach() if self.sites[i].bias is not None
                        else torch.zeros(self.sites[i].out_features, dtype=w0.dtype, device=w0.device)
                        for i in bundle.site_ids])
                    ops.mark_frozen_bias(bundle.bcat)     # never written: the merged path may keep its padding
                else:
                    bundle.bcat = None
            bundle.wcat_key = key
            bundle.wcast = None                           # its autocast copy is stale (and freed) too
        return bundle.wcat, bundle.bcat

    def _compute_dtype(self, x: Tensor) -> torch.dtype:
        ac = self._autocast_dtype(x)
        return x.dtype if ac is None else ac

    def _check_input(self, x, in_features: int, method: str, *names) -> None:
        """``x`` is a tensor ``[..., in_features]``; errors name ``method(*names)``."""
        if not isinstance(x, Tensor) or x.dim() == 0 or x.shape[-1] != in_features:
            what = f"{method}({', '.join(repr(n) for n in names)})"
            if not isinstance(x, Tensor):
                raise TypeError(f"{what}: x must be a torch.Tensor, got {type(x).__name__}")
            raise ValueError(f"{what}: x must have shape [..., {in_features}], got {_fmt(x)}")

    # ------------------------------------------------------------------ projections
    def project(self, site: Union[int, str], x: Tensor) -> Tensor:
        """``y = x @ Wf.T + s*(x @ A.T) @ B.T + bias`` for one site (dense when no concept is
        active; exactly the base ``F.linear(x, W0, bias)`` while :attr:`pristine`)."""
        i = self.site_index(site)
        s = self.sites[i]
        self._check_input(x, s.in_features, "project", s.name)
        if self.pristine:
            return nn.functional.linear(x, s.weight, s.bias)
        self._sync_bundle_device(self._site_bundle[i][0])
        wf = self.folded_weight(i)
        bias = None if s.bias is None else s.bias.detach()
        if self._active is None:
            return nn.functional.linear(x, wf, bias)
        A, B = self.current_factors(i)
        dt = self._compute_dtype(x)
        return ops.lora_projection(x, wf, _factor(A, dt), _factor(B, dt), scale=self.scale, bias=bias,
                                   backend=self.backend)

    def project_pair(self, site_k: Union[int, str], site_v: Union[int, str], x: Tensor) -> Tuple[Tensor, Tensor]:
        """K and V of one attention layer (two sites of the same input) in one launch."""
        ik, iv = self.site_index(site_k), self.site_index(site_v)
        sk, sv = self.sites[ik], self.sites[iv]
        if sk.in_features != sv.in_features:
            raise ValueError(f"project_pair: sites {sk.name!r} and {sv.name!r} have different in_features "
                             f"({sk.in_features} vs {sv.in_features})")
        self._check_input(x, sk.in_features, "project_pair", sk.name, sv.name)
        if self._active is None:
            return self.project(ik, x), self.project(iv, x)
        (b, pk), (bv_, pv) = self._site_bundle[ik], self._site_bundle[iv]
        self._sync_bundle_device(b)
        self._sync_bundle_device(bv_)
        if b == bv_ and pv == pk + 1:
            # K and V are consecutive rows of one bundle: one row block each of the folded weights, biases and
            # flat factors, one segmented call.  A slice of a flat parameter costs a zero-filled gradient of the
            # whole parameter in backward: two per layer here instead of four.
            bundle, r = self._bundles[b], self.rank
            lo, mid, hi = bundle.offsets[pk], bundle.offsets[pk + 1], bundle.offsets[pk + 2]
            ac = self._autocast_dtype(x)
            wcat, bcat = self._bundle_weights(bundle, ac)
            As, Bs = self._flat_factors()
            dt = x.dtype if ac is None else ac
            k, v = ops.segmented_lora_projection(
                x, _rows(wcat, lo, hi), _factor(_rows(As[b], pk * r, (pk + 2) * r), dt),
                _factor(_rows(Bs[b], lo, hi), dt),
                (0, mid - lo, hi - lo), self.scale, bias=None if bcat is None else _rows(bcat, lo, hi),
                backend=self.backend, split=True)
            return k, v
        ak, bk = self.current_factors(ik)
        av, bv = self.current_factors(iv)
        dt = self._compute_dtype(x)
        biases = None
        if sk.bias is not None or sv.bias is not None:
            wd = self.folded_weight(ik).dtype
            biases = tuple(s.bias.detach() if s.bias is not None
                           else torch.zeros(s.out_features, dtype=wd, device=x.device) for s in (sk, sv))
        return ops.lora_kv_projection(x, (self.folded_weight(ik), self.folded_weight(iv)),
                                      (_factor(ak, dt), _factor(av, dt)), (_factor(bk, dt), _factor(bv, dt)),
                                      scale=self.scale, biases=biases, backend=self.backend)

    def group_sites(self, group: str) -> List[str]:
        """Names of the sites of ``group``, in the order :meth:`project_group` returns them."""
        if group not in self._group_bundle:
            raise KeyError(f"unknown group {group!r}; known groups: {self.groups}")
        return [self.sites[i].name for i in self._bundles[self._group_bundle[group]].site_ids]

    def group_in_features(self, group: str) -> int:
        """The input width shared by the sites of ``group``."""
        if group not in self._group_bundle:
            raise KeyError(f"unknown group {group!r}; known groups: {self.groups}")
        return self._bundles[self._group_bundle[group]].in_features

    def project_group(self, group: str, x: Tensor) -> List[Tensor]:
        """Every site of ``group`` applied to the same ``x`` in one (segmented) launch.
        Returns one output per site (views into one ``[..., N]`` tensor), in group order."""
        b = self._group_bundle.get(group)
        if b is None:
            raise KeyError(f"unknown group {group!r}; known groups: {self.groups}")
        bundle = self._bundles[b]
        self._check_input(x, bundle.in_features, "project_group", group)
        if self.pristine:
            return [nn.functional.linear(x, self.sites[i].weight, self.sites[i].bias) for i in bundle.site_ids]
        self._sync_bundle_device(b)
        ac = self._autocast_dtype(x)
        wcat, bcat = self._bundle_weights(bundle, ac)
        return self._group_outputs(b, x, wcat, bcat, ac)

    def _group_outputs(self, b: int, x: Tensor, wcat: Tensor, bcat: Optional[Tensor], ac: Optional[torch.dtype],
                       pos: Optional[int] = None) -> List[Tensor]:
        """Bundle ``b``'s outputs for ``x`` from its folded weights ``wcat`` / biases ``bcat`` (in the compute
        dtype), as split outputs: the sites' gradients are gathered with one concatenation (slicing one output
        would make autograd zero-fill a full-width gradient per site).  ``pos``: ``wcat`` / ``bcat`` hold only the
        site at that position of the bundle, whose output alone is returned."""
        offsets = self._bundles[b].offsets
        if self._active is None:
            return list(ops.split_columns(nn.functional.linear(x, wcat, bcat), offsets if pos is None else
                                          (0, wcat.shape[0])))
        dt = x.dtype if ac is None else ac
        As, Bs = self._flat_factors()
        A, B = As[b], Bs[b]
        if pos is not None:
            A, B = self.current_factors(self._bundles[b].site_ids[pos])
            offsets = (0, wcat.shape[0])
        return list(ops.segmented_lora_projection(x, wcat, _factor(A, dt), _factor(B, dt), offsets,
                                                  self.scale, bias=bcat, backend=self.backend, split=True))

    def _project_group_traced(self, group: str, x: Tensor,
                              bases: Optional[Sequence[Tuple[Tensor, Optional[Tensor]]]] = None,
                              pos: Optional[int] = None) -> List[Tensor]:
        """:meth:`project_group` for a ``torch.compile`` trace (the adapter's call while dynamo traces): the folded
        weights ``W0 + P`` are built in the graph from ``bases`` (the live ``(weight, bias)`` of each site of the
        group, in group order, from an adapter whose sites may be stale views; default: the sites' own tensors)
        instead of taken from the eager cache, whose validity checks (data pointers, version counters) dynamo
        cannot trace.  Same values as :meth:`project_group` (the same fold, :meth:`_merged_value`); the fold costs
        one elementwise pass over the group's weights per call, which a compiled graph fuses.  What dynamo guards
        on (the concept state, the factors' and weights' identities, devices and dtypes) makes a change of state
        recompile instead of reusing a stale graph.  ``pos``: only the site at that position of the group (a
        one-element list; ``bases`` all the same)."""
        b = self._group_bundle.get(group)
        if b is None:
            raise KeyError(f"unknown group {group!r}; known groups: {self.groups}")
        self._check_input(x, self._bundles[b].in_features, "project_group", group)
        return self._bundle_traced(b, x, bases, pos)

    def _project_traced(self, site: Union[int, str], x: Tensor) -> Tensor:
        """:meth:`project` of one site for a ``torch.compile`` trace (see :meth:`_project_group_traced`)."""
        i = self.site_index(site)
        self._check_input(x, self.sites[i].in_features, "project", self.sites[i].name)
        b, pos = self._site_bundle[i]
        return self._bundle_traced(b, x, None, pos)[0]

    def _bundle_traced(self, b: int, x: Tensor, bases, pos: Optional[int]) -> List[Tensor]:
        """Bundle ``b``'s outputs (or its site at ``pos``) for ``x``, folded in the graph: see
        :meth:`_project_group_traced`."""
        bundle = self._bundles[b]
        site_ids = bundle.site_ids
        if bases is None:
            bases = [(self.sites[i].weight, self.sites[i].bias) for i in site_ids]
        if pos is not None:
            site_ids, bases = site_ids[pos:pos + 1], bases[pos:pos + 1]
        if self.pristine:
            return [nn.functional.linear(x, w, bias) for w, bias in bases]
        if self._dev_key is None or bases[0][0].device != self._dev_key[b]:
            _sync_eagerly(self)          # the model moved since the last sync: once, outside the graph
        ws = []                          # (not pristine, so not merged: the live weights are W0)
        for i, (w, _) in zip(site_ids, bases):
            p = self._past[i]
            ws.append(w.detach() if p is None else self._merged_value(w.detach(), p))
        wcat = ws[0] if len(ws) == 1 else torch.cat(ws, 0)
        bcat = None
        if bundle.has_bias:
            bcat = torch.cat([bias.detach() if bias is not None else wcat.new_zeros(w.shape[0]) for w, bias in bases])
        ac = self._autocast_dtype(x)
        if _autocasts(wcat, ac):
            wcat, bcat = wcat.to(ac), None if bcat is None else bcat.to(ac)
        return self._group_outputs(b, x, wcat, bcat, ac, pos)

    def invalidate_caches(self) -> None:
        """Forget the cached folded weights (and an integration's cached K/V).  The caches follow every
        change autograd can see (in-place ops, ``load_state_dict``, optimizer steps, new parameter objects,
        ``.to()``); call this after writing base weights through ``.data`` (e.g. an EMA ``copy_to`` of
        weights that differ), which bypasses the version counters the caches are keyed on."""
        self._bump()

    def _mark_unpatched(self) -> None:
        """Called by the integration's ``unpatch()``: the model no longer calls this controller.  What only
        reads or saves the learned state (``save``, ``export_lora``, ``state_dict``, ``end_concept``) still
        works; what would act on the model or train (``begin_concept``, ``penalty``, ``merge``,
        ``remove_concept``, ``discard_concept``, ``load_bank``) raises instead of silently writing the unpatched
        model's weights or training adapters the model never uses (zero gradients)."""
        self._unpatched = True

    def _check_attached(self, what: str) -> None:
        if self._unpatched:
            raise RuntimeError(f"{what}(): this controller's model was unpatched (clora_fast.unpatch), so the model no "
                               f"longer uses it. Save its concepts with controller.save(path) and continue on the "
                               f"model with clora_fast.load(model, path) (or patch it again)")

    # ------------------------------------------------------------------ concepts
    def _bump(self) -> None:
        self._version += 1
        hook = getattr(self.adapter, "on_state_change", None)
        if hook is not None:
            hook()

    def _all_names(self) -> set:
        names = {c.name for c in self.concepts} | {r["name"] for r in self._retired}
        if self._active is not None:
            names.add(self._active[1])
        return names

    def _new_name(self, name: Optional[str], idx: int) -> str:
        if name is None:        # "<c{idx+1}>", or the next free number after it (an imported concept took it)
            taken, k = self._all_names(), idx + 1
            while f"<c{k}>" in taken:
                k += 1
            name = f"<c{k}>"
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"name must be a non-empty str or None, got {name!r}")
        if name in self._all_names():
            raise ValueError(f"a concept named {name!r} already exists (or existed and was removed); "
                             f"concept names are unique")
        return name

    def begin_concept(self, name: Optional[str] = None) -> int:
        """Start learning a new concept: fresh trainable A (Kaiming-uniform), B (zeros) at
        every site. Returns the concept's index (stable; used by :meth:`remove_concept`).
        Default name ``"<c{idx+1}>"`` (the next free number when an imported concept has that name);
        integrations may add it as a personalized token."""
        self._check_attached("begin_concept")
        if self._active is not None:
            raise RuntimeError(f"concept {self._active[0]} ({self._active[1]!r}) is still active: "
                               f"call end_concept() before begin_concept()")
        if self.merged:
            raise RuntimeError("the controller is merged: call unmerge() before begin_concept()")
        idx = self._next_idx
        name = self._new_name(name, idx)
        self._refresh_sites()
        self._sync_device()
        self._warn_trainable_base()
        self._warn_distributed()
        # trainable tensors even when called under torch.inference_mode (an evaluation block that starts the next
        # concept): inference tensors could not be saved for backward at the first training step
        with torch.inference_mode(False):
            As, Bs = [], []
            for bundle in self._bundles:
                dev = self.sites[bundle.site_ids[0]].weight.device
                A = torch.empty(len(bundle.site_ids) * self.rank, bundle.in_features, dtype=self.param_dtype,
                                device=dev)
                for p in range(len(bundle.site_ids)):
                    nn.init.kaiming_uniform_(A[p * self.rank:(p + 1) * self.rank], a=math.sqrt(5))
                B = torch.zeros(bundle.n_out, self.rank, dtype=self.param_dtype, device=dev)
                As.append(nn.Parameter(A))
                Bs.append(nn.Parameter(B))
            self.lora_A = nn.ParameterList(As)
            self.lora_B = nn.ParameterList(Bs)
            self._active = (idx, name)
            self._next_idx += 1
            self._penalized = not self.has_past or self.penalty_weight == 0.0
            hook = getattr(self.adapter, "on_begin_concept", None)      # e.g. a trainable token embedding row
            if hook is not None:
                try:
                    hook(name, idx)
                except BaseException:
                    self._active = None
                    self._next_idx -= 1
                    self.lora_A = nn.ParameterList()
                    self.lora_B = nn.ParameterList()
                    raise
        self._bump()
        logger.debug("begin_concept %d (%s)", idx, name)
        return idx

    def all_reduce_grads(self, group=None) -> None:
        """Average the gradients of :meth:`trainable_parameters` over the processes of ``torch.distributed``
        (multi-GPU training with DDP / accelerate).  The controller's parameters are not the model's (the
        model's ``parameters()`` / ``state_dict()`` stay as they were), so ``DDP(model)`` does not synchronize
        them: call this after ``backward()`` and before ``optimizer.step()`` on every process.  A no-op
        without an initialized process group of more than one process.  (Every process must start a concept
        from the same A and token row: seed the global RNG identically before :meth:`begin_concept`.)

        It checks what would otherwise train silently out of step, and raises the same error on every process:
        processes that train different parameters (another concept, or none: a concept begun or ended on some
        processes only), and, at the first call of a concept (or after a state change such as
        :meth:`load_bank`), parameters whose values differ between the processes (a concept begun without
        seeding every process alike: averaged gradients would then train a different concept on each).  The
        cost: one all-gather of five integers per call, read on the host (so one device synchronization per
        call, after the backward pass; a loop that logs its loss every step has one already), plus a hash of the
        parameters at that first call.  The gradients are averaged with one all-reduce per device and dtype."""
        import torch.distributed as dist
        world = _world_size(group)
        if world == 1:
            return
        params = self.trainable_parameters()
        dev = params[0].device if params else self._device()
        key = (self._active, self._version, tuple(id(p) for p in params))
        shapes = hashlib.sha256(repr([(tuple(p.shape), str(p.dtype)) for p in params]).encode()).digest()
        meta = torch.tensor([-1 if self._active is None else self._active[0], len(params),
                             sum(p.numel() for p in params), int.from_bytes(shapes[:7], "little"),
                             int(key != self._dist_checked)], dtype=torch.int64, device=dev)
        metas = [torch.empty_like(meta) for _ in range(world)]
        dist.all_gather(metas, meta, group=group)
        rows = [m.tolist() for m in metas]
        if any(r[:4] != rows[0][:4] for r in rows):
            def what(r):
                return ("no active concept" if r[0] < 0 else f"concept {r[0]}") + f" ({r[1]} tensors, {r[2]} values)"
            raise RuntimeError(
                "all_reduce_grads(): the processes do not train the same parameters (" +
                "; ".join(f"rank {j}: {what(r)}" for j, r in enumerate(rows)) + "): call begin_concept(), "
                "end_concept(), remove_concept() and load_bank() alike on every process")
        if any(r[4] for r in rows):
            from .bank import _weight_bytes      # the exact bytes of a tensor (bfloat16 too)
            h = hashlib.sha256()
            for p in params:
                h.update(_weight_bytes(p))
            digest = torch.tensor([int.from_bytes(h.digest()[:7], "little")], dtype=torch.int64, device=dev)
            digests = [torch.empty_like(digest) for _ in range(world)]
            dist.all_gather(digests, digest, group=group)
            differ = [j for j, d in enumerate(digests) if not torch.equal(d, digests[0])]
            if differ:
                raise RuntimeError(
                    f"all_reduce_grads(): the parameters of concept {rows[0][0]} differ between the processes (rank "
                    f"0 and rank(s) {differ}): averaging their gradients would train a different concept on each. "
                    f"Seed the global RNG identically on every process before begin_concept() (torch.manual_seed), "
                    f"or make them equal once after it: for p in controller.trainable_parameters(): "
                    f"torch.distributed.broadcast(p.data, src=0)")
            self._dist_checked = key
        # one all-reduce per (device, dtype) of the gradients gathered in one flat buffer, copied back in place
        # (the flat A and B of every group and the token rows: a ViT-B/16 has 24 tensors, which were 24
        # collectives and 24 divisions per step)
        buckets: Dict[Tuple[torch.device, torch.dtype], List[Tensor]] = {}
        for p in params:
            if p.grad is None:                     # every process takes part in every all-reduce
                p.grad = torch.zeros_like(p)
            buckets.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        for grads in buckets.values():
            flat = torch.cat([g.reshape(-1) for g in grads]) if len(grads) > 1 else grads[0]
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat.div_(world)
            if len(grads) > 1:
                parts = flat.split([g.numel() for g in grads])
                torch._foreach_copy_(grads, [t.view_as(g) for t, g in zip(parts, grads)])

    def _warn_distributed(self) -> None:
        if _world_size() > 1 and not getattr(self, "_warned_distributed", False):
            self._warned_distributed = True
            warnings.warn("clora_fast: torch.distributed runs several processes, but the controller's parameters are "
                          "not part of the model, so DDP / accelerate do not synchronize their gradients: call "
                          "controller.all_reduce_grads() after backward() on every process",
                          DistributedGradientsWarning, stacklevel=3)

    def _warn_trainable_base(self) -> None:
        """The adapted projections compute with ``W0 + P`` built without autograd (W0 is frozen in C-LoRA):
        a base weight or bias that requires grad would silently get no gradient from them."""
        hook = getattr(self.adapter, "base_parameters", None)
        params = list(hook()) if hook is not None else [t for s in self.sites for t in (s.weight, s.bias)]
        if any(isinstance(p, Tensor) and p.requires_grad for p in params):
            warnings.warn("clora_fast: the adapted K/V projections' base weights/biases require grad, but C-LoRA "
                          "keeps them frozen: they get no gradient from the adapted projections while a concept is "
                          "active. Freeze them (e.g. model.requires_grad_(False), then train "
                          "controller.trainable_parameters() and your head) to silence this warning",
                          UserWarning, stacklevel=3)

    def trainable_parameters(self) -> List[Tensor]:
        """The active concept's A and B (flat per group) and whatever the adapter trains for it
        (e.g. its token embedding row). Empty when no concept is active."""
        if self._active is None:
            return []
        params = list(self.lora_A) + list(self.lora_B)
        hook = getattr(self.adapter, "trainable_parameters", None)
        if hook is not None:
            params += list(hook())
        return params

    def _fold_into(self, pasts: List[Optional[Tensor]], A: List[Tensor], B: List[Tensor], scale: float) -> None:
        # s*B@A in float64, rounded once to float32: the same P whatever autocast region or TF32 setting
        # end_concept() runs under (autocast never casts float64; float64 GEMMs never use TF32), so a
        # saved bank always matches the fp32 refold its loader checks.  On P's device (the site's for a
        # first fold): finished concepts' factors are in host memory
        for i in range(self.num_sites):
            dev = pasts[i].device if pasts[i] is not None else self.sites[i].weight.device
            upd = (scale * (B[i].detach().to(dev, torch.float64) @ A[i].detach().to(dev, torch.float64))).float()
            pasts[i] = upd if pasts[i] is None else pasts[i] + upd

    def _refold(self, concepts: List[Concept]) -> List[Optional[Tensor]]:
        pasts: List[Optional[Tensor]] = [None] * self.num_sites
        for c in concepts:
            self._fold_into(pasts, c.lora_A, c.lora_B, c.scale)
        return pasts

    def end_concept(self) -> int:
        """Fold ``s*B@A`` of the active concept into P (fp32), freeze it and push its factors
        on the stack. Returns its index."""
        if self._active is None:
            raise RuntimeError("no concept is active: call begin_concept() first")
        idx, name = self._active
        As, Bs = [], []
        for i in range(self.num_sites):
            A, B = self.current_factors(i)
            As.append(A.detach().float().clone())
            Bs.append(B.detach().float().clone())
        if not all(torch.isfinite(a).all() and torch.isfinite(b).all() for a, b in zip(As, Bs)):
            raise FloatingPointError(f"concept {idx} ({name!r}) has non-finite LoRA factors (NaN/inf); "
                                     f"refusing to fold it into the past")
        if not any(bool(b.any()) for b in Bs):
            warnings.warn(f"clora_fast: concept {idx} ({name!r}) ends untrained: all its B factors are still zero, "
                          f"so s*B@A = 0 and it changes nothing. Was the optimizer built from "
                          f"controller.trainable_parameters() after this begin_concept()? (They are new tensors "
                          f"for every concept.)", UserWarning, stacklevel=2)
        elif not getattr(self, "_penalized", True):    # (a controller unpickled from an older version: unknown)
            warnings.warn(f"clora_fast: concept {idx} ({name!r}) was trained without the forgetting penalty: "
                          f"penalty() was never called since its begin_concept(), so C-LoRA's self-regularization "
                          f"did not keep it off the weights the past concepts use. Add controller.penalty() to the "
                          f"loss (or make the controller with penalty_weight=0 to train without it on purpose)",
                          UserWarning, stacklevel=2)
        self._fold_into(self._past, As, Bs, self.scale)
        # the stack of finished concepts lives in host memory: it is read only by remove_concept (refold),
        # export and save, and on the model's device it grew with every concept (SD-1.5, r=16: 3.2 MB each)
        self.concepts.append(Concept(idx, name, self.scale, [a.cpu() for a in As], [b.cpu() for b in Bs]))
        self._active = None
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        hook = getattr(self.adapter, "on_end_concept", None)
        if hook is not None:
            hook(idx)
        self._bump()
        logger.debug("end_concept %d (%s)", idx, name)
        return idx

    def import_concept(self, factors: Dict[str, Tuple[Tensor, Tensor]], name: Optional[str] = None, *,
                       scale: float = 1.0, strict: bool = True, source: Optional[str] = None) -> int:
        """Add a LoRA trained elsewhere as a finished concept: ``scale * B @ A`` of every site is folded into P, so
        the concepts learned after it are kept off the weights it uses (the forgetting penalty), and it is saved,
        exported, merged and removed like a concept learned here.  Returns its index.

        ``factors``: ``{site name: (A [r', in], B [out, r'])}`` (``controller.site_names``; any floating dtype and
        device).  Rank columns whose ``B`` column or ``A`` row is all zeros are dropped (a fused ``qkv`` LoRA's K
        and V parts, or a concept exported with others), the rest must fit the controller's rank (zero-padded up
        to it: the same ``B @ A``).  A site missing from ``factors`` is an error unless ``strict=False`` (it then
        gets no change).  ``name`` as for :meth:`begin_concept` (for a pipeline it becomes the concept's token,
        whose embedding the integration's ``import_lora`` can set).  Everything is checked before anything
        changes; no concept may be active (``end_concept()`` or ``discard_concept()`` first) and the controller
        must not be merged.  ``source`` (e.g. the file's name) is kept with the concept (``concept(idx).meta``,
        the bank's manifest): it marks the concept as imported, which ``clora-fast train`` relies on."""
        self._check_attached("import_concept")
        if self._active is not None:
            raise RuntimeError(f"import_concept: concept {self._active[0]} ({self._active[1]!r}) is being learned: "
                               f"call end_concept() or discard_concept() first (an import changes the past it is "
                               f"penalized against)")
        if self.merged:
            raise RuntimeError("the controller is merged: call unmerge() before import_concept()")
        scale = _positive_scale("import_concept", scale)
        if source is not None and (not isinstance(source, str) or not source):
            raise ValueError(f"import_concept: source must be a non-empty str or None, got {source!r}")
        if not isinstance(factors, dict):
            raise TypeError(f"import_concept: factors must be a dict {{site name: (A, B)}}, got "
                            f"{type(factors).__name__}")
        unknown = sorted(k for k in factors if k not in self._index)
        if unknown:
            raise KeyError(f"import_concept: {len(unknown)} name(s) in factors are not sites of this controller: "
                           f"{unknown[:5]}{' ...' if len(unknown) > 5 else ''} (sites: controller.site_names)")
        missing = [s.name for s in self.sites if s.name not in factors]
        if missing and strict:
            raise KeyError(f"import_concept: no factors for {len(missing)} of the {self.num_sites} sites: "
                           f"{missing[:5]}{' ...' if len(missing) > 5 else ''} (strict=False imports the others "
                           f"and leaves these unchanged)")
        idx = self._next_idx
        name = self._new_name(name, idx)
        As, Bs = [], []
        for i, site in enumerate(self.sites):
            A = torch.zeros(self.rank, site.in_features)
            B = torch.zeros(site.out_features, self.rank)
            if site.name in factors:
                a, b = self._import_factors(site, factors[site.name])
                A[:a.shape[0]] = a
                B[:, :b.shape[1]] = b
            As.append(A)
            Bs.append(B)
        self._refresh_sites()
        self._sync_device()
        pasts = list(self._past)
        self._fold_into(pasts, As, Bs, scale)
        begin = getattr(self.adapter, "on_begin_concept", None)      # e.g. the concept's token
        if begin is not None:
            begin(name, idx)
        end = getattr(self.adapter, "on_end_concept", None)
        if end is not None:
            try:
                end(idx)
            except BaseException:
                remove = getattr(self.adapter, "on_remove_concept", None)
                if remove is not None:
                    remove(idx)
                raise
        self._past = pasts
        self.concepts.append(Concept(idx, name, scale, As, Bs, {"source": source or "import_concept"}))
        self._next_idx += 1
        self._bump()
        logger.debug("import_concept %d (%s)", idx, name)
        return idx

    def import_lora(self, path, name: Optional[str] = None, *, scale: float = 1.0, strict: bool = True,
                    ignore_other_modules: bool = False) -> int:
        """:meth:`import_concept` from a LoRA safetensors file (the inverse of :meth:`export_lora`; pickle files
        are refused).  Keys understood: the adapter's own layout (``adapter.lora_factors``, e.g. PEFT's for a
        ViT, with a fused ``qkv``'s K and V rows), else PEFT / diffusers ``<prefix><site>.lora_A.weight`` /
        ``.lora_B.weight`` (``prefix`` the adapter's ``lora_key_prefix``, e.g. ``"unet."``; also without it),
        diffusers' older layouts (``<site>.lora.down.weight``; the attention processors'
        ``<attention>.processor.to_k_lora.down.weight``) and kohya's
        ``lora_unet_<site, dots as _>.lora_down.weight`` / ``.lora_up.weight`` with its ``.alpha`` (``alpha /
        rank`` goes into B), also under the other names of a site's module that ``adapter.lora_module_aliases()``
        gives (``{site: names}``; a diffusers UNet's: the original Stable Diffusion ones, as in kohya's SDXL
        files' ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k``).  The file's own scale is
        applied: kohya's alphas, and ``lora_alpha / r`` of the LoRA config that diffusers' ``save_lora_weights(...,
        unet_lora_adapter_metadata=...)`` stores in the header, or the ``adapter_config.json`` that PEFT's
        ``save_pretrained`` writes beside the file (with ``use_rslora``: ``lora_alpha / sqrt(r)``); ``scale``
        multiplies it (the strength to import at; a file with neither carries no alpha: pass ``lora_alpha / r``;
        :meth:`export_lora`'s files have it in B).  A file that also adapts other modules (attention Q / out,
        feed-forward, a text encoder) is refused, since only the sites' part can be folded into P and protected,
        unless ``ignore_other_modules=True`` (then only the sites' part is imported).  DoRA at a site (a
        ``lora_magnitude_vector`` / ``dora_scale`` key beside its factors, or ``use_dora`` in the config), and
        any other tensor of a site's module that is not read (e.g. LyCORIS's ``lora_mid``), is refused: the
        change is not ``s * B @ A``.  ``path`` may also be the folder that diffusers' ``save_lora_weights`` or
        PEFT's ``save_pretrained`` wrote (see :func:`_lora_file`)."""
        source = os.path.basename(os.path.normpath(str(path)))
        path = _lora_file(path)
        tensors, metadata = _read_lora_file(path, with_metadata=True)
        prefix = getattr(self.adapter, "lora_key_prefix", "")
        file_scale = _metadata_scale(metadata, prefix, f"import_lora: {str(path)!r}",
                                     os.path.dirname(os.path.abspath(str(path))))
        hook = getattr(self.adapter, "lora_factors", None)
        if hook is not None:
            factors, used, other = hook(tensors)
        else:
            names = getattr(self.adapter, "lora_module_aliases", None)
            factors, used = _lora_factors_by_name(tensors, self.site_names, prefix,
                                                  names() if names is not None else None)
            other = []
        # tensors of a site's module beside the factors read (DoRA's magnitude, LyCORIS's lora_mid, an alpha of a
        # layout that has none): the module's change is not what was read, so nothing is imported
        modules = {_LORA_SUFFIX.sub("", k) for k in used}
        extra = sorted(k for k in tensors if k not in used
                       and any(k[:i] in modules for i, ch in enumerate(k) if ch == "."))
        if any(_DORA_SUFFIX.search(k) for k in extra):
            dora = sorted({_DORA_SUFFIX.sub("", k) for k in extra if _DORA_SUFFIX.search(k)})
            raise ValueError(f"import_lora: {str(path)!r} is DoRA (weight-decomposed LoRA) at {len(dora)} of the "
                             f"sites' module(s) (e.g. {dora[:2]}: a magnitude vector, lora_magnitude_vector / "
                             f"dora_scale): its change is not s * B @ A and cannot be folded into the past (diffusers "
                             f"drops kohya's dora_scale and loads B @ A alone; to import that, remove those keys)")
        if extra:
            raise ValueError(f"import_lora: {str(path)!r} holds {len(extra)} tensor(s) beside the LoRA factors of "
                             f"the sites' modules that this import does not read (e.g. {extra[:3]}): the change "
                             f"they make is not s * B @ A alone, so it cannot be folded into the past")
        other = sorted(set(other) | {_LORA_SUFFIX.sub("", k) for k in tensors if k not in used and "lora" in k.lower()})
        if not factors:
            lyco = [k for k in tensors if re.search(r"\.(hada|lokr)_", k)]
            raise ValueError(f"import_lora: {str(path)!r} holds no LoRA factors for this model's sites (e.g. "
                             f"{self.site_names[0]!r}); its keys start {sorted(tensors)[:3]}"
                             + (f"; its {min(lyco).rpartition('.')[2]!r} keys are LyCORIS LoHa / LoKr factors, "
                                f"whose change is not B @ A" if lyco else ""))
        if other and not ignore_other_modules:
            raise ValueError(f"import_lora: {str(path)!r} also adapts {len(other)} module(s) that are not C-LoRA sites "
                             f"(e.g. {other[:3]}): only the sites' part can be folded into the past and protected. "
                             f"Pass ignore_other_modules=True to import that part alone")
        scale = _positive_scale("import_lora", scale) * file_scale
        return self.import_concept(factors, name, scale=scale, strict=strict, source=source)

    def _import_factors(self, site: Site, ab) -> Tuple[Tensor, Tensor]:
        """One site's ``(A, B)`` for :meth:`import_concept`: checked, float32 on the CPU, zero rank columns dropped."""
        where = f"import_concept: site {site.name!r}"
        if not isinstance(ab, (tuple, list)) or len(ab) != 2 or not all(isinstance(t, Tensor) for t in ab):
            raise TypeError(f"{where}: expected a pair of tensors (A, B), got {type(ab).__name__}")
        a, b = ab
        if a.dim() != 2 or b.dim() != 2 or not a.is_floating_point() or not b.is_floating_point():
            raise ValueError(f"{where}: A and B must be 2-D floating tensors, got A {_fmt(a)}, B {_fmt(b)}")
        if a.shape[1] != site.in_features or b.shape[0] != site.out_features or a.shape[0] != b.shape[1]:
            raise ValueError(f"{where}: expected A [r, {site.in_features}] and B [{site.out_features}, r], got "
                             f"A {tuple(a.shape)}, B {tuple(b.shape)}")
        a = a.detach().to("cpu", torch.float32)
        b = b.detach().to("cpu", torch.float32)
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise FloatingPointError(f"{where}: the factors are not finite (NaN/inf)")
        keep = (b != 0).any(0) & (a != 0).any(1)
        a, b = a[keep], b[:, keep]
        if a.shape[0] > self.rank:
            raise ValueError(f"{where}: the LoRA has rank {a.shape[0]} (nonzero columns of B), more than the "
                             f"controller's rank {self.rank}; patch with rank >= {a.shape[0]} to import it")
        return a, b

    def remove_concept(self, idx: int) -> None:
        """Forget a finished concept: P is refolded from the remaining concepts (in order)."""
        self._check_attached("remove_concept")
        self.remove_concepts([idx])

    def remove_concepts(self, idxs: Sequence[int]) -> None:
        """Forget several finished concepts at once (e.g. every one learned after a given one, to get the model
        as it was then): P is refolded once from the remaining concepts (in order).  Every index is checked
        first; on an error nothing changes."""
        self._check_attached("remove_concepts")
        if self.merged:
            raise RuntimeError("the controller is merged: call unmerge() before remove_concept()")
        if isinstance(idxs, (int, str)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in idxs):
            raise TypeError(f"remove_concepts: idxs must be a sequence of concept indices (ints), got {idxs!r}")
        gone = {self.concept(i).idx for i in idxs}        # (an unknown index raises here, before any change)
        self._refresh_sites()
        remaining = [k for k in self.concepts if k.idx not in gone]
        self._past = self._refold(remaining)
        removed = [k for k in self.concepts if k.idx in gone]
        self.concepts = remaining
        hook = getattr(self.adapter, "on_remove_concept", None)
        for c in removed:
            self._retired.append({"idx": c.idx, "name": c.name})
            if hook is not None:
                hook(c.idx)
            logger.debug("remove_concept %d (%s)", c.idx, c.name)
        self._bump()

    def discard_concept(self) -> int:
        """Drop the active concept without folding it: P, the finished concepts and the base weights stay
        exactly as they were (no refold), the concept's A / B (and the adapter's rows for it, e.g. its token
        embedding) are released, and its name stays taken, as after :meth:`remove_concept`.  What
        ``end_concept()`` then ``remove_concept(idx)`` would leave, without their cost (a fold, then a refold
        of every finished concept) and without their checks of a concept that is thrown away (non-finite or
        untrained factors).  Returns the concept's index."""
        self._check_attached("discard_concept")
        if self._active is None:
            raise RuntimeError("no concept is active: discard_concept() drops the one begun by begin_concept()")
        idx, name = self._active
        self._active = None
        self.lora_A = nn.ParameterList()
        self.lora_B = nn.ParameterList()
        self._retired.append({"idx": idx, "name": name})
        for hook_name in ("on_end_concept", "on_remove_concept"):    # the adapter protocol's two steps
            hook = getattr(self.adapter, hook_name, None)
            if hook is not None:
                hook(idx)
        self._bump()
        logger.debug("discard_concept %d (%s)", idx, name)
        return idx

    # ------------------------------------------------------------------ penalty
    def penalty(self) -> Tensor:
        """``penalty_weight * sum_sites ||P ⊙ (s B A)||_F^2`` in one grouped launch (0-dim fp32).
        Exactly 0 when no concept is active or nothing is folded yet (while a concept is active, a zero that
        supports ``.backward()`` on its own, like the penalty of later concepts; no kernel runs)."""
        if self._unpatched:
            self._check_attached("penalty")
        if trace_kv():
            return self._penalty_traced()
        self._refresh_sites()
        dev = self._device()
        if self._active is None or not self.has_past or self.penalty_weight == 0.0:
            return torch.zeros((), dtype=torch.float32, device=dev,
                               requires_grad=self._active is not None and torch.is_grad_enabled())
        self._penalized = True
        self._sync_device()
        # The factors go in as the flat per-bundle parameters with a row layout: the gradient
        # lands in each flat parameter as one tensor (no per-site views in the autograd graph).
        key = (self._version, self._dev_key, self.scale, self.backend)
        if self._penalty_layout is None or self._penalty_layout[0] != key:
            pasts, layout = [], []
            r = self.rank
            for i in range(self.num_sites):
                if self._past[i] is None:
                    continue
                b, pos = self._site_bundle[i]
                pasts.append(self._past[i])
                layout.append((b, pos * r, self._bundles[b].offsets[pos], r))
            self._penalty_layout = (key, ops.PackedForgettingPenalty(pasts, layout, scales=self.scale,
                                                                      backend=self.backend))
        As, Bs = self._flat_factors()
        return self.penalty_weight * self._penalty_layout[1](As, Bs)

    def _penalty_traced(self) -> Tensor:
        """:meth:`penalty` in a ``torch.compile`` trace: the same sum through the grouped penalty's custom op over
        per-site row views of the flat factors (the eager path's packed launcher keeps tables keyed on data
        pointers, which dynamo cannot trace); the views' gradients land in the flat parameters in the graph."""
        if self._active is None or not self.has_past or self.penalty_weight == 0.0:
            if self._active is not None and torch.is_grad_enabled():
                return _ZeroOf.apply(self._flat_factors()[0][0])     # (a trace cannot create a leaf that requires grad)
            return torch.zeros((), dtype=torch.float32, device=self.sites[0].weight.device)
        self._penalized = True
        sites = [i for i, p in enumerate(self._past) if p is not None]
        a_rows, b_rows = zip(*(self.current_factors(i) for i in sites))
        return self.penalty_weight * ops.grouped_forgetting_penalty([self._past[i] for i in sites], a_rows, b_rows,
                                                                    scales=self.scale, backend=self.backend)

    # ------------------------------------------------------------------ merge
    def merge(self) -> None:
        """Write ``W0 + P`` into the base weights (zero-overhead inference); an exact copy of W0
        is kept and :meth:`unmerge` restores it bit for bit (a weight changed while merged keeps its change)."""
        self._check_attached("merge")
        if self._active is not None:
            raise RuntimeError(f"concept {self._active[0]} is still active: call end_concept() before merge()")
        if self.merged:
            raise RuntimeError("already merged")
        self._refresh_sites()
        self._sync_device()
        backup = [s.weight.detach().clone() for s in self.sites]
        with torch.no_grad():
            folded = [self._merged_value(b, p) if p is not None else None for b, p in zip(backup, self._past)]
            self._merged_backup = backup
            for s, f in zip(self.sites, folded):
                if f is not None:
                    s.weight.copy_(f)
        self._bump()

    def unmerge(self) -> None:
        """Restore the exact base weights saved by :meth:`merge`.

        A base weight changed while merged (``fuse_lora``, ``load_state_dict``, an optimizer step on it)
        keeps its change: W0 becomes the saved W0 plus (what the weight holds now - the ``W0 + P`` that
        merge() wrote), with a warning; the unchanged ones are restored bit for bit."""
        if not self.merged:
            raise RuntimeError("not merged")
        self._refresh_sites()
        changed = []
        with torch.no_grad():
            for i, (s, b) in enumerate(zip(self.sites, self._merged_backup)):
                p = self._past[i]
                w = s.weight
                written = b if p is None else self._merged_value(b, p)
                if self._holds_merged(w, written):
                    w.copy_(b)
                    continue
                changed.append(s.name)
                if p is not None:      # (else merge wrote nothing and the weight is W0 + change already)
                    ft = torch.promote_types(w.dtype, torch.float32)
                    w.copy_(b.to(w.device, ft) + (w.to(ft) - written.to(w.device, ft)))
        self._merged_backup = None
        self._bump()
        if changed:
            warnings.warn(f"clora_fast: {len(changed)} adapted base weight(s) changed while merged "
                          f"({changed[:3]}{' ...' if len(changed) > 3 else ''}); unmerge() kept the change: "
                          f"their W0 is now the W0 from before merge() plus that change (not restored bit for bit)",
                          UserWarning, stacklevel=2)

    @staticmethod
    def _holds_merged(w: Tensor, written: Tensor) -> bool:
        """Whether ``w`` still holds what merge() wrote, also after a dtype round trip (``model.half().float()``:
        not a change of the weights, so unmerge restores the saved W0 bit for bit).  A weight on the meta device
        (offloaded by accelerate) holds no values to compare: as before, the saved W0 is written back."""
        if w.is_meta:
            return True
        ref = written.to(w.device)
        return any(torch.equal(w, ref.to(d).to(w.dtype)) for d in dict.fromkeys((w.dtype, torch.float16, torch.bfloat16)))

    @staticmethod
    def _merged_value(w0: Tensor, past: Tensor) -> Tensor:
        """``W0 + P`` as :meth:`merge` writes it (fp32 or wider sum, in W0's dtype)."""
        return (w0.to(torch.promote_types(w0.dtype, torch.float32)) + past.to(w0.device)).to(w0.dtype)

    # ------------------------------------------------------------------ export
    def export_factors(self, which: Union[int, str] = "merged") -> Dict[str, Tuple[Tensor, Tensor]]:
        """Plain LoRA factors with the scale baked into B (so ``delta W = B @ A``, alpha = rank):
        ``which`` = a concept index (that concept's ``s*B_t@A_t``) or ``"merged"`` (all finished
        concepts, ``P = [s B_1 .. s B_T] @ [A_1; ..; A_T]``, rank T*r). ``{site_name: (A, B)}``."""
        if which == "merged":
            cs = list(self.concepts)
            if not cs:
                raise ValueError("export_factors('merged'): no finished concept to export")
        else:
            cs = [self.concept(which)]
        out = {}
        for i, s in enumerate(self.sites):
            A = torch.cat([c.lora_A[i].cpu() for c in cs], 0)
            B = torch.cat([c.scale * c.lora_B[i].cpu() for c in cs], 1)
            out[s.name] = (A.contiguous(), B.contiguous())
        return out

    def export_lora(self, path, which: Union[int, str] = "merged", *, prefix: Optional[str] = None,
                    dtype: Optional[torch.dtype] = None, layout: str = "peft",
                    original_names: Optional[bool] = None) -> None:
        """Write :meth:`export_factors` as a LoRA safetensors file, atomically.  ``layout="peft"`` (or its other
        name ``"diffusers"``): keys ``<prefix><site>.lora_A.weight`` / ``.lora_B.weight`` (alpha = rank: the scale
        is in B); ``prefix`` defaults to the adapter's ``lora_key_prefix`` (``"unet."`` for diffusers, which
        ``pipe.load_lora_weights`` accepts).  ``layout="kohya"`` (an adapter with ``kohya_names``, e.g. a diffusers
        UNet's): kohya's keys ``<stem>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha`` (alpha = each
        site's rank, the scale in ``lora_up``), the stems from ``adapter.kohya_names(original_names)``
        (``original_names``: the original Stable Diffusion module names, as kohya's SDXL files have them; None:
        the adapter's default)."""
        from safetensors.torch import save
        from .bank import atomic_write_bytes
        if layout not in ("peft", "diffusers", "kohya"):
            raise ValueError(f"export_lora: layout must be 'peft' (also called 'diffusers') or 'kohya', got {layout!r}")
        if layout != "kohya" and original_names is not None:
            raise ValueError("export_lora: original_names is for layout='kohya' (kohya's key stems)")
        names = getattr(self.adapter, "kohya_names", None)
        if layout == "kohya" and names is None:
            raise ValueError(f"export_lora: layout='kohya' writes kohya's lora_unet_ keys of a diffusers UNet; this "
                             f"controller's adapter ({type(self.adapter).__name__}) has no kohya names")
        if layout == "kohya" and prefix is not None:
            raise ValueError("export_lora: prefix is for layout='peft' (kohya's keys start lora_unet_)")
        factors = self.export_factors(which)
        hook = getattr(self.adapter, "lora_tensors", None)
        if layout == "kohya":
            stems = names(original_names)
            tensors = {}
            for name, (A, B) in factors.items():
                tensors[f"{stems[name]}.lora_down.weight"] = A
                tensors[f"{stems[name]}.lora_up.weight"] = B
                tensors[f"{stems[name]}.alpha"] = torch.tensor(float(A.shape[0]))
        elif prefix is None and hook is not None:     # the integration's own key layout (e.g. PEFT's for a ViT)
            tensors = hook(factors)
        else:
            if prefix is None:
                prefix = getattr(self.adapter, "lora_key_prefix", "")
            tensors = {}
            for name, (A, B) in factors.items():
                tensors[f"{prefix}{name}.lora_A.weight"] = A
                tensors[f"{prefix}{name}.lora_B.weight"] = B
        tensors = {k: (t if dtype is None else t.to(dtype)).detach().cpu().contiguous() for k, t in tensors.items()}
        atomic_write_bytes(path, save(tensors, metadata={"format": "pt"}))

    # ------------------------------------------------------------------ save / load
    def _identity(self) -> Dict[str, Any]:
        from .bank import model_identity
        ident = model_identity([(s.name, self._base_weight(i)) for i, s in enumerate(self.sites)])
        hook = getattr(self.adapter, "identity", None)
        if hook is not None:
            ident["adapter"] = hook() if self._merged_backup is None else self._adapter_identity_unmerged()
        return ident

    def _adapter_identity_unmerged(self):
        # the adapter hashes the live weights: compute it on W0 by briefly unmerging
        merged = self._merged_backup
        with torch.no_grad():
            folded = [s.weight.detach().clone() for s in self.sites]
            for s, b in zip(self.sites, merged):
                s.weight.copy_(b)
            try:
                return self.adapter.identity()
            finally:
                for s, f in zip(self.sites, folded):
                    s.weight.copy_(f)

    def save(self, path) -> None:
        """Write the concept bank (folder): manifest.json + safetensors files, atomically, each
        with a sha256 checksum. Includes the active concept (resumable)."""
        from .bank import save_controller
        self._refresh_sites()
        save_controller(self, path)

    def load_bank(self, path, *, replace_active: bool = False) -> None:
        """Replace this controller's concepts with those of the bank at ``path``. Everything is
        verified first (checksums, base model identity, rank, sites, extra state): on any error
        nothing changes. A concept being learned here is not thrown away silently: unless the bank
        holds that same concept (same index and name: a rollback to its checkpoint) or
        ``replace_active=True``, that is an error (save or end_concept() first)."""
        from .bank import load_into_controller
        self._check_attached("load_bank")
        self._refresh_sites()
        load_into_controller(self, path, replace_active=replace_active)

    @classmethod
    def load_state(cls, path, sites: Sequence[Site], *, adapter=None, backend: str = "auto",
                   **kwargs) -> "CLoRAController":
        """A new controller over ``sites`` with rank/alpha/penalty weight from the bank at
        ``path`` and its concepts loaded (see :meth:`load_bank`)."""
        from .bank import read_manifest
        m = read_manifest(path)
        kw = dict(rank=m["rank"], alpha=m["alpha"], penalty_weight=m["penalty_weight"], backend=backend,
                  adapter=adapter)
        kw.update(kwargs)
        ctrl = cls(sites, **kw)
        ctrl.load_bank(path)
        return ctrl

    def _set_state(self, pasts, concepts, retired, next_idx, active, active_factors) -> None:
        """Install verified state (used by the bank loader)."""
        with torch.inference_mode(False):     # an active concept's factors must be trainable (see begin_concept)
            self._set_state_impl(pasts, concepts, retired, next_idx, active, active_factors)

    def _set_state_impl(self, pasts, concepts, retired, next_idx, active, active_factors) -> None:
        if self.merged:
            self.unmerge()
        previous = self._active
        self._past = pasts
        self.concepts = concepts
        self._retired = retired
        self._next_idx = next_idx
        if active is None:
            self._active = None
            self.lora_A = nn.ParameterList()
            self.lora_B = nn.ParameterList()
        else:
            self._active = active
            self._penalized = True         # trained before this load: how is not known
            As, Bs = active_factors
            newA = [torch.cat([As[i] for i in b.site_ids], 0).to(self.param_dtype) for b in self._bundles]
            newB = [torch.cat([Bs[i] for i in b.site_ids], 0).to(self.param_dtype) for b in self._bundles]
            old = list(self.lora_A) + list(self.lora_B)
            if active == previous and len(old) == len(newA) + len(newB) and all(
                    o.shape == n.shape and o.device == n.device for o, n in zip(old, newA + newB)):
                # the concept being learned, same layout (a rollback to its checkpoint): load into the
                # existing parameters (in their dtype, e.g. after controller.half()), as nn.Module.load_state_dict
                # does, so an optimizer built over trainable_parameters() keeps training them
                with torch.no_grad():
                    for o, n in zip(old, newA + newB):
                        o.copy_(n)
            else:
                self.lora_A = nn.ParameterList([nn.Parameter(a) for a in newA])
                self.lora_B = nn.ParameterList([nn.Parameter(b) for b in newB])
        self._bump()

    # ------------------------------------------------------------------ nn.Module state_dict
    _STATE_FORMAT = "clora_fast.controller/1"

    def get_extra_state(self) -> Dict[str, Any]:
        """The controller's whole state for ``state_dict()`` (plain types and tensors: ``torch.load`` with
        ``weights_only=True`` reads it): the folded pasts, every finished concept's factors and metadata,
        the removed concepts, the next index and the active concept (its factors are the ``lora_A.*`` /
        ``lora_B.*`` entries).  Without it a ``state_dict()`` held only the active factors, so saving it
        lost everything learned.  An integration's own per-concept state (diffusers token embeddings) is
        not in it: :meth:`save` / :meth:`load_bank` keep that too."""
        return {
            "format": self._STATE_FORMAT, "sites": [s.name for s in self.sites], "rank": self.rank,
            "alpha": self.alpha, "next_idx": self._next_idx,
            "active": None if self._active is None else [self._active[0], self._active[1]],
            "retired": [dict(r) for r in self._retired],
            "past": list(self._past),
            "concepts": [{"idx": c.idx, "name": c.name, "scale": c.scale, "lora_A": list(c.lora_A),
                          "lora_B": list(c.lora_B), **({"source": c.source} if c.source else {})}
                         for c in self.concepts],
        }

    def set_extra_state(self, state) -> None:
        """Install :meth:`get_extra_state`'s state (``load_state_dict``), after checking that it belongs to a
        controller over the same sites and rank; a clear error, and no change, otherwise."""
        def bad(msg):
            return ValueError(f"load_state_dict: the controller state {msg}")
        if not isinstance(state, dict) or state.get("format") != self._STATE_FORMAT:
            raise bad(f"is not a {self._STATE_FORMAT} state (got {type(state).__name__})")
        if state["sites"] != [s.name for s in self.sites]:
            raise bad(f"is for other sites ({len(state['sites'])} sites, first {state['sites'][:2]}) than this "
                      f"controller's ({self.num_sites}, first {self.site_names[:2]})")
        if state["rank"] != self.rank or float(state["alpha"]) != self.alpha:
            raise bad(f"has rank {state['rank']}, alpha {state['alpha']}; this controller rank {self.rank}, "
                      f"alpha {self.alpha}")
        has_tokens = getattr(self.adapter, "extra_state", None) is not None and getattr(self.adapter, "slots", None)
        if has_tokens and (state["concepts"] or state["active"] is not None or state["retired"]
                           or self.concepts or self._active is not None or self._retired):
            raise bad("cannot carry this integration's personalized token embeddings: use controller.save() and "
                      "load_bank() (or clora_fast.load) for a pipeline")
        n = self.num_sites
        if len(state["past"]) != n or any(len(c["lora_A"]) != n or len(c["lora_B"]) != n for c in state["concepts"]):
            raise bad(f"does not hold one past and one factor pair per site ({n} sites)")
        next_idx = int(state["next_idx"])
        idxs = [int(c["idx"]) for c in state["concepts"]] + [int(r["idx"]) for r in state["retired"]]
        if state["active"] is not None:
            idxs.append(int(state["active"][0]))
        if len(set(idxs)) != len(idxs) or any(i < 0 or i >= next_idx for i in idxs):
            raise bad(f"has concept indices {sorted(idxs)} that repeat or fall outside 0..next_idx-1 = {next_idx - 1}")
        dev = self._device()
        shapes = [(s.out_features, s.in_features) for s in self.sites]

        def check(t, shape, what, to=dev):
            if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != shape):
                got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise bad(f"has {what} of shape {got}, expected {shape}")
            return None if t is None else t.detach().to(to, torch.float32)

        r = self.rank
        pasts = [check(p, sh, f"past of {s.name!r}") for p, sh, s in zip(state["past"], shapes, self.sites)]
        concepts = []
        for c in state["concepts"]:
            As = [check(a, (r, sh[1]), f"concept {c['idx']} lora_A", "cpu") for a, sh in zip(c["lora_A"], shapes)]
            Bs = [check(b, (sh[0], r), f"concept {c['idx']} lora_B", "cpu") for b, sh in zip(c["lora_B"], shapes)]
            meta = {"source": str(c["source"])} if c.get("source") else {}
            concepts.append(Concept(int(c["idx"]), str(c["name"]), float(c["scale"]), As, Bs, meta))
        active, factors = None, None
        if state["active"] is not None:
            active = (int(state["active"][0]), str(state["active"][1]))
            # placeholders of the right layout: the lora_A.* / lora_B.* entries are loaded into them next
            factors = ([torch.zeros(r, sh[1], device=dev) for sh in shapes],
                       [torch.zeros(sh[0], r, device=dev) for sh in shapes])
        self._set_state(pasts, concepts, [dict(x) for x in state["retired"]], next_idx, active, factors)
        # token embeddings a bank load kept for a bare UNet belonged to the previous concepts
        from .bank import _CARRY_ATTR
        object.__setattr__(self, _CARRY_ATTR, None)

    def extra_repr(self) -> str:
        return (f"sites={self.num_sites}, rank={self.rank}, alpha={self.alpha}, penalty_weight={self.penalty_weight}, "
                f"backend={self.backend!r}, concepts={[c.idx for c in self.concepts]}, active={self.active_concept}, "
                f"merged={self.merged}")
