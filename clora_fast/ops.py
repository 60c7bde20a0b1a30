"""Public operations of clora_fast.

Layering (the flash-attention pattern): a backend's *launchers* (plain tensors in
and out: ``clora_fast.reference``, ``clora_fast.kernels.*``, ``clora_fast._cuda``)
-> torch *custom ops* (``clora_fast::segmented_lora``, ``..._backward``,
``clora_fast::forgetting_penalty``, ``clora_fast::grouped_forgetting_penalty``)
with fake (meta) implementations and registered autograd, so that
``torch.compile(fullgraph=True)`` traces through them -> the public functions
below, which validate inputs, apply autocast and pick the backend.

Every backend goes through the same custom ops and autograd formulas, so the
``reference`` backend is the kernels' code path with PyTorch launchers.

Math (shapes in the PyTorch/PEFT convention, ``weight [out, in]``,
``lora_A [r, in]``, ``lora_B [out, r]``):

- ``lora_projection``: ``y = x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T (+ bias)``
- ``segmented_lora_projection``: L projections of one input with weights stacked by
  rows, ``y[:, o_l:o_{l+1}] = x @ W_l.T + s_l (x @ A_l.T) @ B_l.T``
- ``forgetting_penalty``: ``sum((past * (scale * lora_B @ lora_A)) ** 2)``, its
  gradients computed in the forward pass, scaled by ``grad_output`` in backward.

Two projection strategies (``strategy=``): "fused" runs the backend's segmented kernels;
"merged" folds ``s*B@A`` into the weight per call and runs library GEMMs (one projection or a
layer's K/V on CUDA by default: measured faster there, see benchmarks/RESULTS.md).  Eager calls
go through plain autograd Functions; ``torch.compile`` takes the custom ops, except the merged strategy
(equal segments on CUDA from ``TRACED_MERGED_MIN_ROWS`` rows up, or asked for), which it traces as plain
tensor ops (:class:`_TracedMergedLoRA`).
"""
from __future__ import annotations

import collections
import functools
import importlib
import math
import numbers
import os
import weakref
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import reference as _reference
from ._graphs import graph_capture as _graph_capture
from ._validate import (check_dtype_for_backend, check_lora_shapes, check_same_device, check_same_dtype,
                        check_scale, check_tensor, interpreting, layout_overlap, resolve_backend)

__all__ = ["lora_projection", "lora_kv_projection", "segmented_lora_projection", "forgetting_penalty",
           "grouped_forgetting_penalty", "packed_forgetting_penalty", "PackedForgettingPenalty", "split_columns",
           "mark_frozen_bias"]


# ---------------------------------------------------------------------------
# Backend launchers
# ---------------------------------------------------------------------------

_LAUNCHER_MODULES = {
    "projection": {"triton": "clora_fast.kernels.lora_projection", "cuda": "clora_fast._cuda"},
    "penalty": {"triton": "clora_fast.kernels.forgetting_penalty", "cuda": "clora_fast._cuda"},
}


def _launchers(op: str, backend: str):
    """The module holding ``backend``'s launchers of ``op`` ("projection" or "penalty")."""
    if backend == "reference":
        return _reference
    try:
        return importlib.import_module(_LAUNCHER_MODULES[op][backend])
    except KeyError:
        raise ValueError(f"unknown backend {backend!r}") from None


def _projection_launchers(backend: str):
    return _launchers("projection", backend)


def _penalty_launchers(backend: str):
    return _launchers("penalty", backend)


# ---------------------------------------------------------------------------
# Differentiable once
# ---------------------------------------------------------------------------

_TWICE_MSG = ("clora_fast's ops are differentiable once: the gradients they return (their backward ran with "
              "create_graph=True) cannot be differentiated again (no double backward / gradgradcheck); "
              "compute second derivatives with the 'reference' formulas in plain PyTorch instead")
try:   # what torch.autograd.function.once_differentiable uses
    from torch._C import _functions as _torch_functions
    _DelayedError = _torch_functions.DelayedError
except (ImportError, AttributeError):  # pragma: no cover - every torch >= 2.4 has it
    _DelayedError = None


def _poison(out, anchors):
    """``out`` (a backward's result: tensors, None, nested tuples/lists) with every tensor
    ``g`` replaced by ``g + z``, where ``z`` is an exact zero whose gradient node raises
    ``_TWICE_MSG`` and which hangs off ``anchors`` (the forward's saved inputs and the incoming
    gradients that require grad): differentiating a returned gradient with respect to anything
    it depends on reaches that node and raises."""
    anchors = [t for t in anchors if isinstance(t, Tensor) and t.requires_grad and t.numel() > 0]
    if not anchors:
        return out                                        # nothing it depends on can be differentiated
    if _DelayedError is None:  # pragma: no cover
        raise RuntimeError(_TWICE_MSG)
    with torch.enable_grad():
        probe = sum(t.reshape(-1)[:1].sum().to(torch.float32) for t in anchors)
        e = _DelayedError(_TWICE_MSG.encode(), 1)(probe)
        zero = torch.nan_to_num(e - e.detach(), 0.0, 0.0, 0.0)

        def rebuild(o):
            if isinstance(o, Tensor):
                return o + zero.to(o.dtype)
            if isinstance(o, (tuple, list)):
                return type(o)(rebuild(v) for v in o)
            return o

        return rebuild(out)


def _once_differentiable(backward):
    """A backward (``(ctx, *grads) -> grads``) whose results carry no wrong graph: run with
    ``create_graph=True`` (grad mode on inside backward), it computes without recording and
    returns gradients whose differentiation raises a clear error (see :func:`_poison`; every
    Function using it saves its differentiable inputs).  The kernels' gradients are not
    themselves differentiable, and a partially recorded graph (saved ``xa``, gradients computed
    in the forward pass) would give silently wrong second derivatives.  Unlike
    ``torch.autograd.function.once_differentiable`` this also fires for ``grad(gA.sum(), A)``
    after ``gA = grad(loss, A, create_graph=True)`` (there the error node is not on any path to
    ``A``, and the second derivative silently misses this op's term)."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if not torch.is_grad_enabled():                  # the usual backward: nothing to guard
            return backward(ctx, *grads)
        with torch.no_grad():
            out = backward(ctx, *grads)
        return _poison(out, (*ctx.saved_tensors, *_flat_tensors(grads)))
    return wrapper


def _flat_tensors(xs):
    for x in xs:
        if isinstance(x, Tensor):
            yield x
        elif isinstance(x, (tuple, list)):
            yield from _flat_tensors(x)


# ---------------------------------------------------------------------------
# Custom ops: segmented LoRA projection
# ---------------------------------------------------------------------------

@torch.library.custom_op("clora_fast::segmented_lora", mutates_args=(), schema=(
    "(Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor? bias, int[] seg_offsets, float[] scales, "
    "str backend) -> (Tensor, Tensor)"))
def _segmented_lora_op(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                       seg_offsets: List[int], scales: List[float], backend: str) -> Tuple[Tensor, Tensor]:
    launch = _projection_launchers(backend)
    y, xa = launch.segmented_lora_forward(x, weight, lora_A, lora_B, tuple(seg_offsets), tuple(scales), bias)
    return y, xa


@_segmented_lora_op.register_fake
def _(x, weight, lora_A, lora_B, bias, seg_offsets, scales, backend):
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.new_empty((x.shape[0], weight.shape[0])),
            x.new_empty((x.shape[0], lora_A.shape[0]), dtype=acc))


@torch.library.custom_op("clora_fast::segmented_lora_backward", mutates_args=(), schema=(
    "(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor xa, int[] seg_offsets, "
    "float[] scales, str backend, bool need_dx, bool need_dA, bool need_dB) -> (Tensor, Tensor, Tensor)"))
def _segmented_lora_backward_op(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                xa: Tensor, seg_offsets: List[int], scales: List[float], backend: str,
                                need_dx: bool, need_dA: bool, need_dB: bool) -> Tuple[Tensor, Tensor, Tensor]:
    launch = _projection_launchers(backend)
    dx, dA, dB = launch.segmented_lora_backward(grad_y.contiguous(), x, weight, lora_A, lora_B, xa,
                                                tuple(seg_offsets), tuple(scales),
                                                need_dx=need_dx, need_dA=need_dA, need_dB=need_dB)
    # custom ops cannot return None: unneeded gradients come back as empty tensors
    empty = x.new_empty((0,))
    return (dx if dx is not None else empty, dA if dA is not None else empty, dB if dB is not None else empty)


@_segmented_lora_backward_op.register_fake
def _(grad_y, x, weight, lora_A, lora_B, xa, seg_offsets, scales, backend, need_dx, need_dA, need_dB):
    empty = x.new_empty((0,))
    return (x.new_empty(x.shape) if need_dx else empty,
            lora_A.new_empty(lora_A.shape) if need_dA else empty,
            lora_B.new_empty(lora_B.shape) if need_dB else empty)


def _segmented_setup_context(ctx, inputs, output):
    x, weight, lora_A, lora_B, bias, seg_offsets, scales, backend = inputs
    ctx.save_for_backward(x, weight, lora_A, lora_B, output[1])
    ctx.seg_offsets, ctx.scales, ctx.backend = seg_offsets, scales, backend
    ctx.has_bias = bias is not None


def _segmented_grads(ctx, grad_y, backward_fn):
    """Gradients of the segmented projection; ``backward_fn`` is the custom op (traced by
    torch.compile) or a backend's launcher (eager)."""
    x, weight, lora_A, lora_B, xa = ctx.saved_tensors
    need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
    dx = dA = dB = dW = dbias = None
    if need_x or need_a or need_b:
        dx, dA, dB = backward_fn(grad_y, x, weight, lora_A, lora_B, xa, ctx.seg_offsets, ctx.scales, ctx.backend,
                                 need_x, need_a, need_b)
        dx = dx if need_x else None
        dA = dA if need_a else None
        dB = dB if need_b else None
    if need_w:  # a trainable base weight: never drop its gradient silently
        dW = (grad_y.t().to(torch.float32) @ x.to(torch.float32)).to(weight.dtype) \
            if weight.dtype != torch.float64 else grad_y.t() @ x
    if need_bias:
        dbias = grad_y.sum(0, dtype=torch.float32 if grad_y.dtype != torch.float64 else torch.float64)
        dbias = dbias.to(grad_y.dtype)
    return dx, dW, dA, dB, dbias, None, None, None


def _segmented_backward(ctx, grad_y, grad_xa):
    return _segmented_grads(ctx, grad_y, _segmented_lora_backward_op)


_segmented_lora_op.register_autograd(_once_differentiable(_segmented_backward),
                                     setup_context=_segmented_setup_context)


# ---------------------------------------------------------------------------
# Custom ops: forgetting penalty (gradients computed in the forward pass)
# ---------------------------------------------------------------------------

@torch.library.custom_op("clora_fast::forgetting_penalty", mutates_args=(), schema=(
    "(Tensor past, Tensor lora_A, Tensor lora_B, float scale, str backend) -> (Tensor, Tensor, Tensor)"))
def _penalty_op(past: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, backend: str
                ) -> Tuple[Tensor, Tensor, Tensor]:
    loss, dA, dB = _penalty_launchers(backend).forgetting_penalty_forward(past, lora_A, lora_B, scale)
    return loss, dA, dB


@_penalty_op.register_fake
def _(past, lora_A, lora_B, scale, backend):
    acc = _reference._penalty_acc(past, lora_A, lora_B)
    return (past.new_empty((), dtype=acc), lora_A.new_empty(lora_A.shape, dtype=acc),
            lora_B.new_empty(lora_B.shape, dtype=acc))


def _penalty_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1], output[2], inputs[1], inputs[2])     # the factors: see _poison
    ctx.dtypes = (inputs[1].dtype, inputs[2].dtype)


def _penalty_backward(ctx, grad_loss, _grad_dA, _grad_dB):
    dA, dB = ctx.saved_tensors[:2]
    return (None, (grad_loss * dA).to(ctx.dtypes[0]) if ctx.needs_input_grad[1] else None,
            (grad_loss * dB).to(ctx.dtypes[1]) if ctx.needs_input_grad[2] else None, None, None)


_penalty_op.register_autograd(_once_differentiable(_penalty_backward), setup_context=_penalty_setup_context)


@torch.library.custom_op("clora_fast::grouped_forgetting_penalty", mutates_args=(), schema=(
    "(Tensor[] pasts, Tensor[] lora_As, Tensor[] lora_Bs, float[] scales, str backend) "
    "-> (Tensor, Tensor[], Tensor[])"))
def _grouped_penalty_op(pasts: List[Tensor], lora_As: List[Tensor], lora_Bs: List[Tensor], scales: List[float],
                        backend: str) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    loss, dAs, dBs = _penalty_launchers(backend).grouped_forgetting_penalty_forward(
        list(pasts), list(lora_As), list(lora_Bs), tuple(scales))
    return loss, list(dAs), list(dBs)


@_grouped_penalty_op.register_fake
def _(pasts, lora_As, lora_Bs, scales, backend):
    acc = _reference._penalty_acc(*pasts, *lora_As, *lora_Bs)
    return (pasts[0].new_empty((), dtype=acc), [a.new_empty(a.shape, dtype=acc) for a in lora_As],
            [b.new_empty(b.shape, dtype=acc) for b in lora_Bs])


def _grouped_penalty_setup_context(ctx, inputs, output):
    _, dAs, dBs = output
    ctx.n = len(dAs)
    ctx.save_for_backward(*dAs, *dBs, *inputs[1], *inputs[2])           # the factors: see _poison
    ctx.dtypes = ([a.dtype for a in inputs[1]], [b.dtype for b in inputs[2]])


def _grouped_penalty_backward(ctx, grad_loss, _grad_dAs, _grad_dBs):
    saved = list(ctx.saved_tensors[:2 * ctx.n])
    scaled = torch._foreach_mul(saved, grad_loss)    # one fused launch for all 2L gradients
    dAs = [g.to(dt) for g, dt in zip(scaled[:ctx.n], ctx.dtypes[0])]
    dBs = [g.to(dt) for g, dt in zip(scaled[ctx.n:], ctx.dtypes[1])]
    return [None] * ctx.n, dAs, dBs, None, None


_grouped_penalty_op.register_autograd(_once_differentiable(_grouped_penalty_backward),
                                     setup_context=_grouped_penalty_setup_context)


# ---------------------------------------------------------------------------
# Eager fast path: the same launchers and gradient formulas as the custom ops,
# through plain autograd Functions. The custom-op dispatcher costs tens of
# microseconds of host time per call, which dominates at the small SD
# cross-attention shapes; torch.compile always takes the custom ops above.
# ---------------------------------------------------------------------------

def _launch_segmented_backward(grad_y, x, weight, lora_A, lora_B, xa, seg_offsets, scales, backend,
                               need_dx, need_dA, need_dB):
    return _projection_launchers(backend).segmented_lora_backward(
        grad_y.contiguous(), x, weight, lora_A, lora_B, xa, tuple(seg_offsets), tuple(scales),
        need_dx=need_dx, need_dA=need_dA, need_dB=need_dB)


class _SegmentedLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, seg_offsets, scales, backend):
        y, xa = _projection_launchers(backend).segmented_lora_forward(
            x, weight, lora_A, lora_B, tuple(seg_offsets), tuple(scales), bias)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.seg_offsets, ctx.scales, ctx.backend = seg_offsets, scales, backend
        return y

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_y):
        return _segmented_grads(ctx, grad_y, _launch_segmented_backward)


class _SplitColumns(torch.autograd.Function):
    """Column blocks of ``y`` (last dim) as separate outputs (views, one ``split_with_sizes``); backward
    concatenates their gradients once.  Slicing ``y`` directly would make autograd zero-fill a full
    ``y``-sized gradient per slice and add them up (for the whole-UNet K/V: 32 fills, copies and adds of
    ``[M, 25k]`` per backward)."""

    @staticmethod
    def forward(ctx, y, sizes):
        ctx.set_materialize_grads(False)
        ctx.sizes, ctx.lead, ctx.dtype, ctx.device = sizes, y.shape[:-1], y.dtype, y.device
        return y.split(sizes, -1)

    @staticmethod
    def backward(ctx, *grads):
        pieces = [g if g is not None else torch.zeros((*ctx.lead, n), dtype=ctx.dtype, device=ctx.device)
                  for g, n in zip(grads, ctx.sizes)]
        return (pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)), None


def split_columns(y: Tensor, offsets: Sequence[int]) -> Tuple[Tensor, ...]:
    """``tuple(y[..., o_l:o_{l+1}])`` (views) whose gradients are gathered with one
    concatenation instead of a zero-filled ``y``-sized gradient per slice."""
    offsets = _int_offsets("offsets", offsets)
    if offsets[0] != 0 or offsets[-1] != y.shape[-1] or any(b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"offsets must increase strictly from 0 to y.shape[-1]={y.shape[-1]}, got {list(offsets)}")
    sizes = [b - a for a, b in zip(offsets, offsets[1:])]
    if not torch.is_grad_enabled() or not y.requires_grad or _compiling():
        return tuple(y.split(sizes, -1))
    return _SplitColumns.apply(y, sizes)


class _PenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, past, lora_A, lora_B, scale, backend):
        loss, dA, dB = _penalty_launchers(backend).forgetting_penalty_forward(past, lora_A, lora_B, scale)
        _penalty_setup_context(ctx, (past, lora_A, lora_B), (loss, dA, dB))
        return loss

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_loss):
        return _penalty_backward(ctx, grad_loss, None, None)


class _GroupedPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scales, backend, n, *tensors):
        pasts, As, Bs = list(tensors[:n]), list(tensors[n:2 * n]), list(tensors[2 * n:])
        loss, dAs, dBs = _penalty_launchers(backend).grouped_forgetting_penalty_forward(pasts, As, Bs, tuple(scales))
        _grouped_penalty_setup_context(ctx, (pasts, As, Bs), (loss, list(dAs), list(dBs)))
        return loss

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_loss):
        _, dAs, dBs, _, _ = _grouped_penalty_backward(ctx, grad_loss, None, None)
        return (None, None, None) + (None,) * ctx.n + tuple(dAs) + tuple(dBs)


def _launch_packed_penalty(pasts, flat_As, flat_Bs, layout, scales, backend, prepared=None):
    """``(loss, [dA_flat], [dB_flat])`` fp32 for factors packed in flat buffers (see
    :func:`packed_forgetting_penalty`); the Triton launcher writes the flat gradients
    directly (``prepared``: its table cache for fixed pasts/layout/scales), other backends run
    their grouped launcher on views and scatter."""
    launch = _penalty_launchers(backend)
    if hasattr(launch, "grouped_forgetting_penalty_packed"):
        return launch.grouped_forgetting_penalty_packed(pasts, flat_As, flat_Bs, layout, scales, prepared=prepared)
    As = [flat_As[f][a:a + r] for f, a, _, r in layout]
    Bs = [flat_Bs[f][b:b + p.shape[0]] for (f, _, b, _), p in zip(layout, pasts)]
    loss, dAs, dBs = launch.grouped_forgetting_penalty_forward(pasts, As, Bs, tuple(scales))
    acc = loss.dtype
    dA_flat = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in flat_As]
    dB_flat = [torch.zeros(t.shape, dtype=acc, device=t.device) for t in flat_Bs]
    for (f, a, b, r), da, db in zip(layout, dAs, dBs):
        dA_flat[f][a:a + r] += da
        dB_flat[f][b:b + db.shape[0]] += db
    return loss, dA_flat, dB_flat


class _PackedPenaltyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pasts, layout, scales, backend, prepared, n_flat, *flats):
        flat_As, flat_Bs = flats[:n_flat], flats[n_flat:]
        loss, dA_flat, dB_flat = _launch_packed_penalty(pasts, flat_As, flat_Bs, layout, scales, backend, prepared)
        ctx.save_for_backward(*dA_flat, *dB_flat, *flats)                 # the factors: see _poison
        ctx.dtypes = [t.dtype for t in flats]
        ctx.n_fixed = 6
        return loss

    @staticmethod
    @_once_differentiable
    def backward(ctx, grad_loss):
        grads = torch._foreach_mul(list(ctx.saved_tensors[:len(ctx.dtypes)]), grad_loss)   # one launch, all buffers
        grads = [g.to(dt) for g, dt in zip(grads, ctx.dtypes)]
        return (None,) * ctx.n_fixed + tuple(g if need else None
                                             for g, need in zip(grads, ctx.needs_input_grad[ctx.n_fixed:]))


# ---------------------------------------------------------------------------
# Merged-weight strategy: the dense GEMMs go to cuBLAS with the adapter folded
# into the weight for the call.  For one projection (or the K and V of one
# layer: equal segments) the weight is small next to the activations
# (ViT-B/16 at batch 128: 2.4 MB of K/V weight vs 116 MB of x and y), so
#
#     forward   W_eff = [W_l + s_l B_l @ A_l]   (L GEMMs N x r x K, or one batched)
#               y     = x @ [W_eff; A]^T + bias (one GEMM; the A rows give xa = x @ A^T
#                                                for dB when the outputs are split)
#     backward  dx    = sum_l dy_l @ W_eff_l    (W_eff kept from the forward)
#               dA    = [s_l (dy_l @ B_l)^T] @ x  (one GEMM for all segments)
#               dB_l  = s_l dy_l^T @ xa_l
#
# When x and A both need gradients and B is stacked (a controller's call), dy_l @ s_l B_l
# rides along in the dx GEMMs the same way: the kept weight is [W_eff | Z] with
# Z = blockdiag(s_l B_l) ([L*n, L*r], written in the forward by one elementwise
# product), so sum_l dy_l @ [W_eff_l | Z_l] = [dx | (dy_l s_l B_l)_l] and dA is one
# GEMM of its last L*r columns with x: the dy_l are read once each, by the dx GEMMs.
#
# For a controller's K/V pair that costs the dense projection plus one more read of x
# and one of dy for the rank-r gradients, in 9 library launches (PEFT's unfused LoRA:
# 25, the dense pair: 5; tests/test_ops.py::test_merged_kv_launch_counts) and
# no Python-side kernel launch cost, which dominates the fused Triton path at
# these sizes (benchmarks/RESULTS.md).  Precision: the products run in the
# input dtype with fp32 accumulation, like torch's own LoRA; W_eff (and s_l B_l)
# is rounded once to the input dtype.  Used by the triton and cuda backends on CUDA
# tensors when all segments have one size ("auto"); the segmented Triton
# kernels keep the grouped whole-UNet launch (unequal segments, weight >>
# activations there).
# ---------------------------------------------------------------------------

def _mm(a: Tensor, b: Tensor, s: float, out: Optional[Tensor] = None) -> Tensor:
    """``s * a @ b`` (into ``out`` when given): a plain GEMM when ``s == 1``, else the scale in the
    GEMM's epilogue (``addmm`` with ``beta=0`` ignores its input)."""
    if s == 1.0:
        return torch.mm(a, b, out=out)
    return torch.addmm(a.new_empty(()), a, b, beta=0.0, alpha=s, out=out)


_CACHE_MAX = 64                 # entries of each of the merged strategy's small caches (least recently used out)
# cached tensors a captured CUDA graph reads by address at every replay (id -> tensor): kept for the process, so
# that no eviction frees one under a live graph
_GRAPH_HELD: dict = {}


def _lru_put(cache: "collections.OrderedDict", key, value):
    """``cache[key] = value``, evicting the least recently used entry when ``cache`` holds ``_CACHE_MAX``."""
    if len(cache) >= _CACHE_MAX:
        cache.popitem(last=False)
    cache[key] = value
    return value


def _cached(cache: "collections.OrderedDict", key, device: torch.device, build):
    """``cache[key]``, built by ``build()`` on a miss (an LRU of ``_CACHE_MAX`` entries).  Inside a CUDA-graph
    capture a hit is kept for the process (the graph reads it by address at every replay) and a miss builds a
    tensor the graph owns, left out of the cache: captured kernels write it only when the graph replays, and an
    eager call must not read it before."""
    v = cache.get(key)
    if _graph_capture(device):
        if v is None:
            return build()
        _GRAPH_HELD[id(v)] = v
        return v
    if v is None:
        return _lru_put(cache, key, build())
    cache.move_to_end(key)
    return v


_ZEROS: "collections.OrderedDict" = collections.OrderedDict()


def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A cached read-only zero vector (padding the bias of the forward GEMM's extra columns)."""
    return _cached(_ZEROS, (n, dtype, device), device, lambda: torch.zeros(n, dtype=dtype, device=device))



def mark_frozen_bias(bias: Tensor) -> None:
    """Declare ``bias`` a tensor nobody writes in place (a controller's folded bias, rebuilt as a new tensor
    whenever the model's biases change): the merged strategy may then keep its zero-padded copy across calls.
    Any other bias is padded at every call that needs it (a cache keyed on a user's tensor could not see
    writes through ``.data``)."""
    _FROZEN[id(bias)] = weakref.ref(bias)
    if len(_FROZEN) > 4 * _CACHE_MAX:               # drop the entries whose tensors are gone
        for k in [k for k, ref in _FROZEN.items() if ref() is None]:
            del _FROZEN[k]


_FROZEN: dict = {}


def _xa_bias(bias: Tensor, extra: int, per_segment_A: bool) -> Optional[Tensor]:
    """The bias of the forward GEMM when the A rows ride along in it (``[bias; zeros(extra)]``), or None when
    they should not: a bias marked frozen is padded once (cached with its version), another only when A comes
    per segment (then the A rows save L GEMMs of backward, else one: not worth a concatenation per call)."""
    ref = _FROZEN.get(id(bias))
    frozen = ref is not None and ref() is bias and not bias.is_inference()
    key = (id(bias), extra)
    hit = _PADDED.get(key) if frozen else None
    if hit is not None and hit[0]() is bias and hit[1] == bias._version:
        if _graph_capture(bias.device):
            _GRAPH_HELD[id(hit[2])] = hit[2]
        else:
            _PADDED.move_to_end(key)
        return hit[2]
    if not (frozen or per_segment_A):
        return None
    out = torch.cat((bias, _zeros(extra, bias.dtype, bias.device)))
    if frozen and not _graph_capture(bias.device):      # (see _cached: what a capture builds stays the graph's)
        _lru_put(_PADDED, key, (weakref.ref(bias), bias._version, out))
    return out


_PADDED: "collections.OrderedDict" = collections.OrderedDict()


def _scale_diag(scales, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``diag(scales)`` shaped ``[L, 1, L, 1]`` (cached): ``B.view(L, n, 1, r) * it`` is ``blockdiag(s_l B_l)``
    viewed ``[L, n, L, r]``.  In ``promote_types(dtype, float32)``, so that a bf16 / fp16 ``s_l B_l`` is computed in
    fp32 and rounded once."""
    def build():
        L, dt = len(scales), torch.promote_types(dtype, torch.float32)
        d = torch.zeros(L, L, dtype=dt, device=device)
        for l, sc in enumerate(scales):           # scalar fills, no host-to-device copy: a first call inside a
            d[l, l].fill_(sc)                      # CUDA graph capture may build it
        return d.view(L, 1, L, 1)
    return _cached(_DIAGS, (tuple(scales), dtype, device), device, build)


_DIAGS: "collections.OrderedDict" = collections.OrderedDict()


def _fold_into(out: Tensor, Wp, Ap, Bp, scales, n: int, r: int) -> None:
    """Write ``W_l + s_l B_l @ A_l`` into the row blocks ``out[l*n:(l+1)*n]`` (``out`` may be a column block
    of a wider buffer): one batched GEMM when W, A and B are each stacked and the scales equal (a
    controller's call), else one GEMM per segment.  ``Bp`` may also be one ``[L, n, r]`` tensor: the diagonal
    blocks of the merged Function's ``Z`` (``s_l B_l`` already, with scales 1)."""
    L = len(scales)
    K = out.shape[1]
    if L > 1 and len(Wp) == len(Ap) == len(Bp) == 1 and all(sc == scales[0] for sc in scales):
        torch.baddbmm(Wp[0].reshape(L, n, K), Bp[0].reshape(L, n, r), Ap[0].reshape(L, r, K), alpha=scales[0],
                      out=out[:L * n].view(L, n, K))
        return
    Ws, As = _segments(Wp, L, n), _segments(Ap, L, r)
    Bs = list(Bp[0]) if Bp[0].dim() == 3 else _segments(Bp, L, n)
    for l, (w, a, b, s) in enumerate(zip(Ws, As, Bs, scales)):
        torch.addmm(w, b, a, alpha=s, out=out[l * n:(l + 1) * n])


def _segments(parts, L: int, rows: int):
    """Per-segment tensors from ``parts``: L tensors as they are, or the row blocks of one stacked one."""
    return list(parts) if len(parts) == L else [parts[0][l * rows:(l + 1) * rows] for l in range(L)]


class _MergedLoRAFunction(torch.autograd.Function):
    """Merged-weight LoRA projection of L equal segments.  The weights, A's and B's each come
    either stacked (one tensor, e.g. a controller's flat parameter) or one per segment (K and V
    as the user holds them): no concatenation, and no per-segment slicing in the autograd graph.
    With ``split`` the segment outputs come back as separate views and their gradients arrive
    separately: no ``[M, N]`` gradient is assembled from slices.

    Forward: ``W_eff = [W_l + s_l B_l @ A_l]`` (``[L*n, K]``), ``y = x @ W_eff^T (+ bias)``: L small
    GEMMs (or one batched) and one large one.  With ``split`` and B trainable, the rows of the A's
    ride along in the large GEMM, so ``xa_l = x @ A_l^T`` (which dB needs) comes out of it as extra
    columns of the output's storage instead of a second read of x in backward (the bias, if any, padded
    with zeros for them: cached per bias tensor).
    ``W_eff`` is kept for dx (the size of the frozen weight) rather than folded again; when x and A need
    gradients and B is stacked, it is kept as ``[W_eff | Z]`` with ``Z = blockdiag(s_l B_l)`` (``[L*n, L*r]``,
    one elementwise product into the same buffer), so that the dx GEMMs also give ``G^T``.
    Float32 master factors of a half-precision call (mixed-precision training) are rounded to x's dtype by
    the writes that place them in that buffer (the A rows' copy, Z's product), and the fold reads them
    there (``W_l + Z_l @ A_l``): no separate casts; their gradients are computed in x's dtype and returned
    in float32 (the casts autograd would make after a ``.to()``).

    Backward, per live segment ``l`` (``dy_l [M, n]``): ``dx = sum_l dy_l @ W_eff_l``,
    ``dA = G @ x`` with ``G = [s_l (dy_l @ B_l)^T]`` stacked (``[L*r, M]``: x read once for all
    segments; with ``Z``, ``[dx | G^T] = sum_l dy_l @ [W_eff_l | Z_l]`` and dx is returned as that column
    block, a strided view), ``dB_l = s_l dy_l^T @ xa_l``, ``dW_l = dy_l^T @ x``, ``dbias_l = sum(dy_l)``."""

    @staticmethod
    def forward(ctx, x, bias, xa_bias, diag, scales, split, keep_xa, nW, nA, *tensors):
        # keep_xa, xa_bias, diag: the extra columns, decided by _ride_along (as for the C++ Function)
        ctx.set_materialize_grads(False)
        L = len(scales)
        Wp, Ap, Bp = tensors[:nW], tensors[nW:nW + nA], tensors[nW + nA:]
        n = (Wp[0].shape[0] if nW == L else Wp[0].shape[0] // L)
        r = (Ap[0].shape[0] if nA == L else Ap[0].shape[0] // L)
        Ln, Lr = L * n, L * r
        ext = diag is not None
        K = x.shape[-1]
        w = Wp[0].new_empty((Ln + Lr if keep_xa else Ln, K + Lr if ext else K))
        wk = w[:, :K] if ext else w
        if keep_xa:
            if nA == 1:
                wk[Ln:].copy_(Ap[0])
            else:
                torch.cat(Ap, out=wk[Ln:])
            if bias is not None:
                bias = xa_bias
        if ext:
            torch.mul(Bp[0].reshape(L, n, 1, r), diag, out=w[:Ln, K:].view(L, n, L, r))
        if Ap[0].dtype == x.dtype and Bp[0].dtype == x.dtype:
            _fold_into(wk, Wp, Ap, Bp, scales, n, r)
        else:                   # float32 master factors: rounded to x's dtype where the writes above put them
            Ac = [wk[Ln:]] if keep_xa else [a.to(x.dtype) for a in Ap]
            if ext:             # s_l B_l: the diagonal blocks of Z
                _fold_into(wk, Wp, Ac, [w[:Ln, K:].view(L, n, L, r).diagonal(0, 0, 2).permute(2, 0, 1)], (1.0,) * L,
                           n, r)
            else:
                _fold_into(wk, Wp, Ac, [b.to(x.dtype) for b in Bp], scales, n, r)
        y = torch.nn.functional.linear(x, wk, bias)               # [..., L*n (+ L*r)]: any leading dims
        ctx.save_for_backward(x, *tensors)
        ctx.w = w[:Ln] if ctx.needs_input_grad[0] else None       # [L*n, K (+ L*r)]
        ctx.ext = ext
        ctx.xa = y[..., Ln:] if keep_xa else None                 # columns no output exposes
        ctx.scales, ctx.split, ctx.nW, ctx.nA, ctx.n, ctx.r = scales, split, nW, nA, n, r
        if not split:
            return y
        return y.split_with_sizes((n,) * L + ((Lr,) if keep_xa else ()), -1)[:L]

    @staticmethod
    @_once_differentiable
    def backward(ctx, *grads):
        x, *tensors = ctx.saved_tensors
        scales, nW, nA, n, r = ctx.scales, ctx.nW, ctx.nA, ctx.n, ctx.r
        L = len(scales)
        nB = len(tensors) - nW - nA
        Ap, Bp = tensors[nW:nW + nA], tensors[nW + nA:]
        need = ctx.needs_input_grad
        need_w, need_a, need_b = need[9:9 + nW], need[9 + nW:9 + nW + nA], need[9 + nW + nA:]
        x_shape = x.shape
        K = x_shape[-1]
        if x.dim() != 2:                                          # leading dims: 2-D views, no autograd nodes
            x = x.reshape(-1, K)
        M = x.shape[0]
        if ctx.split:
            dys = [None if g is None else g.reshape(-1, n) for g in grads]
        else:
            dys = [None] * L if grads[0] is None else list(grads[0].reshape(-1, L * n).split(n, 1))
        dx = dbias = dA = None
        gW, gA, gB = [None] * nW, [None] * nA, [None] * nB
        if need[0]:
            w = ctx.w
            for l, dy in enumerate(dys):
                if dy is not None:
                    wl = w[l * n:(l + 1) * n]
                    dx = dy @ wl if dx is None else dx.addmm_(dy, wl)
            if ctx.ext and dx is not None:                       # [dx | G^T]: G^T = [dy_l s_l B_l]_l  [M, L*r]
                dA = dx[:, K:].t() @ x                                                 # [L*r, K]
                dx = dx[:, :K]
            dx = x.new_zeros(x_shape) if dx is None else dx.view(x_shape)
        if any(need_a):
            if dA is None:
                Bs = _segments([b.to(x.dtype) for b in Bp], L, n)
                G = x.new_empty((L * r, M))
                for l in range(L):
                    if dys[l] is None:
                        G[l * r:(l + 1) * r].zero_()
                    else:
                        _mm(Bs[l].t(), dys[l].t(), scales[l], out=G[l * r:(l + 1) * r])   # s (dy B)^T  [r, M]
                dA = G @ x                                                                 # [L*r, K]
            dA = dA.to(Ap[0].dtype)                               # (float32 master factors: their dtype)
            gA = [dA] if nA == 1 else [dA[l * r:(l + 1) * r] if need_a[l] else None for l in range(L)]
        if any(need_b):
            if ctx.xa is not None:
                xa = ctx.xa.reshape(M, L * r)
            else:
                xa = x @ Ap[0].to(x.dtype).t() if nA == 1 else None                    # [M, L*r]
            dB = x.new_empty((L * n, r)) if nB == 1 else None
            for l in range(L):
                if nB == L and not need_b[l]:
                    continue
                out = None if dB is None else dB[l * n:(l + 1) * n]
                if dys[l] is None:
                    g = out.zero_() if out is not None else torch.zeros_like(Bp[l])
                else:
                    xa_l = xa[:, l * r:(l + 1) * r] if xa is not None else x @ Ap[l].to(x.dtype).t()
                    g = _mm(dys[l].t(), xa_l, scales[l], out=out)                     # s dy^T (x A^T)  [n, r]
                if dB is None:
                    gB[l] = g.to(Bp[l].dtype)
            if dB is not None:
                gB[0] = dB.to(Bp[0].dtype)
        if any(need_w):
            dWs = [dy.t() @ x if dy is not None else x.new_zeros((n, K)) for dy in dys]
            gW = [torch.cat(dWs)] if nW == 1 else dWs
        if need[1]:
            acc = torch.float32 if x.dtype != torch.float64 else torch.float64
            dbias = torch.cat([d.sum(0, dtype=acc) if d is not None else torch.zeros(n, dtype=acc, device=x.device)
                               for d in dys]).to(x.dtype)
        return (dx, dbias, None, None, None, None, None, None, None, *gW, *gA, *gB)


class _TracedMergedLoRA(torch.autograd.Function):
    """The merged strategy of :class:`_MergedLoRAFunction` in plain tensor ops, for a ``torch.compile`` trace:
    no caches, no ``out=`` writes, no host-side decisions beyond the constants passed in, so that dynamo traces
    forward and backward into the graph (inductor fuses the fold, the casts and the padding; the GEMMs stay
    library calls) and a CUDA graph replays it.  Stacked operands only (a controller's call, or K and V
    concatenated): x ``[M, K]``, weight ``[L*n, K]``, lora_A ``[L*r, K]``, lora_B ``[L*n, r]``, bias ``[L*n]`` or
    None; the factors may be float32 masters of a half-precision x.

    Forward: ``Z_l = s_l B_l`` (rounded once to x's dtype), ``W_eff = [W_l + Z_l @ A_l]``,
    ``y = x @ W_eff^T (+ bias)``; with ``keep_xa`` the A rows ride along in that GEMM (``xa = x @ A^T``, which dB
    needs, as extra output columns); with ``grad_a`` (A trains) ``blockdiag(Z)`` is kept for ``G^T = [dy_l @ Z_l]``,
    and with ``ext`` (x trains too) it sits beside ``W_eff`` in the backward weight ``[W_eff | blockdiag(Z)]``, so
    that the dx GEMM also gives ``G^T``.  Backward: ``dx = dy @ W_eff``, ``dA = G @ x``,
    ``dB_l = s_l dy_l^T @ xa_l``, ``dW = dy^T @ x``, ``dbias = sum(dy)`` (factor gradients in the factors'
    dtype).  Returns ``[M, L*n]`` (a view when xa rides along); the caller splits it (views: returning one view
    per segment from the Function gives zero gradients under torch 2.11's dynamo)."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scales, keep_xa, grad_a, ext):
        L, dt = len(scales), x.dtype
        (Ln, K), Lr = weight.shape, lora_A.shape[0]
        n, r = Ln // L, Lr // L
        ac = lora_A.to(dt)
        if len(set(scales)) == 1:                             # s_l B_l in fp32 (or fp64), rounded once
            z = lora_B.to(torch.promote_types(lora_B.dtype, torch.float32)) * scales[0]
        else:
            z = torch.cat([lora_B[l * n:(l + 1) * n].to(torch.promote_types(lora_B.dtype, torch.float32)) * s
                           for l, s in enumerate(scales)])
        z = z.to(dt)
        weff = torch.baddbmm(weight.reshape(L, n, K), z.view(L, n, r), ac.reshape(L, r, K)).view(Ln, K)
        zb = torch.block_diag(*z.view(L, n, r).unbind(0)) if grad_a else None      # [L*n, L*r]
        w = torch.cat((weff, zb), 1) if ext else weff        # [L*n, K (+ L*r)]: the backward weight
        wf, bf = weff, bias
        if keep_xa:
            w = torch.cat((w, torch.nn.functional.pad(ac, (0, Lr)) if ext else ac), 0)
            wf = w[:, :K]
            if bias is not None:
                bf = torch.cat((bias, bias.new_zeros(Lr)))
        y = torch.nn.functional.linear(x, wf, bf)             # [M, L*n (+ L*r)]
        ctx.save_for_backward(x, w[:Ln] if ctx.needs_input_grad[0] else None, zb,
                              y[:, Ln:] if keep_xa else None)
        ctx.scales, ctx.ext, ctx.n, ctx.r, ctx.dtypes = scales, ext, n, r, (lora_A.dtype, lora_B.dtype)
        return y[:, :Ln] if keep_xa else y

    @staticmethod
    @_once_differentiable
    def backward(ctx, dy):                                    # dy [M, L*n]
        x, w, zb, xa = ctx.saved_tensors
        scales, n, r, K = ctx.scales, ctx.n, ctx.r, x.shape[1]
        L = len(scales)
        need_x, need_w, need_a, need_b, need_bias = ctx.needs_input_grad[:5]
        dx = dW = dA = dB = dbias = gT = None
        if need_x:
            out = dy @ w                                      # [dx | G^T]  [M, K (+ L*r)]
            dx = out[:, :K]
            if ctx.ext:
                gT = out[:, K:]
        if need_a:
            if gT is None:
                gT = dy @ zb                                  # [M, L*r]
            dA = (gT.t() @ x).to(ctx.dtypes[0])
        if need_b:
            dB = torch.cat([(dy[:, l * n:(l + 1) * n].t() @ xa[:, l * r:(l + 1) * r]) * scales[l]
                            for l in range(L)]).to(ctx.dtypes[1])                  # [L*n, r]
        if need_w:
            dW = dy.t() @ x
        if need_bias:
            dbias = dy.sum(0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32).to(dy.dtype)
        return dx, dW, dA, dB, dbias, None, None, None, None


def _traced_merged(x, weight, lora_A, lora_B, bias, offsets, scales, split):
    """The merged strategy inside a ``torch.compile`` trace (:class:`_TracedMergedLoRA`): x ``[..., K]``,
    stacked operands; ``[..., L*n]`` or (``split``) one ``[..., n]`` per segment."""
    lead, K = x.shape[:-1], x.shape[-1]
    grad = torch.is_grad_enabled()
    keep_xa = grad and lora_B.requires_grad
    grad_a = grad and lora_A.requires_grad
    y = _TracedMergedLoRA.apply(x.reshape(-1, K), weight, lora_A, lora_B, bias, tuple(scales), keep_xa, grad_a,
                                grad_a and x.requires_grad).reshape(*lead, weight.shape[0])
    if not split:
        return y
    return split_columns(y, offsets) if len(offsets) > 2 else (y,)


# Which autograd Function runs the merged strategy: "auto" = the C++ one of the host extension
# clora_fast._host when it is built (csrc/merged_lora.cpp: the same ATen calls in the same order, so the
# same results bit for bit, without the Python Function's host time), else the Python one; "python" /
# "cpp" force one ("cpp" raises without the extension).  Initialised from CLORA_FAST_MERGED_IMPL; tests
# set the attribute.
MERGED_IMPL = os.environ.get("CLORA_FAST_MERGED_IMPL", "auto")
_CPP_MERGED: list = []          # [the extension's merged_lora or None], looked up on first use
# the calling convention of _host.merged_lora this Python code speaks (csrc/merged_lora.cpp's MERGED_ABI)
_MERGED_ABI = 3


def _cpp_merged():
    if not _CPP_MERGED:
        try:
            from . import _host
            fn = _host.merged_lora
            if getattr(_host, "MERGED_ABI", 1) != _MERGED_ABI:    # an extension built from older sources
                import warnings
                warnings.warn(f"clora_fast: the C++ host extension clora_fast._host ({_host.__file__}) was built from "
                              f"other sources than this Python code (calling convention "
                              f"{getattr(_host, 'MERGED_ABI', 1)}, expected {_MERGED_ABI}): using the Python "
                              f"Function; rebuild with `pip install --no-build-isolation -e .`", UserWarning,
                              stacklevel=3)
                fn = None
            _CPP_MERGED.append(fn)
        except (ImportError, AttributeError):      # not built (optional), or built against another torch
            _CPP_MERGED.append(None)
    return _CPP_MERGED[0]


def _ride_along(x, bias, lora_As, lora_Bs, scales, split):
    """What the merged Function's GEMMs carry in extra columns, decided once for both implementations:
    ``(keep_xa, padded bias or None, scale diagonal or None)``.

    ``keep_xa``: x @ A^T rides along in the forward GEMM (split outputs, B trains): it replaces L GEMMs of
    backward (one when A is stacked), each a read of x, at the cost of one copy of A and, with a bias, of its
    zero-padded copy (:func:`_xa_bias`; no padding, no ride).  The diagonal (x and A train, B stacked):
    dy_l @ s_l B_l rides along in the dx GEMMs (Z = blockdiag(s_l B_l) beside W_eff), which replaces L GEMMs of
    backward, each a read of dy_l, at the cost of one small elementwise product."""
    grad = torch.is_grad_enabled()
    keep_xa, padded, diag = grad and split and any(b.requires_grad for b in lora_Bs), None, None
    if keep_xa and bias is not None:
        padded = _xa_bias(bias, sum(a.shape[0] for a in lora_As), len(lora_As) == len(scales) > 1)
        keep_xa = padded is not None
    if grad and len(lora_Bs) == 1 and x.requires_grad and any(a.requires_grad for a in lora_As):
        diag = _scale_diag(scales, lora_Bs[0].dtype, lora_Bs[0].device)
    return keep_xa, padded, diag


def _merged(x, weights, lora_As, lora_Bs, bias, scales, split):
    """Run the merged-weight projection (x ``[..., K]``; each of weights / lora_As / lora_Bs a
    sequence of one stacked tensor or of one tensor per segment) through the Function MERGED_IMPL picks."""
    if MERGED_IMPL not in ("auto", "python", "cpp"):
        raise ValueError(f"clora_fast.ops.MERGED_IMPL must be 'auto', 'python' or 'cpp', got {MERGED_IMPL!r}")
    fn = _cpp_merged() if MERGED_IMPL != "python" else None
    keep_xa, padded, diag = _ride_along(x, bias, lora_As, lora_Bs, scales, split)
    if fn is not None:      # (it derives keep_xa from the same inputs: the same decision, tested bit for bit)
        outs = fn(x, list(weights), list(lora_As), list(lora_Bs), bias, padded, diag, [float(v) for v in scales],
                  split, torch.is_grad_enabled())
        return tuple(outs) if split else outs[0]
    if MERGED_IMPL == "cpp":
        raise RuntimeError("clora_fast.ops.MERGED_IMPL='cpp' needs the C++ extension clora_fast._host, which is "
                           "not built here: reinstall with `pip install --no-build-isolation -e .` (it builds by "
                           "default; CLORA_FAST_BUILD_HOST=1 makes a failed build an error)")
    return _MergedLoRAFunction.apply(x, bias, padded, diag, tuple(scales), split, keep_xa, len(weights), len(lora_As),
                                     *weights, *lora_As, *lora_Bs)


_STRATEGIES = ("auto", "fused", "merged")
_TRITON_MAX_RANK = 128          # kernels/lora_projection.py pads the rank to a power of two <= 128


@torch.compiler.assume_constant_result
def _forced_strategy() -> str:
    """``CLORA_FAST_STRATEGY`` (read per call; a constant inside a torch.compile graph: torch 2.4's dynamo
    cannot trace ``os.environ.get`` of an unset variable)."""
    return os.environ.get("CLORA_FAST_STRATEGY", "")


# Inside a torch.compile trace "auto" takes the merged strategy only from this many rows of x (tokens x batch)
# up.  A compiled graph (CUDA graphs with mode="reduce-overhead") removes the host time per launch that makes
# "merged" the eager choice at every size, which leaves GPU time, and there the fused kernels win at few rows:
# H100, bf16, r=16, one layer's K/V fwd+bwd (benchmarks/RESULTS.md, runs B and D), fused vs merged kernels
# 0.036 vs 0.042 ms at 77 rows (out 320), 0.043 vs 0.047 at 154 (out 640), 0.040 vs 0.094 at 77 (out 1280),
# but 0.084 vs 0.062 at 616 (out 1280) and 0.371 vs 0.192 / 0.714 vs 0.328 at 12608 / 25216 (ViT-B/16).
TRACED_MERGED_MIN_ROWS = 384


def _pick_strategy(strategy: str, backend: str, device: torch.device, equal: bool, offsets=None,
                   rows: Optional[int] = None) -> str:
    """The projection strategy for a call (``equal``: all segments have one size; ``rows``: x's rows when
    compiling, which "auto" then weighs by :data:`TRACED_MERGED_MIN_ROWS`, else None)."""
    if strategy not in _STRATEGIES:
        raise ValueError(f"strategy must be one of {_STRATEGIES}, got {strategy!r}")
    if strategy == "merged" and not equal:
        raise ValueError(f"strategy='merged' needs segments of one size, got seg_offsets {list(offsets)}")
    if strategy != "auto":
        return strategy
    forced = _forced_strategy()
    if forced in ("fused", "merged"):           # tests and experiments: override "auto" process-wide
        return "merged" if forced == "merged" and equal else "fused"
    if equal and backend != "reference" and device.type == "cuda" and (rows is None
                                                                      or rows >= TRACED_MERGED_MIN_ROWS):
        return "merged"
    return "fused"


# (offsets, n_rows) -> (all segments equal, the checked tuple of python ints); a hit counts only when the
# caller's tuple is that very object or all ints: (0, 20.0, 40) and (0, True, 2) hash and compare equal to
# int tuples.  A controller passes the same tuple object every call: the hot paths test identity only.
_OFFSETS_OK: dict = {}


def _all_ints(offsets: tuple) -> bool:
    """Whether every entry is a python ``int`` (the cheap test of the hot paths; bool is not int here)."""
    for o in offsets:
        if type(o) is not int:
            return False
    return True


def _int_offsets(name: str, offsets) -> Tuple[int, ...]:
    """``offsets`` as a tuple of python ints.  Integers only (numbers.Integral: numpy integers too): a
    float such as 20.7 would otherwise be truncated to 20 silently, and a bool or a tensor is a bug."""
    out = []
    for o in offsets:
        if type(o) is not int:
            if isinstance(o, bool) or not isinstance(o, numbers.Integral):
                raise ValueError(f"{name} must hold integers, got {o!r} ({type(o).__name__}) in "
                                 f"{list(offsets)!r:.200}")
            o = int(o)
        out.append(o)
    return tuple(out)


def _known_offsets(offsets: tuple, n_rows: int) -> Optional[bool]:
    """Whether all segments of the already checked ``offsets`` have one size; None when they were not checked
    (or only an equal tuple of non-ints was: (0, 20.0, 40) must go through the check)."""
    hit = _OFFSETS_OK.get((offsets, n_rows))
    if hit is not None and (hit[1] is offsets or _all_ints(offsets)):
        return hit[0]
    return None


def _check_offsets(seg_offsets, n_rows: int) -> Tuple[Tuple[int, ...], bool]:
    """``seg_offsets`` as a tuple of ints, checked against ``weight.shape[0] = n_rows``, and whether all
    segments have one size.  Valid tuples are remembered (a controller passes the same ones every call)."""
    offsets = seg_offsets if type(seg_offsets) is tuple else tuple(seg_offsets)
    equal = _known_offsets(offsets, n_rows)
    if equal is not None:
        return offsets, equal
    # unseen, or equal to a checked tuple without being all ints: check (refuse or convert)
    offsets = _int_offsets("seg_offsets", offsets)
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != n_rows or any(
            b <= a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"seg_offsets must be strictly increasing from 0 to weight.shape[0]={n_rows}, "
                         f"got {list(offsets)}")
    equal = len({b - a for a, b in zip(offsets, offsets[1:])}) == 1
    if not _compiling():        # (in a trace a write would be a side effect: one a checkpoint region refuses)
        if len(_OFFSETS_OK) > 1024:
            _OFFSETS_OK.clear()
        _OFFSETS_OK[(offsets, n_rows)] = (equal, offsets)
    return offsets, equal


# ---------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------

def _autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """The dtype torch.autocast casts linear layers' inputs to on ``device``, or None when it is off there."""
    dev = device.type
    if dev not in ("cuda", "cpu"):
        return None
    if hasattr(torch, "get_autocast_dtype"):
        return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    else:  # pragma: no cover - torch < 2.4
        if not (torch.is_autocast_enabled() if dev == "cuda" else torch.is_autocast_cpu_enabled()):
            return None
        return torch.get_autocast_gpu_dtype() if dev == "cuda" else torch.get_autocast_cpu_dtype()


def _autocast(device: torch.device, *tensors):
    """Apply torch.autocast's rule for linear layers: cast float inputs to the autocast dtype."""
    dt = _autocast_dtype(device)
    if dt is None:
        return tensors
    return tuple(t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                 for t in tensors)


_HALF = (torch.float16, torch.bfloat16)


def _master_dtypes(factor: torch.dtype, dt: torch.dtype) -> bool:
    """A factor of dtype ``factor`` in a call computing in ``dt`` is a float32 master of a half-precision call:
    the mixed-precision training layout, computed in ``dt`` with float32 gradients."""
    return factor == torch.float32 and dt in _HALF


def _master(name: str, t: Optional[Tensor], dt: torch.dtype) -> bool:
    """Whether ``t`` is a LoRA factor that is a float32 master (:func:`_master_dtypes`) for a call computing in
    ``dt`` (the dtype of x after autocast)."""
    return t is not None and name.startswith("lora_") and _master_dtypes(t.dtype, dt)


def _prepare(named, backend: str):
    """The checks every projection entry shares, on ``named = [(name, tensor or None), ...]``
    (x first): one device, the concrete backend, torch.autocast's cast for linear layers, one
    dtype (except float32 LoRA factors of a float16 / bfloat16 call, :func:`_master`: kept as they are,
    autocast or not), a dtype the backend supports.  Returns ``(backend, cast tensors)``."""
    x = named[0][1]
    dev = x.device
    for _, t in named:
        if t is not None and t.device != dev:
            check_same_device(named)                        # raises, naming the tensors
    cast = _autocast(dev, *(t for _, t in named))
    dt = cast[0].dtype
    tensors = tuple(t if _master(n, t, dt) else c for (n, t), c in zip(named, cast))
    for (n, _), t in zip(named, tensors):
        if t is not None and t.dtype != dt and not _master(n, t, dt):
            check_same_dtype([(n, t) for (n, _), t in zip(named, tensors)])     # raises
    backend = resolve_backend(backend, dev, dt)
    check_dtype_for_backend(named[0][0], tensors[0], backend)
    return backend, tensors


def segmented_lora_projection(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                              seg_offsets: Sequence[int], scales: Union[float, Sequence[float]], *,
                              bias: Optional[Tensor] = None, backend: str = "auto",
                              strategy: str = "auto", split: bool = False) -> Union[Tensor, Tuple[Tensor, ...]]:
    """L LoRA projections of the same input in one launch.

    ``weight [N, in]`` stacks the layers' (folded) weights by rows; layer ``l`` owns
    output columns ``seg_offsets[l]:seg_offsets[l+1]``, rows ``l*r:(l+1)*r`` of
    ``lora_A [L*r, in]`` and the same rows of ``lora_B [N, r]`` as ``weight``.
    Returns ``[..., N]``; split it with views per segment.

    ``strategy``: ``"fused"`` runs the backend's segmented kernels (one forward launch);
    ``"merged"`` folds ``s_l * B_l @ A_l`` into the weight for the call and runs the
    dense products as library GEMMs (equal segments only; any backend and device);
    ``"auto"`` (default) picks ``"merged"`` for the triton and cuda backends on CUDA
    tensors when all segments have one size, else ``"fused"``; inside a ``torch.compile`` trace
    only from ``TRACED_MERGED_MIN_ROWS`` rows of x up (the environment variable
    ``CLORA_FAST_STRATEGY=fused|merged`` overrides "auto", e.g. to compare the two).

    ``split=True`` returns one ``[..., n_l]`` output per segment (views) whose gradients are
    gathered without autograd's per-slice zero-filled ``[..., N]`` gradients (see
    :func:`split_columns`): use it when the segments feed different layers.

    Dtypes: one of float32 / float16 / bfloat16 for all, except that ``lora_A`` / ``lora_B`` may be
    float32 when x and the weight are float16 / bfloat16 (mixed-precision training's float32 masters;
    autocast leaves them float32 too): the products run in x's dtype, the factors' gradients come back in
    float32, and the merged strategy rounds the factors where it writes them anyway (no cast launches).
    """
    return _segmented(x, weight, lora_A, lora_B, seg_offsets, scales, bias, backend, strategy, split=split)


def _segmented(x, weight, lora_A, lora_B, seg_offsets, scales, bias, backend, strategy, split):
    """Validated segmented projection: ``[..., N]``, or (``split``) one ``[..., n_l]`` view per segment."""
    out = _segmented_fast(x, weight, lora_A, lora_B, seg_offsets, scales, bias, backend, strategy, split)
    if out is not None:
        return out
    check_tensor("x", x)
    check_tensor("weight", weight, ndim=2)
    check_tensor("lora_A", lora_A, ndim=2)
    check_tensor("lora_B", lora_B, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension [..., in], got a 0-dim tensor")
    offsets, equal = _check_offsets(seg_offsets, weight.shape[0])
    L = len(offsets) - 1
    if isinstance(scales, (numbers.Real, Tensor)):
        scales = [check_scale("scales[0]", scales)] * L
    else:
        scales = [check_scale(f"scales[{i}]", s) for i, s in enumerate(scales)]
    if len(scales) != L:
        raise ValueError(f"scales has {len(scales)} entries but seg_offsets defines {L} segments")
    if lora_A.shape[0] == 0:
        raise ValueError(f"lora_A has rank 0 (shape {tuple(lora_A.shape)}); the rank must be >= 1")
    if lora_A.shape[0] % L != 0:
        raise ValueError(f"lora_A must have shape [L*r, in] = [{L}*r, in] for {L} segments, "
                         f"got {tuple(lora_A.shape)}")
    r = lora_A.shape[0] // L
    check_lora_shapes(x.shape[-1], weight, lora_A, lora_B, bias, rank=r)
    backend, (x, weight, lora_A, lora_B, bias) = _prepare(
        [("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)], backend)
    compiling = _compiling()
    # (in a trace "auto" weighs x's rows, unless the rank is one only the merged strategy serves)
    strategy = _pick_strategy(strategy, backend, x.device, equal, offsets,
                              rows=math.prod(x.shape[:-1]) if compiling and r <= _TRITON_MAX_RANK else None)
    if backend == "triton" and strategy == "fused" and r > _TRITON_MAX_RANK:
        raise ValueError(f"lora_A has rank {r}, above the {_TRITON_MAX_RANK} the fused Triton projection kernels "
                         f"support; use strategy='merged' (equal segments) or backend='reference'")
    if strategy == "merged":
        if compiling:
            return _traced_merged(x, weight, lora_A, lora_B, bias, offsets, scales, split)
        return _merged(x, [weight], [lora_A], [lora_B], bias, scales, split)
    # float32 master factors: the kernels and the reference take one dtype
    lora_A, lora_B = lora_A.to(x.dtype), lora_B.to(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    if compiling:
        y, _ = _segmented_lora_op(x2, weight, lora_A, lora_B, bias, offsets, scales, backend)
    else:
        y = _SegmentedLoRAFunction.apply(x2, weight, lora_A, lora_B, bias, offsets, scales, backend)
    y = y.reshape(*lead, weight.shape[0])
    if split:
        return split_columns(y, offsets) if L > 1 else (y,)
    return y


def lora_projection(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, *, scale: float = 1.0,
                    bias: Optional[Tensor] = None, backend: str = "auto", strategy: str = "auto") -> Tensor:
    """``y = x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T (+ bias)``.

    x ``[..., in]``, weight ``[out, in]`` (frozen; the past adapters already folded in),
    lora_A ``[r, in]``, lora_B ``[out, r]``, bias ``[out]``. Returns ``[..., out]``.
    Gradients flow to x, lora_A, lora_B, bias (and weight if it requires grad).
    ``strategy``: see :func:`segmented_lora_projection`.
    """
    check_tensor("weight", weight, ndim=2)
    if type(scale) is not float:
        scale = check_scale("scale", scale)
    return segmented_lora_projection(x, weight, lora_A, lora_B, (0, weight.shape[0]), [scale],
                                     bias=bias, backend=backend, strategy=strategy)


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling())


def _adjacent_rows(a: Tensor, b: Tensor) -> bool:
    """True when ``b`` directly follows ``a`` in memory, so ``cat([a, b])`` is a free view."""
    # row stride == row length checked explicitly: is_contiguous() ignores the stride of a size-1 dimension
    # (a [1, K] view with stride (1, 1) is "contiguous", and as_strided with its strides would read wrong rows)
    return (a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1] and a.dtype == b.dtype
            and a.device == b.device and a.is_contiguous() and b.is_contiguous()
            and a.stride() == (a.shape[1], 1) and b.stride() == (b.shape[1], 1)
            and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + a.numel() * a.element_size())


def _pair(name: str, v) -> tuple:
    if not isinstance(v, (tuple, list)) or len(v) != 2:
        raise TypeError(f"{name} must be a pair (k, v), got {type(v).__name__}"
                        + (f" of length {len(v)}" if isinstance(v, (tuple, list)) else ""))
    return tuple(v)


# Fast paths: the common call of a training loop passes every check trivially.  One run of plain
# comparisons decides that (the per-argument checks cost more host time than the launches at small
# shapes); anything else - autocast, compilation, the fused strategy, float64, a first call with new
# seg_offsets, bad input - goes through the checked path, which also names what is wrong.

_FAST_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _all_2d_like(tensors, dt: torch.dtype, dev: torch.device) -> bool:
    for t in tensors:
        if not isinstance(t, Tensor) or t.dim() != 2 or t.dtype != dt or t.device != dev:
            return False
    return True


def _factors_like(tensors, dt: torch.dtype, dev: torch.device) -> bool:
    """LoRA factors of a call computing in ``dt``: 2-D, on ``dev``, in ``dt`` or float32 masters (:func:`_master`)."""
    for t in tensors:
        if (not isinstance(t, Tensor) or t.dim() != 2 or t.device != dev
                or (t.dtype != dt and not _master_dtypes(t.dtype, dt))):
            return False
    return True


def _fast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype a fast-path call computes in: x's, or under autocast the autocast dtype (x is then cast as
    :func:`_autocast` would); None for the checked path (x of another dtype, or an autocast dtype it does not
    know)."""
    if x.dtype not in _FAST_DTYPES:
        return None
    dt = _autocast_dtype(x.device)
    if dt is None:
        return x.dtype
    return dt if dt in _FAST_DTYPES else None


def _merged_applies(dev: torch.device, backend: str, strategy: str, dtype: torch.dtype) -> bool:
    """The call (equal segments) takes the merged strategy: not compiling, and :func:`_pick_strategy` picks
    "merged" (an unknown backend or strategy raises the checked path's error)."""
    if _compiling():
        return False
    return _pick_strategy(strategy, resolve_backend(backend, dev, dtype), dev, True) == "merged"


def _kv_fast(x, weights, lora_As, lora_Bs, scale, biases, backend, strategy):
    """:func:`lora_kv_projection` through the merged strategy when every check passes trivially, else None."""
    if (type(weights) not in (tuple, list) or type(lora_As) not in (tuple, list) or type(lora_Bs) not in (tuple, list)
            or len(weights) != 2 or len(lora_As) != 2 or len(lora_Bs) != 2 or type(scale) not in (float, int)
            or not isinstance(x, Tensor) or x.dim() == 0 or _fast_dtype(x) != x.dtype
            or not _all_2d_like(weights, x.dtype, x.device)
            or not _factors_like((*lora_As, *lora_Bs), x.dtype, x.device)
            or lora_As[0].dtype != lora_As[1].dtype or lora_Bs[0].dtype != lora_Bs[1].dtype):
        return None
    (w_k, w_v), (a_k, a_v), (b_k, b_v) = weights, lora_As, lora_Bs
    n, r, K = w_k.shape[0], a_k.shape[0], x.shape[-1]
    if (r < 1 or w_k.shape[1] != K or w_v.shape != w_k.shape or a_k.shape[1] != K or a_v.shape != a_k.shape
            or b_k.shape != (n, r) or b_v.shape != (n, r)):
        return None
    if biases is not None:
        if type(biases) not in (tuple, list) or len(biases) != 2:
            return None
        for t in biases:
            if not isinstance(t, Tensor) or t.shape != (n,) or t.dtype != x.dtype or t.device != x.device:
                return None
    if not _merged_applies(x.device, backend, strategy, x.dtype):
        return None
    bias = None if biases is None else torch.cat(biases)     # only once the fast path is taken
    s = float(scale)
    return _merged(x, (w_k, w_v), (a_k, a_v), (b_k, b_v), bias, (s, s), True)


def _segmented_fast(x, weight, lora_A, lora_B, seg_offsets, scales, bias, backend, strategy, split):
    """:func:`segmented_lora_projection` (a controller's call) through the merged strategy when every check
    passes trivially and ``seg_offsets`` was checked before (equal segments), else None."""
    if not isinstance(x, Tensor) or x.dim() == 0 or type(seg_offsets) is not tuple:
        return None
    dt = _fast_dtype(x)               # under autocast: the weight and bias come cast (a controller's are)
    if (dt is None or not _all_2d_like((weight,), dt, x.device)
            or not _factors_like((lora_A, lora_B), dt, x.device)):
        return None
    N, K = weight.shape
    if not _known_offsets(seg_offsets, N):
        return None                # unseen (checked path first), unequal segments, or 20.0 equal to 20
    L = len(seg_offsets) - 1
    r = lora_A.shape[0] // L
    if r < 1 or lora_A.shape != (L * r, K) or lora_B.shape != (N, r) or x.shape[-1] != K:
        return None
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (N,) or bias.dtype != dt
                             or bias.device != x.device):
        return None
    if type(scales) in (float, int):
        scales = (float(scales),) * L
    elif type(scales) in (tuple, list) and len(scales) == L and all(type(v) in (float, int) for v in scales):
        scales = tuple(float(v) for v in scales)
    else:
        return None
    if not _merged_applies(x.device, backend, strategy, dt):
        return None
    if x.dtype != dt:
        x = x.to(dt)                  # autocast's cast of the input of a linear layer
    return _merged(x, [weight], [lora_A], [lora_B], bias, scales, split)


def lora_kv_projection(x: Tensor, weights, lora_As, lora_Bs, *, scale: float = 1.0, biases=None,
                       backend: str = "auto", strategy: str = "auto") -> Tuple[Tensor, Tensor]:
    """K and V of one attention layer from one read of ``x``, in one launch.

    ``weights = (w_k [out_k, in], w_v [out_v, in])``, ``lora_As = (a_k [r, in], a_v [r, in])``,
    ``lora_Bs = (b_k [out_k, r], b_v [out_v, r])``, optional ``biases = (b_k, b_v)``.
    When ``w_v`` directly follows ``w_k`` in memory (e.g. timm's fused qkv rows)
    the stacked weight is a view; otherwise it is concatenated per call.
    ``strategy``: see :func:`segmented_lora_projection` (K and V of equal width take
    the merged-weight GEMMs on CUDA by default).
    """
    out = _kv_fast(x, weights, lora_As, lora_Bs, scale, biases, backend, strategy)
    if out is not None:
        return out
    w_k, w_v = _pair("weights", weights)
    a_k, a_v = _pair("lora_As", lora_As)
    b_k, b_v = _pair("lora_Bs", lora_Bs)
    for name, t in (("weights[0]", w_k), ("weights[1]", w_v), ("lora_As[0]", a_k), ("lora_As[1]", a_v),
                    ("lora_Bs[0]", b_k), ("lora_Bs[1]", b_v)):
        check_tensor(name, t, ndim=2)
    check_tensor("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least 1 dimension [..., in], got a 0-dim tensor")
    if a_k.shape[0] != a_v.shape[0]:
        raise ValueError(f"lora_As[0] and lora_As[1] must have the same rank, got {tuple(a_k.shape)} and "
                         f"{tuple(a_v.shape)}")
    check_lora_shapes(x.shape[-1], w_k, a_k, b_k, None, "[0] (K)")
    check_lora_shapes(x.shape[-1], w_v, a_v, b_v, None, "[1] (V)")
    named = [("x", x), ("weights[0]", w_k), ("weights[1]", w_v), ("lora_As[0]", a_k), ("lora_As[1]", a_v),
             ("lora_Bs[0]", b_k), ("lora_Bs[1]", b_v)]
    bias = None
    if biases is not None:
        bk, bv = _pair("biases", biases)
        check_tensor("biases[0]", bk, ndim=1)
        check_tensor("biases[1]", bv, ndim=1)
        if bk.shape[0] != w_k.shape[0] or bv.shape[0] != w_v.shape[0]:
            raise ValueError(f"biases must have shapes [{w_k.shape[0]}] and [{w_v.shape[0]}], got "
                             f"{tuple(bk.shape)} and {tuple(bv.shape)}")
        named += [("biases[0]", bk), ("biases[1]", bv)]
    # K and V are concatenated below: check them pairwise first (torch.cat would promote mixed dtypes
    # silently and name no argument for a device mismatch)
    check_same_device(named)
    for i in range(1, len(named), 2):
        check_same_dtype(named[i:i + 2])
    if biases is not None:
        bias = torch.cat([bk, bv])
    if w_k.shape[0] == w_v.shape[0] and not _compiling():
        # the merged strategy takes K and V as they are: no concatenated weight or factors at all
        if _pick_strategy(strategy, resolve_backend(backend, x.device, x.dtype), x.device, True) == "merged":
            _, (x, w_k, w_v, a_k, a_v, b_k, b_v, bias) = _prepare(
                [("x", x), ("weights[0]", w_k), ("weights[1]", w_v), ("lora_As[0]", a_k), ("lora_As[1]", a_v),
                 ("lora_Bs[0]", b_k), ("lora_Bs[1]", b_v), ("biases", bias)], backend)
            scale = check_scale("scale", scale)
            return _merged(x, (w_k, w_v), (a_k, a_v), (b_k, b_v), bias, (scale, scale), True)
    if (not _compiling() and not (w_k.requires_grad or w_v.requires_grad) and _adjacent_rows(w_k, w_v)):
        weight = w_k.as_strided((w_k.shape[0] + w_v.shape[0], w_k.shape[1]), w_k.stride())
    else:
        weight = torch.cat([w_k, w_v])
    k, v = _segmented(x, weight, torch.cat([a_k, a_v]), torch.cat([b_k, b_v]), (0, w_k.shape[0], weight.shape[0]),
                      [scale, scale], bias, backend, strategy, split=True)
    return k, v


def _check_penalty_args(past, lora_A, lora_B, suffix=""):
    check_tensor(f"past{suffix}", past, ndim=2)
    check_tensor(f"lora_A{suffix}", lora_A, ndim=2)
    check_tensor(f"lora_B{suffix}", lora_B, ndim=2)
    out_f, in_f = past.shape
    r = lora_A.shape[0]
    if r < 1:
        raise ValueError(f"lora_A{suffix} has rank 0 (shape {tuple(lora_A.shape)}); the rank must be >= 1")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A{suffix} must have shape [r, in] = [r, {in_f}] to match past{suffix} "
                         f"{tuple(past.shape)}, got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B{suffix} must have shape [out, r] = [{out_f}, {r}] to match past{suffix} "
                         f"{tuple(past.shape)} and lora_A{suffix} {tuple(lora_A.shape)}, got {tuple(lora_B.shape)}")
    check_same_device([(f"past{suffix}", past), (f"lora_A{suffix}", lora_A), (f"lora_B{suffix}", lora_B)])
    check_same_dtype([(f"lora_A{suffix}", lora_A), (f"lora_B{suffix}", lora_B)])


def _layer_scales(scales, n: int):
    """``scales`` of the grouped penalties: one number (or 1-element tensor) for every layer, or one per layer."""
    if isinstance(scales, (numbers.Real, Tensor)):
        scales = [scales] * n
    if len(scales) != n:
        raise ValueError(f"scales has {len(scales)} entries for {n} layers")
    return scales


def _check_rows_disjoint(layout, pasts) -> None:
    """Every layer of a packed layout owns its rows of the flat buffers (its gradient is written there)."""
    hit = layout_overlap(layout, pasts)
    if hit is not None:
        role, f, first, second = hit
        lo, hi = sorted((first[2], second[2]))
        raise ValueError(f"layout[{lo}] and layout[{hi}] share row {second[0]} of {role}[{f}]; "
                         f"every layer needs rows of its own")


def _penalty_backend(backend: str, pasts, roles) -> str:
    """Checks shared by the grouped penalties: one device for everything, one dtype per role
    (``pasts`` and each ``(name, tensors)`` of ``roles``), dtypes the backend supports; returns the
    resolved backend."""
    named = {"pasts": [(f"pasts[{i}]", p) for i, p in enumerate(pasts)]}
    for name, ts in roles:
        named[name] = [(f"{name}[{i}]", t) for i, t in enumerate(ts)]
    check_same_device([nt for group in named.values() for nt in group])
    for group in named.values():
        check_same_dtype(group)
    name, ts = roles[0]
    resolved = resolve_backend(backend, pasts[0].device, pasts[0].dtype, ts[0].dtype)
    check_dtype_for_backend("pasts[0]", pasts[0], resolved)
    check_dtype_for_backend(f"{name}[0]", ts[0], resolved)
    return resolved


def forgetting_penalty(past: Tensor, lora_A: Tensor, lora_B: Tensor, *, scale: float = 1.0,
                       backend: str = "auto") -> Tensor:
    """``sum((past * (scale * lora_B @ lora_A)) ** 2)`` as a 0-dim float32 tensor.

    past ``[out, in]`` (frozen: no gradient), lora_A ``[r, in]``, lora_B ``[out, r]``.
    ``past`` may have another dtype than the factors (e.g. fp32 past, bf16 factors).
    """
    _check_penalty_args(past, lora_A, lora_B)
    scale = check_scale("scale", scale)
    backend = resolve_backend(backend, past.device, past.dtype, lora_A.dtype)
    for n, t in (("past", past), ("lora_A", lora_A)):
        check_dtype_for_backend(n, t, backend)
    if _compiling():
        return _penalty_op(past, lora_A, lora_B, scale, backend)[0]
    return _PenaltyFunction.apply(past, lora_A, lora_B, scale, backend)


def grouped_forgetting_penalty(pasts: Sequence[Tensor], lora_As: Sequence[Tensor], lora_Bs: Sequence[Tensor], *,
                               scales: Union[float, Sequence[float]] = 1.0, backend: str = "auto") -> Tensor:
    """Sum of :func:`forgetting_penalty` over many layers of different shapes, in one launch."""
    for name, seq in (("pasts", pasts), ("lora_As", lora_As), ("lora_Bs", lora_Bs)):
        if not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple of tensors, got {type(seq).__name__}")
    n = len(pasts)
    if n == 0:
        raise ValueError("pasts is empty: the grouped penalty needs at least one layer")
    if len(lora_As) != n or len(lora_Bs) != n:
        raise ValueError(f"pasts, lora_As and lora_Bs must have the same length, got {n}, {len(lora_As)}, "
                         f"{len(lora_Bs)}")
    scales = [check_scale(f"scales[{i}]", s) for i, s in enumerate(_layer_scales(scales, n))]
    for i in range(n):
        _check_penalty_args(pasts[i], lora_As[i], lora_Bs[i], f"s[{i}]")
    backend = _penalty_backend(backend, pasts, [("lora_As", lora_As)])
    if _compiling():
        return _grouped_penalty_op(list(pasts), list(lora_As), list(lora_Bs), scales, backend)[0]
    return _GroupedPenaltyFunction.apply(scales, backend, n, *pasts, *lora_As, *lora_Bs)


_PACKED_CHECKED: dict = {}


def _packed_structure(pasts, flat_As, flat_Bs, layout, scales):
    """The cheap structural checks of the packed penalty (``flat_As = flat_Bs = None``: not known
    yet); returns ``(layout as int tuples, scales list)``."""
    for name, seq in (("pasts", pasts), ("flat_As", flat_As), ("flat_Bs", flat_Bs), ("layout", layout)):
        if seq is not None and not isinstance(seq, (list, tuple)):
            raise TypeError(f"{name} must be a list or tuple, got {type(seq).__name__}")
    n = len(pasts)
    if n == 0:
        raise ValueError("pasts is empty: the grouped penalty needs at least one layer")
    if flat_As is not None and (len(flat_As) != len(flat_Bs) or not flat_As):
        raise ValueError(f"flat_As and flat_Bs must be non-empty and of one length, got {len(flat_As)} and "
                         f"{len(flat_Bs)}")
    if len(layout) != n:
        raise ValueError(f"layout has {len(layout)} entries for {n} pasts")
    return tuple(tuple(int(v) for v in e) for e in layout), _layer_scales(scales, n)


def _validate_packed(pasts, flat_As, flat_Bs, layout, backend: str) -> str:
    """Every per-layer check of the packed penalty (shapes, rows in range and disjoint, contiguous
    flat buffers, devices, dtypes); returns the resolved backend."""
    for l, e in enumerate(layout):
        if len(e) != 4:
            raise ValueError(f"layout[{l}] must be (flat index, A row, B row, rank), got {e}")
        f, a, b, r = e
        if not 0 <= f < len(flat_As):
            raise ValueError(f"layout[{l}] = {e} names flat buffer {f}; there are {len(flat_As)}")
        for nm, t in ((f"flat_As[{f}]", flat_As[f]), (f"flat_Bs[{f}]", flat_Bs[f])):
            check_tensor(nm, t, ndim=2)
            if not t.is_contiguous():
                raise ValueError(f"{nm} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
        if r < 1 or a < 0 or a + r > flat_As[f].shape[0] or b < 0 or b + pasts[l].shape[0] > flat_Bs[f].shape[0]:
            raise ValueError(f"layout[{l}] = {e}: rows out of range of flat_As[{f}] {tuple(flat_As[f].shape)} / "
                             f"flat_Bs[{f}] {tuple(flat_Bs[f].shape)} for past {tuple(pasts[l].shape)}")
        _check_penalty_args(pasts[l], flat_As[f][a:a + r], flat_Bs[f][b:b + pasts[l].shape[0]], f"s[{l}]")
    _check_rows_disjoint(layout, pasts)
    return _penalty_backend(backend, pasts, [("flat_As", flat_As), ("flat_Bs", flat_Bs)])


def _packed_call(pasts, flat_As, flat_Bs, layout, scales, resolved, prepared=None) -> Tensor:
    if _compiling():
        As = [flat_As[f][a:a + r] for f, a, _, r in layout]
        Bs = [flat_Bs[f][b:b + p.shape[0]] for (f, _, b, _), p in zip(layout, pasts)]
        return _grouped_penalty_op(list(pasts), As, Bs, list(scales), resolved)[0]
    return _PackedPenaltyFunction.apply(list(pasts), layout, scales, resolved, prepared, len(flat_As),
                                        *flat_As, *flat_Bs)


def packed_forgetting_penalty(pasts: Sequence[Tensor], flat_As: Sequence[Tensor], flat_Bs: Sequence[Tensor],
                              layout: Sequence[Tuple[int, int, int, int]], *,
                              scales: Union[float, Sequence[float]] = 1.0, backend: str = "auto") -> Tensor:
    """:func:`grouped_forgetting_penalty` with the factors packed by rows in flat buffers.

    Layer ``l`` with ``layout[l] = (f, a_row, b_row, r)`` uses ``A_l = flat_As[f][a_row:a_row+r]``
    ``[r, in_l]`` and ``B_l = flat_Bs[f][b_row:b_row+out_l]`` ``[out_l, r]``; ``pasts[l]``
    is ``[out_l, in_l]``.  Gradients flow to the flat buffers as wholes (one fp32 buffer
    each, zero on rows no layer uses), so a controller whose parameters are the flat
    buffers pays no per-layer view, gradient cast or accumulation: on the triton backend
    one call is one kernel launch plus a few allocations.  Validation runs once per
    distinct (layout, shapes, dtypes, devices).  For fixed pasts, layout and scales called
    every step (a training loop), :class:`PackedForgettingPenalty` skips even that lookup.
    """
    layout, scales = _packed_structure(pasts, flat_As, flat_Bs, layout, scales)
    key = (layout, interpreting(), tuple((p.shape, p.dtype, p.device) for p in pasts),
           tuple((t.shape, t.dtype, t.device, t.is_contiguous()) for t in (*flat_As, *flat_Bs)), backend)
    resolved = _PACKED_CHECKED.get(key)
    if resolved is None:
        resolved = _validate_packed(pasts, flat_As, flat_Bs, layout, backend)
        if len(_PACKED_CHECKED) > 256:
            _PACKED_CHECKED.clear()
        _PACKED_CHECKED[key] = resolved
    scales = tuple(check_scale(f"scales[{i}]", s) for i, s in enumerate(scales))
    return _packed_call(pasts, flat_As, flat_Bs, layout, scales, resolved)


class PackedForgettingPenalty:
    """:func:`packed_forgetting_penalty` for fixed ``pasts``, ``layout`` and ``scales``, e.g. a
    controller's state while one concept trains: ``pen = PackedForgettingPenalty(pasts, layout,
    scales=s)`` once, then ``loss = pen(flat_As, flat_Bs)`` every step.

    The pasts, layout and scales are checked once; every per-layer check runs again only when the
    flat buffers' shapes, dtypes, devices or contiguity change (a call compares one signature per
    flat buffer), and the Triton launcher keeps its tables here instead of looking them up by a key
    over all layers.  The pasts are held (not copied): change them in place only, never reassign
    their storage, or build a new object.  Same values and gradients as the function.
    """

    def __init__(self, pasts: Sequence[Tensor], layout: Sequence[Tuple[int, int, int, int]], *,
                 scales: Union[float, Sequence[float]] = 1.0, backend: str = "auto"):
        if not isinstance(pasts, (list, tuple)):
            raise TypeError(f"pasts must be a list or tuple, got {type(pasts).__name__}")
        for i, p in enumerate(pasts):
            check_tensor(f"pasts[{i}]", p, ndim=2)
        self.pasts = list(pasts)
        self.layout, scales = _packed_structure(self.pasts, None, None, layout, scales)
        self.scales = tuple(check_scale(f"scales[{i}]", s) for i, s in enumerate(scales))
        self.backend = backend
        self._sig = None
        self._resolved: Optional[str] = None
        self._prepared: dict = {}

    def __call__(self, flat_As: Sequence[Tensor], flat_Bs: Sequence[Tensor]) -> Tensor:
        sig = (interpreting(), tuple((t.shape, t.dtype, t.device, t.is_contiguous()) if isinstance(t, Tensor)
                                     else None for t in (*flat_As, *flat_Bs)), len(flat_As))
        if sig != self._sig:
            _packed_structure(self.pasts, flat_As, flat_Bs, self.layout, self.scales)
            self._resolved = _validate_packed(self.pasts, flat_As, flat_Bs, self.layout, self.backend)
            self._sig = sig
            self._prepared.clear()
        return _packed_call(self.pasts, flat_As, flat_Bs, self.layout, self.scales, self._resolved, self._prepared)
