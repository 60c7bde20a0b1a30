"""Kernel configurations that an older Triton cannot compile for the GPU at hand.

Triton 3.0 and 3.1 abort the whole process (a C++ assertion in their compiler, "mma -> mma layout
conversion is only supported on Ampere") on a few of our kernel configurations for Hopper (sm_90),
where a ``tl.dot`` result feeds the next ``tl.dot`` on the warp-group MMA.  Found by compiling the
launchers' configurations (SD whole-UNet and ViT-B shapes, ranks 16-128, fp32/bf16/fp16, every penalty
option) for sm_90 with Triton 3.0, 3.1 and 3.2 on the CPU (docs/COMPATIBILITY.md): 3.2 compiles all of
them, 3.0 and 3.1 abort on exactly the two cases the launchers refuse.  The launchers raise a clear error
instead of letting the compiler abort: an ``assert`` in C++ cannot be caught from Python.
"""
import re

import torch
import triton

TRITON_VERSION = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])


def hopper_compiler_abort(device: torch.device) -> bool:
    """True on a Hopper GPU with a Triton older than 3.2 (the configurations named by the callers abort there)."""
    return TRITON_VERSION < (3, 2) and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9


def refuse(what: str) -> None:
    raise RuntimeError(f"Triton {triton.__version__} aborts the process compiling {what} for this GPU (sm_90): a "
                       f"Triton compiler bug, fixed in Triton 3.2. Upgrade Triton (pip install 'triton>=3.2'; it "
                       f"comes with torch >= 2.6), or use the reference backend (backend='reference')")
