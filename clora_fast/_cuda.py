"""CUDA C++ backend: the launchers of the compiled extension ``clora_fast._C`` (``csrc/``).

Same four launchers, same signatures, as every backend (docs/ARCHITECTURE.md, "Kernel launcher
contract"): plain tensors in, plain tensors out, no autograd.

The extension is optional.  Build it with::

    CLORA_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .

(or ``CLORA_FAST_BUILD_CUDA=1 python setup.py build_ext --inplace``, or CMake: see
CMakeLists.txt).  It is imported lazily, on first use; a module that fails to import (not
built, or built against another torch) only makes this backend unavailable.  Setting
``CLORA_FAST_CUDA_EXT=/path/to/_C.<abi>.so`` loads that file instead of ``clora_fast._C``
(e.g. the CMake build's output).

``is_available()`` is True when the extension imports AND a CUDA device is present; every
launcher raises ``RuntimeError`` saying which of the two is missing otherwise.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["is_available", "is_built", "unavailable_reason", "build_info", "segmented_lora_forward",
           "segmented_lora_backward", "forgetting_penalty_forward", "grouped_forgetting_penalty_forward"]

BUILD_HINT = "CLORA_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e ."
ENV_EXT_PATH = "CLORA_FAST_CUDA_EXT"

_lock = threading.Lock()
_state = {"loaded": False, "module": None, "error": None, "file": None}


def _load():
    """Import the extension once; returns the module or None (the error is remembered)."""
    if _state["loaded"]:
        return _state["module"]
    with _lock:
        if _state["loaded"]:
            return _state["module"]
        path = os.environ.get(ENV_EXT_PATH)
        try:
            if path:
                if not os.path.isfile(path):
                    raise ImportError(f"{ENV_EXT_PATH}={path} is not a file")
                spec = importlib.util.spec_from_file_location("clora_fast._C", path)
                module = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(module)
            else:
                module = importlib.import_module("clora_fast._C")
            _state["module"] = module
            _state["file"] = getattr(module, "__file__", path)
        except Exception as e:  # not built, or an ABI mismatch (undefined symbol, ...)
            _state["error"] = f"{type(e).__name__}: {e}"
        _state["loaded"] = True
        return _state["module"]


def is_built() -> bool:
    """True when the compiled extension imports."""
    return _load() is not None


def is_available() -> bool:
    """True when the extension is built (imports) AND a CUDA device is present."""
    return is_built() and torch.cuda.is_available()


def unavailable_reason() -> Optional[str]:
    """Why the CUDA backend cannot run here (None when it can), with how to fix it."""
    if not is_built():
        return (f"the CUDA extension clora_fast._C is not built or does not import "
                f"({_state['error']}); build it with: {BUILD_HINT}")
    if not torch.cuda.is_available():
        return ("the CUDA extension clora_fast._C is built but no CUDA device is available "
                "(torch.cuda.is_available() is False); use backend='reference' or 'triton' on this machine")
    return None


def build_info() -> dict:
    """How the extension was built (when it imports) and whether it can run here."""
    module = _load()
    info = {
        "built": module is not None,
        "available": module is not None and torch.cuda.is_available(),
        "cuda_device": torch.cuda.is_available(),
        "module_file": _state["file"],
        "import_error": _state["error"],
        "build_hint": BUILD_HINT,
    }
    if module is not None:
        info.update(module.build_info())
    return info


def _require():
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError("clora_fast CUDA backend: " + reason)
    return _state["module"]


def segmented_lora_forward(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                           seg_offsets: Sequence[int], scales: Sequence[float],
                           bias: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """``y = x @ weight.T + bias + concat_l(scales[l] * xa_l @ lora_B[o_l:o_{l+1}].T)``, ``xa = x @ lora_A.T``.

    x ``[M, K]`` (any strides, M may be 0), weight ``[N, K]``, lora_A ``[L*r, K]``, lora_B ``[N, r]``,
    bias ``[N]`` or None, one dtype in {fp32, fp16, bf16}.  Returns y ``[M, N]`` (x.dtype, contiguous)
    and xa ``[M, L*r]`` float32 (saved for backward).
    """
    ext = _require()
    y, xa = ext.segmented_lora_forward(x, weight, lora_A, lora_B, [int(o) for o in seg_offsets],
                                       [float(s) for s in scales], bias)
    return y, xa


def segmented_lora_backward(grad_y: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                            xa: Tensor, seg_offsets: Sequence[int], scales: Sequence[float],
                            need_dx: bool = True, need_dA: bool = True, need_dB: bool = True
                            ) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(dx, dA, dB)`` of the segmented projection (None where not needed).

    With ``g_l = scales[l] * grad_y[:, o_l:o_{l+1}] @ lora_B[o_l:o_{l+1}]``: ``dx = grad_y @ weight +
    concat(g) @ lora_A`` (x.dtype), ``dA_l = g_l.T @ x`` (lora_A.dtype), ``dB[o_l:o_{l+1}] = scales[l] *
    grad_y[:, o_l:o_{l+1}].T @ xa_l`` (lora_B.dtype); fp32 accumulation throughout.
    """
    ext = _require()
    dx, dA, dB = ext.segmented_lora_backward(grad_y, x, weight, lora_A, lora_B, xa, [int(o) for o in seg_offsets],
                                             [float(s) for s in scales], bool(need_dx), bool(need_dA), bool(need_dB))
    return dx, dA, dB


def forgetting_penalty_forward(past: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float
                               ) -> Tuple[Tensor, Tensor, Tensor]:
    """``(loss, dA, dB)``: ``loss = sum(past**2 * M**2)`` with ``M = scale * lora_B @ lora_A``, and its
    gradients ``dA = scale * B.T @ G``, ``dB = scale * G @ A.T``, ``G = 2 * past**2 * M`` (all fp32),
    in one fused pass over ``past`` ``[out, in]``."""
    ext = _require()
    loss, dA, dB = ext.forgetting_penalty_forward(past, lora_A, lora_B, float(scale))
    return loss, dA, dB


def grouped_forgetting_penalty_forward(pasts: Sequence[Tensor], lora_As: Sequence[Tensor],
                                       lora_Bs: Sequence[Tensor], scales
                                       ) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """The sum over layers of :func:`forgetting_penalty_forward`, in ONE kernel launch (no copy of
    the pasts); ``scales`` is a sequence (one per layer) or a single float."""
    ext = _require()
    pasts, lora_As, lora_Bs = list(pasts), list(lora_As), list(lora_Bs)
    if isinstance(scales, (int, float)):
        scales = [float(scales)] * len(pasts)
    loss, dAs, dBs = ext.grouped_forgetting_penalty_forward(pasts, lora_As, lora_Bs, [float(s) for s in scales])
    return loss, list(dAs), list(dBs)
