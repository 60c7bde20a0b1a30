"""CUDA-graph capture state and the current stream, read as cheaply as Triton's own launcher reads them.

Shared by :mod:`clora_fast.ops` and the Triton launchers (``clora_fast.kernels``): their caches of small device
tensors change behaviour while a stream is being captured (a captured graph reads them by address at every
replay, so they must outlive it; what a capture writes is not valid before the first replay).
"""
from __future__ import annotations

import torch

#: ``capturing()``: whether the current CUDA stream is being captured (torch's C binding when it has one)
capturing = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None) or torch.cuda.is_current_stream_capturing
#: ``raw_stream(device_index)``: the current stream's handle on that device
raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None) or \
    (lambda index: torch.cuda.current_stream(index).cuda_stream)


def graph_capture(device: torch.device) -> bool:
    """Whether the current stream of a CUDA ``device`` is being captured into a CUDA graph."""
    return device.type == "cuda" and bool(capturing())
