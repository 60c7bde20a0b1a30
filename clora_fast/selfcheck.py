"""``python -m clora_fast.selfcheck``: list the usable backends and check every op of
every backend against the float64 reference (forward and gradients) on small odd shapes.

Exit status 0 when every check passes, 1 otherwise.  On a CPU-only machine the
Triton kernels are checked through the interpreter when ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

import clora_fast
from clora_fast import ops

TOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-6)).item()


def _check_projection(backend, dtype, device):
    g = torch.Generator().manual_seed(0)
    M, K, N, r = 5, 33, 77, 4
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w, wv = ((torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype) for _ in range(2))
    a, av = ((torch.randn(r, K, generator=g) / K ** 0.5).to(device, dtype).requires_grad_() for _ in range(2))
    b, bv = ((torch.randn(N, r, generator=g) / r ** 0.5).to(device, dtype).requires_grad_() for _ in range(2))
    outs = []
    for bk, dt in ((backend, dtype), ("reference", torch.float64)):   # the backend vs the float64 reference
        xs, ws, wvs = (t.to(dt) for t in (x, w, wv))
        ps = [t.detach().to(dt).requires_grad_() for t in (a, b, av, bv)]
        y = ops.lora_projection(xs, ws, ps[0], ps[1], scale=0.5, backend=bk)
        k, v = ops.lora_kv_projection(xs, (ws, wvs), (ps[0], ps[2]), (ps[1], ps[3]), scale=0.5, backend=bk)
        loss = (y.double() ** 2).sum() + (k.double() * v.double()).sum()
        outs.append([y, k, v] + list(torch.autograd.grad(loss, ps)))
    return max(_rel_err(got, ref) for got, ref in zip(*outs))


def _check_merged(impl, dtype, device):
    """The merged-weight strategy (the one "auto" takes for a layer's K/V on CUDA) through one of its two
    autograd Functions ("python", or "cpp": the host extension clora_fast._host) vs the float64 reference."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 33, generator=g).to(device, dtype)
    w, wv = ((torch.randn(19, 33, generator=g) / 33 ** 0.5).to(device, dtype) for _ in range(2))
    bias = [torch.randn(19, generator=g).to(device, dtype) for _ in range(2)]
    fac = [(torch.randn(4, 33, generator=g) / 33 ** 0.5).to(device, dtype) for _ in range(2)] + \
          [(torch.randn(19, 4, generator=g) / 2).to(device, dtype) for _ in range(2)]
    outs, saved = [], ops.MERGED_IMPL
    try:
        for im, dt, bk in ((impl, dtype, "auto"), ("python", torch.float64, "reference")):
            ops.MERGED_IMPL = im
            ps = [t.detach().to(dt).requires_grad_() for t in fac]
            xs = x.to(dt).requires_grad_()
            k, v = ops.lora_kv_projection(xs, (w.to(dt), wv.to(dt)), ps[:2], ps[2:], scale=0.5,
                                          biases=[t.to(dt) for t in bias], backend=bk, strategy="merged")
            loss = (k.double() * v.double()).sum()
            outs.append([k, v] + list(torch.autograd.grad(loss, [xs] + ps)))
    finally:
        ops.MERGED_IMPL = saved
    return max(_rel_err(got, ref) for got, ref in zip(*outs))


def _check_penalty(backend, dtype, device):
    g = torch.Generator().manual_seed(1)
    shapes = [(77, 33), (20, 65)]
    pasts = [(torch.randn(o, i, generator=g) * 0.1).to(device, dtype) for o, i in shapes]
    As = [(torch.randn(4, i, generator=g) * 0.1).to(device, dtype).requires_grad_() for _, i in shapes]
    Bs = [(torch.randn(o, 4, generator=g) * 0.1).to(device, dtype).requires_grad_() for o, _ in shapes]
    outs = []
    for bk, dt in ((backend, dtype), ("reference", torch.float64)):   # the backend vs the float64 reference
        ps = [p.to(dt) for p in pasts]
        a_s = [t.detach().to(dt).requires_grad_() for t in As]
        b_s = [t.detach().to(dt).requires_grad_() for t in Bs]
        single = ops.forgetting_penalty(ps[0], a_s[0], b_s[0], scale=0.5, backend=bk)
        grouped = ops.grouped_forgetting_penalty(ps, a_s, b_s, scales=[0.5, 2.0], backend=bk)
        outs.append([single, grouped] + list(torch.autograd.grad(single + grouped, a_s + b_s)))
    return max(_rel_err(gt, rf) for gt, rf in zip(*outs))


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _report(label: str, name: str, dtype, check) -> bool:
    """Run one check (``check() -> max relative error``), print its line, return whether it passed
    (an exception is a failure that is reported, and the other checks go on)."""
    t0 = time.perf_counter()
    try:
        err = check()
        passed = err <= TOL[dtype]
        msg = f"max rel err {err:.2e} (tol {TOL[dtype]:.0e})"
    except Exception as e:  # report every failure, keep checking the rest
        passed, msg = False, f"{type(e).__name__}: {e}"
    print(f"  [{'ok' if passed else 'FAIL'}] {label} {str(dtype)[6:]:8s} {name:10s} {msg}"
          f"  ({time.perf_counter() - t0:.2f}s)")
    return passed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m clora_fast.selfcheck", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    try:
        device = torch.device(args.device)
        torch.empty(1, device=device)          # the device must exist here (cuda without a GPU: one line, not N FAILs)
    except (RuntimeError, AssertionError) as e:
        print(f"selfcheck: --device {args.device!r} cannot be used here: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    backends = clora_fast.available_backends()
    print(f"clora_fast {clora_fast.__version__}  torch {torch.__version__}  device {device}")
    print(f"available backends: {', '.join(backends)}")
    ok = True
    for backend in backends:
        for dtype in DTYPES:
            for name, fn in (("projection", _check_projection), ("penalty", _check_penalty)):
                ok &= _report(f"{backend:9s}", name, dtype, lambda: fn(backend, dtype, device))
    impls = ["python"] + (["cpp"] if ops._cpp_merged() is not None else [])
    print("merged strategy (one layer's K/V on CUDA): "
          + ("C++ autograd Function of clora_fast._host" if "cpp" in impls
             else "Python autograd Function (the C++ host extension clora_fast._host is not built)"))
    for impl in impls:
        for dtype in DTYPES:
            ok &= _report(f"merged/{impl:6s}", "projection", dtype, lambda: _check_merged(impl, dtype, device))
    print("selfcheck passed" if ok else "selfcheck FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
