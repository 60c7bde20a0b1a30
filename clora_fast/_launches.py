"""Count the device kernels a call launches, on any device (a diagnostic for host-bound regimes).

At small shapes a GPU step is bound by the host: every kernel launch costs several microseconds of
CPU time whatever its size, so the number of launches per step predicts the wall time there better
than FLOPs or bytes.  :func:`count_launches` runs a function under a ``TorchDispatchMode`` and counts

* the ATen operators that reach a device kernel: every op except views (outputs that alias an
  input) and bare allocations.  What reaches the dispatcher does not depend on the device, so the
  count is the same on the CPU as on a GPU and can be checked in CPU tests (library GEMMs count one
  each; cuBLAS may add a split-K reduction kernel of its own);
* Triton kernel launches (``JITFunction.run``, and the interpreter's ``InterpretedFunction.run``
  under ``TRITON_INTERPRET=1``; ``GridExecutor.__call__`` on Triton 3.0), as ``"triton:<kernel name>"``.

Kernels of the CUDA C++ extension (called through pybind, not the dispatcher) are not counted.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Callable, Dict, Iterator, Tuple

from torch.utils._python_dispatch import TorchDispatchMode

_NO_KERNEL = frozenset({"empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach",
                        "alias", "lift_fresh", "_unsafe_view", "set_", "resize_"})


def _is_view(func) -> bool:
    return any(a.alias_info is not None and not a.alias_info.is_write for a in func._schema.returns)


class _Counter(TorchDispatchMode):
    def __init__(self, ops: Counter):
        super().__init__()
        self.ops = ops
        self.paused = 0          # inside a Triton launch: the interpreter's own host copies are not kernels

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::", 1)[-1]
        if not self.paused and name not in _NO_KERNEL and not _is_view(func):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _triton_launches(ops: Counter, mode: _Counter) -> Iterator[None]:
    """Count every Triton kernel launch (compiled or interpreted) while the block runs."""
    classes = []
    try:
        from triton.runtime.jit import JITFunction
        classes.append(JITFunction)
        from triton.runtime.interpreter import InterpretedFunction
        classes.append(InterpretedFunction)
    except Exception:  # noqa: BLE001 - no triton, or a layout without the interpreter class
        pass
    saved = [(cls, "run", cls.__dict__["run"]) for cls in classes if "run" in cls.__dict__]
    if classes and "run" not in classes[-1].__dict__:
        # Triton 3.0's interpreter: `kernel[grid](...)` calls a GridExecutor, and `run` is set per instance
        try:
            from triton.runtime.interpreter import GridExecutor
            saved.append((GridExecutor, "__call__", GridExecutor.__dict__["__call__"]))
        except Exception:  # noqa: BLE001
            pass

    def wrap(run):
        def counted(self, *args, **kwargs):
            if not kwargs.get("warmup", False):
                fn = getattr(self, "fn", None)
                ops["triton:" + getattr(fn, "__name__", getattr(self, "__name__", "kernel"))] += 1
            mode.paused += 1
            try:
                return run(self, *args, **kwargs)
            finally:
                mode.paused -= 1
        return counted

    for cls, attr, run in saved:
        setattr(cls, attr, wrap(run))
    try:
        yield
    finally:
        for cls, attr, run in saved:
            setattr(cls, attr, run)


def count_launches(fn: Callable[[], object]) -> Tuple[int, Dict[str, int]]:
    """``(launches, {op: count})`` of one call of ``fn`` (forward and, when ``fn`` calls it, backward)."""
    ops: Counter = Counter()
    mode = _Counter(ops)
    with _triton_launches(ops, mode), mode:
        fn()
    return sum(ops.values()), dict(ops)
