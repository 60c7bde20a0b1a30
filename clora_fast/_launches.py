"""Count the device kernels a call launches, on any device (a diagnostic for host-bound regimes).

At small shapes a GPU step is bound by the host: every kernel launch costs several microseconds of
CPU time whatever its size, so the number of launches per step predicts the wall time there better
than FLOPs or bytes.  :func:`count_launches` runs a function under a ``TorchDispatchMode`` and counts
the ATen operators that reach a device kernel: every op except views (outputs that alias an input)
and bare allocations.  The count is the same on the CPU as on a GPU for PyTorch code (what reaches
the dispatcher does not depend on the device), so it can be checked in CPU tests.  Triton / CUDA
extension kernels do not go through the dispatcher and are not counted; library GEMMs count one each
(cuBLAS may add a split-K reduction kernel of its own).
"""
from __future__ import annotations

from collections import Counter
from typing import Callable, Dict, Tuple

from torch.utils._python_dispatch import TorchDispatchMode

_NO_KERNEL = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach",
                        "alias", "lift_fresh", "_unsafe_view", "set_", "resize_"})


def _is_view(func) -> bool:
    return any(a.alias_info is not None and not a.alias_info.is_write for a in func._schema.returns)


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::", 1)[-1]
        if name not in _NO_KERNEL and not _is_view(func):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_launches(fn: Callable[[], object]) -> Tuple[int, Dict[str, int]]:
    """``(launches, {op: count})`` of one call of ``fn`` (forward and, when ``fn`` calls it, backward)."""
    with _Counter() as c:
        fn()
    return sum(c.ops.values()), dict(c.ops)
