"""Input checks for the public ops: every bad input gets an error that names the
argument, what it got, and what was expected."""
from __future__ import annotations

import numbers
import os
from typing import Optional, Sequence

import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
REFERENCE_DTYPES = KERNEL_DTYPES + (torch.float64,)
BACKENDS = ("auto", "reference", "triton", "cuda")


def _fmt(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_tensor(name: str, t, *, ndim: Optional[int] = None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got {t.dim()}-D tensor with {_fmt(t)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (float32/float16/bfloat16), got {t.dtype}")
    return t


def check_same_device(named: Sequence[tuple]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t is not None and t.device != first.device:
            raise RuntimeError(
                f"all tensors must be on one device: {first_name} is on {first.device} but {name} is on "
                f"{t.device}; move them with .to({first.device!s})")


def check_same_dtype(named: Sequence[tuple]) -> None:
    first_name, first = named[0]
    for name, t in named[1:]:
        if t is not None and t.dtype != first.dtype:
            raise TypeError(
                f"mixed dtypes: {first_name} is {first.dtype} but {name} is {t.dtype}; cast them to one "
                f"dtype, or run under torch.autocast, which casts every input to the autocast dtype")


def check_dtype_for_backend(name: str, t: Tensor, backend: str) -> None:
    allowed = REFERENCE_DTYPES if backend == "reference" else KERNEL_DTYPES
    if t.dtype not in allowed:
        raise TypeError(
            f"{name} has dtype {t.dtype}, which the {backend!r} backend does not support; "
            f"supported: {', '.join(str(d) for d in allowed)}")


def check_scale(name: str, s) -> float:
    if isinstance(s, Tensor):
        if s.numel() != 1:
            raise ValueError(f"{name} must be a Python float, got a tensor of shape {tuple(s.shape)}")
        if s.requires_grad:
            raise TypeError(f"{name} is a tensor that requires grad, but the LoRA scale is a constant of the "
                            f"ops (no gradient flows to it); pass a float or {name}.detach()")
        s = s.item()
    if isinstance(s, bool) or not isinstance(s, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(s).__name__}")
    return float(s)


def check_lora_shapes(x_in: int, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
                      suffix: str = "", rank: Optional[int] = None) -> None:
    """``weight [out, in]``, ``lora_A [r, in]`` (or, given ``rank``, ``[L*rank, in]``: segments stacked),
    ``lora_B [out, r]``, ``bias [out]``."""
    out_f, in_f = weight.shape
    if in_f != x_in:
        raise ValueError(f"weight{suffix} has shape {tuple(weight.shape)} ([out, in]) but x has {x_in} input "
                         f"features (x.shape[-1]); expected weight{suffix}.shape[1] == {x_in}")
    r = lora_A.shape[0] if rank is None else rank
    if r < 1:
        raise ValueError(f"lora_A{suffix} has rank 0 (shape {tuple(lora_A.shape)}); the rank must be >= 1")
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A{suffix} must have shape [r, in] = [r, {in_f}], got {tuple(lora_A.shape)}")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B{suffix} must have shape [out, r] = [{out_f}, {r}] to match weight{suffix} "
                         f"{tuple(weight.shape)} and lora_A{suffix} {tuple(lora_A.shape)}, got {tuple(lora_B.shape)}")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias{suffix} must have shape [out] = [{out_f}], got {tuple(bias.shape)}")


_TRITON_OK: Optional[bool] = None


def layout_overlap(layout, pasts):
    """The first two layers of a packed-penalty ``layout`` (entries ``(f, a_row, b_row, r)``; layer ``l``
    owns rows ``a_row:a_row+r`` of ``flat_As[f]`` and ``b_row:b_row+out_l`` of ``flat_Bs[f]``) that share
    rows of a flat buffer, as ``(name, f, (start, stop, layer), (start, stop, layer))`` with the first span
    starting first; None when every layer owns its rows (its gradient is written there)."""
    spans: dict = {}
    for l, (f, a, b, r) in enumerate(layout):
        for name, start, stop in (("flat_As", a, a + r), ("flat_Bs", b, b + pasts[l].shape[0])):
            if stop > start:                               # an empty span owns no row
                spans.setdefault((name, f), []).append((start, stop, l))
    for (name, f), iv in spans.items():
        iv.sort()
        for first, second in zip(iv, iv[1:]):              # sorted by start: an overlap shows between neighbours
            if second[0] < first[1]:
                return name, f, first, second
    return None


def triton_available() -> bool:
    """Whether triton imports (checked once per process: on the hot path of every op)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
            _TRITON_OK = True
        except Exception:  # pragma: no cover - depends on the install
            _TRITON_OK = False
    return _TRITON_OK


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_backend(backend: str, device: torch.device, *dtypes: torch.dtype) -> str:
    """Turn ``backend`` (auto/reference/triton/cuda) into a concrete backend for ``device``.  ``auto``
    takes the reference path for ``dtypes`` the kernels do not support (float64 on a GPU)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "auto":
        if device.type == "cuda" and triton_available() and all(d in KERNEL_DTYPES for d in dtypes):
            return "triton"
        return "reference"
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend='triton' needs the triton package: pip install triton "
                               "(or use backend='reference')")
        if device.type == "cpu" and not interpreting():
            raise RuntimeError(
                "backend='triton' got CPU tensors; Triton kernels run on CUDA tensors, or on the CPU only in the "
                "Triton interpreter (set TRITON_INTERPRET=1 before the first launch). Use backend='reference' "
                "or 'auto' for CPU tensors, or move the tensors to a GPU")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"backend='triton' does not support tensors on {device}")
    if backend == "cuda":
        if device.type != "cuda":
            raise RuntimeError(f"backend='cuda' needs CUDA tensors, got tensors on {device}; "
                               f"use backend='reference' or 'auto'")
        from . import _cuda
        if not _cuda.is_available():
            raise RuntimeError("backend='cuda' is not available: " + _cuda.unavailable_reason())
    return backend
