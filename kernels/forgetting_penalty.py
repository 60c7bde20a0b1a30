"""C-LoRA forgetting penalty and its gradients in one pass over ``past``: Triton kernels + launchers.

What it computes (contract: ``docs/ARCHITECTURE.md``)
-----------------------------------------------------
For each adapted layer ``l`` with frozen past ``P`` ``[out, in]`` (the folded
sum of earlier concepts' adapters), current factors ``A`` ``[r, in]``,
``B`` ``[out, r]`` and LoRA scale ``s``::

    M     = s * B @ A                    [out, in]   (never materialised: recomputed per tile)
    loss  = sum_ij P_ij^2 * M_ij^2       0-dim fp32
    G     = 2 * P^2 * M                  [out, in]   (registers only)
    dA    = s * B^T @ G                  [r, in]     fp32
    dB    = s * G @ A^T                  [out, r]    fp32

The grouped launcher sums ``loss`` over all layers and returns every layer's
``dA``/``dB``, with ONE launch for the whole model (the partial sums reduced
inside it; or a main and a reduce launch, ``fused_reduce=False``).  ``P`` is
read exactly once per call; nothing of size ``[out, in]`` is written.

Kernels
-------
``_penalty_main_kernel`` -- one program per (layer, row block, column chunk).
  The program loads ``B[rows, :]`` ``[BO, RP]`` once, then walks its column
  chunk in ``BI``-wide steps: load ``A[:, cols]`` ``[RP, BI]`` and the ``P``
  tile ``[BO, BI]``, ``M = s * B @ A`` (``tl.dot``), ``W = P^2 * M``,
  ``loss += sum(W * M)``, ``dB_acc += W @ A^T`` (``tl.dot``), and the
  column slice of ``dA`` from this row block, ``2s * B^T @ W`` ``[RP, BI]``
  (``tl.dot``), stored at once.  ``dB`` is complete for the row block when
  the chunk is the whole ``in`` dimension (the usual case) and is then stored
  straight into the output; otherwise it is a partial.

Partial sums (``_sum_partials``, in a fixed order): the per-row-block ``dA``
  partials ``[n_row_blocks, r, in]``, the per-column-chunk ``dB`` partials
  ``[n_col_chunks, out, r]`` (only when ``in`` was split) and the per-program
  loss partials.  By default (``fused_reduce``) the main kernel reduces them
  itself: the last program of a layer to finish (an ``acq_rel`` arrival
  counter per layer, self-resetting) sums that layer's partials, the last
  program of the grid sums the loss partials.  This saves a launch and the
  reduce kernel's own latency-bound time (24 us of 77 on the H100 run B,
  ``benchmarks/RESULTS.md``); the tail work per layer is at most
  ``n_row_blocks * r * in`` floats read from L2.  ``_penalty_reduce_kernel``
  (``fused_reduce=False``, and always when a layer has no program, i.e. an
  empty layer whose gradients are zeros) does the same sums in a second
  launch.  Both give the same bits.

Reduction choice: by default (``deterministic=True``) the per-row-block ``dA``
partials go through an fp32 workspace: ``n_row_blocks * r * in * 4`` bytes
written, then read once when they are summed, i.e. ``8 r / (BO * sizeof(P))``
extra bytes per byte of ``P`` *if* they reach HBM (``r = 16``, ``BO = 128``:
25 % for fp32 ``P``, 50 % for bf16).  ``P`` is loaded with
``eviction_policy="evict_first"`` so that the workspace (a few MB for a whole
UNet) tends to stay in L2 until it is reduced.  The result is
bit-identical from run to run.  ``deterministic=False`` instead adds the
``dA`` partials with fp32 atomics into one zeroed ``[r, in]`` slot per layer
(no per-row-block partials; the order of the additions, hence the last bits,
varies).  On the H100 (``benchmarks/RESULTS.md``, run B, with the separate
reduce kernel) the atomics were faster: 45 vs 64 us for main + reduce over
the 32 SD projections; the default stays bit-reproducible.  When a layer has a single
row block, ``dA`` is stored straight into the output either way; ``dB`` and
the loss never use atomics.

Grouping: offset tables for the inputs, a pointer table for the outputs
----------------------------------------------------------------------
All pasts must share one dtype, all ``A`` one dtype, all ``B`` one dtype
(ranks, shapes and strides may differ per layer; per-layer ranks are
supported, ``RP`` is the padded maximum rank).  The kernel receives the
first non-empty layer's tensors as base pointers and a cached int64 *layer
table* holding, per layer, the element offset of its tensors from those
bases, its shape, strides, workspace offsets and split counts; a cached int32
*tile table* maps program id -> (layer, row block, column chunk).  Offsets from a base pointer
(instead of raw pointers cast with ``.to(tl.pointer_type(...))``, which also
works, in the interpreter too) let the compiler prove 16-byte alignment
(``tl.multiple_of``) so ``P`` is read with 128-bit vector loads (checked by
compiling for sm_90: 16-byte ``cp.async``, see the tests).  Both tables
are built once per distinct (device, dtypes, data pointers, shapes, strides,
scales, block config) and cached (LRU), so a training step does no
host->device table build.  The outputs (per-layer ``dA``, ``dB`` and the
loss, separate tensors because a custom op's outputs may not alias each
other) are reached through a small int64 table of their data pointers, cached
per output address tuple (the caching allocator hands out the same blocks
step after step, provided nothing stays allocated in between: the tables live
in one pool per plan and stream, allocated once); a miss costs one pinned
non-blocking copy into the least recently used slot.

Precision
---------
``past``, ``A`` and ``B`` may have different dtypes in {fp32, fp16, bf16}
(e.g. bf16 past with fp32 factors); ``P`` is upcast to fp32 right after its
load and everything is accumulated in fp32.  The three products use
``tl.dot`` with the rank padded to ``RP >= 16`` (a power of two); the
operand precision (``input_precision``, chosen per call unless given):

- bf16 ``A`` and ``B`` -> ``"bf16"``: native bf16 tensor-core products (exact
  bf16 x bf16 products, fp32 accumulation); ``W = P^2 M`` is rounded to bf16
  for the two gradient products, as a bf16 autograd would round ``G``.
- fp16 ``A`` and ``B`` (or one fp16, one bf16) -> ``"tf32"`` on upcast
  operands: fp16/bf16 values are exact in TF32 and ``W`` keeps fp32 range
  (``P^2 M`` could overflow fp16).
- otherwise (an fp32 factor) -> follows PyTorch's float32 matmul setting: ``"ieee"`` (exact
  fp32 FMA) when torch's fp32 matmuls may not use TF32 (the default),
  ``"tf32"`` when they may (``torch.set_float32_matmul_precision("high")``,
  ``torch.backends.cuda.matmul.allow_tf32 = True`` or ``.fp32_precision =
  "tf32"``).  ``"tf32x3"`` on request.  Speed: the ``"ieee"`` path runs the
  products on the FMA units and is likely compute-bound on an H100 at
  ``r = 16``; enable TF32 (as training usually does) or use bf16 factors for
  the bandwidth-bound path.

The dA product ``B^T @ W`` has only ``RP`` (16) rows: on sm_90 Triton runs it as ``mma.sync`` with
both operands re-read from shared memory every step, while the other two use the warp-group MMA;
``da_trans=True`` computes it as ``(W^T @ B)^T`` instead (``BI`` rows: warp-group MMA for all three;
ptxas for sm_90a at the bf16 default tiles: 222 registers instead of 245, 58 instead of 62 KB of
shared memory).  Which is faster was not measured yet (``benchmarks/tune_triton.py`` times both).

Explicit rank-loop FMAs were not used: extracting a rank column from a
register tile is not expressible in Triton, and the ``dA``/``dB`` reductions
would become ``r`` separate cross-thread reductions per tile.  Under the
Triton interpreter (``TRITON_INTERPRET=1``, read at launch time) every
operand is upcast to fp32 right after its load (the interpreter computes
bf16 on raw bits) and fp32 dots are exact whatever the precision, so CPU
results are fp32-exact for every input dtype.

Outputs are allocated with ``torch.empty``; set ``CLORA_FAST_POISON=1`` to
fill outputs and workspaces with NaN first, so any entry a kernel fails to
write shows up in tests.
"""

# No `from __future__ import annotations` here: Triton 3.0's interpreter recognises constexpr
# parameters only by their evaluated annotation (a string "tl.constexpr" is taken for a tensor).
import collections
import functools
import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from .._graphs import capturing as _capturing, graph_capture, raw_stream as _raw_stream
from .._validate import layout_overlap
from . import _triton_compat
from ._precision import fp32_dot_precision

__all__ = ["forgetting_penalty_forward", "grouped_forgetting_penalty_forward", "grouped_forgetting_penalty_packed"]

# Layer table: int64 [L, _NF], one row per layer, fields (the kernel loads them by index):
#   0 P offset, 1 A offset, 2 B offset (elements from the base tensors), 3 out, 4 in, 5 r,
#   6-7 P strides, 8-9 A strides, 10-11 B strides, 12 dA-partials workspace offset,
#   13 dB-partials workspace offset, 14 row blocks, 15 column chunks, 16 chunk width (multiple of BI).
_NF = 17
_F_DAWS, _F_DBWS = 12, 13
# Reduce table: int64 [n_red, _NRF]: src offset, n_parts, part stride, start, end, output slot, is_sum.
_NRF = 7
_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _penalty_main_kernel(
    layer_tab, tile_tab, scale_tab, out_tab,
    p_base, a_base, b_base, ws_ptr,
    loss_ws_off, cnt_ptr, n_prog, n_layers,
    NF: tl.constexpr, RP: tl.constexpr, BO: tl.constexpr, BI: tl.constexpr,
    VEC_P: tl.constexpr, P_UNIT: tl.constexpr, VEC_A: tl.constexpr, A_UNIT: tl.constexpr,
    PRECISION: tl.constexpr, DA_ATOMIC: tl.constexpr, BF16_DOT: tl.constexpr,
    FUSED_REDUCE: tl.constexpr, RBLOCK: tl.constexpr, DA_TRANS: tl.constexpr,
):
    """Penalty, dA, dB for one (layer, row block, column chunk).

    Program ``pid`` reads ``tile_tab[pid] = (layer, rb, cs)`` and the layer's row
    ``layer_tab[layer, :NF]``.  With ``rows = rb*BO + [0, BO)`` and the chunk
    ``cols in [cs*CI, min((cs+1)*CI, in))``::

        b      = B[rows, :r]                                      [BO, RP]  (zero-padded)
        for each BI-wide step of the chunk:
            a  = A[:r, cols]                                      [RP, BI]
            p  = P[rows, cols]                                    [BO, BI]
            m  = s * b @ a                                        [BO, BI]
            w  = p^2 * m                                          (= G / 2)
            loss_acc += tl.sum(w * m, axis=1)
            dB_acc   += w @ a^T                                   [BO, RP]
            dA_part   = 2s * b^T @ w                              [RP, BI] -> ws or dA
        dB part = 2s * dB_acc                                     -> dB (one chunk) or ws
        loss part = sum(loss_acc)                                 -> ws[loss_ws_off + pid]

    ``out_tab`` holds the data pointers of the outputs: ``2*l`` -> dA_l, ``2*l+1``
    -> dB_l, ``2*n_layers`` -> loss (fp32, contiguous).  All loads are upcast to fp32 at once.

    ``FUSED_REDUCE``: the partial sums are reduced inside this launch instead of by
    ``_penalty_reduce_kernel``.  ``cnt_ptr`` is an int32 ``[1 + n_layers]`` arrival counter
    (zero on entry, left zero on exit).  After its stores a program increments its layer's
    counter (``acq_rel``, GPU scope, after a CTA barrier so that every thread's stores are
    ordered before it); the program that arrives last for the layer (``n_rb * n_cs``
    programs) sums the layer's ``dA`` / ``dB`` partials exactly as the reduce kernel would
    (``_sum_partials``: same order, bit-identical), then every program increments counter 0
    and the last one over the grid sums the ``n_prog`` loss partials.  Partials are read
    with ``.cg`` (L2, never a stale L1 line).  The last arriver resets the counter it
    consumed, so the buffer can be reused by the next launch on the same stream.
    """
    pid = tl.program_id(0)
    lay = tl.load(tile_tab + 3 * pid)
    rb = tl.load(tile_tab + 3 * pid + 1)
    cs = tl.load(tile_tab + 3 * pid + 2)
    row = layer_tab + lay.to(tl.int64) * NF
    p_off = tl.load(row + 0)
    a_off = tl.load(row + 1)
    b_off = tl.load(row + 2)
    n_out = tl.load(row + 3)
    n_in = tl.load(row + 4)
    r = tl.load(row + 5)
    sp0 = tl.load(row + 6)
    sp1 = tl.load(row + 7)
    sa0 = tl.load(row + 8)
    sa1 = tl.load(row + 9)
    sb0 = tl.load(row + 10)
    sb1 = tl.load(row + 11)
    da_ws = tl.load(row + 12)
    db_ws = tl.load(row + 13)
    n_rb = tl.load(row + 14)
    n_cs = tl.load(row + 15)
    ci = tl.load(row + 16)
    s = tl.load(scale_tab + lay)
    if VEC_P > 1:
        # host checked: every past is VEC_P-element aligned, row stride and `in` multiples of VEC_P
        p_off = tl.multiple_of(p_off, VEC_P)
        sp0 = tl.multiple_of(sp0, VEC_P)
        n_in = tl.multiple_of(n_in, VEC_P)
    if VEC_A > 1:
        a_off = tl.multiple_of(a_off, VEC_A)
        sa0 = tl.multiple_of(sa0, VEC_A)

    rows = rb * BO + tl.arange(0, BO)
    rmask = rows < n_out
    ks = tl.arange(0, RP)
    kmask = ks < r
    rows64 = rows.to(tl.int64)

    b = tl.load(b_base + b_off + rows64[:, None] * sb0 + ks[None, :] * sb1,
                mask=rmask[:, None] & kmask[None, :], other=0.0)                     # [BO, RP]
    if not BF16_DOT:
        b = b.to(tl.float32)
    db_acc = tl.zeros([BO, RP], dtype=tl.float32)
    loss_acc = tl.zeros([BO], dtype=tl.float32)
    two_s = 2.0 * s

    col_start = tl.multiple_of(cs.to(tl.int64) * ci, BI)
    col_end = tl.minimum(col_start + ci, n_in)
    if VEC_P > 1:
        col_end = tl.multiple_of(col_end, VEC_P)
    p_rows = p_base + p_off + rows64[:, None] * sp0                                   # [BO, 1]
    a_rows = a_base + a_off + ks[:, None].to(tl.int64) * sa0                          # [RP, 1]
    if DA_ATOMIC:   # one zeroed [r, in] slot per layer, every row block adds into it
        da_rows_ws = ws_ptr + da_ws + ks[:, None].to(tl.int64) * n_in
    else:           # one [r, in] slot per row block, summed in order by the reduce kernel
        da_rows_ws = ws_ptr + da_ws + rb.to(tl.int64) * (r * n_in) + ks[:, None].to(tl.int64) * n_in
    da_direct = n_rb == 1
    da_out = tl.load(out_tab + 2 * lay).to(tl.pointer_type(tl.float32))
    da_rows_out = da_out + ks[:, None].to(tl.int64) * n_in
    for c0 in range(col_start, col_end, BI):
        cols = c0 + tl.arange(0, BI)
        cmask = cols < col_end
        if A_UNIT:
            a_ptrs = a_rows + cols[None, :]
        else:
            a_ptrs = a_rows + cols[None, :] * sa1
        a = tl.load(a_ptrs, mask=kmask[:, None] & cmask[None, :], other=0.0)          # [RP, BI]
        if P_UNIT:
            p_ptrs = p_rows + cols[None, :]
        else:
            p_ptrs = p_rows + cols[None, :] * sp1
        # P is streamed once: evict it first so A, B and the workspace stay in L2
        p = tl.load(p_ptrs, mask=rmask[:, None] & cmask[None, :], other=0.0,
                    eviction_policy="evict_first").to(tl.float32)                     # [BO, BI]
        if BF16_DOT:
            # bf16 factors on a GPU: exact bf16 x bf16 products, fp32 accumulation; W is
            # rounded to bf16 for the two gradient products (as a bf16 autograd would)
            m = tl.dot(b, a) * s                                                      # [BO, BI]
            # padded positions (rows past `out`, columns past the chunk) hold inf * 0 = NaN when A or B has an
            # inf: zeroed, so the loss is inf (not NaN) and the valid gradient rows are the reference's (one
            # select per element; unconditional: 250 registers at the bf16 default tiles, 254 as a tail-only
            # branch, 245 without it - ptxas, sm_90a)
            m = tl.where(rmask[:, None] & cmask[None, :], m, 0.0)
            w = (p * p) * m                                                           # G / 2
            loss_acc += tl.sum(w * m, axis=1)
            w_h = w.to(tl.bfloat16)
            db_acc = tl.dot(w_h, tl.trans(a), db_acc)                                 # [BO, RP]
            if DA_TRANS:    # (W^T @ B)^T: M = BI rows for the MMA instead of M = RP (see module doc)
                da_part = tl.trans(tl.dot(tl.trans(w_h), b)) * two_s                  # [RP, BI]
            else:
                da_part = tl.dot(tl.trans(b), w_h) * two_s                            # [RP, BI]
        else:
            a = a.to(tl.float32)
            m = tl.dot(b, a, input_precision=PRECISION) * s                          # [BO, BI]
            m = tl.where(rmask[:, None] & cmask[None, :], m, 0.0)
            w = (p * p) * m                                                           # G / 2
            loss_acc += tl.sum(w * m, axis=1)
            db_acc = tl.dot(w, tl.trans(a), db_acc, input_precision=PRECISION)       # [BO, RP]
            if DA_TRANS:
                da_part = tl.trans(tl.dot(tl.trans(w), b, input_precision=PRECISION)) * two_s
            else:
                da_part = tl.dot(tl.trans(b), w, input_precision=PRECISION) * two_s  # [RP, BI]
        da_mask = kmask[:, None] & cmask[None, :]
        if da_direct:
            tl.store(da_rows_out + cols[None, :], da_part, mask=da_mask)
        elif DA_ATOMIC:
            tl.atomic_add(da_rows_ws + cols[None, :], da_part, mask=da_mask, sem="relaxed")
        else:
            tl.store(da_rows_ws + cols[None, :], da_part, mask=da_mask)

    db_part = db_acc * two_s
    db_mask = rmask[:, None] & kmask[None, :]
    if n_cs == 1:
        db_out = tl.load(out_tab + 2 * lay + 1).to(tl.pointer_type(tl.float32))
        tl.store(db_out + rows64[:, None] * r + ks[None, :], db_part, mask=db_mask)
    else:
        tl.store(ws_ptr + db_ws + cs.to(tl.int64) * (n_out * r) + rows64[:, None] * r + ks[None, :],
                 db_part, mask=db_mask)
    tl.store(ws_ptr + loss_ws_off + pid, tl.sum(loss_acc, axis=0))

    if FUSED_REDUCE:
        n_arrive = n_rb * n_cs
        if n_arrive > 1:
            tl.debug_barrier()          # every thread's partial stores before the release below
            seen = tl.atomic_add(cnt_ptr + 1 + lay, 1, sem="acq_rel", scope="gpu")
            if seen == n_arrive - 1:    # last of the layer: all its partials are visible
                if n_rb > 1:
                    n_da = n_rb
                    if DA_ATOMIC:
                        n_da = 1
                    _sum_partials(ws_ptr, da_ws, n_da, r * n_in, 0, r * n_in, da_out, 0, RBLOCK, True)
                if n_cs > 1:
                    db_out = tl.load(out_tab + 2 * lay + 1).to(tl.pointer_type(tl.float32))
                    _sum_partials(ws_ptr, db_ws, n_cs, n_out * r, 0, n_out * r, db_out, 0, RBLOCK, True)
                tl.atomic_xchg(cnt_ptr + 1 + lay, 0, sem="relaxed", scope="gpu")
        tl.debug_barrier()
        seen_all = tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu")
        if seen_all == n_prog - 1:      # last program of the grid: every loss partial is visible
            loss_out = tl.load(out_tab + 2 * n_layers).to(tl.pointer_type(tl.float32))
            _sum_partials(ws_ptr, loss_ws_off, 1, 0, 0, n_prog, loss_out, 1, RBLOCK, True)
            tl.atomic_xchg(cnt_ptr, 0, sem="relaxed", scope="gpu")


@triton.jit
def _load_part(ptrs, mask, FROM_L2: tl.constexpr):
    if FROM_L2:
        return tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def _sum_partials(ws_ptr, src, n_parts, pstride, start, end, out, is_sum, BLOCK: tl.constexpr,
                  FROM_L2: tl.constexpr):
    """``acc[j] = sum_{k < n_parts} ws[src + k * pstride + j]`` for ``j in [start, end)``, k in
    increasing order (deterministic); stores ``out[j] = acc[j]`` or, when ``is_sum``, the scalar
    ``out[0] = sum_j acc[j]``.  ``FROM_L2``: load with ``.cg`` (partials written by other
    programs of the same launch).

    The parts are loaded four at a time before any of them is added (then added in order, k = 0, 1,
    2, 3: the same sum, bit for bit, as one load and add per part, since a part past ``n_parts`` loads
    +0.0 and ``acc`` is never -0.0): a chunk's reduction is a chain of L2 round trips, and one load in
    flight per step made it latency-bound (the separate reduce took 24 us for 10 MB on the H100 run B;
    the fused tail runs on one SM per layer, 60 round trips for an SD-1.5 1280-row layer at BLOCK 2048)."""
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for c0 in range(start, end, BLOCK):
        offs = c0 + tl.arange(0, BLOCK)
        m = offs < end
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for k in range(0, n_parts, 4):
            ptrs = ws_ptr + src + k * pstride + offs
            v0 = _load_part(ptrs, m, FROM_L2)
            v1 = _load_part(ptrs + pstride, m & (k + 1 < n_parts), FROM_L2)
            v2 = _load_part(ptrs + 2 * pstride, m & (k + 2 < n_parts), FROM_L2)
            v3 = _load_part(ptrs + 3 * pstride, m & (k + 3 < n_parts), FROM_L2)
            acc += v0
            acc += v1
            acc += v2
            acc += v3
        if is_sum == 0:
            tl.store(out + offs, acc, mask=m)
        total += acc
    if is_sum != 0:
        tl.store(out, tl.sum(total, axis=0))


@triton.jit
def _penalty_reduce_kernel(red_tab, out_tab, ws_ptr, NRF: tl.constexpr, BLOCK: tl.constexpr):
    """Deterministic sum of workspace partials into an output.

    Program ``pid`` reads ``red_tab[pid] = (src, n_parts, part_stride, start, end, slot, is_sum)``
    and, for ``j in [start, end)``::

        acc[j] = sum_{k < n_parts} ws[src + k * part_stride + j]     (k in increasing order)

    then stores ``out[j] = acc[j]`` into the fp32 output whose data pointer is
    ``out_tab[slot]`` (``n_parts == 0`` writes zeros), or, when ``is_sum``, the scalar
    ``out[0] = sum_j acc[j]`` (the loss).
    """
    pid = tl.program_id(0)
    e = red_tab + pid.to(tl.int64) * NRF
    src = tl.load(e + 0)
    n_parts = tl.load(e + 1)
    pstride = tl.load(e + 2)
    start = tl.load(e + 3)
    end = tl.load(e + 4)
    slot = tl.load(e + 5)
    is_sum = tl.load(e + 6)
    out = tl.load(out_tab + slot).to(tl.pointer_type(tl.float32))
    _sum_partials(ws_ptr, src, n_parts, pstride, start, end, out, is_sum, BLOCK, False)


# ----------------------------------------------------------------------------------------------
# host side: configuration, cached plans
# ----------------------------------------------------------------------------------------------
def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _poison() -> bool:
    return os.environ.get("CLORA_FAST_POISON", "0") == "1"


def _fused_reduce(requested: Optional[bool]) -> bool:
    """Where the partial sums are reduced: ``True`` inside the main launch (one launch per call),
    ``False`` by a second kernel.  Default from ``CLORA_FAST_PENALTY_REDUCE`` (``fused`` |
    ``separate``; unset: ``fused``)."""
    if requested is not None:
        return bool(requested)
    mode = os.environ.get("CLORA_FAST_PENALTY_REDUCE", "fused")
    if mode not in ("fused", "separate"):
        raise ValueError(f"CLORA_FAST_PENALTY_REDUCE must be 'fused' or 'separate', got {mode!r}")
    return mode == "fused"




def _empty(shape, device, poison: bool) -> torch.Tensor:
    t = torch.empty(shape, dtype=torch.float32, device=device)
    if poison:
        t.fill_(float("nan"))
    return t


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# GPU tile configs (BO, BI, num_warps) per padded rank, chosen so that ptxas (sm_90, Triton 3.8,
# num_stages=3) reports no register spills: the [BO, BI] fp32 tiles (P, M, W) plus the [BO, RP]
# B tile and dB accumulator must fit 255 registers/thread.  Larger BO means fewer dA partials.
_GPU_CONFIGS = {
    "tf32": {16: (128, 64, 8), 32: (128, 32, 8), 64: (64, 64, 8), 128: (64, 32, 8)},
    "ieee": {16: (128, 32, 8), 32: (64, 32, 8), 64: (64, 32, 8), 128: (32, 32, 8)},
}


def _config(outs: Sequence[int], ins: Sequence[int], rp: int, precision: str, interpret: bool,
            block_o: Optional[int], block_i: Optional[int]) -> Tuple[int, int, int]:
    """(BO, BI, num_warps).  GPU: the spill-free table above.  Interpreter: few, large
    programs (each costs ~1 ms whatever its size)."""
    if interpret:
        bo = min(max(_pow2(max(outs)), 16), 128)
        bi = min(max(_pow2(max(ins)), 16), 128)
        warps = 4
    else:
        table = _GPU_CONFIGS["ieee" if precision == "ieee" else "tf32"]
        bo, bi, warps = table[min(rp, 128)] if rp <= 128 else (32, 32, 8)
    if block_o is not None:
        bo = int(block_o)
    if block_i is not None:
        bi = int(block_i)
    for name, v in (("block_o", bo), ("block_i", bi)):
        if v < 16 or v & (v - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {v}")
    return bo, bi, warps


class _Plan:
    """Device tables and sizes for one (layers, dtypes, config) combination."""

    def __init__(self, pasts, lora_As, lora_Bs, scales, device, interpret, precision, deterministic,
                 block_o, block_i, col_splits, bases=None, num_warps=None, num_stages=None, reduce_block=None,
                 fused_reduce=True, maxnreg=None, da_trans=False):
        L = len(pasts)
        outs = [int(p.shape[0]) for p in pasts]
        ins = [int(p.shape[1]) for p in pasts]
        ranks = [int(a.shape[0]) for a in lora_As]
        self.rp = max(16, _pow2(max(ranks)))
        self.bo, self.bi, self.num_warps = _config(outs, ins, self.rp, precision, interpret, block_o, block_i)
        if num_warps is not None:
            self.num_warps = int(num_warps)
        self.num_stages = 1 if interpret else (3 if num_stages is None else int(num_stages))
        # a register cap per thread (ptxas .maxnreg): the default configs use ~245 of 255 at 8 warps, i.e. one
        # program per SM; a cap of 128 allows two (with some spills, see tune_triton.py)
        self.launch_opts = {} if maxnreg is None else {"maxnreg": int(maxnreg)}
        self.compiled = None        # the main kernel's last compiled binary (GPU): n_regs, n_spills for reports
        self.da_trans = bool(da_trans)
        if self.da_trans and precision == "tf32x3" and not interpret and _triton_compat.hopper_compiler_abort(device):
            _triton_compat.refuse("the penalty kernel with da_trans=True and precision 'tf32x3'")
        self.deterministic = deterministic
        bo, bi = self.bo, self.bi
        esize = pasts[0].element_size()
        n_rb = [math.ceil(o / bo) if i > 0 else 0 for o, i in zip(outs, ins)]
        n_ib = [math.ceil(i / bi) for i in ins]

        # column splits: fill the GPU when there are too few row blocks
        if col_splits is not None:
            want = max(1, int(col_splits))
        elif interpret or device.type != "cuda":
            want = 1
        else:
            target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
            total = max(1, sum(n_rb))
            want = 1 if total >= target else math.ceil(target / total)
        n_cs, ci = [], []
        for nib in n_ib:
            k = max(1, min(want, nib))
            steps = math.ceil(nib / k) if nib else 1
            ci.append(steps * bi)
            n_cs.append(math.ceil(nib / steps) if nib else 1)

        # base tensors: the first non-empty one of each role (an empty tensor may have address 0)
        # (the packed entry passes its flat buffers as bases instead: offsets may then be negative)
        self.base = tuple(next((l for l, t in enumerate(ts) if t.numel() > 0), 0)
                          for ts in (pasts, lora_As, lora_Bs))
        if bases is None:
            p0, a0, b0 = (ts[i].data_ptr() for ts, i in zip((pasts, lora_As, lora_Bs), self.base))
        else:
            p0, a0, b0 = (t.data_ptr() for t in bases)
        ae, be = lora_As[0].element_size(), lora_Bs[0].element_size()
        for name, ts, base, e in (("pasts", pasts, p0, esize), ("lora_As", lora_As, a0, ae),
                                  ("lora_Bs", lora_Bs, b0, be)):
            for l, t in enumerate(ts):
                if t.numel() > 0 and (t.data_ptr() - base) % e:
                    raise ValueError(f"{name}[{l}] is not element-aligned "
                                     f"(address {t.data_ptr():#x}, {e}-byte dtype)")
        vec = 16 // esize
        p_unit = all(p.stride(1) == 1 or p.shape[1] <= 1 for p in pasts)
        aligned = p_unit and all(p.numel() == 0 or (p.data_ptr() % 16 == 0
                                                    and (p.stride(0) % vec == 0 or p.shape[0] <= 1)
                                                    and p.shape[1] % vec == 0) for p in pasts)
        self.vec_p = vec if aligned else 1
        self.p_unit = p_unit
        # same for A (only used when every layer's `in` is a multiple of both vector widths)
        vec_a = 16 // ae
        a_unit = all(a.stride(1) == 1 or a.shape[1] <= 1 for a in lora_As)
        a_aligned = (a_unit and self.vec_p > 1
                     and all(a.numel() == 0 or (a.data_ptr() % 16 == 0
                                                and (a.stride(0) % vec_a == 0 or a.shape[0] <= 1)
                                                and a.shape[1] % vec_a == 0) for a in lora_As))
        self.vec_a = vec_a if a_aligned else 1
        self.a_unit = a_unit

        rows, tiles, red = [], [], []
        ws = 0
        for l in range(L):
            p, a, b = pasts[l], lora_As[l], lora_Bs[l]
            o, i, r = outs[l], ins[l], ranks[l]
            da_ws = db_ws = 0
            if n_rb[l] > 1:
                da_ws = ws
                ws += _align4((n_rb[l] if deterministic else 1) * r * i)
            if n_cs[l] > 1 and n_rb[l] > 0:
                db_ws = ws
                ws += _align4(n_cs[l] * o * r)
            rows.append([(p.data_ptr() - p0) // esize if p.numel() else 0,
                         (a.data_ptr() - a0) // ae if a.numel() else 0,
                         (b.data_ptr() - b0) // be if b.numel() else 0,
                         o, i, r, p.stride(0), p.stride(1), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                         da_ws, db_ws, n_rb[l], n_cs[l], ci[l]])
            for rb in range(n_rb[l]):
                for cs in range(n_cs[l]):
                    tiles.append((ci[l], l, rb, cs))
        # longest programs first (largest chunk width), layer-major otherwise
        tiles.sort(key=lambda t: -t[0])
        self.n_prog = len(tiles)
        self.loss_ws = ws
        ws += _align4(self.n_prog)
        self.ws_numel = ws

        # reduce chunk per program (the H100 runs in benchmarks/RESULTS.md used 2048: the reduce took 24 us for
        # 10 MB of partials, i.e. latency-bound; smaller chunks give more programs -- not measured yet, see
        # tune_triton.py's "rblk" rows)
        rblk = int(reduce_block) if reduce_block else (8192 if interpret else 2048)
        for l in range(L):
            o, i, r = outs[l], ins[l], ranks[l]
            da_ws, db_ws = rows[l][_F_DAWS], rows[l][_F_DBWS]
            if n_rb[l] != 1:            # several row blocks (or none: zeros)
                for st in range(0, r * i, rblk):
                    nparts = n_rb[l] if (deterministic or n_rb[l] == 0) else 1
                    red.append([da_ws, nparts, r * i, st, min(st + rblk, r * i), 2 * l, 0])
            if n_cs[l] > 1 or n_rb[l] == 0:
                nparts = n_cs[l] if n_rb[l] > 0 else 0
                for st in range(0, o * r, rblk):
                    red.append([db_ws, nparts, o * r, st, min(st + rblk, o * r), 2 * l + 1, 0])
        red.append([self.loss_ws, 1, 0, 0, self.n_prog, 2 * L, 1])
        self.n_red = len(red)
        self.rblk = rblk
        # the reduction inside the main launch needs a program per layer (an empty layer's zero
        # gradients come from the reduce kernel)
        self.fused = bool(fused_reduce) and all(n > 0 for n in n_rb)
        self.n_layers = L
        self._counters: dict = {}

        self.layer_tab = torch.tensor(rows, dtype=torch.int64).reshape(L, _NF).to(device)
        self.tile_tab = torch.tensor([t[1:] for t in tiles] or [[0, 0, 0]], dtype=torch.int32).to(device)
        self.red_tab = torch.tensor(red, dtype=torch.int64).to(device)
        self.scale_tab = torch.tensor([float(s) for s in scales], dtype=torch.float32).to(device)
        self.da_shapes = [(r, i) for r, i in zip(ranks, ins)]
        self.db_shapes = [(o, r) for o, r in zip(outs, ranks)]
        # output-address tables: key -> (stream key, slot, table); one persistent [_TAB_SLOTS, 2L+1] pool per
        # stream holds them (see out_table)
        self.out_tabs: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
        self._tab_pools: dict = {}

    def counters(self, device) -> torch.Tensor:
        """The zeroed int32 ``[1 + L]`` arrival counters of the fused reduction, one buffer per
        stream (the kernel leaves them zero; two streams never share one).  Under CUDA-graph
        capture a fresh buffer per capture (its zero fill is captured with the launch), so no
        buffer is shared between a graph and eager launches."""
        if device.type == "cuda":
            if _capturing():
                _GRAPH_PLANS[id(self)] = self
                return torch.zeros(self.n_layers + 1, dtype=torch.int32, device=device)
            key = _raw_stream(device.index if device.index is not None else torch.cuda.current_device())
        else:
            key = None
        t = self._counters.get(key)
        if t is None:
            t = self._counters[key] = torch.zeros(self.n_layers + 1, dtype=torch.int32, device=device)
        return t

    def cached_table(self, key: tuple, device) -> Optional[torch.Tensor]:
        """The table cached under ``key`` (output addresses, or a caller's alias of them) for the current
        stream, or None (always None under CUDA-graph capture: a graph must not read a slot that a later
        eager miss rewrites)."""
        if graph_capture(device):
            return None
        hit = self.out_tabs.get((_stream_key(device), key))
        if hit is None:
            return None
        self.out_tabs.move_to_end((_stream_key(device), key))
        return hit[2]

    def out_table(self, ptrs: Tuple[int, ...], device, alias: Optional[tuple] = None) -> torch.Tensor:
        """The device table of output addresses ``ptrs`` (int64 ``[2L+1]``), cached per address tuple and
        stream, also under ``alias`` when given (a key the caller derives the addresses from).

        A miss writes the addresses into a slot of a pool allocated once per plan and stream
        (``_TAB_SLOTS`` rows; the least recently used slot is overwritten, with every key that named it):
        one pinned, stream-ordered copy and no device allocation.  Allocating a fresh table per miss (as
        before) kept a new block alive in the caching allocator after every miss, so the next step's
        outputs got other addresses and missed again: on the H100 a training step's penalty copied its
        table to the GPU at every step.  Under CUDA-graph capture the table is written by captured fills
        instead, neither cached nor taken from the cache (see :func:`_table_by_fills`)."""
        if graph_capture(device):
            _GRAPH_PLANS[id(self)] = self
            return _table_by_fills(ptrs, device)
        skey = _stream_key(device)
        t = self.cached_table(ptrs, device)
        if t is None:
            pool = self._tab_pools.get(skey)
            if pool is None:
                pool = self._tab_pools[skey] = torch.zeros(_TAB_SLOTS, len(ptrs), dtype=torch.int64, device=device)
            used = {v[1] for v in self.out_tabs.values() if v[0] == skey}
            free = [i for i in range(_TAB_SLOTS) if i not in used]
            if free:
                slot = free[0]
            else:               # the least recently used slot of this stream (by its most recently used key),
                last = {}       # and every key that names it
                for i, v in enumerate(self.out_tabs.values()):
                    if v[0] == skey:
                        last[v[1]] = i
                slot = min(last, key=last.__getitem__)
                for k in [k for k, v in self.out_tabs.items() if v[0] == skey and v[1] == slot]:
                    del self.out_tabs[k]
            host = torch.tensor(ptrs, dtype=torch.int64)
            t = pool[slot]
            if device.type == "cuda":
                t.copy_(host.pin_memory(), non_blocking=True)
            else:
                t.copy_(host)
            self.out_tabs[(skey, ptrs)] = (skey, slot, t)
        if alias is not None:
            self.out_tabs[(skey, alias)] = self.out_tabs[(skey, ptrs)]
        return t


def _stream_key(device):
    """The current stream's handle on a CUDA ``device``; None on the CPU."""
    if device.type != "cuda":
        return None
    return _raw_stream(device.index if device.index is not None else torch.cuda.current_device())


_TAB_SLOTS = 8


def _table_by_fills(ptrs: Sequence[int], device) -> torch.Tensor:
    """An int64 device tensor holding ``ptrs``, written by one fill per entry: capturable in a CUDA
    graph, where a host->device copy is not (a pageable copy synchronizes; a pinned one needs a
    host block the graph keeps for as long as it lives).  The graph owns the table (it lives in the
    graph's memory pool and is rewritten at every replay, 2L+1 tiny kernels), so it is never cached:
    an eager call that later gets the same addresses must not find a table that was never written
    outside the graph.  Build the plan with one eager call before capturing (its tables are copied
    from the host once)."""
    t = torch.empty(len(ptrs), dtype=torch.int64, device=device)
    for i, v in enumerate(ptrs):
        t[i].fill_(v)
    return t


def _align4(n: int) -> int:
    return (n + 3) // 4 * 4


_PLANS: "collections.OrderedDict[tuple, _Plan]" = collections.OrderedDict()
_MAX_PLANS = 32
# plans a captured CUDA graph used (id -> plan): the graph reads their tables by address at every replay, so they
# are kept for the process, whatever the caches above evict
_GRAPH_PLANS: dict = {}


def _layers_key(pasts, lora_As, lora_Bs) -> tuple:
    """Everything a plan's tables depend on, per tensor: address, shape, strides, dtype.
    (With unified virtual addressing an address also identifies the device.)"""
    k: list = []
    for p, a, b in zip(pasts, lora_As, lora_Bs):
        k += (p.data_ptr(), p.shape, p.stride(), p.dtype, a.data_ptr(), a.shape, a.stride(), a.dtype,
              b.data_ptr(), b.shape, b.stride(), b.dtype)
    return tuple(k)


def _plan(pasts, lora_As, lora_Bs, scales, device, interpret, precision, deterministic,
          block_o, block_i, col_splits, num_warps=None, num_stages=None, reduce_block=None,
          fused_reduce=True, maxnreg=None, da_trans=False) -> _Plan:
    """The cached plan; inputs are validated only when a new plan is built (a cache hit means
    the same addresses, shapes, strides and dtypes as an earlier validated call)."""
    try:
        layers = _layers_key(pasts, lora_As, lora_Bs)
    except AttributeError:          # not tensors: let _check name the culprit
        layers = None
    key = (device, interpret, precision, deterministic, block_o, block_i, col_splits, num_warps, num_stages,
           reduce_block, fused_reduce, maxnreg, da_trans, tuple(scales), layers)
    plan = _PLANS.get(key) if layers is not None else None
    if plan is None:
        _check(pasts, lora_As, lora_Bs, scales)
        plan = _Plan(pasts, lora_As, lora_Bs, scales, device, interpret, precision, deterministic,
                     block_o, block_i, col_splits, num_warps=num_warps, num_stages=num_stages,
                     reduce_block=reduce_block, fused_reduce=fused_reduce, maxnreg=maxnreg, da_trans=da_trans)
        _PLANS[key] = plan
        if len(_PLANS) > _MAX_PLANS:
            _PLANS.popitem(last=False)
    else:
        _PLANS.move_to_end(key)
    return plan


def clear_cache() -> None:
    """Drop every cached plan (layer/tile/output tables)."""
    _PLANS.clear()
    _PACKED.clear()


def _precision(a_dtype: torch.dtype, b_dtype: torch.dtype, requested: Optional[str]) -> str:
    if requested is not None:
        if requested not in ("ieee", "tf32", "tf32x3", "bf16"):
            raise ValueError(f"input_precision must be 'ieee', 'tf32', 'tf32x3' or 'bf16', got {requested!r}")
        if requested == "bf16" and not (a_dtype == b_dtype == torch.bfloat16):
            raise ValueError(f"input_precision='bf16' needs bf16 lora_A and lora_B, got {a_dtype} and {b_dtype}")
        return requested
    if a_dtype == torch.bfloat16 and b_dtype == torch.bfloat16:
        return "bf16"
    half = (torch.float16, torch.bfloat16)
    if a_dtype in half and b_dtype in half:
        return "tf32"
    return fp32_dot_precision()


def _check(pasts, lora_As, lora_Bs, scales):
    n = len(pasts)
    if n == 0:
        raise ValueError("pasts is empty: the grouped penalty needs at least one layer")
    if len(lora_As) != n or len(lora_Bs) != n or len(scales) != n:
        raise ValueError(f"pasts, lora_As, lora_Bs and scales must have the same length, got {n}, "
                         f"{len(lora_As)}, {len(lora_Bs)}, {len(scales)}")
    dev = pasts[0].device
    for l in range(n):
        p, a, b = pasts[l], lora_As[l], lora_Bs[l]
        for name, t in (("pasts", p), ("lora_As", a), ("lora_Bs", b)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name}[{l}] must be a 2-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
            if t.dtype not in _SUPPORTED:
                raise ValueError(f"{name}[{l}] has dtype {t.dtype}; supported: fp32, fp16, bf16")
            if t.device != dev:
                raise ValueError(f"{name}[{l}] is on {t.device}, pasts[0] on {dev}: all on one device")
        o, i = p.shape
        if a.shape[1] != i or tuple(b.shape) != (o, a.shape[0]):
            raise ValueError(f"layer {l}: past [out, in] = {tuple(p.shape)} needs lora_A [r, {i}] and lora_B "
                             f"[{o}, r]; got lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}")
        for name, t, t0 in (("pasts", p, pasts[0]), ("lora_As", a, lora_As[0]), ("lora_Bs", b, lora_Bs[0])):
            if t.dtype != t0.dtype:
                raise ValueError(f"{name}[{l}] has dtype {t.dtype} but {name}[0] has {t0.dtype}: the grouped "
                                 f"kernel needs one dtype per role (pasts / lora_As / lora_Bs)")
    if dev.type == "cpu" and not _interpreting():
        raise RuntimeError("Triton penalty kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _launch(plan, p_base, a_base, b_base, ws, out_tab, precision, deterministic, interpret) -> None:
    fused = plan.fused              # (implies programs: a plan with an empty layer never fuses)
    cnt = plan.counters(ws.device) if fused else ws
    try:
        _launch_main(plan, p_base, a_base, b_base, ws, cnt, out_tab, precision, deterministic, interpret, fused)
    except BaseException:
        # a launch that failed part-way (an interpreter error, Ctrl-C) may leave counts behind:
        # never reuse that buffer
        plan._counters.clear()
        raise
    if not fused:
        _penalty_reduce_kernel[(plan.n_red,)](plan.red_tab, out_tab, ws, NRF=_NRF, BLOCK=plan.rblk, num_warps=4)


def _launch_main(plan, p_base, a_base, b_base, ws, cnt, out_tab, precision, deterministic, interpret, fused):
    if plan.n_prog > 0:
        plan.compiled = _penalty_main_kernel[(plan.n_prog,)](
            plan.layer_tab, plan.tile_tab, plan.scale_tab, out_tab,
            p_base, a_base, b_base, ws, plan.loss_ws, cnt, plan.n_prog, plan.n_layers,
            NF=_NF, RP=plan.rp, BO=plan.bo, BI=plan.bi, VEC_P=plan.vec_p, P_UNIT=plan.p_unit,
            VEC_A=plan.vec_a, A_UNIT=plan.a_unit,
            # the interpreter computes bf16 dots on raw bits: exact fp32 dots there instead
            PRECISION="ieee" if precision == "bf16" else precision, DA_ATOMIC=not deterministic,
            BF16_DOT=precision == "bf16" and not interpret, FUSED_REDUCE=fused, RBLOCK=plan.rblk,
            DA_TRANS=plan.da_trans,
            num_warps=plan.num_warps, num_stages=plan.num_stages, **plan.launch_opts,
        )


def _workspace(plan, device, deterministic: bool, poison: bool) -> torch.Tensor:
    """The fp32 workspace of one launch: partials (deterministic), or zeroed atomic dA slots."""
    if deterministic:
        return _empty((max(plan.ws_numel, 4),), device, poison)
    # the atomic dA slots must start at zero (one memset for the whole workspace)
    return torch.zeros((max(plan.ws_numel, 4),), dtype=torch.float32, device=device)


def _check_device_mode(device: torch.device, interpret: bool) -> None:
    if device.type == "cpu" and not interpret:
        raise RuntimeError("Triton penalty kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    if device.type != "cpu" and interpret:
        raise RuntimeError(f"TRITON_INTERPRET=1 with {device.type} tensors: the penalty kernels address tensors "
                           "through tables of raw addresses, which the interpreter's host copies would not "
                           "follow; unset TRITON_INTERPRET or pass CPU tensors")


def grouped_forgetting_penalty_forward(
    pasts: Sequence[torch.Tensor], lora_As: Sequence[torch.Tensor], lora_Bs: Sequence[torch.Tensor],
    scales: Union[float, Sequence[float]], *, input_precision: Optional[str] = None,
    deterministic: bool = True, block_o: Optional[int] = None, block_i: Optional[int] = None,
    col_splits: Optional[int] = None, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
    reduce_block: Optional[int] = None, fused_reduce: Optional[bool] = None, maxnreg: Optional[int] = None,
    da_trans: bool = False,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Sum over layers of ``sum(P_l^2 * (s_l B_l @ A_l)^2)`` and every layer's gradients.

    pasts[l] ``[out_l, in_l]``, lora_As[l] ``[r_l, in_l]``, lora_Bs[l] ``[out_l, r_l]``,
    scales: one float per layer (or one float for all).  One dtype per role, any
    strides, one device.  Returns ``(loss 0-dim fp32, [dA_l [r_l, in_l] fp32],
    [dB_l [out_l, r_l] fp32])``: separate (non-aliasing) contiguous tensors.
    ``dA_l = s_l B_l^T G_l``, ``dB_l = s_l G_l A_l^T``, ``G_l = 2 P_l^2 (s_l B_l A_l)``.

    Keyword-only knobs: ``input_precision`` ('ieee' | 'tf32' | 'tf32x3', default from
    torch's float32 matmul precision, see module doc), ``deterministic`` (default True:
    dA partials through a workspace, bit-reproducible; False: fp32 atomics for dA, see
    module doc), ``block_o``/``block_i`` (tile
    sizes, powers of two >= 16) and ``col_splits`` (split ``in`` into that many chunks
    per layer; default: only on a GPU, to fill it when there are few row blocks), ``num_warps`` /
    ``num_stages`` (GPU launch parameters; defaults from the config table, 3 stages), ``reduce_block``
    (elements per program of the partial-sum reduction, a power of two; default 2048 on a GPU),
    ``fused_reduce`` (default True, or ``CLORA_FAST_PENALTY_REDUCE``): the partial sums are
    reduced by the last program of each layer inside the main launch, one launch per call;
    False: by a second, reduce kernel.  Both sum in the same order: the same bits.  ``maxnreg``:
    a cap on the main kernel's registers per thread (GPU; default none).  ``da_trans``: compute
    each dA partial as ``(W^T @ B)^T`` (all products on sm_90's warp-group MMA; see module doc).
    """
    pasts, lora_As, lora_Bs = list(pasts), list(lora_As), list(lora_Bs)
    if isinstance(scales, (int, float)):
        scales = [float(scales)] * len(pasts)
    scales = [float(s) for s in scales]
    if not pasts or len(lora_As) != len(pasts) or len(lora_Bs) != len(pasts) or len(scales) != len(pasts) \
            or not isinstance(pasts[0], torch.Tensor) or not isinstance(lora_As[0], torch.Tensor) \
            or not isinstance(lora_Bs[0], torch.Tensor):
        _check(pasts, lora_As, lora_Bs, scales)         # raises the precise error
    device = pasts[0].device
    interpret = _interpreting()
    _check_device_mode(device, interpret)
    poison = _poison()
    precision = _precision(lora_As[0].dtype, lora_Bs[0].dtype, input_precision)
    deterministic = bool(deterministic)
    plan = _plan(pasts, lora_As, lora_Bs, scales, device, interpret, precision, deterministic,
                 block_o, block_i, col_splits, num_warps, num_stages, reduce_block, _fused_reduce(fused_reduce),
                 maxnreg, bool(da_trans))

    f32 = torch.float32
    dAs = [torch.empty(sa, dtype=f32, device=device) for sa in plan.da_shapes]
    dBs = [torch.empty(sb, dtype=f32, device=device) for sb in plan.db_shapes]
    loss = torch.empty((), dtype=f32, device=device)
    if poison:
        for t in (*dAs, *dBs, loss):
            t.fill_(float("nan"))
    ptrs: list = []
    for da, db in zip(dAs, dBs):
        ptrs += (da.data_ptr(), db.data_ptr())
    ptrs.append(loss.data_ptr())
    out_tab = plan.out_table(tuple(ptrs), device)
    ws = _workspace(plan, device, deterministic, poison)

    _launch_on(device, plan, pasts[plan.base[0]], lora_As[plan.base[1]], lora_Bs[plan.base[2]], ws, out_tab,
               precision, deterministic, interpret)
    return loss, dAs, dBs


def _launch_on(device, plan, p_base, a_base, b_base, ws, out_tab, precision, deterministic, interpret) -> None:
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device):     # Triton launches on the current device
            _launch(plan, p_base, a_base, b_base, ws, out_tab, precision, deterministic, interpret)
    else:
        _launch(plan, p_base, a_base, b_base, ws, out_tab, precision, deterministic, interpret)


def _check_packed(pasts, flat_As, flat_Bs, layout):
    """Validate the packed layout (the per-layer checks follow in ``_check`` on the views)."""
    if len(layout) != len(pasts):
        raise ValueError(f"layout has {len(layout)} entries for {len(pasts)} pasts")
    for name, flats in (("flat_As", flat_As), ("flat_Bs", flat_Bs)):
        for i, t in enumerate(flats):
            if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be a contiguous 2-D tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    hit = layout_overlap(layout, pasts)       # each layer writes its own rows: no two may share one
    if hit is not None:
        name, fi, (s0, e0, l0), (s1, e1, l1) = hit
        raise ValueError(f"layout[{l0}] and layout[{l1}] overlap in {name}[{fi}] (rows {s0}:{e0} and "
                         f"{s1}:{e1}); every layer needs rows of its own")
    for l, (fi, a_row, b_row, r) in enumerate(layout):
        if not (0 <= fi < min(len(flat_As), len(flat_Bs))):
            raise ValueError(f"layout[{l}] names flat buffer {fi}; there are {len(flat_As)}")
        o, i = pasts[l].shape
        fa, fb = flat_As[fi], flat_Bs[fi]
        if r < 1 or a_row < 0 or a_row + r > fa.shape[0] or fa.shape[1] != i:
            raise ValueError(f"layout[{l}] = {layout[l]}: rows {a_row}:{a_row + r} of flat_As[{fi}] "
                             f"{tuple(fa.shape)} do not hold an A of shape [{r}, {i}] for past {tuple(pasts[l].shape)}")
        if b_row < 0 or b_row + o > fb.shape[0] or fb.shape[1] != r:
            raise ValueError(f"layout[{l}] = {layout[l]}: rows {b_row}:{b_row + o} of flat_Bs[{fi}] "
                             f"{tuple(fb.shape)} do not hold a B of shape [{o}, {r}] for past {tuple(pasts[l].shape)}")


_PACKED: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()


def _packed_layout_scales(layout, scales, n: int):
    """``layout`` as int tuples and ``scales`` as a tuple of n floats."""
    layout = tuple(tuple(int(v) for v in e) for e in layout)
    if isinstance(scales, (int, float)):
        scales = [float(scales)] * n
    return layout, tuple(float(s) for s in scales)


def _packed_entry(pasts, flat_As, flat_Bs, layout, scales, device, interpret, precision, deterministic, fused):
    """Check a packed layout and build what its launches reuse: ``(plan, flat index of the bases, dA rows all
    covered, dB rows all covered, per-layer element offsets of dA / dB in the flat gradients)``."""
    layout, scales = _packed_layout_scales(layout, scales, len(pasts))
    _check_packed(pasts, flat_As, flat_Bs, layout)
    As = [flat_As[f][a:a + r] for f, a, _, r in layout]
    Bs = [flat_Bs[f][b:b + p.shape[0]] for (f, _, b, _), p in zip(layout, pasts)]
    _check(pasts, As, Bs, scales)
    fa = next((f for f, *_ in layout), 0)
    plan = _Plan(pasts, As, Bs, scales, device, interpret, precision, deterministic, None, None, None,
                 bases=(pasts[next((l for l, p in enumerate(pasts) if p.numel() > 0), 0)], flat_As[fa], flat_Bs[fa]),
                 fused_reduce=fused)
    covered_a = sum(r * p.shape[1] for (_, _, _, r), p in zip(layout, pasts)) == sum(t.numel() for t in flat_As)
    covered_b = sum(p.shape[0] * r for (_, _, _, r), p in zip(layout, pasts)) == sum(t.numel() for t in flat_Bs)
    offs = [(f, a * p.shape[1], b * r) for (f, a, b, r), p in zip(layout, pasts)]
    return plan, fa, covered_a, covered_b, offs


def grouped_forgetting_penalty_packed(
    pasts: Sequence[torch.Tensor], flat_As: Sequence[torch.Tensor], flat_Bs: Sequence[torch.Tensor],
    layout: Sequence[Tuple[int, int, int, int]], scales: Union[float, Sequence[float]], *,
    input_precision: Optional[str] = None, deterministic: bool = True, prepared: Optional[dict] = None,
    fused_reduce: Optional[bool] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """The grouped penalty over factors packed by rows in a few flat buffers.

    Layer ``l`` with ``layout[l] = (f, a_row, b_row, r)`` uses ``A = flat_As[f][a_row:a_row+r]``
    and ``B = flat_Bs[f][b_row:b_row+out_l]`` (flat buffers contiguous 2-D, e.g. a
    controller's flat parameters).  Returns ``(loss, [dA_flat_f], [dB_flat_f])``: fp32
    gradients of the whole flat buffers (zero on rows no layer uses), written by the same launch(es)
    as :func:`grouped_forgetting_penalty_forward`.  A call with the same
    buffers, pasts and layout as an earlier one reuses its tables without building a
    view per layer (the host cost of a training step is a few dozen microseconds).

    ``prepared``: a dict the caller owns for one fixed ``(pasts, layout, scales)`` whose
    shapes, strides and dtypes it has checked (``ops.PackedForgettingPenalty``); the tables are
    cached there, keyed by the flat buffers and the pasts' addresses only.  ``input_precision``,
    ``deterministic``, ``fused_reduce``: as in :func:`grouped_forgetting_penalty_forward`.
    """
    pasts, flat_As, flat_Bs = list(pasts), list(flat_As), list(flat_Bs)
    if not pasts:
        raise ValueError("pasts is empty: the grouped penalty needs at least one layer")
    device = pasts[0].device
    interpret = _interpreting()
    _check_device_mode(device, interpret)
    precision = _precision(flat_As[0].dtype, flat_Bs[0].dtype, input_precision)
    deterministic = bool(deterministic)
    fused = _fused_reduce(fused_reduce)
    flats = tuple((t.data_ptr(), t.shape, t.stride(), t.dtype) for t in (*flat_As, *flat_Bs))
    args = (pasts, flat_As, flat_Bs, layout, scales, device, interpret, precision, deterministic, fused)
    if prepared is not None:        # pasts, layout and scales fixed (and checked) by the caller
        key = (device, interpret, precision, deterministic, fused, flats, tuple(p.data_ptr() for p in pasts))
        entry = prepared.get(key)
        if entry is None:
            if len(prepared) >= _MAX_PLANS:
                prepared.clear()
            entry = prepared[key] = _packed_entry(*args)
    else:
        layout, scales = _packed_layout_scales(layout, scales, len(pasts))
        key = (device, interpret, precision, deterministic, fused, scales, layout, flats,
               tuple((p.data_ptr(), p.shape, p.stride(), p.dtype) for p in pasts))
        entry = _PACKED.get(key)
        if entry is None:
            entry = _PACKED[key] = _packed_entry(*args)
            if len(_PACKED) > _MAX_PLANS:
                _PACKED.popitem(last=False)
        else:
            _PACKED.move_to_end(key)
    plan, fa, covered_a, covered_b, offs = entry
    f32 = torch.float32
    new = torch.empty if (covered_a and not _poison()) else torch.zeros
    dA_flat = [new(t.shape, dtype=f32, device=device) for t in flat_As]
    new = torch.empty if (covered_b and not _poison()) else torch.zeros
    dB_flat = [new(t.shape, dtype=f32, device=device) for t in flat_Bs]
    loss = torch.empty((), dtype=f32, device=device)
    outs = tuple(t.data_ptr() for t in dA_flat) + tuple(t.data_ptr() for t in dB_flat) + (loss.data_ptr(),)
    out_tab = plan.cached_table(("packed",) + outs, device)
    if out_tab is None:
        ptrs: list = []
        for f, oa, ob in offs:
            ptrs += (dA_flat[f].data_ptr() + 4 * oa, dB_flat[f].data_ptr() + 4 * ob)
        ptrs.append(loss.data_ptr())
        out_tab = plan.out_table(tuple(ptrs), device, alias=("packed",) + outs)
    ws = _workspace(plan, device, deterministic, _poison())
    p_base = pasts[plan.base[0]]
    _launch_on(device, plan, p_base, flat_As[fa], flat_Bs[fa], ws, out_tab, precision, deterministic, interpret)
    return loss, dA_flat, dB_flat


def forgetting_penalty_forward(past: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                               scale: float = 1.0, **kwargs) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``loss = sum(P^2 * M^2)`` with ``M = scale * lora_B @ lora_A``, and its gradients.

    past ``[out, in]`` (fp32/fp16/bf16), lora_A ``[r, in]``, lora_B ``[out, r]`` (their
    own dtypes).  Returns ``(loss 0-dim fp32, dA [r, in] fp32, dB [out, r] fp32)`` with
    ``G = 2 P^2 M``, ``dA = scale * B^T @ G``, ``dB = scale * G @ A^T``.  One pass over
    ``past`` (the grouped kernel with one layer); keyword knobs as in
    :func:`grouped_forgetting_penalty_forward`.
    """
    loss, dAs, dBs = grouped_forgetting_penalty_forward([past], [lora_A], [lora_B], [scale], **kwargs)
    return loss, dAs[0], dBs[0]
