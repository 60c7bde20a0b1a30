"""The public ops (clora_fast.ops): reference vs float64, gradcheck, every backend
through the custom ops and autograd, torch.compile, autocast and bad inputs.

Tolerance idiom (flash-attention): a backend's error against a float64 reference
must be at most twice the error of the same op computed by plain PyTorch in the
same dtype, plus a small floor.
"""
import re

import numpy as np
import pytest
import torch
from hypothesis import Phase, given, settings, strategies as st

import clora_fast
from clora_fast import ops, reference as R

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def backends_for(device):
    out = ["reference"]
    if "triton" in clora_fast.available_backends():
        out.append("triton")
    if device.type == "cuda" and "cuda" in clora_fast.available_backends():
        out.append("cuda")
    return out


def make_lora(M, K, N, r, dtype, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(N, K, generator=g) / K ** 0.5).to(device, dtype)
    a = (torch.randn(r, K, generator=g) / K ** 0.5).to(device, dtype)
    b = (torch.randn(N, r, generator=g) / r ** 0.5).to(device, dtype)
    bb = torch.randn(N, generator=g).to(device, dtype) if bias else None
    return x, w, a, b, bb


@pytest.fixture(params=["python", "cpp"])
def merged_impl(request, monkeypatch):
    """Both implementations of the merged strategy: the Python autograd Function and the C++ one of the
    host extension clora_fast._host (csrc/merged_lora.cpp; skipped when it is not built here)."""
    if request.param == "cpp" and ops._cpp_merged() is None:
        pytest.skip("the C++ host extension clora_fast._host is not built here")
    monkeypatch.setattr(ops, "MERGED_IMPL", request.param)
    return request.param


def proj_and_grads(fn, x, w, a, b, bias, gy):
    x, a, b = (t.detach().clone().requires_grad_(True) for t in (x, a, b))
    bias = bias.detach().clone().requires_grad_(True) if bias is not None else None
    y = fn(x, w, a, b, bias)
    y.backward(gy)
    out = [y.detach(), x.grad, a.grad, b.grad]
    if bias is not None:
        out.append(bias.grad)
    return out


def torch_in_dtype(x, w, a, b, bias, scale):
    return R.lora_projection(x, w, a, b, scale, bias)


def assert_close_idiom(got, ref64, torch_low, dtype, what):
    err = (got.double() - ref64).abs().max().item()
    base = (torch_low.double() - ref64).abs().max().item()
    bound = 2 * base + FLOOR[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= bound, f"{what}: error {err:.3g} > bound {bound:.3g} (torch {dtype} error {base:.3g})"
    return err


# ---------------------------------------------------------------------------
# The reference against float64 formulas
# ---------------------------------------------------------------------------

def test_reference_matches_float64_formulas():
    x, w, a, b, bias = make_lora(5, 33, 77, 4, torch.float64, torch.device("cpu"))
    y = R.lora_projection(x, w, a, b, 0.3, bias)
    torch.testing.assert_close(y, x @ w.T + 0.3 * (x @ a.T) @ b.T + bias, rtol=0, atol=1e-12)
    p = torch.randn(77, 33, dtype=torch.float64)
    m = 0.3 * b @ a
    expect = ((p * m) ** 2).sum()
    torch.testing.assert_close(R.forgetting_penalty(p, a, b, 0.3), expect, rtol=1e-12, atol=0)
    loss, dA, dB = R.forgetting_penalty_grads(p, a, b, 0.3)
    a_, b_ = a.clone().requires_grad_(), b.clone().requires_grad_()
    ((p * (0.3 * b_ @ a_)) ** 2).sum().backward()
    torch.testing.assert_close(dA, a_.grad)
    torch.testing.assert_close(dB, b_.grad)


def test_gradcheck_reference_float64():
    d = torch.float64
    x, w, a, b, bias = make_lora(3, 6, 7, 2, d, torch.device("cpu"))
    x, a, b, bias = (t.requires_grad_() for t in (x, a, b, bias))
    assert torch.autograd.gradcheck(
        lambda x, a, b, bias: ops.lora_projection(x, w, a, b, scale=0.7, bias=bias, backend="reference"),
        (x, a, b, bias))
    wk = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, a, b, wk: ops.lora_kv_projection(x, (wk, w[:4]), (a, 2 * a), (b, b[:4]), scale=0.7,
                                                   backend="reference"), (x, a, b, wk))
    p = torch.randn(7, 6, dtype=d)
    assert torch.autograd.gradcheck(lambda a, b: ops.forgetting_penalty(p, a, b, scale=0.7, backend="reference"),
                                    (a, b))
    assert torch.autograd.gradcheck(
        lambda a, b: ops.grouped_forgetting_penalty([p, p[:3]], [a, a], [b, b[:3]], scales=[0.7, 2.0],
                                                    backend="reference"), (a, b))


_TWICE = "differentiable once"


def _double_backward_cases(backend, dtype=torch.float64, device="cpu"):
    """(name, f(x, a, b) -> scalar) through every autograd Function / custom op of the library."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(5, 6, generator=g, dtype=dtype).to(device)
    p = torch.randn(5, 6, generator=g, dtype=dtype).to(device)
    flat = [(0, 0, 0, 2)]
    return [
        ("fused projection", lambda x, a, b: ops.lora_projection(x, w, a, b, scale=0.7, backend=backend,
                                                                 strategy="fused").square().sum()),
        ("merged projection", lambda x, a, b: ops.lora_projection(x, w, a, b, scale=0.7, backend=backend,
                                                                  strategy="merged").square().sum()),
        ("merged K/V", lambda x, a, b: sum(t.square().sum() for t in ops.lora_kv_projection(
            x, (w, w), (a, a), (b, b), scale=0.7, backend=backend, strategy="merged"))),
        ("penalty", lambda x, a, b: ops.forgetting_penalty(p, a, b, scale=0.8, backend=backend)),
        ("grouped penalty", lambda x, a, b: ops.grouped_forgetting_penalty([p, p], [a, a], [b, b], scales=0.8,
                                                                           backend=backend)),
        ("packed penalty", lambda x, a, b: ops.packed_forgetting_penalty([p], [a], [b], flat, scales=0.8,
                                                                         backend=backend)),
    ]


@pytest.mark.parametrize("custom_op", [False, True], ids=["function", "custom_op"])
def test_double_backward_raises_instead_of_wrong_values(merged_impl, custom_op, monkeypatch):
    """create_graph=True: the first-order gradients are the usual ones, and differentiating them again
    raises a clear error (before, the penalties' saved gradients and the fused path's saved xa gave
    silently wrong second derivatives, and the merged path raised an unrelated out= error)."""
    if custom_op:   # the custom-op path torch.compile takes, run eagerly
        monkeypatch.setattr(ops, "_compiling", lambda: True)
    g = torch.Generator().manual_seed(4)
    x0, a0, b0 = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, 6), (2, 6), (5, 2)))
    for name, f in _double_backward_cases("reference"):
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        gx, ga, gb = torch.autograd.grad(f(x, a, b), (x, a, b), create_graph=True, allow_unused=True)
        x1, a1, b1 = (t.clone().requires_grad_() for t in (x0, a0, b0))
        expect = torch.autograd.grad(f(x1, a1, b1), (x1, a1, b1), allow_unused=True)
        for got, exp in zip((gx, ga, gb), expect):
            assert (got is None) == (exp is None), name
            if got is not None:
                torch.testing.assert_close(got, exp, rtol=0, atol=0, msg=name)
        with pytest.raises(RuntimeError, match=_TWICE):
            torch.autograd.grad((ga.square().sum() + a.sum()), a)
        # the plain backward right after is unaffected
        x2, a2, b2 = (t.clone().requires_grad_() for t in (x0, a0, b0))
        f(x2, a2, b2).backward()
        torch.testing.assert_close(a2.grad, expect[1], rtol=0, atol=0, msg=name)


def test_double_backward_raises_triton(device):
    g = torch.Generator().manual_seed(5)
    x0, a0, b0 = (torch.randn(*s, generator=g).to(device) for s in ((4, 6), (2, 6), (5, 2)))
    for name, f in _double_backward_cases("triton", torch.float32, device):
        if name.startswith("merged"):
            continue                                 # covered above: the merged strategy is backend-independent
        x, a, b = (t.clone().requires_grad_() for t in (x0, a0, b0))
        _, ga, _ = torch.autograd.grad(f(x, a, b), (x, a, b), create_graph=True, allow_unused=True)
        with pytest.raises(RuntimeError, match=_TWICE):
            torch.autograd.grad(ga.sum(), a)


# ---------------------------------------------------------------------------
# Every backend through the public ops, forward and all gradients
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r", [1, 16])
def test_lora_projection_backends(device, dtype, r):
    M, K, N, scale = 5, 33, 77, 0.5
    x, w, a, b, bias = make_lora(M, K, N, r, dtype, device, seed=r)
    gy = torch.randn(M, N, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    ref64 = proj_and_grads(lambda *t: torch_in_dtype(*t, scale), *(t.double() for t in (x, w, a, b, bias)),
                           gy.double())
    low = proj_and_grads(lambda *t: torch_in_dtype(*t, scale), x, w, a, b, bias, gy)
    for backend in backends_for(device):
        got = proj_and_grads(lambda x, w, a, b, bias: ops.lora_projection(x, w, a, b, scale=scale, bias=bias,
                                                                          backend=backend), x, w, a, b, bias, gy)
        for name, g, r64, lo in zip(["y", "dx", "dA", "dB", "dbias"], got, ref64, low):
            assert g.dtype == dtype and g.shape == r64.shape, (backend, name)
            assert_close_idiom(g, r64, lo, dtype, f"{backend} {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("L,r,scales", [(1, 1, [0.5]), (2, 16, [0.5, 0.5]), (3, 3, [0.5, 2.0, -1.0])])
def test_merged_strategy_matches_float64(device, dtype, L, r, scales, merged_impl):
    """strategy='merged' (W + s*B@A folded per call, library GEMMs): forward and every gradient
    against float64 with the tolerance idiom, on odd shapes, equal segments, per-segment scales."""
    M, K, n = 7, 33, 19
    offsets = [i * n for i in range(L + 1)]
    g = torch.Generator().manual_seed(10 + L)
    x = torch.randn(M, K, generator=g).to(device, dtype)
    w = (torch.randn(L * n, K, generator=g) / K ** 0.5).to(device, dtype)
    a = (torch.randn(L * r, K, generator=g) / K ** 0.5).to(device, dtype)
    b = (torch.randn(L * n, r, generator=g) / r ** 0.5).to(device, dtype)
    bias = torch.randn(L * n, generator=g).to(device, dtype)
    gy = torch.randn(M, L * n, generator=g).to(device, dtype)

    def seg(fn):
        return lambda x, w, a, b, bias: fn(x, w, a, b, offsets, scales, bias)

    ref = seg(lambda *t: R.segmented_lora_projection(*t))
    ref64 = proj_and_grads(ref, *(t.double() for t in (x, w, a, b, bias)), gy.double())
    low = proj_and_grads(ref, x, w, a, b, bias, gy)
    for backend in backends_for(device):
        got = proj_and_grads(seg(lambda x, w, a, b, o, s, bias: ops.segmented_lora_projection(
            x, w, a, b, o, s, bias=bias, backend=backend, strategy="merged")), x, w, a, b, bias, gy)
        for name, gt, r64, lo in zip(["y", "dx", "dA", "dB", "dbias"], got, ref64, low):
            assert gt.dtype == dtype and gt.shape == r64.shape, (backend, name)
            assert_close_idiom(gt, r64, lo, dtype, f"merged {backend} {name}")


@pytest.mark.parametrize("strategy", ["fused", "merged"])
def test_split_outputs_match_slicing(device, strategy, merged_impl):
    """split=True: one output per segment (views); gradients equal those of slicing one output,
    also when a segment's output is unused (its gradient is None)."""
    offs = (0, 11, 22, 33) if strategy == "merged" else (0, 7, 22, 33)
    x, w, a, b, bias = make_lora(6, 20, 33, 3 * 2, torch.float64, device)
    a = a[:6].reshape(6, 20)                                    # 3 segments x r 2
    b = b[:, :2].contiguous()
    xs = x.reshape(2, 3, 20)
    for used in ((0, 1, 2), (0, 2)):
        leaves = [t.detach().clone().requires_grad_() for t in (xs, a, b, bias)]
        outs = ops.segmented_lora_projection(leaves[0], w, leaves[1], leaves[2], offs, [0.5, 1.0, 2.0],
                                             bias=leaves[3], backend="reference", strategy=strategy, split=True)
        assert isinstance(outs, tuple) and [o.shape for o in outs] == [(2, 3, e - s) for s, e in zip(offs, offs[1:])]
        got = torch.autograd.grad(sum(outs[i].sin().sum() for i in used), leaves)
        ref_leaves = [t.detach().clone().requires_grad_() for t in (xs, a, b, bias)]
        y = R.segmented_lora_projection(ref_leaves[0], w, ref_leaves[1], ref_leaves[2], offs, [0.5, 1.0, 2.0],
                                        bias=ref_leaves[3])
        want = torch.autograd.grad(sum(y[..., offs[i]:offs[i + 1]].sin().sum() for i in used), ref_leaves)
        for o, (s_, e) in zip(outs, zip(offs, offs[1:])):
            torch.testing.assert_close(o, y[..., s_:e], rtol=1e-12, atol=1e-12)
        for g, w_ in zip(got, want):
            torch.testing.assert_close(g, w_, rtol=1e-10, atol=1e-12)
    # split_columns on a plain tensor: same gradients as slicing; bad offsets are refused
    y = torch.randn(4, 9, dtype=torch.float64, device=device, requires_grad=True)
    parts = ops.split_columns(y, (0, 2, 9))
    g1, = torch.autograd.grad(parts[1].square().sum(), y)
    g2, = torch.autograd.grad(y[:, 2:9].square().sum(), y)
    assert torch.equal(g1, g2)
    with pytest.raises(ValueError, match="offsets must increase strictly from 0 to y.shape"):
        ops.split_columns(y, (0, 5, 5, 9))
    # 3-D y, one output unused: the same gradients, and the split is ONE dispatcher call (split_with_sizes;
    # it was a reshape, a slice and a reshape per segment: 64 host calls for the whole UNet's K/V)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func._schema.name)
            return func(*args, **(kwargs or {}))
    y3 = torch.randn(2, 3, 9, dtype=torch.float64, device=device, requires_grad=True)
    with Calls() as calls:
        parts = ops.split_columns(y3, (0, 2, 5, 9))
    assert calls.names == ["aten::split_with_sizes"], calls.names
    assert [p.shape for p in parts] == [(2, 3, 2), (2, 3, 3), (2, 3, 4)]
    g1, = torch.autograd.grad(parts[0].sin().sum() + parts[2].square().sum(), y3)
    g2, = torch.autograd.grad(y3[..., 0:2].sin().sum() + y3[..., 5:9].square().sum(), y3)
    assert torch.equal(g1, g2)


def test_merged_strategy_gradcheck_layouts_and_choice(device, monkeypatch, merged_impl):
    d = torch.float64
    x, w, a, b, bias = make_lora(3, 6, 8, 2, d, torch.device("cpu"))
    x, a, b, bias = (t.requires_grad_() for t in (x, a, b, bias))
    wt = w.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, a, b, bias, wt: ops.segmented_lora_projection(
            x, wt, torch.cat([a, 2 * a]), b, (0, 4, 8), [0.7, -1.3], bias=bias, backend="reference",
            strategy="merged"), (x, a, b, bias, wt))
    # non-contiguous x, leading dims, M = 0, grad of the K/V views
    x, w, a, b, _ = make_lora(8, 33, 20, 4, torch.float32, device)
    xt = torch.randn(2, 33, 4, device=device).transpose(1, 2)          # [2, 4, 33] non-contiguous
    k, v = ops.lora_kv_projection(xt, (w, w.flip(0)), (a, a), (b, b.flip(0)), scale=0.5, strategy="merged")
    torch.testing.assert_close(k, R.lora_projection(xt, w, a, b, 0.5), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(v, R.lora_projection(xt, w.flip(0), a, b.flip(0), 0.5), rtol=1e-4, atol=1e-4)
    a_ = a.clone().requires_grad_()
    y = ops.lora_projection(torch.empty(0, 33, device=device), w, a_, b, strategy="merged")
    assert y.shape == (0, 20)
    y.sum().backward()
    assert a_.grad.abs().max().item() == 0.0
    # K/V with split outputs: only K used (V's gradient is None), biases, trainable weight
    g = torch.Generator().manual_seed(9)
    xd = torch.randn(2, 3, 16, generator=g, dtype=torch.float64, requires_grad=True)
    wk = torch.randn(8, 16, generator=g, dtype=torch.float64, requires_grad=True)
    wv = torch.randn(8, 16, generator=g, dtype=torch.float64)
    ab = [torch.randn(*sh, generator=g, dtype=torch.float64, requires_grad=True) for sh in ((3, 16), (3, 16), (8, 3),
                                                                                            (8, 3), (8,), (8,))]
    for use_v in (True, False):
        k, v = ops.lora_kv_projection(xd, (wk, wv), ab[0:2], ab[2:4], scale=0.7, biases=ab[4:6], strategy="merged")
        kr = R.lora_projection(xd, wk, ab[0], ab[2], 0.7, ab[4])
        vr = R.lora_projection(xd, wv, ab[1], ab[3], 0.7, ab[5])
        got = torch.autograd.grad(k.cos().sum() + (v.square().sum() if use_v else 0), [xd, wk] + ab, allow_unused=True)
        want = torch.autograd.grad(kr.cos().sum() + (vr.square().sum() if use_v else 0), [xd, wk] + ab,
                                   allow_unused=True)
        for gt, wt in zip(got, want):
            wt = torch.zeros_like(gt) if wt is None else wt
            torch.testing.assert_close(gt, wt, rtol=1e-10, atol=1e-12)
    # which strategy "auto" picks, and the errors
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert ops._pick_strategy("auto", "triton", cuda, True) == "merged"
    assert ops._pick_strategy("auto", "cuda", cuda, True) == "merged"
    assert ops._pick_strategy("auto", "triton", cuda, False) == "fused"      # unequal segments
    assert ops._pick_strategy("auto", "reference", cuda, True) == "fused"
    assert ops._pick_strategy("auto", "triton", cpu, True) == "fused"
    monkeypatch.setenv("CLORA_FAST_STRATEGY", "merged")       # the override of "auto"
    assert ops._pick_strategy("auto", "reference", cpu, True) == "merged"
    assert ops._pick_strategy("auto", "triton", cuda, False) == "fused"
    monkeypatch.setenv("CLORA_FAST_STRATEGY", "fused")
    assert ops._pick_strategy("auto", "triton", cuda, True) == "fused"
    monkeypatch.delenv("CLORA_FAST_STRATEGY")
    with pytest.raises(ValueError, match="strategy='merged' needs segments of one size"):
        ops.segmented_lora_projection(x, w, torch.cat([a, a]), b, (0, 5, 20), 1.0, strategy="merged")
    with pytest.raises(ValueError, match="strategy must be one of"):
        ops.lora_projection(x, w, a, b, strategy="fast")


def test_auto_backend_takes_reference_for_dtypes_the_kernels_lack(monkeypatch, device):
    """backend='auto' on a GPU picks the kernels for fp32/fp16/bf16 and the reference path for float64
    (which the kernels reject: before, auto picked them and float64 CUDA tensors raised a TypeError);
    an explicit backend='triton' still names the dtype it cannot take."""
    from clora_fast import _validate
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    monkeypatch.setattr(_validate, "triton_available", lambda: True)
    assert _validate.resolve_backend("auto", cuda, torch.bfloat16, torch.float32) == "triton"
    assert _validate.resolve_backend("auto", cuda, torch.float32, torch.float64) == "reference"
    assert _validate.resolve_backend("auto", cuda) == "triton"
    assert _validate.resolve_backend("auto", cpu, torch.float32) == "reference"
    x, w, a, b = (torch.randn(*s, dtype=torch.float64, device=device) for s in ((3, 4), (5, 4), (2, 4), (5, 2)))
    with pytest.raises(TypeError, match="x has dtype torch.float64, which the 'triton' backend does not support"):
        ops.lora_projection(x, w, a, b, backend="triton", strategy="fused")


@pytest.mark.parametrize("stacked", [False, True])
@pytest.mark.parametrize("bias_kind", ["none", "user", "frozen"])
def test_merged_layouts_bias_and_unused_outputs(device, stacked, bias_kind, merged_impl):
    """Every layout of the merged K/V path (stacked flat factors as a controller holds them, or
    per-segment tensors as a user does; without bias, with a user's bias or with one marked frozen as a
    controller's is; x @ A^T taken from the forward GEMM's extra columns or recomputed; dy_l @ s_l B_l from
    the dx GEMMs' extra columns or separate GEMMs) against the float64 reference, with 3-D x and with one
    output unused."""
    d, M, K, n, r = torch.float64, 5, 12, 7, 3
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, M, K, generator=g, dtype=d).to(device)
    w = torch.randn(2 * n, K, generator=g, dtype=d).to(device)
    a0 = torch.randn(2 * r, K, generator=g, dtype=d).to(device)
    b0 = torch.randn(2 * n, r, generator=g, dtype=d).to(device)
    bias0 = torch.randn(2 * n, generator=g, dtype=d).to(device) if bias_kind != "none" else None
    if bias_kind == "frozen":
        ops.mark_frozen_bias(bias0)
    gys = [torch.randn(2, M, n, generator=g, dtype=d).to(device) for _ in range(2)]
    for used in ((0, 1), (1,)):
        leaves = [t.detach().clone().requires_grad_() for t in (x0, a0, b0)]
        x, a, b = leaves
        if stacked:
            outs = ops.segmented_lora_projection(x, w, a, b, (0, n, 2 * n), 0.5, bias=bias0, strategy="merged",
                                                 split=True)
        else:
            outs = ops.lora_kv_projection(x, (w[:n], w[n:]), (a[:r], a[r:]), (b[:n], b[n:]), scale=0.5,
                                          biases=None if bias0 is None else (bias0[:n], bias0[n:]),
                                          strategy="merged")
        got = torch.autograd.grad([outs[i] for i in used], leaves, [gys[i] for i in used])
        ref_leaves = [t.detach().clone().requires_grad_() for t in (x0, a0, b0)]
        y = R.segmented_lora_projection(ref_leaves[0], w, ref_leaves[1], ref_leaves[2], (0, n, 2 * n), [0.5, 0.5],
                                        bias=bias0)
        want = torch.autograd.grad([y[..., i * n:(i + 1) * n] for i in used], ref_leaves, [gys[i] for i in used])
        for i in range(2):
            assert outs[i].shape == (2, M, n)
            torch.testing.assert_close(outs[i], y[..., i * n:(i + 1) * n], rtol=1e-12, atol=1e-12)
        for name, gt, wt in zip(("x", "A", "B"), got, want):
            torch.testing.assert_close(gt, wt, rtol=1e-10, atol=1e-12, msg=f"d{name} used={used}")


def test_merged_frozen_bias_padding_follows_the_bias(merged_impl):
    """A bias marked frozen (a controller's) is padded for the forward GEMM's x @ A^T columns once, not per call
    (no concatenation in a steady step); an in-place write to it (a new version), or another tensor, is seen at
    the next call; a user's bias with stacked A keeps x @ A^T out of the forward GEMM (no per-call padding)."""
    from clora_fast._launches import count_launches
    g = torch.Generator().manual_seed(8)
    M, K, n, r = 6, 10, 5, 2
    x0, w = torch.randn(M, K, generator=g), torch.randn(2 * n, K, generator=g)
    a, b = torch.randn(2 * r, K, generator=g).requires_grad_(), torch.randn(2 * n, r, generator=g).requires_grad_()
    frozen, user = torch.randn(2 * n, generator=g), torch.randn(2 * n, generator=g)
    ops.mark_frozen_bias(frozen)

    def step(bias):
        x = x0.clone().requires_grad_()
        outs = ops.segmented_lora_projection(x, w, a, b, (0, n, 2 * n), 0.5, bias=bias, strategy="merged",
                                             split=True)
        torch.autograd.grad([o.sum() for o in outs], [x, a, b])
        return outs

    for bias in (frozen, user):
        step(bias)
        _, ops_seen = count_launches(lambda: step(bias))
        assert "cat" not in ops_seen, ops_seen
        assert ("mm" in ops_seen) and ops_seen.get("copy_", 0) == (1 if bias is frozen else 0), ops_seen
    for change in ("in place", "new tensor"):
        if change == "in place":
            frozen.add_(1.0)
        else:
            frozen = frozen * 2
            ops.mark_frozen_bias(frozen)
        outs = step(frozen)
        want = R.segmented_lora_projection(x0, w, a.detach(), b.detach(), (0, n, 2 * n), [0.5, 0.5], bias=frozen)
        torch.testing.assert_close(torch.cat(outs, -1), want, msg=change)


def test_merged_ride_along_with_a_strided_B(merged_impl):
    """The merged strategy's blockdiag(s_l B_l) columns built from a stacked B that is not contiguous (a
    transposed view): the same outputs and gradients as the float64 reference."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(5, 12, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(14, 12, generator=g, dtype=torch.float64)
    a = torch.randn(6, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 14, generator=g, dtype=torch.float64).t().requires_grad_()
    assert not b.is_contiguous()
    outs = ops.segmented_lora_projection(x, w, a, b, (0, 7, 14), 0.5, strategy="merged", split=True)
    got = torch.autograd.grad([o.square().sum() for o in outs], [x, a, b])
    y = R.segmented_lora_projection(x, w, a, b, (0, 7, 14), [0.5, 0.5])
    want = torch.autograd.grad(y.square().sum(), [x, a, b])
    torch.testing.assert_close(torch.cat(outs, -1), y)
    for gt, wt in zip(got, want):
        torch.testing.assert_close(gt, wt)


def test_host_extension_built_from_other_sources_is_not_called(monkeypatch):
    """A clora_fast._host built from older sources (another calling convention of merged_lora) is not called with
    arguments it does not take: a warning says to rebuild, and the merged strategy runs the Python Function."""
    import sys
    import types

    import clora_fast
    stale = types.ModuleType("clora_fast._host")
    stale.__file__ = "stale/_host.so"
    stale.merged_lora = lambda *args: pytest.fail("the stale extension was called")
    monkeypatch.setitem(sys.modules, "clora_fast._host", stale)
    monkeypatch.setattr(clora_fast, "_host", stale, raising=False)
    monkeypatch.setattr(ops, "_CPP_MERGED", [])
    monkeypatch.setattr(ops, "MERGED_IMPL", "auto")
    with pytest.warns(UserWarning, match=f"calling convention 1, expected {ops._MERGED_ABI}"):
        assert ops._cpp_merged() is None
    x, w = torch.randn(3, 8, requires_grad=True), torch.randn(10, 8)
    a, b = torch.randn(4, 8, requires_grad=True), torch.randn(10, 2, requires_grad=True)
    outs = ops.segmented_lora_projection(x, w, a, b, (0, 5, 10), 0.5, strategy="merged", split=True)
    torch.testing.assert_close(torch.cat(outs, -1), R.segmented_lora_projection(x, w, a, b, (0, 5, 10), [0.5, 0.5]))


@pytest.mark.gpu
def test_gpu_merged_call_first_made_inside_a_cuda_graph_capture(merged_impl):
    """A merged K/V call with scales not seen before (its block-diagonal scale tensor not cached yet) made first
    inside a CUDA graph capture: nothing is copied from the host during the capture (that would fail it), and
    the replay gives the eager outputs."""
    g = torch.Generator().manual_seed(2)
    M, K, n, r, bf = 64, 96, 48, 8, torch.bfloat16
    x = torch.randn(M, K, generator=g).to("cuda", bf).requires_grad_()
    w = (torch.randn(2 * n, K, generator=g) / K ** 0.5).to("cuda", bf)
    a = (torch.randn(2 * r, K, generator=g) / K ** 0.5).to("cuda", bf).requires_grad_()
    b = (torch.randn(2 * n, r, generator=g) * 0.1).to("cuda", bf).requires_grad_()
    bias = torch.randn(2 * n, generator=g).to("cuda", bf)
    ops.mark_frozen_bias(bias)

    def call(s):
        return ops.segmented_lora_projection(x, w, a, b, (0, n, 2 * n), s, bias=bias, strategy="merged", split=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call(0.5)                                        # warm-up (cuBLAS, the allocator) with other scales
    torch.cuda.current_stream().wait_stream(side)
    s_new = 0.3125
    assert ((s_new, s_new), bf, b.device) not in ops._DIAGS
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = call(s_new)
    # what the capture built stays the graph's: its captured fills run only at a replay
    assert ((s_new, s_new), bf, b.device) not in ops._DIAGS
    graph.replay()
    torch.cuda.synchronize()
    for p, q in zip(got, call(s_new)):
        assert torch.equal(p, q)
    ops._DIAGS.clear()                                   # the other implementation's run builds it again


def test_merged_caches_evict_least_recently_used(monkeypatch):
    """The merged strategy's small caches (zero padding, scale diagonals, padded frozen biases) are LRUs: an entry
    every call uses survives others passing through (a captured CUDA graph reads it by address), bounded."""
    monkeypatch.setattr(ops, "_ZEROS", type(ops._ZEROS)())
    cpu = torch.device("cpu")
    hot = ops._zeros(3, torch.float32, cpu)
    for n in range(4, 4 + 3 * ops._CACHE_MAX):
        ops._zeros(n, torch.float32, cpu)
        assert ops._zeros(3, torch.float32, cpu) is hot
    assert len(ops._ZEROS) == ops._CACHE_MAX and (4, torch.float32, cpu) not in ops._ZEROS
    monkeypatch.setattr(ops, "_PADDED", type(ops._PADDED)())
    bias = torch.randn(5)
    ops.mark_frozen_bias(bias)
    padded = ops._xa_bias(bias, 2, False)
    others = []
    for _ in range(2 * ops._CACHE_MAX):
        others.append(torch.randn(5))
        ops.mark_frozen_bias(others[-1])
        ops._xa_bias(others[-1], 2, False)
        assert ops._xa_bias(bias, 2, False) is padded
    assert torch.equal(padded, torch.cat((bias, torch.zeros(2)))) and len(ops._PADDED) == ops._CACHE_MAX


def test_kv_fast_path_equals_checked_path(monkeypatch, merged_impl):
    """lora_kv_projection's fast path (one run of comparisons for the common call) computes exactly what
    the fully checked path computes, and leaves every other call (autocast, unequal widths, fused, bad
    input) to the checked path."""
    K, n, r = 12, 6, 2
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(2, 3, K, generator=g)
    W = [torch.randn(n, K, generator=g) for _ in range(2)]
    A0 = [torch.randn(r, K, generator=g) for _ in range(2)]
    B0 = [torch.randn(n, r, generator=g) for _ in range(2)]
    bias = [torch.randn(n, generator=g) for _ in range(2)]
    gy = [torch.randn(2, 3, n, generator=g) for _ in range(2)]

    def run():
        x = x0.clone().requires_grad_()
        A = [a.clone().requires_grad_() for a in A0]
        B = [b.clone().requires_grad_() for b in B0]
        outs = ops.lora_kv_projection(x, W, A, B, scale=0.5, biases=bias, strategy="merged")
        torch.autograd.backward(outs, gy)
        return [o.detach() for o in outs] + [x.grad] + [t.grad for t in A + B]

    def spy_on(name):
        """Wrap ops.<name>; the returned list records, per call, whether the fast path took the call."""
        orig, taken = getattr(ops, name), []

        def spy(*a, **k):
            out = orig(*a, **k)
            taken.append(out is not None)
            return out
        monkeypatch.setattr(ops, name, spy)
        return taken

    calls = spy_on("_kv_fast")
    fast = run()
    assert calls == [True]
    spied = ops._kv_fast
    monkeypatch.setattr(ops, "_kv_fast", lambda *a, **k: None)
    checked = run()
    for f, c in zip(fast, checked):
        assert torch.equal(f, c)
    monkeypatch.setattr(ops, "_kv_fast", spied)
    calls.clear()
    x = torch.randn(2, K)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        k, _ = ops.lora_kv_projection(x, W, A0, B0, strategy="merged")
    assert k.dtype == torch.bfloat16
    ops.lora_kv_projection(x, (W[0], W[1][:4]), A0, (B0[0], B0[1][:4]))                     # unequal widths
    ops.lora_kv_projection(x, W, A0, B0, strategy="fused")
    with pytest.raises(ValueError, match=r"lora_B\[1\] \(V\) must have shape"):
        ops.lora_kv_projection(x, W, A0, (B0[0], B0[1][:, :1]), strategy="merged")
    assert calls == [False] * 4

    # the segmented entry (a controller's call): checked the first time seg_offsets are seen, fast after
    monkeypatch.setattr(ops, "_OFFSETS_OK", {})
    seg = spy_on("_segmented_fast")
    Wc, Ac, Bc, bc = torch.cat(W), torch.cat(A0), torch.cat(B0), torch.cat(bias)
    res = []
    for _ in range(2):
        xs, a, b = x0.clone().requires_grad_(), Ac.clone().requires_grad_(), Bc.clone().requires_grad_()
        outs = ops.segmented_lora_projection(xs, Wc, a, b, (0, n, 2 * n), 0.5, bias=bc, strategy="merged",
                                             split=True)
        torch.autograd.backward(outs, gy)
        res.append([o.detach() for o in outs] + [xs.grad, a.grad, b.grad])
    assert seg == [False, True]
    for f, c in zip(res[1], res[0]):
        assert torch.equal(f, c)


def test_merged_kv_launch_counts(merged_impl):
    """Host-bound regimes pay per kernel launch: the merged K/V fwd+bwd must stay within a few
    launches of the two dense projections and far below PEFT's unfused LoRA (counts are the ATen
    ops that reach a kernel, the same on a CPU as on a GPU; see clora_fast._launches)."""
    from clora_fast._launches import count_launches
    import torch.nn.functional as F

    K, n, r = 16, 8, 2
    x = torch.randn(2, 3, K, requires_grad=True)
    W = [torch.randn(n, K) for _ in range(2)]
    A = [torch.randn(r, K, requires_grad=True) for _ in range(2)]
    B = [torch.randn(n, r, requires_grad=True) for _ in range(2)]
    bias = [torch.randn(n) for _ in range(2)]
    gy = [torch.randn(2, 3, n) for _ in range(2)]
    Wc, Ac, Bc = torch.cat(W), torch.cat(A).detach().requires_grad_(), torch.cat(B).detach().requires_grad_()

    def step(outs_fn):
        def fn():          # gradients handed back as they are (x.grad would copy a strided dx: x is a model's
            outs = list(outs_fn())                                   # activation, not a leaf, in training)
            leaves = [t for t in (x, *A, *B, Ac, Bc) if t.requires_grad]
            torch.autograd.grad(outs, leaves, gy, allow_unused=True)
        fn()
        return count_launches(fn)[0]

    for bs in (None, bias):
        bc = None if bs is None else torch.cat(bs)
        dense = step(lambda: [F.linear(x, W[i], None if bs is None else bs[i]) for i in range(2)])
        ours = step(lambda: ops.lora_kv_projection(x, W, A, B, scale=0.5, biases=bs, strategy="merged"))
        peft = step(lambda: [F.linear(x, W[i], None if bs is None else bs[i])
                             + F.linear(F.linear(x, A[i]), B[i]) * 0.5 for i in range(2)])
        flat = step(lambda: ops.segmented_lora_projection(x, Wc, Ac, Bc, (0, n, 2 * n), 0.5,
                                                          bias=bc,
                                                          strategy="merged", split=True))
        assert 4 <= dense <= 6, dense                 # 2 forward GEMMs, 2 dx GEMMs, one add (5 on torch 2.14)
        assert ours <= dense + (6 if bs is None else 8), (ours, dense)      # 11 / 13 on torch 2.14
        assert flat <= dense + 4, (flat, dense)      # 9: dy_l @ s_l B_l rides along in the dx GEMMs
        assert peft >= 1.9 * ours, (peft, ours)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float32_master_factors_of_a_half_precision_call(device, dtype, merged_impl):
    """Float32 A / B with fp16 / bf16 x and weight (mixed-precision training keeps float32 masters): every path of
    the merged strategy (the A rows riding along or not, Z or not, stacked or per-segment factors, equal or
    per-segment scales) and the fused / reference ones take them as they are; outputs in x's dtype and
    gradients in float32 within the tolerance idiom against float64 (PyTorch's error: the same op with the
    factors cast to x's dtype), and the merged strategy makes no cast of a factor in forward."""
    from clora_fast._launches import count_launches
    g = torch.Generator().manual_seed(21)
    M, K, n, r = 6, 24, 10, 3
    x0 = torch.randn(2, M // 2, K, generator=g)
    w0 = torch.randn(2 * n, K, generator=g) / K ** 0.5
    a0 = torch.randn(2 * r, K, generator=g) / K ** 0.5
    b0 = torch.randn(2 * n, r, generator=g) / r ** 0.5
    bias0 = torch.randn(2 * n, generator=g)
    gy = [torch.randn(2, M // 2, n, generator=g) for _ in range(2)]

    def run(fdt, cdt, x_trains, a_trains, b_trains, split, per_segment, scales, strategy, backend="reference"):
        x = x0.to(device, cdt, copy=True).requires_grad_(x_trains)
        a, b = (t.to(device, fdt, copy=True).requires_grad_(tr) for t, tr in ((a0, a_trains), (b0, b_trains)))
        w, bias = w0.to(device, cdt), bias0.to(device, cdt)
        if per_segment:
            y = ops.lora_kv_projection(x, (w[:n], w[n:]), (a[:r], a[r:]), (b[:n], b[n:]), scale=scales[0],
                                       biases=(bias[:n], bias[n:]), backend=backend, strategy=strategy)
        else:
            y = ops.segmented_lora_projection(x, w, a, b, (0, n, 2 * n), scales, bias=bias, backend=backend,
                                              strategy=strategy, split=split)
            y = y if split else (y[..., :n], y[..., n:])
        leaves = [t for t in (x, a, b) if t.requires_grad] if torch.is_grad_enabled() else []
        grads = torch.autograd.grad(y, leaves, [t.to(device, cdt) for t in gy]) if leaves else ()
        return [t.detach() for t in y], dict(zip([k for k, t in zip("xab", (x, a, b)) if t.requires_grad], grads))

    cases = [dict(x_trains=True, a_trains=True, b_trains=True, split=True, per_segment=False, scales=[0.5, 0.5]),
             dict(x_trains=True, a_trains=True, b_trains=True, split=True, per_segment=False, scales=[0.5, -2.0]),
             dict(x_trains=True, a_trains=True, b_trains=True, split=False, per_segment=False, scales=[0.3, 0.3]),
             dict(x_trains=True, a_trains=True, b_trains=True, split=True, per_segment=True, scales=[0.3, 0.3]),
             dict(x_trains=False, a_trains=True, b_trains=True, split=True, per_segment=False, scales=[0.3, 0.3]),
             dict(x_trains=True, a_trains=False, b_trains=True, split=True, per_segment=False, scales=[0.3, 0.3]),
             dict(x_trains=True, a_trains=True, b_trains=False, split=True, per_segment=False, scales=[0.3, 0.3])]
    for case in cases:
        ys64, g64 = run(torch.float64, torch.float64, strategy="merged", **case)
        ys_lo, g_lo = run(dtype, dtype, strategy="merged", **case)           # the factors cast to x's dtype
        for strategy, backend in [("merged", "reference")] + [("fused", bk) for bk in backends_for(device)]:
            ys, gs = run(torch.float32, dtype, strategy=strategy, backend=backend, **case)
            what = f"{strategy} {backend} {case}"
            for y, y64, ylo in zip(ys, ys64, ys_lo):
                assert y.dtype == dtype, what
                assert_close_idiom(y, y64, ylo, dtype, f"{what} y")
            assert gs.keys() == g64.keys(), what
            for k, gt in gs.items():
                assert gt.dtype == (dtype if k == "x" else torch.float32), (what, k)
                assert_close_idiom(gt, g64[k], g_lo[k], dtype, f"{what} d{k}")
        with torch.no_grad():
            ys, _ = run(torch.float32, dtype, strategy="merged", **case)
        for y, y64, ylo in zip(ys, ys64, ys_lo):
            assert_close_idiom(y, y64, ylo, dtype, f"no grad {case} y")

    # the controller's call: float32 masters cost the two gradient casts only (a cast per factor and per call
    # before: four launches more than the all-half call)
    x = x0.to(device, dtype, copy=True).requires_grad_()
    w, bias = w0.to(device, dtype), bias0.to(device, dtype)
    ops.mark_frozen_bias(bias)
    gys = [t.to(device, dtype) for t in gy]

    def call(a, b, cast):
        def fn():
            A, B = (a.to(dtype), b.to(dtype)) if cast else (a, b)
            ys = ops.segmented_lora_projection(x, w, A, B, (0, n, 2 * n), 0.5, bias=bias, strategy="merged",
                                               split=True)
            torch.autograd.grad(ys, [x, a, b], gys)
        fn()
        return count_launches(fn)[0]

    a32, b32, a_h, b_h = (t.to(device, dt, copy=True).requires_grad_()
                          for t, dt in ((a0, torch.float32), (b0, torch.float32), (a0, dtype), (b0, dtype)))
    half, master, cast = call(a_h, b_h, False), call(a32, b32, False), call(a32, b32, True)
    assert master == half + 2 and cast == half + 4, (half, master, cast)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_kv_projection_backends(device, dtype):
    M, K, r = 6, 40, 4
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, M // 2, K, generator=g).to(device, dtype)
    qkv = (torch.randn(3 * 24, K, generator=g) / K ** 0.5).to(device, dtype)   # timm-style fused rows
    wk, wv = qkv[24:48], qkv[48:]
    ak, av = ((torch.randn(r, K, generator=g) / K ** 0.5).to(device, dtype) for _ in range(2))
    bk, bv = ((torch.randn(24, r, generator=g) / r ** 0.5).to(device, dtype) for _ in range(2))
    k64 = R.lora_projection(x.double(), wk.double(), ak.double(), bk.double(), 2.0)
    v64 = R.lora_projection(x.double(), wv.double(), av.double(), bv.double(), 2.0)
    klo = R.lora_projection(x, wk, ak, bk, 2.0)
    vlo = R.lora_projection(x, wv, av, bv, 2.0)
    for backend in backends_for(device):
        k, v = ops.lora_kv_projection(x, (wk, wv), (ak, av), (bk, bv), scale=2.0, backend=backend)
        assert k.shape == (2, M // 2, 24) and v.shape == (2, M // 2, 24)
        assert_close_idiom(k, k64, klo, dtype, f"{backend} k")
        assert_close_idiom(v, v64, vlo, dtype, f"{backend} v")


@pytest.mark.parametrize("mixed", [False, True])
@pytest.mark.parametrize("layout", ["per_segment", "stacked", "stacked_scales", "single"])
def test_merged_cpp_equals_python_bit_for_bit(layout, mixed):
    """The C++ autograd Function of the merged strategy runs the Python one's ATen calls in the same order:
    outputs and every gradient equal bit for bit (bias, trainable weight, an unused output, no-grad; float32
    master factors of a bfloat16 call)."""
    if ops._cpp_merged() is None:
        pytest.skip("the C++ host extension clora_fast._host is not built here")
    g = torch.Generator().manual_seed(11)
    L = 1 if layout == "single" else 3
    K, n, r = 10, 6, 2
    scales = [0.5, 2.0, -1.0][:L] if layout != "stacked" else [0.5] * L
    dt = torch.bfloat16 if mixed else torch.float32
    x0 = torch.randn(2, 4, K, generator=g).to(dt)
    w0 = torch.randn(L * n, K, generator=g).to(dt)
    a0 = torch.randn(L * r, K, generator=g)
    b0 = torch.randn(L * n, r, generator=g)
    bias0 = torch.randn(L * n, generator=g).to(dt)
    gys = [torch.randn(2, 4, n, generator=g).to(dt) for _ in range(L)]

    def run(impl, split, used, bias_on, w_trains):
        ops.MERGED_IMPL = impl
        try:
            leaves = [x0.clone().requires_grad_(), w0.clone().requires_grad_(w_trains), a0.clone().requires_grad_(),
                      b0.clone().requires_grad_(), bias0.clone().requires_grad_()]
            x, w, a, b, bias = leaves
            if layout == "per_segment":
                W, A, B = [w[l * n:(l + 1) * n] for l in range(L)], [a[l * r:(l + 1) * r] for l in range(L)], \
                    [b[l * n:(l + 1) * n] for l in range(L)]
            else:
                W, A, B = [w], [a], [b]
            outs = ops._merged(x, W, A, B, bias if bias_on else None, scales, split)
            outs = outs if split else tuple(outs[..., l * n:(l + 1) * n] for l in range(L))
            loss = sum((outs[l] * gys[l]).sum() for l in used)
            grads = torch.autograd.grad(loss, [t for t in leaves if t.requires_grad], allow_unused=True)
            with torch.no_grad():
                nog = ops._merged(x, W, A, B, bias if bias_on else None, scales, split)
            return [o.detach() for o in outs] + [gr for gr in grads if gr is not None] + \
                [o for o in (nog if split else (nog,))]
        finally:
            ops.MERGED_IMPL = "auto"

    for split in (True, False):
        for used in (tuple(range(L)), (L - 1,)):
            for bias_on in (False, True):
                for w_trains in (False, True):
                    py = run("python", split, used, bias_on, w_trains)
                    cc = run("cpp", split, used, bias_on, w_trains)
                    assert len(py) == len(cc)
                    for p_, c_ in zip(py, cc):
                        assert torch.equal(p_, c_), (split, used, bias_on, w_trains)


@pytest.mark.parametrize("dtype", DTYPES)
def test_forgetting_penalty_backends(device, dtype):
    g = torch.Generator().manual_seed(5)
    p = (torch.randn(77, 33, generator=g) * 0.1).to(device, dtype)
    a = (torch.randn(16, 33, generator=g) * 0.1).to(device, dtype)
    b = (torch.randn(77, 16, generator=g) * 0.1).to(device, dtype)

    def run(fn, p, a, b):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        loss = fn(p, a, b)
        (3.0 * loss).backward()
        return [loss.detach(), a.grad, b.grad]

    plain = lambda p, a, b: ((p * (0.7 * b @ a)) ** 2).sum()  # noqa: E731
    ref64 = run(plain, p.double(), a.double(), b.double())
    low = run(plain, p, a, b)
    for backend in backends_for(device):
        got = run(lambda p, a, b: ops.forgetting_penalty(p, a, b, scale=0.7, backend=backend), p, a, b)
        assert got[0].dtype == torch.float32 and got[0].dim() == 0
        for name, gg, r64, lo in zip(["loss", "dA", "dB"], got, ref64, low):
            assert_close_idiom(gg, r64, lo, dtype, f"{backend} {name}")


def test_packed_penalty_gradients_reach_flat_buffers(device):
    """packed_forgetting_penalty == grouped penalty on row views, and autograd delivers the
    gradient of each flat buffer as one tensor (zeros on rows no layer uses)."""
    g = torch.Generator().manual_seed(4)
    fa = [torch.randn(6, 12, generator=g).to(device), torch.randn(2, 8, generator=g).to(device)]
    fb = [torch.randn(19, 2, generator=g).to(device), torch.randn(5, 2, generator=g).to(device)]
    layout = [(0, 0, 0, 2), (0, 4, 9, 2), (1, 0, 0, 2)]
    pasts = [torch.randn(9, 12, generator=g).to(device), torch.randn(8, 12, generator=g).to(device),
             torch.randn(5, 8, generator=g).to(device)]
    for backend in backends_for(device):
        fa_ = [t.clone().requires_grad_() for t in fa]
        fb_ = [t.clone().requires_grad_() for t in fb]
        loss = ops.packed_forgetting_penalty(pasts, fa_, fb_, layout, scales=[0.5, 2.0, 1.0], backend=backend)
        (3 * loss).backward()
        fa64 = [t.double().requires_grad_() for t in fa]
        fb64 = [t.double().requires_grad_() for t in fb]
        ref = R.grouped_forgetting_penalty([p.double() for p in pasts],
                                           [fa64[f][a:a + r] for f, a, _, r in layout],
                                           [fb64[f][b:b + p.shape[0]] for (f, _, b, _), p in zip(layout, pasts)],
                                           [0.5, 2.0, 1.0])
        (3 * ref).backward()
        torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-5)
        for got, want in zip(fa_ + fb_, fa64 + fb64):
            torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-5, atol=1e-4)
        assert fa_[0].grad[2:4].abs().max() == 0 and fb_[0].grad[9 + 8:].abs().max() == 0
    with pytest.raises(ValueError, match=r"layout\[0\] = \(2, 0, 0, 2\) names flat buffer 2"):
        ops.packed_forgetting_penalty(pasts, fa, fb, [(2, 0, 0, 2)] + layout[1:])
    with pytest.raises(ValueError, match="layout has 2 entries for 3 pasts"):
        ops.packed_forgetting_penalty(pasts, fa, fb, layout[:2])
    with pytest.raises(ValueError, match=r"layout\[0\] and layout\[1\] share row 1 of flat_As\[0\]"):
        ops.packed_forgetting_penalty(pasts, fa, fb, [(0, 0, 0, 2), (0, 1, 9, 2), (1, 0, 0, 2)])


def test_prepared_packed_penalty_matches_function(device):
    """PackedForgettingPenalty (pasts/layout/scales fixed, as a controller calls it every step) gives
    the function's loss and flat gradients bit for bit, across calls, after the flat buffers are
    replaced (a new concept: new addresses), and checks again when their shapes change."""
    g = torch.Generator().manual_seed(5)
    layout = [(0, 0, 0, 2), (0, 4, 9, 2), (1, 0, 0, 2)]
    pasts = [torch.randn(9, 12, generator=g).to(device), torch.randn(8, 12, generator=g).to(device),
             torch.randn(5, 8, generator=g).to(device)]
    scales = [0.5, 2.0, 1.0]

    def flats():
        return ([torch.randn(6, 12, generator=g).to(device), torch.randn(2, 8, generator=g).to(device)],
                [torch.randn(19, 2, generator=g).to(device), torch.randn(5, 2, generator=g).to(device)])

    def run(fn, fa, fb):
        fa_ = [t.clone().requires_grad_() for t in fa]
        fb_ = [t.clone().requires_grad_() for t in fb]
        loss = fn(fa_, fb_)
        loss.backward()
        return [loss.detach()] + [t.grad for t in fa_ + fb_]

    for backend in backends_for(device):
        pen = ops.PackedForgettingPenalty(pasts, layout, scales=scales, backend=backend)
        for fa, fb in (flats(), flats()):
            for _ in range(2):
                got = run(pen, fa, fb)
                want = run(lambda a, b: ops.packed_forgetting_penalty(pasts, a, b, layout, scales=scales,
                                                                     backend=backend), fa, fb)
                for x, y in zip(got, want):
                    assert torch.equal(x, y), backend
        fa, fb = flats()
        with pytest.raises(ValueError, match=r"rows out of range of flat_As\[0\]"):
            pen([fa[0][:3], fa[1]], fb)
        with pytest.raises(TypeError, match="flat_As must be a list or tuple, got Tensor"):
            pen(fa[0], fb)
    if "triton" in backends_for(device):
        # a training step's penalty: ONE kernel launch (partials reduced inside it), then the gradient
        # scaling of backward (one _foreach_mul for all flat buffers); no reduce launch
        from clora_fast._launches import count_launches
        pen = ops.PackedForgettingPenalty(pasts, layout, scales=scales, backend="triton")
        fa, fb = [[t.clone().requires_grad_() for t in ts] for ts in flats()]
        for _ in range(3):          # tables and arrival counters built (a copy to the GPU once), and the
            pen(fa, fb).backward()  # caching allocator settled: the steps repeat the outputs' addresses
            for t in fa + fb:
                t.grad = None
        _, by_op = count_launches(lambda: pen(fa, fb).backward())
        if device.type == "cpu":    # the CPU allocator hands out other blocks step after step: the interpreter's
            by_op.pop("copy_", None)    # host table is rewritten (on a GPU the copy would be a host-to-device one)
        # (+ zero fills of the flat gradients: this layout leaves rows of them to no layer; + the seed)
        assert by_op == {"triton:_penalty_main_kernel": 1, "zeros": 4, "ones_like": 1, "_foreach_mul": 1}, by_op
    with pytest.raises(ValueError, match="layout has 2 entries for 3 pasts"):
        ops.PackedForgettingPenalty(pasts, layout[:2])
    with pytest.raises(TypeError, match=r"scales\[1\] must be a float, got str"):
        ops.PackedForgettingPenalty(pasts, layout, scales=[1.0, "x", 1.0])


def test_grouped_penalty_equals_sum_of_singles(device):
    g = torch.Generator().manual_seed(7)
    shapes = [(20, 33), (77, 33), (5, 64), (64, 5)]
    pasts = [torch.randn(o, i, generator=g).to(device) for o, i in shapes]
    As = [torch.randn(4, i, generator=g).to(device).requires_grad_() for _, i in shapes]
    Bs = [torch.randn(o, 4, generator=g).to(device).requires_grad_() for o, _ in shapes]
    scales = [0.5, 1.0, 2.0, 0.25]
    for backend in backends_for(device):
        total = ops.grouped_forgetting_penalty(pasts, As, Bs, scales=scales, backend=backend)
        grads = torch.autograd.grad(total, As + Bs)
        singles = sum(ops.forgetting_penalty(p, a, b, scale=s, backend="reference")
                      for p, a, b, s in zip(pasts, As, Bs, scales))
        sgrads = torch.autograd.grad(singles, As + Bs)
        torch.testing.assert_close(total, singles, rtol=1e-4, atol=1e-4)
        for x, y in zip(grads, sgrads):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def test_penalty_zero_for_first_concept(device):
    p = torch.zeros(10, 12, device=device)
    a = torch.randn(3, 12, device=device, requires_grad=True)
    b = torch.randn(10, 3, device=device, requires_grad=True)
    for backend in backends_for(device):
        loss = ops.forgetting_penalty(p, a, b, backend=backend)
        assert loss.item() == 0.0
        ga, gb = torch.autograd.grad(loss, (a, b))
        assert ga.abs().max().item() == 0.0 and gb.abs().max().item() == 0.0


@settings(max_examples=8, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(M=st.integers(0, 9), K=st.integers(1, 40), segs=st.lists(st.integers(1, 30), min_size=1, max_size=3),
       r=st.integers(1, 20), seed=st.integers(0, 2 ** 16))
def test_property_segmented_projection(M, K, segs, r, seed):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    N = sum(segs)
    offsets = [0]
    for s in segs:
        offsets.append(offsets[-1] + s)
    L = len(segs)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dev)
    w = torch.randn(N, K, generator=g).to(dev)
    a = torch.randn(L * r, K, generator=g).to(dev).requires_grad_()
    b = torch.randn(N, r, generator=g).to(dev).requires_grad_()
    scales = [0.5 + i for i in range(L)]
    expect = R.segmented_lora_projection(x.double(), w.double(), a.double(), b.double(), offsets, scales)
    ea, eb = torch.autograd.grad(expect.sum(), (a, b)) if M else (torch.zeros_like(a), torch.zeros_like(b))
    for backend in backends_for(dev):
        y = ops.segmented_lora_projection(x, w, a, b, offsets, scales, backend=backend)
        torch.testing.assert_close(y.double(), expect, rtol=1e-4, atol=1e-3 * (1 + K))
        ga, gb = torch.autograd.grad(y.sum(), (a, b))
        torch.testing.assert_close(ga.double(), ea.double(), rtol=1e-4, atol=1e-3 * (1 + M * K))
        torch.testing.assert_close(gb.double(), eb.double(), rtol=1e-4, atol=1e-3 * (1 + M * K))


# ---------------------------------------------------------------------------
# Layout edge cases
# ---------------------------------------------------------------------------

def test_noncontiguous_x_empty_batch_and_weight_grad(device):
    x, w, a, b, bias = make_lora(8, 33, 20, 4, torch.float32, device)
    xt = torch.randn(33, 8, device=device).T           # non-contiguous [8, 33]
    for backend in backends_for(device):
        torch.testing.assert_close(ops.lora_projection(xt, w, a, b, backend=backend),
                                   R.lora_projection(xt, w, a, b), rtol=1e-4, atol=1e-4)
        empty = torch.empty(0, 33, device=device, requires_grad=True)
        a_ = a.clone().requires_grad_()
        y = ops.lora_projection(empty, w, a_, b, backend=backend)
        assert y.shape == (0, 20)
        y.sum().backward()
        assert a_.grad.abs().max().item() == 0.0
        w_ = w.clone().requires_grad_()
        ops.lora_projection(x, w_, a, b, backend=backend).square().sum().backward()
        w_ref = w.clone().requires_grad_()
        R.lora_projection(x, w_ref, a, b).square().sum().backward()
        torch.testing.assert_close(w_.grad, w_ref.grad, rtol=1e-4, atol=1e-4)


def test_nan_propagates_like_reference(device):
    x, w, a, b, _ = make_lora(4, 16, 8, 2, torch.float32, device)
    x[1, 3] = float("nan")
    p = torch.randn(8, 16, device=device)
    p[2, 2] = float("inf")
    b = b + 1.0
    for backend in backends_for(device):
        y = ops.lora_projection(x, w, a, b, backend=backend)
        assert torch.equal(torch.isnan(y), torch.isnan(R.lora_projection(x, w, a, b)))
        assert not torch.isfinite(ops.forgetting_penalty(p, a, b, backend=backend))


def test_autocast_casts_like_linear():
    x, w, a, b, bias = make_lora(4, 16, 8, 2, torch.float32, torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.lora_projection(x, w, a, b, bias=bias, backend="reference")
        lin = torch.nn.functional.linear(x, w, bias)
    assert y.dtype == lin.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), R.lora_projection(x, w, a, b, 1.0, bias), rtol=3e-2, atol=3e-2)


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    x, w, a, b, _ = make_lora(5, 12, 9, 3, torch.float32, torch.device("cpu"))
    p = torch.randn(9, 12)

    def f(x, a, b):
        y = ops.lora_projection(x, w, a, b, scale=0.5, backend="reference")
        k, v = ops.lora_kv_projection(x, (w, w), (a, a), (b, b), backend="reference")
        s = ops.segmented_lora_projection(x, torch.cat([w, w]), torch.cat([a, a]), torch.cat([b, b]), (0, 9, 18),
                                          [1.0, 2.0], backend="reference")
        return (y.sum() + (k * v).mean() + s.square().mean() + ops.forgetting_penalty(p, a, b, backend="reference")
                + ops.grouped_forgetting_penalty([p, p], [a, a], [b, b], scales=[1.0, 0.5], backend="reference"))

    def run(fn):
        args = [t.clone().requires_grad_() for t in (x, a, b)]
        out = fn(*args)
        out.backward()
        return [out.detach()] + [t.grad for t in args]

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for got, exp in zip(run(compiled), run(f)):
        torch.testing.assert_close(got, exp)


def _compiled_vs_eager(f, tensors, grads_of, backend):
    """Outputs and the gradients (w.r.t. ``tensors[i]`` for i in ``grads_of``) of ``f`` eagerly and compiled with
    ``fullgraph=True`` through ``backend``: ``(eager, compiled)`` lists."""
    res = []
    for fn in (f, torch.compile(f, fullgraph=True, backend=backend)):
        args = [t.clone().requires_grad_(i in grads_of) for i, t in enumerate(tensors)]
        out = fn(*args)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum((o.double() * torch.linspace(-1, 1, o.numel(), dtype=torch.float64, device=o.device).view(o.shape)).sum()
                   for o in outs)
        res.append([o.detach() for o in outs] + list(torch.autograd.grad(loss, [args[i] for i in grads_of])))
    torch._dynamo.reset()
    return res


@pytest.mark.parametrize("bias, split, scales, grads_of", [
    (True, True, (0.5, 0.5), (0, 1, 2)),
    (False, True, (0.5, 0.5), (0, 1, 2)),
    (True, False, (0.5, 0.5), (0, 1, 2)),
    (True, True, (0.7,), (0, 1, 2)),                   # one segment
    (True, True, (0.5, 1.0, 2.0), (0, 1, 2)),         # three, scaled apiece
    (True, True, (0.5, 0.5), (1, 2)),                  # x frozen: dA from dy @ blockdiag(s B)
    (True, True, (0.5, 0.5), (0, 2)),                  # A frozen
    (True, True, (0.5, 0.5), (0, 1)),                  # B frozen: no xa columns
    (True, True, (0.5, 0.5), (0,)),
    (True, True, (0.5, 0.5), "A transposed"),         # a column-major lora_A (a view), everything trains
])
def test_compiled_merged_strategy_matches_eager(bias, split, scales, grads_of, recording_aot_eager):
    """Inside a torch.compile trace the merged strategy runs as plain tensor ops (no custom op: the graph has no
    clora_fast::segmented_lora call, so inductor and CUDA graphs see library GEMMs), and gives the eager merged
    Function's outputs and gradients, float64, for every combination of what trains."""
    L = len(scales)
    x, w, a, b, bb = make_lora(2 * 7, 12, 5 * L, 3, torch.float64, torch.device("cpu"), bias=bias)
    a = torch.cat([a.roll(l, 1) for l in range(L)])                    # [L*3, 12]
    offsets = tuple(range(0, 5 * L + 1, 5))
    transposed = grads_of == "A transposed"
    if transposed:
        grads_of, a = (0, 1, 2), a.t().contiguous()                     # [12, L*3]: lora_A is its transpose

    def f(x, a, b):
        a = a.t() if transposed else a
        out = ops.segmented_lora_projection(x.view(2, 7, 12), w, a, b, offsets, list(scales), bias=bb,
                                            backend="reference", strategy="merged", split=split)
        return tuple(out) if split else out

    graphs = []
    eager, compiled = _compiled_vs_eager(f, (x, a, b), grads_of, recording_aot_eager(graphs))
    assert graphs and not any("segmented_lora" in gm.code for gm, _ in graphs)
    assert len(eager) == len(compiled) == (L if split else 1) + len(grads_of)
    for got, exp in zip(compiled, eager):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_compiled_merged_strategy_half_precision_error_bound():
    """bf16 x / weight with float32 master factors through the traced merged strategy: its error against a float64
    reference is within twice the eager merged Function's plus a floor (outputs and all gradients), and the
    factors' gradients come back float32.  K and V through lora_kv_projection, which a trace takes through the
    stacked call."""
    x, w, a, b, bb = make_lora(24, 32, 20, 4, torch.float64, torch.device("cpu"), seed=3)
    w2, a2, b2 = w.flip(0), a.flip(0), b.flip(0)

    def f(x, a, b):
        k, v = ops.lora_kv_projection(x, (w.to(x.dtype), w2.to(x.dtype)), (a, a2.to(a.dtype)), (b, b2.to(b.dtype)),
                                      scale=0.5, biases=(bb.to(x.dtype), bb.to(x.dtype)), backend="reference",
                                      strategy="merged")
        return k, v

    (ref, _), (eager, compiled) = (_compiled_vs_eager(f, (x, a, b), (0, 1, 2), "aot_eager"),
                                   _compiled_vs_eager(f, (x.bfloat16(), a.float(), b.float()), (0, 1, 2), "aot_eager"))
    assert [t.dtype for t in compiled[2:]] == [torch.bfloat16, torch.float32, torch.float32]
    for name, r, e, c in zip(("k", "v", "dx", "dA", "dB"), ref, eager, compiled):
        err_e, err_c = (e.double() - r).abs().max(), (c.double() - r).abs().max()
        assert err_c <= 2 * err_e + 1e-2 * r.abs().max(), (name, float(err_c), float(err_e))


def test_traced_strategy_weighs_the_rows():
    """"auto" under torch.compile: merged on CUDA from TRACED_MERGED_MIN_ROWS rows of x up, the fused kernels
    below (GPU time decides once CUDA graphs remove the host time); eager calls (rows None) keep merged at every
    size; an explicit or environment-forced strategy is taken as it is."""
    cuda, cpu, n = torch.device("cuda"), torch.device("cpu"), ops.TRACED_MERGED_MIN_ROWS
    assert ops._pick_strategy("auto", "triton", cuda, True, rows=n) == "merged"
    assert ops._pick_strategy("auto", "triton", cuda, True, rows=n - 1) == "fused"
    assert ops._pick_strategy("auto", "triton", cuda, True) == "merged"
    assert ops._pick_strategy("auto", "triton", cuda, False, rows=10 * n) == "fused"
    assert ops._pick_strategy("auto", "reference", cuda, True, rows=10 * n) == "fused"
    assert ops._pick_strategy("auto", "triton", cpu, True, rows=10 * n) == "fused"
    assert ops._pick_strategy("merged", "triton", cuda, True, rows=1) == "merged"


@pytest.mark.gpu
def test_gpu_compiled_auto_strategy_on_cuda(recording_aot_eager):
    """On CUDA a compiled "auto" call takes the traced merged ops from TRACED_MERGED_MIN_ROWS rows up and the fused
    kernels' custom op below, except at a rank only the merged strategy serves (above the Triton kernels' 128);
    each matches the eager call (fp32 products: TF32 tolerance)."""
    dev = torch.device("cuda")
    for rows, r, custom_op in ((ops.TRACED_MERGED_MIN_ROWS, 16, False), (8, 16, True), (8, 192, False)):
        x, w, a, b, bias = make_lora(rows, 256, 64, r, torch.float32, dev)

        def f(x, a, b):
            return ops.lora_kv_projection(x, (w, w.flip(0)), (a, a), (b, b), scale=0.5, biases=(bias, bias))

        graphs = []
        eager, compiled = _compiled_vs_eager(f, (x, a, b), (0, 1, 2), recording_aot_eager(graphs))
        assert any("segmented_lora" in gm.code for gm, _ in graphs) == custom_op, (rows, r)
        for got, exp in zip(compiled, eager):
            torch.testing.assert_close(got, exp, rtol=2e-2, atol=2e-2 * exp.abs().max().item())


def test_compiled_auto_strategy_follows_the_forced_one(monkeypatch, recording_aot_eager):
    """CLORA_FAST_STRATEGY=merged reaches a compiled call of "auto" (the traced merged ops, no custom op);
    =fused keeps the segmented custom op."""
    x, w, a, b, _ = make_lora(6, 8, 5, 2, torch.float64, torch.device("cpu"), bias=False)

    def f(x, a, b):
        return ops.lora_kv_projection(x, (w, w), (a, a), (b, b), scale=0.5, backend="reference")

    for forced, custom_op in (("merged", False), ("fused", True)):
        monkeypatch.setenv("CLORA_FAST_STRATEGY", forced)
        graphs = []
        eager, compiled = _compiled_vs_eager(f, (x, a, b), (0, 1, 2), recording_aot_eager(graphs))
        assert any("segmented_lora" in gm.code for gm, _ in graphs) == custom_op, forced
        for got, exp in zip(compiled, eager):
            torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-12)


def test_available_backends():
    bk = clora_fast.available_backends()
    assert bk[0] == "reference"
    assert ("triton" in bk) == (torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1")


# ---------------------------------------------------------------------------
# Bad input -> clear error
# ---------------------------------------------------------------------------

def _ok():
    return make_lora(4, 16, 8, 2, torch.float32, torch.device("cpu"), bias=False)[:4]


@pytest.mark.parametrize("mutate, exc, pattern", [
    (lambda x, w, a, b: (x, w[:, :15], a, b), ValueError, r"weight has shape \(8, 15\).*16 input features"),
    (lambda x, w, a, b: (x, w, a[:, :15], b), ValueError, r"lora_A must have shape \[r, in\].*\(2, 15\)"),
    (lambda x, w, a, b: (x, w, a, b[:7]), ValueError, r"lora_B must have shape \[out, r\] = \[8, 2\].*\(7, 2\)"),
    (lambda x, w, a, b: (x, w, a[:0], b[:, :0]), ValueError, r"rank 0"),
    (lambda x, w, a, b: (x[0, 0], w, a, b), ValueError, r"x must have at least 1 dimension"),
    (lambda x, w, a, b: (x, w[None], a, b), ValueError, r"weight must be 2-D, got 3-D"),
    (lambda x, w, a, b: (x.half(), w, a, b), TypeError, r"mixed dtypes: x is torch.float16 but weight is torch.float32"),
    (lambda x, w, a, b: (x.int(), w, a, b), TypeError, r"x must be a floating-point tensor"),
    (lambda x, w, a, b: (x.numpy(), w, a, b), TypeError, r"x must be a torch.Tensor, got ndarray"),
    (lambda x, w, a, b: (x, w.to("meta"), a, b), RuntimeError, r"x is on cpu but weight is on meta"),
])
def test_projection_bad_inputs(mutate, exc, pattern):
    x, w, a, b = mutate(*_ok())
    with pytest.raises(exc, match=pattern):
        ops.lora_projection(x, w, a, b, backend="reference")


def test_bias_and_backend_errors(monkeypatch):
    x, w, a, b = _ok()
    with pytest.raises(ValueError, match=r"bias must have shape \[out\] = \[8\], got \(7,\)"):
        ops.lora_projection(x, w, a, b, bias=torch.zeros(7))
    with pytest.raises(ValueError, match=r"unknown backend 'tpu'; choose one of auto, reference, triton, cuda"):
        ops.lora_projection(x, w, a, b, backend="tpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"backend='triton' got CPU tensors.*TRITON_INTERPRET=1"):
        ops.lora_projection(x, w, a, b, backend="triton")
    with pytest.raises(RuntimeError, match=r"backend='cuda' needs CUDA tensors"):
        ops.lora_projection(x, w, a, b, backend="cuda")
    if not torch.cuda.is_available():
        assert ops.lora_projection(x, w, a, b, backend="auto").shape == (4, 8)   # auto -> reference on CPU
    with pytest.raises(TypeError, match=r"has dtype torch.float64, which the 'triton' backend does not support"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        ops.lora_projection(*(t.double() for t in (x, w, a, b)), backend="triton")


def test_kv_and_segment_errors():
    x, w, a, b = _ok()
    with pytest.raises(TypeError, match=r"weights must be a pair \(k, v\), got Tensor"):
        ops.lora_kv_projection(x, w, (a, a), (b, b))
    with pytest.raises(ValueError, match=r"lora_As\[0\] and lora_As\[1\] must have the same rank"):
        ops.lora_kv_projection(x, (w, w), (a, torch.cat([a, a])), (b, b))
    with pytest.raises(ValueError, match=re.escape("lora_B[1] (V) must have shape [out, r] = [8, 2]")):
        ops.lora_kv_projection(x, (w, w), (a, a), (b, b[:5]))
    with pytest.raises(ValueError, match=r"seg_offsets must be strictly increasing from 0 to weight.shape\[0\]=8"):
        ops.segmented_lora_projection(x, w, a, b, (0, 5, 5, 8), 1.0)
    with pytest.raises(ValueError, match=r"scales has 1 entries but seg_offsets defines 2 segments"):
        ops.segmented_lora_projection(x, w, torch.cat([a, a]), b, (0, 4, 8), [1.0])
    with pytest.raises(TypeError, match=r"scales\[0\] must be a float, got str"):
        ops.segmented_lora_projection(x, w, a, b, (0, 8), ["1"])



@pytest.mark.parametrize("strategy", ["fused", "merged"])
def test_kv_pairs_checked_before_concatenation(strategy, merged_impl):
    """K and V are concatenated on the fused path: mixed dtypes between them must not be promoted
    silently, and a device mismatch must name the argument."""
    x, w, a, b = _ok()
    bias = torch.zeros(8)
    with pytest.raises(TypeError, match=r"mixed dtypes: lora_Bs\[0\] is torch.float32 but lora_Bs\[1\] is torch.float16"):
        ops.lora_kv_projection(x, (w, w), (a, a), (b, b.half()), backend="reference", strategy=strategy)
    with pytest.raises(TypeError, match=r"mixed dtypes: biases\[0\] is torch.float32 but biases\[1\] is torch.float16"):
        ops.lora_kv_projection(x, (w, w), (a, a), (b, b), biases=(bias, bias.half()), backend="reference",
                               strategy=strategy)
    with pytest.raises(RuntimeError, match=r"x is on cpu but lora_Bs\[1\] is on meta"):
        ops.lora_kv_projection(x, (w, w), (a, a), (b, b.to("meta")), backend="reference", strategy=strategy)


def test_scale_errors_and_number_types():
    x, w, a, b = _ok()
    s = torch.tensor(0.5, requires_grad=True)
    with pytest.raises(TypeError, match=r"scale is a tensor that requires grad"):
        ops.lora_projection(x, w, a, b, scale=s, backend="reference")
    with pytest.raises(TypeError, match=r"scale is a tensor that requires grad"):
        ops.forgetting_penalty(torch.randn(8, 16), a, b, scale=s, backend="reference")
    p = torch.randn(8, 16)
    expect = ops.grouped_forgetting_penalty([p, p], [a, a], [b, b], scales=2.0, backend="reference")
    got = ops.grouped_forgetting_penalty([p, p], [a, a], [b, b], scales=np.float32(2.0), backend="reference")
    torch.testing.assert_close(got, expect, rtol=0, atol=0)
    torch.testing.assert_close(ops.lora_projection(x, w, a, b, scale=np.float64(0.5), backend="reference"),
                               ops.lora_projection(x, w, a, b, scale=0.5, backend="reference"), rtol=0, atol=0)


def test_triton_rank_limit_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 16, generator=g), torch.randn(8, 16, generator=g)
    a, b = torch.randn(130, 16, generator=g), torch.randn(8, 130, generator=g)
    with pytest.raises(ValueError, match=r"lora_A has rank 130, above the 128 the fused Triton projection"):
        ops.lora_projection(x, w, a, b, backend="triton", strategy="fused")
    y = ops.lora_projection(x, w, a, b, backend="triton", strategy="merged")      # the merged GEMMs have no limit
    torch.testing.assert_close(y, x @ w.T + (x @ a.T) @ b.T, rtol=1e-5, atol=1e-4)


def test_reference_penalty_precision_follows_float64_factors():
    """float64 factors with a float32 past: computed (and returned) in float64, so gradcheck holds."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(7, 6, generator=g)
    a = torch.randn(2, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(7, 2, generator=g, dtype=torch.float64, requires_grad=True)
    assert ops.forgetting_penalty(p, a, b, backend="reference").dtype == torch.float64
    assert torch.autograd.gradcheck(lambda a, b: ops.forgetting_penalty(p, a, b, scale=0.7, backend="reference"),
                                    (a, b))
    assert torch.autograd.gradcheck(
        lambda a, b: ops.grouped_forgetting_penalty([p, p[:3]], [a, a], [b, b[:3]], scales=[0.7, 2.0],
                                                    backend="reference"), (a, b))

def test_penalty_errors():
    p = torch.randn(8, 16)
    _, _, a, b = _ok()
    with pytest.raises(ValueError, match=r"lora_A must have shape \[r, in\] = \[r, 16\] to match past \(8, 16\)"):
        ops.forgetting_penalty(p, a[:, :3], b)
    with pytest.raises(ValueError, match=r"lora_B must have shape \[out, r\] = \[8, 2\]"):
        ops.forgetting_penalty(p, a, b.T)
    with pytest.raises(TypeError, match=r"mixed dtypes: lora_A is torch.float32 but lora_B is torch.float16"):
        ops.forgetting_penalty(p, a, b.half())
    with pytest.raises(ValueError, match=r"pasts is empty"):
        ops.grouped_forgetting_penalty([], [], [])
    with pytest.raises(ValueError, match=r"must have the same length, got 2, 1, 2"):
        ops.grouped_forgetting_penalty([p, p], [a], [b, b])
    with pytest.raises(ValueError, match=r"lora_As\[1\] must have shape"):
        ops.grouped_forgetting_penalty([p, p], [a, a[:, :4]], [b, b])
    with pytest.raises(TypeError, match=r"pasts must be a list or tuple of tensors, got Tensor"):
        ops.grouped_forgetting_penalty(p, [a], [b])
    with pytest.raises(ValueError, match=r"scales has 3 entries for 2 layers"):
        ops.grouped_forgetting_penalty([p, p], [a, a], [b, b], scales=[1.0, 1.0, 1.0])


def test_kv_adjacent_rows_need_a_row_stride_of_k():
    """w_k [1, K] with stride (1, 1) is 'contiguous' (size-1 dims are ignored) and w_v follows it in memory:
    the stacked weight must not be a view with w_k's strides (it read V's rows from the wrong place)."""
    K, nv = 6, 3
    g = torch.Generator().manual_seed(0)
    s = torch.randn(K + nv * K, generator=g)
    w_k, w_v = s[:K].view(K, 1).t(), s[K:].view(nv, K)
    assert w_k.is_contiguous() and w_k.stride() == (1, 1)
    x = torch.randn(4, K, generator=g)
    a_k, a_v = torch.randn(2, K, generator=g), torch.randn(2, K, generator=g)
    b_k, b_v = torch.randn(1, 2, generator=g), torch.randn(nv, 2, generator=g)
    _, v = ops.lora_kv_projection(x, (w_k, w_v), (a_k, a_v), (b_k, b_v), scale=0.5, backend="reference",
                                  strategy="fused")
    torch.testing.assert_close(v, x @ w_v.T + 0.5 * (x @ a_v.T) @ b_v.T, rtol=1e-5, atol=1e-5)


def test_seg_offsets_must_be_integers(monkeypatch):
    """A non-integer offset is refused (ValueError naming seg_offsets and the value), never truncated:
    (0, 20.7, 40) used to run as (0, 20, 40).  An integral float or a bool compares and hashes equal to
    an int, so it must not slip through the per-tuple cache of checked offsets either (fast path included)."""
    monkeypatch.setattr(ops, "_OFFSETS_OK", {})
    x, w, a, b = torch.randn(3, 6), torch.randn(40, 6), torch.randn(4, 6), torch.randn(40, 2)
    expect = R.segmented_lora_projection(x, w, a, b, (0, 20, 40), (1.0, 1.0))
    for strategy in ("fused", "merged"):
        for _ in range(2):           # the second call with (0, 20, 40) is a cache hit (the fast path for merged)
            torch.testing.assert_close(ops.segmented_lora_projection(x, w, a, b, (0, 20, 40), 1.0,
                                                                     strategy=strategy), expect)
        for bad in ((0, 20.7, 40), [0, 20.7, 40], (0, 20.0, 40), (0, torch.tensor(20), 40), (0, 20, 40.0)):
            with pytest.raises(ValueError, match=r"seg_offsets must hold integers, got (20\.7|20\.0|40\.0|tensor)"):
                ops.segmented_lora_projection(x, w, a, b, bad, 1.0, strategy=strategy)
    with pytest.raises(ValueError, match=r"seg_offsets must hold integers, got True \(bool\)"):
        ops.segmented_lora_projection(torch.randn(3, 6), torch.randn(2, 6), torch.randn(2, 6), torch.randn(2, 1),
                                      (0, True, 2), 1.0)
    # numpy integers are integers (converted to python ints for the kernels)
    y = ops.segmented_lora_projection(x, w, a, b, tuple(np.int64(o) for o in (0, 20, 40)), 1.0)
    torch.testing.assert_close(y, expect)
    # split_columns: the same rule
    with pytest.raises(ValueError, match=r"offsets must hold integers, got 2\.5"):
        ops.split_columns(torch.randn(2, 5), (0, 2.5, 5))
