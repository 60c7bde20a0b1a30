"""Pure-PyTorch reference implementations: the truth the kernels are tested against.

Every function here works on any device and dtype and is differentiable by
autograd.  Shapes use the PyTorch/PEFT convention: ``weight`` is ``[out, in]``,
``lora_A`` is ``[r, in]``, ``lora_B`` is ``[out, r]``.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch
from torch import Tensor


def lora_projection(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                    scale: float = 1.0, bias: Optional[Tensor] = None) -> Tensor:
    """``y = x @ weight.T + scale * (x @ lora_A.T) @ lora_B.T (+ bias)``; x ``[..., in]``."""
    y = torch.nn.functional.linear(x, weight, bias)
    return y + scale * torch.nn.functional.linear(torch.nn.functional.linear(x, lora_A), lora_B)


def segmented_lora_projection(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                              seg_offsets: Sequence[int], scales: Sequence[float],
                              bias: Optional[Tensor] = None) -> Tensor:
    """Many LoRA projections of the same input, concatenated along the output.

    ``weight`` ``[N, in]`` holds the L layers' weights stacked by rows; layer l owns
    output rows ``seg_offsets[l]:seg_offsets[l+1]``, A rows ``l*r:(l+1)*r`` of
    ``lora_A`` ``[L*r, in]`` and rows ``seg_offsets[l]:seg_offsets[l+1]`` of
    ``lora_B`` ``[N, r]``. Returns ``[..., N]``.
    """
    L = len(seg_offsets) - 1
    r = lora_A.shape[0] // L
    y = torch.nn.functional.linear(x, weight, bias)
    xa = torch.nn.functional.linear(x, lora_A)
    parts = []
    for l in range(L):
        n0, n1 = seg_offsets[l], seg_offsets[l + 1]
        parts.append(scales[l] * torch.nn.functional.linear(xa[..., l * r:(l + 1) * r], lora_B[n0:n1]))
    return y + torch.cat(parts, dim=-1)


def _no_autocast(t: Tensor):
    """A region without autocast for ``t``'s device (autocast would recast the fp32 products to bf16/fp16)."""
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


def _penalty_acc(*tensors) -> torch.dtype:
    """The penalty's working (and result) dtype: float64 when any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def forgetting_penalty(past: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float = 1.0) -> Tensor:
    """``sum((past * (scale * lora_B @ lora_A)) ** 2)`` as a 0-dim float32 tensor.

    Computed in float32 (float64 if any input is float64), like the kernels, also inside an autocast region."""
    acc = _penalty_acc(past, lora_A, lora_B)
    with _no_autocast(past):
        m = scale * (lora_B.to(acc) @ lora_A.to(acc))
        return (past.to(acc) * m).square().sum().to(acc)


def grouped_forgetting_penalty(pasts: Sequence[Tensor], lora_As: Sequence[Tensor],
                               lora_Bs: Sequence[Tensor], scales: Sequence[float]) -> Tensor:
    """Sum of :func:`forgetting_penalty` over layers."""
    total = None
    for p, a, b, s in zip(pasts, lora_As, lora_Bs, scales):
        v = forgetting_penalty(p, a, b, s)
        total = v if total is None else total + v
    return total


def forgetting_penalty_grads(past: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float = 1.0):
    """Closed-form ``(loss, dL/dA, dL/dB)`` in float32: with ``M = s*B@A`` and
    ``G = 2 * past**2 * M``: ``dA = s * B.T @ G``, ``dB = s * G @ A.T``.  float64 if any input is."""
    acc = _penalty_acc(past, lora_A, lora_B)
    p, a, b = past.to(acc), lora_A.to(acc), lora_B.to(acc)
    with _no_autocast(past):
        m = scale * (b @ a)
        p2 = p.square()
        loss = (p2 * m.square()).sum()
        g = 2.0 * p2 * m
        return loss, scale * (b.T @ g), scale * (g @ a.T)


# ---------------------------------------------------------------------------
# The launcher contract of docs/ARCHITECTURE.md, in plain PyTorch.  ``ops.py``
# wraps every backend's launchers in the same custom ops / autograd, so the
# "reference" backend goes through exactly the code path the kernels do.
# ---------------------------------------------------------------------------

def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def segmented_lora_forward(x, weight, lora_A, lora_B, seg_offsets, scales, bias=None):
    """Launcher contract: ``(y, xa)`` with ``xa = x @ lora_A.T`` in fp32 (fp64 for fp64 input)."""
    L = len(seg_offsets) - 1
    r = lora_A.shape[0] // L
    acc = _acc_dtype(x)
    y = torch.nn.functional.linear(x, weight, bias)
    xa = torch.nn.functional.linear(x.to(acc), lora_A.to(acc))
    if x.shape[0] == 0:
        return y, xa
    parts = []
    for l in range(L):
        n0, n1 = seg_offsets[l], seg_offsets[l + 1]
        parts.append(scales[l] * (xa[:, l * r:(l + 1) * r] @ lora_B[n0:n1].to(acc).T))
    y = (y.to(acc) + torch.cat(parts, dim=1)).to(x.dtype)
    return y, xa


def segmented_lora_backward(grad_y, x, weight, lora_A, lora_B, xa, seg_offsets, scales,
                            need_dx=True, need_dA=True, need_dB=True):
    """Launcher contract: ``(dx, dA, dB)`` (see docs/ARCHITECTURE.md), fp32 accumulation."""
    L = len(seg_offsets) - 1
    r = lora_A.shape[0] // L
    acc = _acc_dtype(x)
    gy = grad_y.to(acc)
    g = torch.empty(x.shape[0], L * r, dtype=acc, device=x.device)
    dB = torch.empty(lora_B.shape, dtype=acc, device=x.device) if need_dB else None
    for l in range(L):
        n0, n1 = seg_offsets[l], seg_offsets[l + 1]
        g[:, l * r:(l + 1) * r] = scales[l] * (gy[:, n0:n1] @ lora_B[n0:n1].to(acc))
        if need_dB:
            dB[n0:n1] = scales[l] * (gy[:, n0:n1].T @ xa[:, l * r:(l + 1) * r].to(acc))
    dx = dA = None
    if need_dx:
        dx = (gy @ weight.to(acc) + g @ lora_A.to(acc)).to(x.dtype)
    if need_dA:
        dA = (g.T @ x.to(acc)).to(lora_A.dtype)
    if need_dB:
        dB = dB.to(lora_B.dtype)
    return dx, dA, dB


def forgetting_penalty_forward(past, lora_A, lora_B, scale):
    """Launcher contract: ``(loss, dA, dB)`` in fp32 (fp64 for fp64 input)."""
    return forgetting_penalty_grads(past, lora_A, lora_B, scale)


def grouped_forgetting_penalty_forward(pasts, lora_As, lora_Bs, scales):
    """Launcher contract: ``(loss, [dA_l], [dB_l])``."""
    loss, dAs, dBs = None, [], []
    for p, a, b, s in zip(pasts, lora_As, lora_Bs, scales):
        l_, da, db = forgetting_penalty_grads(p, a, b, s)
        loss = l_ if loss is None else loss + l_
        dAs.append(da)
        dBs.append(db)
    return loss, dAs, dBs
