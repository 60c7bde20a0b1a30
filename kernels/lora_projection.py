"""Segmented LoRA-augmented projection: Triton kernels and launchers.

What it computes (layout and contract: ``docs/ARCHITECTURE.md``)
-----------------------------------------------------------------
L layers that read the same input ``x`` ``[M, K]`` have their frozen (folded)
weights stacked by rows into ``weight`` ``[N, K]``; layer ``l`` owns output
columns ``o_l:o_{l+1}`` (``seg_offsets``), rows ``l*r:(l+1)*r`` of
``lora_A`` ``[L*r, K]`` and rows ``o_l:o_{l+1}`` of ``lora_B`` ``[N, r]``::

    xa                 = x @ lora_A.T                                [M, L*r]  fp32
    y[:, o_l:o_{l+1}]  = x @ weight[o_l:o_{l+1}].T + bias[o_l:o_{l+1}]
                         + s_l * xa[:, l*r:(l+1)*r] @ lora_B[o_l:o_{l+1}].T

One segment is a plain LoRA linear, two are the K and V projections of one
attention layer (one read of ``x``, one launch), 32 are every cross-attention
K/V of a Stable Diffusion UNet.  Backward (``dy = grad_y``)::

    g_l                = s_l * dy[:, o_l:o_{l+1}] @ lora_B[o_l:o_{l+1}]   [M, r]   fp32
    dx                 = dy @ weight + concat_l(g_l) @ lora_A             [M, K]
    dA[l*r:(l+1)*r]    = g_l.T @ x                                        [r, K]
    dB[o_l:o_{l+1}]    = s_l * dy[:, o_l:o_{l+1}].T @ xa_l                [n_l, r]

Neither ``B @ A`` nor any ``[M, N]`` intermediate other than ``y`` itself is
ever materialised.

Kernels
-------
- ``_seg_lora_fwd_kernel``: one pass over K accumulates ``x @ W^T`` and
  ``x @ A_l^T`` from the same loaded ``x`` tile; the epilogue adds
  ``s_l * xa_l @ B_l^T`` and the bias.  Output tiles never straddle segments:
  a host-built tile table (tile -> segment, n_start, n_end, first-of-segment),
  cached on the device per (device, seg_offsets, BLOCK_N), drives the grid
  ``(M tiles, total N tiles)``, M tiles fastest so that programs sharing a
  weight tile run together.  ``xa`` is stored by the first N tile of each
  segment only.  Every N tile of a segment recomputes its ``x @ A_l^T``
  (``R_PAD / BLOCK_N`` extra work, 12.5% for r <= 16 at BLOCK_N = 128): cheaper
  than a second launch and a second read of ``x``.
- ``_seg_lora_bwd_g_kernel``: ``g_l`` per (M tile, segment), reduction over
  the segment's columns.
- ``_seg_lora_bwd_db_kernel``: ``dB`` per N tile (same tile table), reduction
  over M.
- ``_seg_lora_bwd_dx_kernel``: ``dx = [dy, g] @ [W; A]``, one GEMM whose
  reduction runs over the N columns of ``dy`` then the L*r columns of ``g``.
- ``_seg_lora_bwd_da_kernel``: ``dA = g^T @ x``, reduction over M.
- ``_split_sum_kernel``: the reduction kernels above can split their
  reduction axis over a third grid axis when their output grid is too small
  to fill the GPU (e.g. ``dx`` for the whole UNet: 154 x 768 output, 25k long
  reduction); each split writes an fp32 partial into a workspace and this
  kernel sums the partials in a fixed order (deterministic, no atomics).

Precision
---------
Inputs fp32/fp16/bf16 (all one dtype), fp32 accumulation everywhere.  On a
GPU the big products (``x @ W^T``, ``x @ A^T``, ``dy @ B``, ``dy @ W``) use
``tl.dot`` on the input dtype with fp32 accumulators; products with an fp32
operand (``xa``, ``g``) upcast the other side and run ``tl.dot`` in fp32.
For fp32 *inputs* the operand precision follows torch's own setting
(``kernels/_precision.py``): full fp32 (``input_precision="ieee"``) by default,
exactly as ``F.linear`` computes, TF32 once the user allows TF32 in torch.  The
fp32 intermediates of a half-precision call use TF32 (still finer than the
fp16/bf16 inputs).  Under the
Triton interpreter (``TRITON_INTERPRET=1``, read at launch time) every loaded
tile is upcast to fp32 (the interpreter computes bf16 on raw bits), fp32 dots
are exact, and bf16 stores are rounded to nearest-even by hand (the
interpreter's cast truncates).

Launches: forward 1; backward at most 4 (g if dx or dA is needed, dx, dA, dB),
plus one split-sum per split reduction (GPU only, when the output grid is small).

Compilation: ``M`` (the token count, which changes from call to call) and the rank are
marked ``do_not_specialize``, so most new batch sizes reuse the compiled kernels (the
block config still switches at M = 64); strides and ``K``/``N`` keep Triton's
1/16-divisibility specialisation (vectorised loads).

Outputs: ``y`` and ``dx`` in ``x.dtype``, ``xa`` fp32, ``dA``/``dB`` in the
dtype of ``lora_A``/``lora_B``; all freshly allocated with ``torch.empty``
(set ``CLORA_FAST_POISON=1`` to fill them with NaN before the kernels run, so
an unwritten entry shows up in tests).
"""

# No `from __future__ import annotations` here: Triton 3.0's interpreter recognises constexpr
# parameters only by their evaluated annotation (a string "tl.constexpr" is taken for a tensor).
import collections
import contextlib
import functools
import os
from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._graphs import graph_capture
from . import _triton_compat
from ._precision import fp32_dot_precision

__all__ = ["segmented_lora_forward", "segmented_lora_backward"]


# ----------------------------------------------------------------------------------------------
# jit helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load(ptrs, mask, INTERPRET: tl.constexpr):
    """Masked load (0 outside); upcast to fp32 under the interpreter (bf16 is broken there)."""
    t = tl.load(ptrs, mask=mask, other=0.0)
    if INTERPRET:
        t = t.to(tl.float32)
    return t


@triton.jit
def _cast_out(v, out_ptr, INTERPRET: tl.constexpr):
    """fp32 ``v`` -> the element type of ``out_ptr``; under the interpreter bf16 is rounded
    to nearest-even by hand first (the interpreter's fp32->bf16 cast truncates)."""
    if INTERPRET:
        if out_ptr.dtype.element_ty == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
            v = bits.to(tl.float32, bitcast=True)
    return v.to(out_ptr.dtype.element_ty)


# ----------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "R"])
def _seg_lora_fwd_kernel(
    x_ptr, w_ptr, a_ptr, b_ptr, bias_ptr, y_ptr, xa_ptr, tile_ptr, scale_ptr,
    M, K, R,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ar, stride_ak,
    stride_bn, stride_br, stride_bias, stride_ym, stride_yn, stride_xam, stride_xar,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, R_PAD: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
):
    """Fused segmented LoRA forward, one ``[BLOCK_M, BLOCK_N]`` tile of ``y`` per program.

    Grid ``(cdiv(M, BLOCK_M), T)``; ``tile_ptr`` is int32 ``[T, 4]`` rows
    ``(segment l, n_start, n_end, first)`` with ``n_end - n_start <= BLOCK_N`` and
    every tile inside one segment.  Shapes: x ``[M, K]``, w ``[N, K]``, a ``[L*R, K]``,
    b ``[N, R]``, bias ``[N]`` (strided), scale fp32 ``[L]``; outputs y ``[M, N]``, xa fp32
    ``[M, L*R]``.  Math, with ``n`` in ``[n_start, n_end)``::

        acc   = sum_k x[m, k] * w[n, k]                      (fp32)
        acc_a = sum_k x[m, k] * a[l*R + j, k],  j < R         (fp32, same x tile)
        y[m, n]        = acc + s_l * sum_j acc_a[m, j] * b[n, j] + bias[n]
        xa[m, l*R + j] = acc_a[m, j]                          (only if first)

    ``R_PAD`` = the rank padded to a power of two >= 16 (masked).
    """
    pid_m = tl.program_id(0)
    pid_t = tl.program_id(1)
    seg = tl.load(tile_ptr + pid_t * 4)
    n_start = tl.load(tile_ptr + pid_t * 4 + 1)
    n_end = tl.load(tile_ptr + pid_t * 4 + 2)
    first = tl.load(tile_ptr + pid_t * 4 + 3)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_n = offs_n < n_end
    mask_r = offs_r < R
    rows_a = seg * R + offs_r

    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk
    a_ptrs = a_ptr + rows_a[None, :].to(tl.int64) * stride_ar + offs_k[:, None] * stride_ak

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_a = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        mask_k = (k0 + offs_k) < K
        xt = _load(x_ptrs, mask_m[:, None] & mask_k[None, :], INTERPRET)       # [BM, BK]
        wt = _load(w_ptrs, mask_k[:, None] & mask_n[None, :], INTERPRET)       # [BK, BN]
        at = _load(a_ptrs, mask_k[:, None] & mask_r[None, :], INTERPRET)       # [BK, R_PAD]
        acc = tl.dot(xt, wt, acc, input_precision=PREC)
        acc_a = tl.dot(xt, at, acc_a, input_precision=PREC)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
        a_ptrs += BLOCK_K * stride_ak

    scale = tl.load(scale_ptr + seg)
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_r[:, None] * stride_br
    bt = tl.load(b_ptrs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)  # [R_PAD, BN]
    # the padded rank columns of acc_a are inf * 0 = NaN when x holds an inf: zero them, or the NaN would reach
    # every output column through the (zero) padded rows of bt instead of the reference's inf / NaN pattern
    acc_a = tl.where(mask_r[None, :], acc_a, 0.0)
    acc = tl.dot(acc_a * scale, bt, acc, input_precision=PREC)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)
        acc += bias[None, :]

    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, _cast_out(acc, y_ptr, INTERPRET),
             mask=mask_m[:, None] & mask_n[None, :])
    xa_ptrs = xa_ptr + offs_m[:, None].to(tl.int64) * stride_xam + rows_a[None, :] * stride_xar
    tl.store(xa_ptrs, acc_a, mask=mask_m[:, None] & mask_r[None, :] & (first != 0))


# ----------------------------------------------------------------------------------------------
# backward
# ----------------------------------------------------------------------------------------------
@triton.jit(do_not_specialize=["M", "R"])
def _seg_lora_bwd_g_kernel(
    dy_ptr, b_ptr, g_ptr, off_ptr, scale_ptr,
    M, R,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_gm, stride_gr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
):
    """``g[:, l*R:(l+1)*R] = s_l * dy[:, o_l:o_{l+1}] @ b[o_l:o_{l+1}]`` (fp32).

    Grid ``(cdiv(M, BLOCK_M), L)``; ``off_ptr`` int32 ``[L+1]`` segment offsets.
    Shapes: dy ``[M, N]``, b ``[N, R]``, g fp32 ``[M, L*R]``.  Each program reduces over
    its segment's columns in ``BLOCK_N`` steps.
    """
    pid_m = tl.program_id(0)
    seg = tl.program_id(1)
    n0 = tl.load(off_ptr + seg)
    n1 = tl.load(off_ptr + seg + 1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, R_PAD)
    mask_m = offs_m < M
    mask_r = offs_r < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n in range(n0, n1, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n1
        dyt = _load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn,
                    mask_m[:, None] & mask_n[None, :], INTERPRET)                       # [BM, BN]
        bt = _load(b_ptr + offs_n[:, None].to(tl.int64) * stride_bn + offs_r[None, :] * stride_br,
                   mask_n[:, None] & mask_r[None, :], INTERPRET)                         # [BN, R_PAD]
        acc = tl.dot(dyt, bt, acc, input_precision=PREC)
    acc = acc * tl.load(scale_ptr + seg)
    g_ptrs = g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + (seg * R + offs_r)[None, :] * stride_gr
    tl.store(g_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["M", "R"])
def _seg_lora_bwd_db_kernel(
    dy_ptr, xa_ptr, out_ptr, tile_ptr, scale_ptr,
    M, R, m_chunk,
    stride_dym, stride_dyn, stride_xam, stride_xar, stride_os, stride_on, stride_or,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, R_PAD: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
):
    """``dB[n_start:n_end] = s_l * dy[:, n_start:n_end].T @ xa[:, l*R:(l+1)*R]`` per N tile.

    Grid ``(T, S)``: tile table as in the forward; split ``s`` reduces rows
    ``[s*m_chunk, min(M, (s+1)*m_chunk))`` and writes ``out[s]`` (``stride_os``; with
    ``S == 1`` ``out`` is dB itself, else an fp32 workspace ``[S, N, R]``).
    Shapes: dy ``[M, N]``, xa fp32 ``[M, L*R]``, dB ``[N, R]``.
    """
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    seg = tl.load(tile_ptr + pid_t * 4)
    n_start = tl.load(tile_ptr + pid_t * 4 + 1)
    n_end = tl.load(tile_ptr + pid_t * 4 + 2)
    offs_n = n_start + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, R_PAD)
    mask_n = offs_n < n_end
    mask_r = offs_r < R
    cols_xa = seg * R + offs_r
    m_lo = pid_s * m_chunk
    m_hi = tl.minimum(M, m_lo + m_chunk)
    acc = tl.zeros((BLOCK_N, R_PAD), dtype=tl.float32)
    for m in range(m_lo, m_hi, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_hi
        dyt = tl.load(dy_ptr + offs_m[None, :].to(tl.int64) * stride_dym + offs_n[:, None] * stride_dyn,
                      mask=mask_n[:, None] & mask_m[None, :], other=0.0).to(tl.float32)   # [BN, BM]
        xat = tl.load(xa_ptr + offs_m[:, None].to(tl.int64) * stride_xam + cols_xa[None, :] * stride_xar,
                      mask=mask_m[:, None] & mask_r[None, :], other=0.0)                 # [BM, R_PAD]
        acc = tl.dot(dyt, xat, acc, input_precision=PREC)
    acc = acc * tl.load(scale_ptr + seg)
    o_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + offs_n[:, None].to(tl.int64) * stride_on
              + offs_r[None, :] * stride_or)
    tl.store(o_ptrs, _cast_out(acc, out_ptr, INTERPRET),
             mask=mask_n[:, None] & mask_r[None, :])


@triton.jit(do_not_specialize=["M"])
def _seg_lora_bwd_dx_kernel(
    dy_ptr, w_ptr, g_ptr, a_ptr, out_ptr,
    M, N, K, LR, n_chunk, j_chunk,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_gm, stride_gj, stride_aj, stride_ak,
    stride_os, stride_om, stride_ok,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr,
    INTERPRET: tl.constexpr, PREC: tl.constexpr,
):
    """``dx = dy @ w + g @ a``: one GEMM over the concatenated reduction axis ``[N | L*R]``.

    Grid ``(cdiv(M, BLOCK_M), cdiv(K, BLOCK_K), S)``; split ``s`` reduces columns
    ``[s*n_chunk, (s+1)*n_chunk)`` of dy/rows of w and ``[s*j_chunk, (s+1)*j_chunk)`` of
    g/rows of a, and writes ``out[s]`` (dx itself when S == 1, else an fp32 workspace
    ``[S, M, K]``).  Shapes: dy ``[M, N]``, w ``[N, K]``, g fp32 ``[M, LR]``, a ``[LR, K]``.
    """
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)

    n_lo = pid_s * n_chunk
    n_hi = tl.minimum(N, n_lo + n_chunk)
    for n in range(n_lo, n_hi, BLOCK_N):
        offs_n = n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        dyt = _load(dy_ptr + offs_m[:, None].to(tl.int64) * stride_dym + offs_n[None, :] * stride_dyn,
                    mask_m[:, None] & mask_n[None, :], INTERPRET)                        # [BM, BN]
        wt = _load(w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :] * stride_wk,
                   mask_n[:, None] & mask_k[None, :], INTERPRET)                          # [BN, BK]
        acc = tl.dot(dyt, wt, acc, input_precision=PREC)

    j_lo = pid_s * j_chunk
    j_hi = tl.minimum(LR, j_lo + j_chunk)
    for j in range(j_lo, j_hi, BLOCK_J):
        offs_j = j + tl.arange(0, BLOCK_J)
        mask_j = offs_j < j_hi
        gt = tl.load(g_ptr + offs_m[:, None].to(tl.int64) * stride_gm + offs_j[None, :] * stride_gj,
                     mask=mask_m[:, None] & mask_j[None, :], other=0.0)                  # [BM, BJ] fp32
        at = tl.load(a_ptr + offs_j[:, None].to(tl.int64) * stride_aj + offs_k[None, :] * stride_ak,
                     mask=mask_j[:, None] & mask_k[None, :], other=0.0).to(tl.float32)    # [BJ, BK]
        acc = tl.dot(gt, at, acc, input_precision=PREC)

    o_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + offs_m[:, None].to(tl.int64) * stride_om
              + offs_k[None, :] * stride_ok)
    tl.store(o_ptrs, _cast_out(acc, out_ptr, INTERPRET),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["M"])
def _seg_lora_bwd_da_kernel(
    g_ptr, x_ptr, out_ptr,
    M, K, LR, m_chunk,
    stride_gm, stride_gj, stride_xm, stride_xk, stride_os, stride_oj, stride_ok,
    BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, INTERPRET: tl.constexpr, PREC: tl.constexpr,
):
    """``dA = g.T @ x``: ``[LR, K]``, reduction over M (fp32 g, x upcast to fp32).

    Grid ``(cdiv(LR, BLOCK_J), cdiv(K, BLOCK_K), S)``; split ``s`` reduces rows
    ``[s*m_chunk, (s+1)*m_chunk)`` and writes ``out[s]`` (dA itself when S == 1, else an
    fp32 workspace ``[S, LR, K]``).  Shapes: g fp32 ``[M, LR]``, x ``[M, K]``.
    """
    pid_j = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_j = offs_j < LR
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_J, BLOCK_K), dtype=tl.float32)
    m_lo = pid_s * m_chunk
    m_hi = tl.minimum(M, m_lo + m_chunk)
    for m in range(m_lo, m_hi, BLOCK_M):
        offs_m = m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < m_hi
        gt = tl.load(g_ptr + offs_m[None, :].to(tl.int64) * stride_gm + offs_j[:, None] * stride_gj,
                     mask=mask_j[:, None] & mask_m[None, :], other=0.0)                   # [BJ, BM] fp32
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)     # [BM, BK]
        acc = tl.dot(gt, xt, acc, input_precision=PREC)
    o_ptrs = (out_ptr + pid_s.to(tl.int64) * stride_os + offs_j[:, None].to(tl.int64) * stride_oj
              + offs_k[None, :] * stride_ok)
    tl.store(o_ptrs, _cast_out(acc, out_ptr, INTERPRET),
             mask=mask_j[:, None] & mask_k[None, :])


@triton.jit(do_not_specialize=["S"])
def _split_sum_kernel(ws_ptr, out_ptr, S, P, BLOCK: tl.constexpr, INTERPRET: tl.constexpr):
    """``out[i] = sum_{s < S} ws[s, i]`` for ``i < P`` (fixed order, deterministic).

    ws fp32 contiguous ``[S, P]``, out contiguous ``[P]`` (any float dtype).  Grid ``cdiv(P, BLOCK)``.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < P
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, S):
        acc += tl.load(ws_ptr + s * P + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _cast_out(acc, out_ptr, INTERPRET), mask=mask)


# ----------------------------------------------------------------------------------------------
# host side: flags, tables, heuristics
# ----------------------------------------------------------------------------------------------
def _dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` operand precision: fp32 inputs follow torch's TF32 setting (full fp32 by default,
    like ``F.linear``); fp16/bf16 inputs use their native tensor-core products, and the fp32
    intermediates (``xa``, ``g``) of a half-precision call use TF32."""
    return fp32_dot_precision() if dtype == torch.float32 else "tf32"


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _empty(shape, dtype, device) -> torch.Tensor:
    """``torch.empty``; filled with NaN when ``CLORA_FAST_POISON=1`` (tests catch unwritten entries)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if os.environ.get("CLORA_FAST_POISON", "0") == "1":
        t.fill_(float("nan"))
    return t


# small constant tables (tiles, offsets, scales) by (device, key), least recently used evicted first
_CONST_CACHE: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
_CONST_CACHE_MAX = 512
# tables a captured CUDA graph reads by address at every replay (id -> table), kept for the process (a few hundred
# bytes each), so that no eviction can free one under a live graph
_GRAPH_CONSTS: dict = {}


def _device_const(key, build, device: torch.device) -> torch.Tensor:
    """A small constant device tensor (``build()``'s host tensor, copied) cached per (device, key); constant: never
    written after its copy.  Inside a CUDA-graph capture (torch.compile's mode="reduce-overhead", or a user's
    ``torch.cuda.graph``) see :func:`_graph_const`."""
    full = (device.type, device.index, key)
    if graph_capture(device):
        return _graph_const(full, build, device)
    t = _CONST_CACHE.get(full)
    if t is None:
        if len(_CONST_CACHE) >= _CONST_CACHE_MAX:
            _CONST_CACHE.popitem(last=False)
        t = _CONST_CACHE[full] = build().to(device)
    else:
        _CONST_CACHE.move_to_end(full)
    return t


def _graph_const(full, build, device: torch.device) -> torch.Tensor:
    """:func:`_device_const` inside a CUDA-graph capture: the cached table (built by the eager warm-up call that a
    capture needs anyway, and torch.compile's CUDA graphs make), kept for the process from then on.  A table not
    built yet cannot be made inside the capture: a pageable copy cannot be captured, and a pinned one fails in
    the default (global) capture mode, so a clear error says what to do instead of a CUDA error that
    invalidates the capture."""
    t = _CONST_CACHE.get(full)
    if t is None:
        raise RuntimeError(f"clora_fast: the fused projection's launch table {full[2][0]} {full[2][1:]} is not built "
                           f"yet, and a CUDA graph capture cannot copy it to the GPU: run the same call once outside "
                           f"the capture first (the usual warm-up; torch.compile's CUDA graphs do it)")
    _GRAPH_CONSTS[id(t)] = t
    return t


def build_tile_table(seg_offsets: Sequence[int], block_n: int) -> torch.Tensor:
    """Host tile table: int32 ``[T, 4]`` rows ``(segment, n_start, n_end, first)``.

    Each segment ``[o_l, o_{l+1})`` is cut into ``cdiv(o_{l+1} - o_l, block_n)`` tiles of at
    most ``block_n`` columns; ``first`` is 1 for the first tile of each segment.
    """
    rows = []
    for l in range(len(seg_offsets) - 1):
        n0, n1 = int(seg_offsets[l]), int(seg_offsets[l + 1])
        for t, start in enumerate(range(n0, n1, block_n)):
            rows.append((l, start, min(start + block_n, n1), 1 if t == 0 else 0))
    return torch.tensor(rows, dtype=torch.int32).reshape(-1, 4)


def _tile_table(seg_offsets: Tuple[int, ...], block_n: int, device) -> torch.Tensor:
    return _device_const(("tiles", seg_offsets, block_n),
                         lambda: build_tile_table(seg_offsets, block_n), device)


def _offsets_tensor(seg_offsets: Tuple[int, ...], device) -> torch.Tensor:
    return _device_const(("offsets", seg_offsets),
                         lambda: torch.tensor(seg_offsets, dtype=torch.int32), device)


def _scales_tensor(scales: Tuple[float, ...], device) -> torch.Tensor:
    return _device_const(("scales", scales),
                         lambda: torch.tensor(scales, dtype=torch.float32), device)


def _cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host ints (launch grids, split sizes).  Not ``triton.cdiv``: in newer Tritons that
    is a ``constexpr_function`` (Triton 3.6 and 3.8 here; 3.3 a plain function), whose host call costs
    microseconds: 40 calls per grouped K/V forward + backward, ~70 us of its ~1.1 ms host time on the dev CPU."""
    return -(-a // b)


def _next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for n <= 1), for host ints; see :func:`_cdiv`."""
    return 1 << (int(n) - 1).bit_length() if n > 1 else 1


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, _next_pow2(max(int(n), 1))))


def _rank_pad(r: int) -> int:
    """Rank padded to a power of two >= 16 (tl.dot needs every dim >= 16)."""
    return max(16, _next_pow2(r))


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_heuristic(programs: int, red_len: int, red_block: int, device: torch.device) -> int:
    """How many splits of a reduction axis (1 = none).

    On a GPU, split when the output grid has fewer programs than ~2 waves of SMs, keeping at
    least 4 blocks of reduction per split.  Under the interpreter: never (it only adds programs).
    Tests monkeypatch this function to exercise the split path.
    """
    if _interpreting() or device.type != "cuda":
        return 1
    target = 2 * _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    if programs >= target:
        return 1
    max_split = max(1, red_len // (4 * red_block))
    return max(1, min(_cdiv(target, max(programs, 1)), max_split, 64))


def _split_chunks(red_len: int, splits: int, block: int) -> Tuple[int, int]:
    """Chunk (a multiple of ``block``) and the actual number of splits covering ``red_len``."""
    splits = max(1, min(splits, _cdiv(max(red_len, 1), block)))
    chunk = _cdiv(_cdiv(max(red_len, 1), splits), block) * block
    return chunk, _cdiv(max(red_len, 1), chunk)


def _fwd_config(M: int, K: int, seg_sizes: Sequence[int], r_pad: int, elem_size: int,
                interpret: bool, prec: str = "tf32") -> dict:
    """Single block config for the forward (no autotune: it needs a GPU).

    GPU, 16-bit inputs with M <= 512 and rank <= 64: 64x64x64 tiles, 4 warps, 4 stages (measured best).
    Otherwise: BLOCK_M 64/128 (64 for small M or rank > 64), BLOCK_N 128 (64 for narrow segments),
    BLOCK_K 64, 8 warps for 128x128 tiles or rank > 64; 3 pipeline stages for 16-bit inputs, 2 for fp32
    (x, W and A tiles of one stage take ~80 KB of shared memory in fp32).  Full-fp32 products
    (``prec == "ieee"``, torch's default for fp32) run on FMA units: 8 warps, BLOCK_K 16, and 16x64
    tiles for rank > 64, the largest that compile for sm_90 without register spills.
    """
    if interpret:
        # The interpreter pays per program and per load: as few, as large blocks as possible.
        return dict(BLOCK_M=_pow2_clamp(M, 16, 128), BLOCK_N=_pow2_clamp(max(seg_sizes), 16, 128),
                    BLOCK_K=_pow2_clamp(K, 16, 128), num_warps=4, num_stages=1)
    if prec != "ieee" and elem_size <= 2 and M <= 512 and r_pad <= 64:
        # few rows (e.g. the whole-UNet K/V launch: 77 tokens x batch, 25k output columns): small tiles,
        # 4 warps, 4 stages; on an H100 (bf16, r 16, M 154) 0.040 ms vs 0.094 ms for 128x128x64/8 warps
        # (benchmarks/tune_triton.py, RESULTS.md)
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=4)
    block_m = 64 if (M <= 64 or r_pad > 64) else 128
    block_n = 128 if max(seg_sizes) > 64 else 64
    # two fp32 accumulators ([BM, BN] and [BM, R_PAD]): 8 warps for big tiles or ranks > 64
    # (with 4 warps, R_PAD = 128 spills registers on sm_90)
    num_warps = 8 if (block_m * block_n >= 128 * 128 or r_pad > 64) else 4
    if prec == "ieee":
        # full-fp32 products run on FMA units with operands in registers: 8 warps, thin K steps
        return dict(BLOCK_M=16 if r_pad > 64 else 64, BLOCK_N=64 if r_pad > 64 else block_n, BLOCK_K=16,
                    num_warps=8, num_stages=2)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=64, num_warps=num_warps,
                num_stages=3 if elem_size <= 2 else 2)


def _bwd_config(M: int, K: int, N: int, LR: int, seg_sizes: Sequence[int], r_pad: int,
                elem_size: int, interpret: bool, prec: str = "tf32") -> dict:
    """Block sizes of the backward kernels (one config each, chosen by size and dtype).

    GPU: every kernel stays under ~200 KB of shared memory for its pipelined loop
    (3 stages for 16-bit inputs, 2 for fp32).
    """
    if interpret:
        big = 128
        return dict(
            g=dict(BLOCK_M=_pow2_clamp(M, 16, big), BLOCK_N=_pow2_clamp(max(seg_sizes), 16, big),
                   num_warps=4, num_stages=1),
            db=dict(BLOCK_N=_pow2_clamp(max(seg_sizes), 16, big), BLOCK_M=_pow2_clamp(M, 16, big),
                    num_warps=4, num_stages=1),
            dx=dict(BLOCK_M=_pow2_clamp(M, 16, big), BLOCK_K=_pow2_clamp(K, 16, big),
                    BLOCK_N=_pow2_clamp(N, 16, big), BLOCK_J=_pow2_clamp(LR, 16, big),
                    num_warps=4, num_stages=1),
            da=dict(BLOCK_J=_pow2_clamp(LR, 16, big), BLOCK_K=_pow2_clamp(K, 16, big),
                    BLOCK_M=_pow2_clamp(M, 16, big), num_warps=4, num_stages=1),
        )
    stages = 3 if elem_size <= 2 else 2
    small_r = r_pad <= 64
    if prec == "ieee":
        # full-fp32 products on FMA units: 8 warps and thin reduction steps keep operands in registers
        return dict(
            g=dict(BLOCK_M=32, BLOCK_N=32, num_warps=8, num_stages=2),
            db=dict(BLOCK_N=64, BLOCK_M=16, num_warps=8, num_stages=2),
            dx=dict(BLOCK_M=64, BLOCK_K=64, BLOCK_N=16, BLOCK_J=16, num_warps=8, num_stages=2),
            da=dict(BLOCK_J=_pow2_clamp(LR, 16, 64), BLOCK_K=64, BLOCK_M=16, num_warps=8, num_stages=2),
        )
    return dict(
        g=dict(BLOCK_M=64 if small_r else 32, BLOCK_N=128 if small_r else 64, num_warps=4,
               num_stages=stages),
        db=dict(BLOCK_N=128 if max(seg_sizes) > 64 else 64, BLOCK_M=64 if small_r else 32,
                num_warps=4, num_stages=stages),
        # dx tiles measured on an H100 (bf16, r 16; benchmarks/tune_triton.py): many rows (ViT-B/16, M 25k)
        # 128x256 (K) x64 (N), 8 warps, 3 stages: 0.223 ms vs 0.836 ms for 128x128; few rows (M 154, N 25k)
        # 64x128x64, 4 warps: 0.097 ms vs 0.120 ms
        dx=(dict(BLOCK_M=128, BLOCK_K=256, BLOCK_N=64, BLOCK_J=_pow2_clamp(LR, 16, 32), num_warps=8,
                 num_stages=3) if M > 512 and elem_size <= 2 and small_r else
            dict(BLOCK_M=64 if M <= 512 else 128, BLOCK_K=128, BLOCK_N=64,
                 BLOCK_J=_pow2_clamp(LR, 16, 32), num_warps=4 if M <= 512 else 8, num_stages=stages)),
        da=dict(BLOCK_J=_pow2_clamp(LR, 16, 64), BLOCK_K=128, BLOCK_M=64, num_warps=4,
                num_stages=stages),
    )


def _check_common(x, weight, lora_A, lora_B, seg_offsets, scales):
    seg_offsets = tuple(int(o) for o in seg_offsets)
    scales = tuple(float(s) for s in scales)
    L = len(seg_offsets) - 1
    assert x.dim() == 2, f"x must be 2-D [M, K], got {tuple(x.shape)}"
    M, K = x.shape
    assert weight.dim() == 2 and weight.shape[1] == K, \
        f"weight must be [N, {K}], got {tuple(weight.shape)} (x {tuple(x.shape)})"
    N = weight.shape[0]
    assert L >= 1 and seg_offsets[0] == 0 and seg_offsets[-1] == N and all(
        a < b for a, b in zip(seg_offsets, seg_offsets[1:])), \
        f"seg_offsets must be 0 = o_0 < ... < o_L = N = {N}, got {seg_offsets}"
    assert len(scales) == L, f"scales must have L = {L} entries, got {len(scales)}"
    assert lora_A.dim() == 2 and lora_A.shape[1] == K and lora_A.shape[0] % L == 0 and lora_A.shape[0] >= L, \
        f"lora_A must be [L*r, {K}] with L = {L}, got {tuple(lora_A.shape)}"
    r = lora_A.shape[0] // L
    assert tuple(lora_B.shape) == (N, r), f"lora_B must be [{N}, {r}], got {tuple(lora_B.shape)}"
    assert r <= 128, f"rank {r} > 128 is not supported by the Triton kernels"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x.dtype}"
    assert weight.dtype == lora_A.dtype == lora_B.dtype == x.dtype, (
        f"x, weight, lora_A, lora_B must share one dtype, got {x.dtype}, {weight.dtype}, "
        f"{lora_A.dtype}, {lora_B.dtype}")
    dev = x.device
    assert weight.device == dev and lora_A.device == dev and lora_B.device == dev, \
        "x, weight, lora_A, lora_B must be on one device"
    return seg_offsets, scales, L, M, K, N, r


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _on_device(device: torch.device):
    """Launch on the tensors' GPU even when another one is current (Triton uses the current one)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def segmented_lora_forward(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor,
                           lora_B: torch.Tensor, seg_offsets: Sequence[int], scales: Sequence[float],
                           bias: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Segmented LoRA projection forward in one launch.

    x ``[M, K]`` (any strides, M may be 0), weight ``[N, K]``, lora_A ``[L*r, K]``,
    lora_B ``[N, r]``, bias ``[N]`` or None, all one dtype; ``seg_offsets`` L+1 ints
    ``0 = o_0 < ... < o_L = N``; ``scales`` L floats.  Returns ``y`` ``[M, N]`` (x.dtype,
    contiguous) and ``xa = x @ lora_A.T`` ``[M, L*r]`` fp32 (saved for backward).
    """
    with _on_device(x.device):
        return _forward(x, weight, lora_A, lora_B, seg_offsets, scales, bias)


def _forward(x, weight, lora_A, lora_B, seg_offsets, scales, bias):
    seg_offsets, scales, L, M, K, N, r = _check_common(x, weight, lora_A, lora_B, seg_offsets, scales)
    if bias is not None:
        assert tuple(bias.shape) == (N,) and bias.dtype == x.dtype and bias.device == x.device, \
            f"bias must be [{N}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}"
    dev = x.device
    y = _empty((M, N), x.dtype, dev)
    xa = _empty((M, L * r), torch.float32, dev)
    if M == 0:
        return y, xa
    interpret = _interpreting()
    prec = _dot_precision(x.dtype)
    r_pad = _rank_pad(r)
    if r_pad >= 128 and x.element_size() == 2 and not interpret and _triton_compat.hopper_compiler_abort(dev):
        _triton_compat.refuse(f"the fused projection forward at rank {r} with {x.dtype} (ranks <= 64 compile)")
    seg_sizes = [b - a for a, b in zip(seg_offsets, seg_offsets[1:])]
    cfg = _fwd_config(M, K, seg_sizes, r_pad, x.element_size(), interpret, prec)
    tiles = _tile_table(seg_offsets, cfg["BLOCK_N"], dev)
    scale_t = _scales_tensor(scales, dev)
    grid = (_cdiv(M, cfg["BLOCK_M"]), tiles.shape[0])
    _seg_lora_fwd_kernel[grid](
        x, weight, lora_A, lora_B, bias if bias is not None else y, y, xa, tiles, scale_t,
        M, K, r,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), lora_A.stride(0), lora_A.stride(1),
        lora_B.stride(0), lora_B.stride(1), bias.stride(0) if bias is not None else 0,
        y.stride(0), y.stride(1), xa.stride(0), xa.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], R_PAD=r_pad, INTERPRET=interpret, PREC=prec,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return y, xa


def _finish_split(ws: torch.Tensor, out: torch.Tensor, interpret: bool) -> None:
    """Sum fp32 partials ``ws`` ``[S, *out.shape]`` into contiguous ``out``."""
    P = out.numel()
    block = 1024 if interpret else 512
    _split_sum_kernel[(_cdiv(P, block),)](ws, out, ws.shape[0], P, BLOCK=block,
                                                INTERPRET=interpret, num_warps=4)


def segmented_lora_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                            lora_A: torch.Tensor, lora_B: torch.Tensor, xa: torch.Tensor,
                            seg_offsets: Sequence[int], scales: Sequence[float],
                            need_dx: bool = True, need_dA: bool = True, need_dB: bool = True):
    """Backward of :func:`segmented_lora_forward`: ``(dx | None, dA | None, dB | None)``.

    grad_y ``[M, N]`` and x ``[M, K]`` any strides; xa ``[M, L*r]`` fp32 from the forward.
    ``dx`` ``[M, K]`` in x.dtype, ``dA`` ``[L*r, K]`` in lora_A.dtype, ``dB`` ``[N, r]`` in
    lora_B.dtype (contiguous).  Launches: g (if dx or dA), dx, dA, dB (each only if
    needed; plus a split-sum per split reduction on big GPUs).  With M == 0 nothing is
    launched: dx is empty and dA, dB are zeros.
    """
    with _on_device(x.device):
        return _backward(grad_y, x, weight, lora_A, lora_B, xa, seg_offsets, scales, need_dx, need_dA, need_dB)


def _backward(grad_y, x, weight, lora_A, lora_B, xa, seg_offsets, scales, need_dx, need_dA, need_dB):
    seg_offsets, scales, L, M, K, N, r = _check_common(x, weight, lora_A, lora_B, seg_offsets, scales)
    assert tuple(grad_y.shape) == (M, N), f"grad_y must be [{M}, {N}], got {tuple(grad_y.shape)}"
    assert grad_y.dtype == x.dtype and grad_y.device == x.device, \
        f"grad_y must be {x.dtype} on {x.device}, got {grad_y.dtype} on {grad_y.device}"
    LR = L * r
    assert tuple(xa.shape) == (M, LR) and xa.dtype == torch.float32 and xa.device == x.device, \
        f"xa must be fp32 [{M}, {LR}], got {xa.dtype} {tuple(xa.shape)}"
    dev = x.device
    dx = _empty((M, K), x.dtype, dev) if need_dx else None
    if M == 0:
        dA = torch.zeros((LR, K), dtype=lora_A.dtype, device=dev) if need_dA else None
        dB = torch.zeros((N, r), dtype=lora_B.dtype, device=dev) if need_dB else None
        return dx, dA, dB
    dA = _empty((LR, K), lora_A.dtype, dev) if need_dA else None
    dB = _empty((N, r), lora_B.dtype, dev) if need_dB else None
    if not (need_dx or need_dA or need_dB):
        return dx, dA, dB

    interpret = _interpreting()
    prec = _dot_precision(x.dtype)
    r_pad = _rank_pad(r)
    seg_sizes = [b - a for a, b in zip(seg_offsets, seg_offsets[1:])]
    cfg = _bwd_config(M, K, N, LR, seg_sizes, r_pad, x.element_size(), interpret, prec)
    scale_t = _scales_tensor(scales, dev)

    g = None
    if need_dx or need_dA:
        c = cfg["g"]
        g = _empty((M, LR), torch.float32, dev)
        offs_t = _offsets_tensor(seg_offsets, dev)
        _seg_lora_bwd_g_kernel[(_cdiv(M, c["BLOCK_M"]), L)](
            grad_y, lora_B, g, offs_t, scale_t, M, r,
            grad_y.stride(0), grad_y.stride(1), lora_B.stride(0), lora_B.stride(1), g.stride(0), g.stride(1),
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], R_PAD=r_pad, INTERPRET=interpret, PREC=prec,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )

    if need_dx:
        c = cfg["dx"]
        programs = _cdiv(M, c["BLOCK_M"]) * _cdiv(K, c["BLOCK_K"])
        splits = _split_heuristic(programs, N, c["BLOCK_N"], dev)
        n_chunk, splits = _split_chunks(N, splits, c["BLOCK_N"])
        j_chunk = _cdiv(_cdiv(LR, splits), c["BLOCK_J"]) * c["BLOCK_J"]
        out = dx if splits == 1 else _empty((splits, M, K), torch.float32, dev)
        os_ = 0 if splits == 1 else out.stride(0)
        om, ok = (out.stride(0), out.stride(1)) if splits == 1 else (out.stride(1), out.stride(2))
        _seg_lora_bwd_dx_kernel[(_cdiv(M, c["BLOCK_M"]), _cdiv(K, c["BLOCK_K"]), splits)](
            grad_y, weight, g, lora_A, out, M, N, K, LR, n_chunk, j_chunk,
            grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
            g.stride(0), g.stride(1), lora_A.stride(0), lora_A.stride(1), os_, om, ok,
            BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_N=c["BLOCK_N"], BLOCK_J=c["BLOCK_J"],
            INTERPRET=interpret, PREC=prec, num_warps=c["num_warps"], num_stages=c["num_stages"],
        )
        if splits > 1:
            _finish_split(out, dx, interpret)

    if need_dA:
        c = cfg["da"]
        programs = _cdiv(LR, c["BLOCK_J"]) * _cdiv(K, c["BLOCK_K"])
        splits = _split_heuristic(programs, M, c["BLOCK_M"], dev)
        m_chunk, splits = _split_chunks(M, splits, c["BLOCK_M"])
        out = dA if splits == 1 else _empty((splits, LR, K), torch.float32, dev)
        os_ = 0 if splits == 1 else out.stride(0)
        oj, ok = (out.stride(0), out.stride(1)) if splits == 1 else (out.stride(1), out.stride(2))
        _seg_lora_bwd_da_kernel[(_cdiv(LR, c["BLOCK_J"]), _cdiv(K, c["BLOCK_K"]), splits)](
            g, x, out, M, K, LR, m_chunk,
            g.stride(0), g.stride(1), x.stride(0), x.stride(1), os_, oj, ok,
            BLOCK_J=c["BLOCK_J"], BLOCK_K=c["BLOCK_K"], BLOCK_M=c["BLOCK_M"], INTERPRET=interpret, PREC=prec,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )
        if splits > 1:
            _finish_split(out, dA, interpret)

    if need_dB:
        c = cfg["db"]
        tiles = _tile_table(seg_offsets, c["BLOCK_N"], dev)
        splits = _split_heuristic(tiles.shape[0], M, c["BLOCK_M"], dev)
        m_chunk, splits = _split_chunks(M, splits, c["BLOCK_M"])
        out = dB if splits == 1 else _empty((splits, N, r), torch.float32, dev)
        os_ = 0 if splits == 1 else out.stride(0)
        on, or_ = (out.stride(0), out.stride(1)) if splits == 1 else (out.stride(1), out.stride(2))
        _seg_lora_bwd_db_kernel[(tiles.shape[0], splits)](
            grad_y, xa, out, tiles, scale_t, M, r, m_chunk,
            grad_y.stride(0), grad_y.stride(1), xa.stride(0), xa.stride(1), os_, on, or_,
            BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], R_PAD=r_pad, INTERPRET=interpret, PREC=prec,
            num_warps=c["num_warps"], num_stages=c["num_stages"],
        )
        if splits > 1:
            _finish_split(out, dB, interpret)

    return dx, dA, dB
