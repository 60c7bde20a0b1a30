"""Triton forgetting-penalty kernels (``clora_fast.kernels.forgetting_penalty``).

On CPU the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``, set by
conftest.py): small shapes, large blocks.  Truth: the closed form
``clora_fast.reference.forgetting_penalty_grads`` on float64 copies of the
(already rounded) inputs.  Tolerance (flash-attention idiom): twice the error
of the same computation done by torch in the inputs' dtype, with a small floor.
Every test runs with ``CLORA_FAST_POISON=1`` so unwritten outputs show as NaN.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clora_fast import reference
from clora_fast.kernels import forgetting_penalty as fpk
from clora_fast.kernels.forgetting_penalty import (forgetting_penalty_forward,
                                                   grouped_forgetting_penalty_forward)

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ON_GPU = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("CLORA_FAST_POISON", "1")


def _rand(shape, dtype, device, gen, std=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * std).to(dtype).to(device)


def _make(out_f, in_f, r, p_dtype, ab_dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (_rand((out_f, in_f), p_dtype, device, g), _rand((r, in_f), ab_dtype, device, g, 0.5),
            _rand((out_f, r), ab_dtype, device, g, 0.5))


def _torch_in_dtype(past, A, B, scale):
    """The computation done by torch in the inputs' (lowest) dtype: its error sets the tolerance."""
    dt = past.dtype if past.element_size() <= A.element_size() else A.dtype
    p, a, b = past.to(dt), A.to(dt), B.to(dt)
    m = scale * (b @ a)
    p2 = p * p
    g = 2 * p2 * m
    return (p2 * m * m).float().sum(), scale * (b.t() @ g), scale * (g @ a.t())


def _errors(got, ref):
    return [float((g.double().cpu() - r.double().cpu()).abs().max()) if r.numel() else 0.0
            for g, r in zip(got, ref)]


def _check_against_float64(got, past, A, B, scale, floor=2e-6):
    """Assert kernel (loss, dA, dB) within max(2 * torch-in-dtype error, floor * max|ref|) of float64."""
    ref = reference.forgetting_penalty_grads(past.double().cpu(), A.double().cpu(), B.double().cpu(), scale)
    torch_err = _errors(_torch_in_dtype(past, A, B, scale), ref)
    kern_err = _errors(got, ref)
    for name, g, r, ke, te in zip(("loss", "dA", "dB"), got, ref, kern_err, torch_err):
        assert g.dtype == torch.float32, f"{name} dtype {g.dtype}"
        assert tuple(g.shape) == tuple(r.shape), f"{name} shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name} has non-finite entries (unwritten output?)"
        mag = float(r.abs().max()) if r.numel() else 0.0
        tol = max(2.0 * te, floor * mag, 1e-30)
        assert ke <= tol, (f"{name}: kernel error {ke:.3e} > tol {tol:.3e} "
                           f"(torch-in-dtype error {te:.3e}, |ref| {mag:.3e})")
    return [k / max(float(r.abs().max()), 1e-30) if r.numel() else 0.0 for k, r in zip(kern_err, ref)]


def _rtol(device, ab_dtype):
    """Relative tolerance between two fp32-accumulated kernel results (or vs float64) for sums:
    interpreter: exact fp32 dots; GPU: TF32 products unless both factors are fp32 and torch's
    float32 matmul precision is 'highest' (then exact fp32 FMA)."""
    if device.type == "cpu":
        return 2e-6
    return 2e-5 if fpk._precision(ab_dtype, ab_dtype, None) == "ieee" else 3e-3


# ----------------------------------------------------------------------------------------------
# single layer
# ----------------------------------------------------------------------------------------------
DTYPES = [(F32, F32), (F16, F16), (BF16, BF16), (BF16, F32), (F32, BF16)]
MAX_REL_ERR: dict = {}


@pytest.mark.parametrize("out_f,in_f", [(77, 33), (5, 130)])
@pytest.mark.parametrize("r", [1, 4, 16, 65])
@pytest.mark.parametrize("p_dtype,ab_dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_single_matches_float64(device, out_f, in_f, r, p_dtype, ab_dtype):
    past, A, B = _make(out_f, in_f, r, p_dtype, ab_dtype, device, seed=out_f * 1000 + r)
    scale = 0.75
    got = forgetting_penalty_forward(past, A, B, scale)
    rel = _check_against_float64(got, past, A, B, scale)
    key = f"{p_dtype}/{ab_dtype}"
    MAX_REL_ERR[key] = [max(a, b) for a, b in zip(MAX_REL_ERR.get(key, [0, 0, 0]), rel)]
    if device.type == "cpu":
        # the interpreter computes exact fp32 dots: fp32-level error whatever the input dtype
        assert max(rel) < 2e-6, f"relative errors {rel}"


@pytest.mark.parametrize("cfg", [dict(block_o=16, block_i=16), dict(block_o=32, block_i=16, col_splits=3),
                                 dict(block_o=16, block_i=32, col_splits=2, deterministic=False),
                                 dict(block_o=16, block_i=16, maxnreg=128),
                                 dict(block_o=16, block_i=16, col_splits=2, da_trans=True)],
                         ids=["rowblocks", "colsplits", "atomic", "maxnreg", "da_trans"])
def test_single_multi_block_paths(device, cfg):
    """Several row blocks (dA partials + reduce), column splits (dB partials), atomic dA, a register
    cap (a GPU launch option; the interpreter ignores it) and dA as (W^T B)^T."""
    past, A, B = _make(77, 70, 6, F32, F32, device, seed=3)
    got = forgetting_penalty_forward(past, A, B, 1.3, **cfg)
    _check_against_float64(got, past, A, B, 1.3)


def test_zero_past_gives_exact_zero(device):
    past, A, B = _make(40, 24, 4, F32, F32, device)
    loss, dA, dB = forgetting_penalty_forward(torch.zeros_like(past), A, B, 1.0, block_o=16, block_i=16)
    assert loss.item() == 0.0 and not torch.signbit(loss).item()
    assert torch.equal(dA, torch.zeros_like(dA)) and torch.equal(dB, torch.zeros_like(dB))


def test_zero_B_gives_exact_zero(device):
    past, A, B = _make(40, 24, 4, BF16, F32, device)
    loss, dA, dB = forgetting_penalty_forward(past, A, torch.zeros_like(B), 2.0, block_o=16, block_i=16)
    assert loss.item() == 0.0
    assert torch.equal(dA, torch.zeros_like(dA)) and torch.equal(dB, torch.zeros_like(dB))


def test_deterministic_and_inplace_past_update(device):
    """Two calls are bit-identical; an in-place update of past (a fold) is seen through the cached plan."""
    past, A, B = _make(50, 40, 5, F32, F32, device, seed=7)
    kw = dict(block_o=16, block_i=16, col_splits=2)
    r1 = forgetting_penalty_forward(past, A, B, 0.5, **kw)
    r2 = forgetting_penalty_forward(past, A, B, 0.5, **kw)
    for x, y in zip(r1, r2):
        assert torch.equal(x, y)
    past.add_(1.0)
    A.mul_(-2.0)
    got = forgetting_penalty_forward(past, A, B, 0.5, **kw)
    _check_against_float64(got, past, A, B, 0.5)


def test_strided_inputs(device):
    """Views: past = rows of a fused qkv weight / a transpose, A with a column stride, B transposed storage."""
    g = torch.Generator().manual_seed(11)
    qkv = _rand((3 * 24, 40), F32, device, g)
    past_rows = qkv[24:48]                          # timm-style K rows: offset view, unit inner stride
    past_t = _rand((40, 30), F32, device, g).t()    # [30, 40], inner stride 30
    A_wide = _rand((3, 80), F32, device, g)
    A = A_wide[:, ::2]                              # [3, 40], inner stride 2
    B = _rand((3, 24), F32, device, g).t()          # [24, 3], strides (1, 24)
    got = forgetting_penalty_forward(past_rows, A, B, 1.0, block_o=16, block_i=16)
    _check_against_float64(got, past_rows, A, B, 1.0)
    B2 = _rand((4, 30), F32, device, g).t()
    A2 = _rand((4, 40), F32, device, g)
    got = forgetting_penalty_forward(past_t, A2, B2, 1.0)
    _check_against_float64(got, past_t, A2, B2, 1.0)


# ----------------------------------------------------------------------------------------------
# grouped
# ----------------------------------------------------------------------------------------------
LAYERS = [(77, 33, 4, 1.0), (5, 130, 4, 0.5), (40, 64, 4, 2.0), (130, 17, 4, 0.25), (16, 16, 4, 1.5)]


def _layers(device, p_dtype, ab_dtype, ranks=None, seed=0):
    pasts, As, Bs, scales = [], [], [], []
    for i, (o, n, r, s) in enumerate(LAYERS):
        p, a, b = _make(o, n, ranks[i] if ranks else r, p_dtype, ab_dtype, device, seed=seed + i)
        pasts.append(p), As.append(a), Bs.append(b), scales.append(s)
    return pasts, As, Bs, scales


@pytest.mark.parametrize("p_dtype,ab_dtype", [(F32, F32), (BF16, BF16), (F16, F32)],
                         ids=["fp32", "bf16", "fp16-fp32"])
@pytest.mark.parametrize("cfg", [{}, dict(block_o=32, block_i=16, col_splits=2),
                                 dict(block_o=16, block_i=16, deterministic=False)],
                         ids=["default", "split", "atomic"])
def test_grouped_matches_singles_and_reference(device, p_dtype, ab_dtype, cfg):
    pasts, As, Bs, scales = _layers(device, p_dtype, ab_dtype)
    loss, dAs, dBs = grouped_forgetting_penalty_forward(pasts, As, Bs, scales, **cfg)
    assert len(dAs) == len(dBs) == len(LAYERS)
    total = 0.0
    rtol = _rtol(device, ab_dtype)
    for l in range(len(LAYERS)):
        sl, sdA, sdB = forgetting_penalty_forward(pasts[l], As[l], Bs[l], scales[l])
        # per-layer gradients == singles == float64 closed form
        torch.testing.assert_close(dAs[l], sdA, rtol=rtol, atol=rtol * float(sdA.abs().max()))
        torch.testing.assert_close(dBs[l], sdB, rtol=rtol, atol=rtol * float(sdB.abs().max()))
        _check_against_float64((sl, dAs[l], dBs[l]), pasts[l], As[l], Bs[l], scales[l])
        total += float(sl)
    ref = reference.grouped_forgetting_penalty([p.double().cpu() for p in pasts], [a.double().cpu() for a in As],
                                               [b.double().cpu() for b in Bs], scales)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert abs(float(loss) - total) <= rtol * abs(total)
    assert abs(float(loss) - float(ref)) <= rtol * abs(float(ref))
    # outputs are separate tensors (a custom op may not return aliasing outputs)
    storages = {t.untyped_storage().data_ptr() for t in [loss, *dAs, *dBs]}
    assert len(storages) == 1 + 2 * len(LAYERS)


def test_grouped_per_layer_ranks(device):
    ranks = [1, 16, 3, 20, 7]
    pasts, As, Bs, scales = _layers(device, F32, F32, ranks=ranks, seed=5)
    loss, dAs, dBs = grouped_forgetting_penalty_forward(pasts, As, Bs, scales, block_o=32, block_i=32)
    total = 0.0
    for l in range(len(LAYERS)):
        assert dAs[l].shape == (ranks[l], LAYERS[l][1]) and dBs[l].shape == (LAYERS[l][0], ranks[l])
        ref = reference.forgetting_penalty_grads(pasts[l].double().cpu(), As[l].double().cpu(),
                                                 Bs[l].double().cpu(), scales[l])
        _check_against_float64((ref[0].float(), dAs[l], dBs[l]), pasts[l], As[l], Bs[l], scales[l])
        total += float(ref[0])
    assert abs(float(loss) - total) <= _rtol(device, F32) * total


def test_grouped_empty_and_zero_layers(device):
    """A zero past among others contributes exactly 0; layers with out = 0 or in = 0 (also as the
    first layer, whose tensors anchor the offset tables) give zeros / empties."""
    pasts, As, Bs, scales = _layers(device, F32, F32)
    pasts[2] = torch.zeros_like(pasts[2])
    g = torch.Generator().manual_seed(1)
    pasts = [torch.zeros(0, 9, device=device)] + pasts + [_rand((6, 0), F32, device, g)]
    As = [_rand((4, 9), F32, device, g)] + As + [torch.zeros(4, 0, device=device)]
    Bs = [torch.zeros(0, 4, device=device)] + Bs + [_rand((6, 4), F32, device, g)]
    scales = [1.0] + scales + [1.0]
    loss, dAs, dBs = grouped_forgetting_penalty_forward(pasts, As, Bs, scales, block_o=16, block_i=16)
    assert torch.equal(dAs[3], torch.zeros_like(dAs[3])) and torch.equal(dBs[3], torch.zeros_like(dBs[3]))
    assert torch.equal(dAs[0], torch.zeros(4, 9, device=device)) and dBs[0].shape == (0, 4)
    assert dAs[6].shape == (4, 0) and torch.equal(dBs[6], torch.zeros(6, 4, device=device))
    for l in (1, 2, 4, 5):
        ref = reference.forgetting_penalty_grads(pasts[l].double().cpu(), As[l].double().cpu(),
                                                 Bs[l].double().cpu(), scales[l])
        _check_against_float64((ref[0].float(), dAs[l], dBs[l]), pasts[l], As[l], Bs[l], scales[l])
    ref = sum(float(reference.forgetting_penalty(p.double().cpu(), a.double().cpu(), b.double().cpu(), s))
              for p, a, b, s in zip(pasts, As, Bs, scales))
    assert abs(float(loss) - ref) <= _rtol(device, F32) * ref
    # an empty layer has no program to reduce its zero gradients: the reduce kernel does it
    assert not next(reversed(fpk._PLANS.values())).fused
    # nothing but empty / zero-size layers: loss 0, no main launch needed
    loss, dAs, dBs = grouped_forgetting_penalty_forward(pasts[:1], As[:1], Bs[:1], [1.0])
    assert float(loss) == 0.0 and torch.equal(dAs[0], torch.zeros(4, 9, device=device))


class _CountingKernel:
    """Wraps a Triton kernel; records the grid of every launch."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_grouped_is_one_launch(device, monkeypatch):
    """All layers in ONE launch (one program per row block x column chunk), the partial sums
    reduced inside it; fused_reduce=False (or CLORA_FAST_PENALTY_REDUCE=separate): + one reduce launch."""
    main = _CountingKernel(fpk._penalty_main_kernel)
    red = _CountingKernel(fpk._penalty_reduce_kernel)
    monkeypatch.setattr(fpk, "_penalty_main_kernel", main)
    monkeypatch.setattr(fpk, "_penalty_reduce_kernel", red)
    pasts, As, Bs, scales = _layers(device, F32, F32)
    kw = dict(block_o=32, block_i=16, col_splits=2)
    grouped_forgetting_penalty_forward(pasts, As, Bs, scales, **kw)
    n_prog = sum(-(-o // 32) * min(2, -(-n // 16)) for o, n, _, _ in LAYERS)
    assert main.grids == [(n_prog,)] and red.grids == []
    grouped_forgetting_penalty_forward(pasts, As, Bs, scales, fused_reduce=False, **kw)
    assert main.grids == [(n_prog,)] * 2 and len(red.grids) == 1
    monkeypatch.setenv("CLORA_FAST_PENALTY_REDUCE", "separate")
    grouped_forgetting_penalty_forward(pasts, As, Bs, scales, **kw)
    assert len(red.grids) == 2
    monkeypatch.setenv("CLORA_FAST_PENALTY_REDUCE", "both")
    with pytest.raises(ValueError, match="CLORA_FAST_PENALTY_REDUCE must be 'fused' or 'separate', got 'both'"):
        grouped_forgetting_penalty_forward(pasts, As, Bs, scales, **kw)


@pytest.mark.parametrize("cfg", [dict(block_o=16, block_i=16), dict(block_o=32, block_i=16, col_splits=3),
                                 dict(block_o=16, block_i=32, col_splits=2, deterministic=False), {}],
                         ids=["rowblocks", "colsplits", "atomic", "default"])
def test_fused_reduce_equals_separate_bitwise(device, cfg):
    """The in-launch reduction (last arriving program per layer / of the grid) sums the same partials
    in the same order as the reduce kernel: the same bits for every gradient (and the loss, whose
    final tl.sum may group differently on a GPU with another warp count); the arrival counters are
    left at zero for the next launch.  fp32 atomics (deterministic=False) vary in the last bits on a GPU."""
    pasts, As, Bs, scales = _layers(device, F32, F32, seed=3)
    for t, seq in zip(_make(200, 40, 4, F32, F32, device, seed=9), (pasts, As, Bs)):   # many row blocks:
        seq.append(t)                                                                  # a long tail sum
    scales.append(0.7)
    sep = grouped_forgetting_penalty_forward(pasts, As, Bs, scales, fused_reduce=False, **cfg)
    for _ in range(3):      # the counters must come back to zero after every launch
        fused = grouped_forgetting_penalty_forward(pasts, As, Bs, scales, fused_reduce=True, **cfg)
        plan = next(reversed(fpk._PLANS.values()))
        assert plan.fused and all(int(c.abs().sum()) == 0 for c in plan._counters.values())
        exact = cfg.get("deterministic", True) or device.type == "cpu"
        for a, b in zip([*sep[1], *sep[2]], [*fused[1], *fused[2]]):
            if exact:
                assert torch.equal(a, b)
            else:
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(a.abs().max()))
        if device.type == "cpu":
            assert torch.equal(sep[0], fused[0])
        else:
            torch.testing.assert_close(sep[0], fused[0], rtol=1e-6, atol=0)


def test_partial_sums_add_in_order(device):
    """The reduction of partial sums (the reduce kernel, and the fused tail through the same helper)
    adds parts k = 0, 1, 2, ... in that order although it loads them four at a time: the result equals
    a sequential float32 sum bit for bit, for every count of parts around the groups of four (0-9),
    chunks with a ragged end, and the scalar (loss) form.  The parts' magnitudes differ by up to 2^24,
    so another order would round differently."""
    g = torch.Generator().manual_seed(11)
    n, block, counts = 37, 16, range(10)
    parts = []
    for k in range(max(counts)):
        scale = 2.0 ** int(torch.randint(-12, 13, (1,), generator=g))
        parts.append(torch.randn(n, generator=g) * scale)
    parts[1][:5] = -0.0
    stack = torch.stack(parts)                                                  # [9, n] fp32
    ws = stack.reshape(-1).to(device)
    outs = [torch.full((n,), float("nan"), device=device) for _ in counts]
    loss = torch.full((1,), float("nan"), device=device)
    red = [[0, c, n, st, min(st + block, n), c, 0] for c in counts for st in range(0, n, block)]
    red.append([0, 1, 0, 0, n, len(outs), 1])                                   # sum of part 0: the loss form
    red_tab = torch.tensor(red, dtype=torch.int64, device=device)
    out_tab = torch.tensor([t.data_ptr() for t in (*outs, loss)], dtype=torch.int64, device=device)
    fpk._penalty_reduce_kernel[(len(red),)](red_tab, out_tab, ws, NRF=fpk._NRF, BLOCK=block, num_warps=1)
    for c, got in zip(counts, outs):
        want = torch.zeros(n)
        for k in range(c):
            want = want + stack[k]
        assert torch.equal(got.cpu(), want), c
        if c >= 3:              # the order is visible: reversed, the sum rounds differently somewhere
            rev = torch.zeros(n)
            for k in reversed(range(c)):
                rev = rev + stack[k]
            assert not torch.equal(rev, want)
    assert abs(loss.item() - float(stack[0].double().sum())) <= 1e-6 * float(stack[0].abs().sum())


def test_fused_reduce_packed_and_failed_launch(device, monkeypatch):
    """The packed entry reduces in its one launch too; a launch that fails part-way drops the
    arrival counters (it may have left counts), and the next call starts from fresh zeroed ones."""
    pasts, flat_As, flat_Bs, layout = _packed_case(device)
    sep = fpk.grouped_forgetting_penalty_packed(pasts, flat_As, flat_Bs, layout, 1.0, fused_reduce=False)
    fused = fpk.grouped_forgetting_penalty_packed(pasts, flat_As, flat_Bs, layout, 1.0)
    for a, b in zip([*sep[1], *sep[2]], [*fused[1], *fused[2]]):
        assert torch.equal(a, b)
    torch.testing.assert_close(sep[0], fused[0], rtol=1e-6, atol=0)

    pasts2, As, Bs, scales = _layers(device, F32, F32)
    kw = dict(block_o=16, block_i=16)
    good = grouped_forgetting_penalty_forward(pasts2, As, Bs, scales, **kw)
    plan = next(reversed(fpk._PLANS.values()))
    real = fpk._launch_main

    def half_launch(plan_, p, a, b, ws, cnt, *args):
        cnt.add_(1)                 # some programs arrived, then the launch died
        raise RuntimeError("launch failed")

    monkeypatch.setattr(fpk, "_launch_main", half_launch)
    with pytest.raises(RuntimeError, match="launch failed"):
        grouped_forgetting_penalty_forward(pasts2, As, Bs, scales, **kw)
    assert plan._counters == {}
    monkeypatch.setattr(fpk, "_launch_main", real)
    again = grouped_forgetting_penalty_forward(pasts2, As, Bs, scales, **kw)
    for a, b in zip([again[0], *again[1], *again[2]], [good[0], *good[1], *good[2]]):
        assert torch.equal(a, b)


def test_grouped_plan_cache(device):
    pasts, As, Bs, scales = _layers(device, F32, F32)
    fpk.clear_cache()
    grouped_forgetting_penalty_forward(pasts, As, Bs, scales)
    assert len(fpk._PLANS) == 1
    plan = next(iter(fpk._PLANS.values()))
    grouped_forgetting_penalty_forward(pasts, As, Bs, scales)
    assert len(fpk._PLANS) == 1 and next(iter(fpk._PLANS.values())) is plan
    # a different scale or a different tensor is a different plan
    grouped_forgetting_penalty_forward(pasts, As, Bs, [s * 2 for s in scales])
    assert len(fpk._PLANS) == 2


def test_vector_width_detection(device):
    """16-byte alignment hints only when every past is aligned with a row stride and `in` that keep it so;
    a misaligned (but unit-stride) view falls back to VEC_P = 1 and still gives the right answer."""
    g = torch.Generator().manual_seed(2)
    big = _rand((24, 33), F32, device, g)
    A, B = _rand((3, 32), F32, device, g), _rand((24, 3), F32, device, g)
    aligned = big[:, :32].contiguous()
    misaligned = big[:, 1:]                          # address + 4 bytes, row stride 33
    fpk.clear_cache()
    forgetting_penalty_forward(aligned, A, B, 1.0)
    assert next(reversed(fpk._PLANS.values())).vec_p == 4
    got = forgetting_penalty_forward(misaligned, A, B, 1.0)
    plan = next(reversed(fpk._PLANS.values()))
    assert plan.vec_p == 1 and plan.p_unit
    _check_against_float64(got, misaligned, A, B, 1.0)
    forgetting_penalty_forward(aligned.bfloat16(), A, B, 1.0)
    assert next(reversed(fpk._PLANS.values())).vec_p == 8


def test_bad_inputs(device):
    pasts, As, Bs, scales = _layers(device, F32, F32)
    with pytest.raises(ValueError, match=r"lora_A \[r, 33\]"):
        forgetting_penalty_forward(pasts[0], As[1], Bs[0], 1.0)
    with pytest.raises(ValueError, match="pasts\\[1\\] has dtype torch.bfloat16"):
        grouped_forgetting_penalty_forward([pasts[0], pasts[1].bfloat16()], As[:2], Bs[:2], scales[:2])
    with pytest.raises(ValueError, match="same length"):
        grouped_forgetting_penalty_forward(pasts, As[:2], Bs, scales)
    with pytest.raises(ValueError, match="empty"):
        grouped_forgetting_penalty_forward([], [], [], [])
    with pytest.raises(ValueError, match="float64"):
        forgetting_penalty_forward(pasts[0].double(), As[0], Bs[0], 1.0)
    with pytest.raises(ValueError, match="block_o must be a power of two"):
        forgetting_penalty_forward(pasts[0], As[0], Bs[0], 1.0, block_o=24)
    with pytest.raises(ValueError, match="input_precision"):
        forgetting_penalty_forward(pasts[0], As[0], Bs[0], 1.0, input_precision="fp64")


@pytest.mark.skipif(ON_GPU, reason="CPU tensors without the interpreter")
def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    past, A, B = _make(8, 8, 2, F32, F32, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="need CUDA tensors"):
        forgetting_penalty_forward(past, A, B, 1.0)


def test_precision_follows_torch_setting(monkeypatch):
    m = torch.backends.cuda.matmul
    if hasattr(m, "fp32_precision"):       # torch >= 2.9: the new API (never mixed with the legacy one here)
        old = m.fp32_precision
        try:
            m.fp32_precision = "ieee"
            assert fpk._precision(F32, F32, None) == "ieee"
            assert fpk._precision(BF16, F32, None) == "ieee"
            assert fpk._precision(BF16, BF16, None) == "bf16"   # native bf16 tensor-core products
            assert fpk._precision(F16, F16, None) == "tf32"     # fp16 factors are exact in TF32
            m.fp32_precision = "tf32"
            assert fpk._precision(F32, F32, None) == "tf32"
        finally:
            m.fp32_precision = old
    assert fpk._precision(F32, F32, "tf32x3") == "tf32x3"
    assert fpk._precision(F16, F16, "ieee") == "ieee"
    with pytest.raises(ValueError, match="needs bf16 lora_A and lora_B"):
        fpk._precision(F32, F32, "bf16")


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(out_f=st.integers(1, 70), in_f=st.integers(1, 70), r=st.integers(1, 20),
       dt=st.sampled_from(DTYPES), scale=st.floats(0.1, 4.0), bo=st.sampled_from([None, 16, 32]),
       seed=st.integers(0, 10_000))
def test_property_random_shapes(out_f, in_f, r, dt, scale, bo, seed):
    device = torch.device("cuda" if ON_GPU else "cpu")
    past, A, B = _make(out_f, in_f, r, dt[0], dt[1], device, seed=seed)
    got = forgetting_penalty_forward(past, A, B, scale, block_o=bo)
    _check_against_float64(got, past, A, B, scale)


# ----------------------------------------------------------------------------------------------
# compiled code (CPU: compiles for sm_90 without a GPU) and GPU-only checks
# ----------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from clora_fast.kernels import forgetting_penalty as fpk
for vec_p, fused, da_trans in ((8, False, False), (1, False, False), (8, True, False), (8, False, True)):
    sig = {"layer_tab": "*i64", "tile_tab": "*i32", "scale_tab": "*fp32", "out_tab": "*i64", "p_base": "*bf16",
           "a_base": "*fp32", "b_base": "*fp32", "ws_ptr": "*fp32", "loss_ws_off": "i64", "cnt_ptr": "*i32",
           "n_prog": "i32", "n_layers": "i32"}
    cst = dict(NF=fpk._NF, RP=16, BO=128, BI=64, VEC_P=vec_p, P_UNIT=True, VEC_A=4, A_UNIT=True,
               PRECISION="tf32", DA_ATOMIC=False, BF16_DOT=False, FUSED_REDUCE=fused, RBLOCK=2048,
               DA_TRANS=da_trans)
    sig.update({k: "constexpr" for k in cst})
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(8)}
    ck = triton.compile(ASTSource(fn=fpk._penalty_main_kernel, signature=sig, constexprs=cst, attrs=attrs),
                        target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
    ptx = ck.asm["ptx"]
    if da_trans:
        # every product on the warp-group MMA (no mma.sync for the 16-row dA product)
        print("DATRANS", len(re.findall(r"\bmma\.sync", ptx)), len(re.findall(r"wgmma\.mma_async", ptx)))
        continue
    if fused:
        # every arrival (acq_rel atomic) must follow a CTA barrier with no global store in between
        arrivals = [m.start() for m in re.finditer(r"atom\.global\.gpu\.acq_rel\.add", ptx)]
        ordered = sum(1 for a in arrivals if "st.global" not in ptx[ptx.rfind("bar.sync", 0, a):a])
        print("FUSED", len(arrivals), ordered, len(re.findall(r"ld\.global\.cg", ptx)))
        continue
    vec = re.findall(r"cp\.async\.cg\.shared\.global[^;]*?, 0x10\b|ld\.global\S*\.v4\.b32", ptx)
    scalar16 = re.findall(r"ld\.global\S*\.b16\s", ptx)
    print("RESULT", vec_p, len(vec), len(scalar16), len(re.findall(r"\batom\.", ptx)))
"""


def test_sm90_compile_vectorises_past_loads(sm90_compiler):
    """Compile the main kernel for sm_90 (no GPU needed; a subprocess without the interpreter).
    With the offset-table alignment hints (VEC_P = 8) the bf16 P tile must be read with
    16-byte transfers (cp.async.cg ... 16 / ld.global.v4) and no 2-byte loads; without them
    (VEC_P = 1, the unaligned fallback) 2-byte loads appear -- which shows the check can fail.
    The fused reduction: two arrivals (layer, grid), each an acq_rel GPU-scope atomic after a
    CTA barrier with no global store between them (the release covers every thread's partials),
    partials read through L2 (ld.global.cg); without it, no atomic at all.  da_trans: no mma.sync."""
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        if "ptxas" in proc.stderr.lower() or "GPUTarget" in proc.stderr:
            pytest.skip(f"cannot compile for sm_90 here: {proc.stderr[-300:]}")
        raise AssertionError(proc.stderr[-3000:])
    results, fused, da_trans = {}, None, None
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            v, n_vec, n_b16, n_atom = (int(x) for x in line.split()[1:])
            results[v] = (n_vec, n_b16, n_atom)
        elif line.startswith("FUSED"):
            fused = tuple(int(x) for x in line.split()[1:])
        elif line.startswith("DATRANS"):
            da_trans = tuple(int(x) for x in line.split()[1:])
    assert results[8][0] > 0 and results[8][1] == 0, f"P loads not 16-byte vectorised: {results}"
    assert results[1][1] > 0, f"fallback unexpectedly vectorised: {results}"
    assert results[8][2] == 0, f"atomics without the fused reduction: {results}"
    n_arrivals, n_ordered, n_cg = fused
    assert n_arrivals == 2 and n_ordered == 2 and n_cg > 0, f"fused reduction code: {fused}"
    assert da_trans[0] == 0 and da_trans[1] > 0, f"da_trans: (mma.sync, wgmma) = {da_trans}"


SD_OUTS = [320] * 10 + [640] * 10 + [1280] * 12      # the 32 SD-1.5 attn2 K/V projections (in = 768)


def _sd_layers(outs, p_dtype, ab_dtype, seed):
    """CUDA pasts [o, 768], A [16, 768], B [o, 16] (std 0.02) for the given output widths."""
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(seed)
    pasts = [_rand((o, 768), p_dtype, dev, g, 0.02) for o in outs]
    As = [_rand((16, 768), ab_dtype, dev, g, 0.02) for _ in outs]
    Bs = [_rand((o, 16), ab_dtype, dev, g, 0.02) for o in outs]
    return pasts, As, Bs


@pytest.mark.gpu
@pytest.mark.parametrize("p_dtype,ab_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_gpu_sd_like_grouped(p_dtype, ab_dtype, precision):
    """32 SD-1.5-shaped attn2 K/V layers, r = 16, on the GPU, vs float64; both reduction modes;
    'bf16' = native bf16 tensor-core products (the default for bf16 factors)."""
    if precision == "bf16" and ab_dtype != BF16:
        pytest.skip("native bf16 products need bf16 factors")
    outs = SD_OUTS
    pasts, As, Bs = _sd_layers(outs, p_dtype, ab_dtype, seed=0)
    scales = [1.0] * len(outs)
    m = torch.backends.cuda.matmul
    new_api = hasattr(m, "fp32_precision")
    old = m.fp32_precision if new_api else m.allow_tf32
    # the torch side (tolerance) does the same products as the kernel
    if new_api:
        m.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    else:
        m.allow_tf32 = precision == "tf32"
    try:
        for det in (True, False):
            loss, dAs, dBs = grouped_forgetting_penalty_forward(pasts, As, Bs, scales, input_precision=precision,
                                                                deterministic=det)
            torch.cuda.synchronize()
            # TF32 rounds every operand to a 10-bit mantissa (2^-11 relative): M = B@A carries about
            # 2^-10 of relative error and the loss, a sum of P^2 M^2, twice that; torch's own fp32
            # products here may stay full fp32 (cuBLAS picks), so the floor carries TF32's level.
            floor = 4e-3 if precision == "tf32" else 2e-5
            for l in (0, 15, 31):
                single_loss = forgetting_penalty_forward(pasts[l], As[l], Bs[l], 1.0, input_precision=precision)[0]
                _check_against_float64((single_loss, dAs[l], dBs[l]), pasts[l], As[l], Bs[l], 1.0, floor=floor)
            ref = sum(float(reference.forgetting_penalty(p.double(), a.double(), b.double(), 1.0))
                      for p, a, b in zip(pasts, As, Bs))
            rtol = 2e-5 if precision == "ieee" else 5e-3
            assert abs(float(loss) - ref) <= rtol * ref
            if det:
                again = grouped_forgetting_penalty_forward(pasts, As, Bs, scales, input_precision=precision)
                assert torch.equal(again[0], loss) and all(torch.equal(x, y) for x, y in zip(again[1], dAs))
    finally:
        if new_api:
            m.fp32_precision = old
        else:
            m.allow_tf32 = old


@pytest.mark.gpu
def test_gpu_fused_reduce_sd_shapes_repeatable():
    """The in-launch reduction at the 32 SD-1.5 K/V shapes (hundreds of programs finishing in any
    order, every layer with several row blocks and column chunks): 20 launches, each bit-identical
    to the two-launch reduction -- a missing release/acquire would show as a stale partial -- and
    the arrival counters back at zero."""
    pasts, As, Bs = _sd_layers(SD_OUTS, BF16, BF16, seed=1)
    for kw in ({}, dict(col_splits=3), dict(block_o=64), dict(maxnreg=128), dict(da_trans=True)):
        sep = grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0, fused_reduce=False, **kw)
        for _ in range(20):
            fused = grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0, fused_reduce=True, **kw)
            assert all(torch.equal(a, b) for a, b in zip([*sep[1], *sep[2]], [*fused[1], *fused[2]])), kw
            torch.testing.assert_close(fused[0], sep[0], rtol=1e-6, atol=0)
        plan = next(reversed(fpk._PLANS.values()))
        torch.cuda.synchronize()
        assert plan.fused and all(int(c.abs().sum()) == 0 for c in plan._counters.values())


@pytest.mark.gpu
@pytest.mark.parametrize("ab_dtype,precision", [(BF16, "bf16"), (F32, "ieee"), (F32, "tf32")])
def test_gpu_da_trans_matches_float64(ab_dtype, precision):
    """dA as (W^T B)^T (warp-group MMA on sm_90) at the SD shapes: within the same float64 bounds as the
    default product order, and close to it."""
    outs = [320, 640, 1280]
    pasts, As, Bs = _sd_layers(outs, BF16, ab_dtype, seed=3)
    base = grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0, input_precision=precision)
    got = grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0, input_precision=precision, da_trans=True)
    floor = 4e-3 if precision == "tf32" else 2e-5
    for l in range(len(outs)):
        single = forgetting_penalty_forward(pasts[l], As[l], Bs[l], 1.0, input_precision=precision, da_trans=True)
        _check_against_float64(single, pasts[l], As[l], Bs[l], 1.0, floor=floor)
        torch.testing.assert_close(got[1][l], base[1][l], rtol=floor, atol=floor * float(base[1][l].abs().max()))
    for a, b in zip(got[2], base[2]):      # dB: the same products either way
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


@pytest.mark.gpu
def test_gpu_fused_reduce_in_cuda_graph():
    """Captured in a CUDA graph (its own zeroed counters and output-address table, written by captured
    kernels, never cached) the penalty replays to the eager result, grouped and packed, and eager
    launches before and after the capture stay right."""
    pasts, As, Bs = _sd_layers([320, 640, 1280, 77], BF16, BF16, seed=2)
    want = grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(a, b) for a, b in zip([*want[1], *want[2]], [*got[1], *got[2]]))
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    after = grouped_forgetting_penalty_forward(pasts, As, Bs, 1.0)
    assert all(torch.equal(a, b) for a, b in zip([want[0], *want[1], *want[2]], [after[0], *after[1], *after[2]]))
    # the packed entry (the controller's call): same, and its cached tables are not the graph's
    flat_A, flat_B = torch.cat(As), torch.cat(Bs)
    layout = [(0, 16 * l, sum(p.shape[0] for p in pasts[:l]), 16) for l in range(len(pasts))]
    want = fpk.grouped_forgetting_penalty_packed(pasts, [flat_A], [flat_B], layout, 1.0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = fpk.grouped_forgetting_penalty_packed(pasts, [flat_A], [flat_B], layout, 1.0)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip([want[0], *want[1], *want[2]], [got[0], *got[1], *got[2]]))
    after = fpk.grouped_forgetting_penalty_packed(pasts, [flat_A], [flat_B], layout, 1.0)
    assert all(torch.equal(a, b) for a, b in zip([want[0], *want[1], *want[2]], [after[0], *after[1], *after[2]]))


@pytest.mark.gpu
def test_gpu_unaligned_and_large_rank():
    """Odd `in` (no vector loads), rank 65 (RP = 128) and a column split, on the GPU."""
    dev = torch.device("cuda")
    for (o, n, r) in [(333, 77, 65), (4096, 40, 4), (64, 4099, 16)]:
        past, A, B = _make(o, n, r, BF16, F32, dev, seed=o)
        got = forgetting_penalty_forward(past, A, B, 0.5, input_precision="ieee")
        _check_against_float64(got, past, A, B, 0.5, floor=2e-5)


# ----------------------------------------------------------------------------------------------
# packed entry: factors as row blocks of flat buffers, gradients of the flat buffers
# ----------------------------------------------------------------------------------------------
def _packed_case(device, ab_dtype=F32, seed=5):
    """Two flat buffers (like two controller bundles), four layers of different shapes; rows
    3:5 of flat A 0 and rows 20:23 of flat B 0 belong to no layer (a site without a past)."""
    g = torch.Generator().manual_seed(seed)
    r = 2
    flat_As = [_rand((9, 24), ab_dtype, device, g, 0.5), _rand((4, 16), ab_dtype, device, g, 0.5)]
    flat_Bs = [_rand((33, r), ab_dtype, device, g, 0.5), _rand((18, r), ab_dtype, device, g, 0.5)]
    layout = [(0, 0, 0, r), (0, 5, 23, r), (1, 0, 0, r), (1, 2, 7, r)]
    outs = [20, 10, 7, 11]
    pasts = [_rand((o, flat_As[f].shape[1]), F32, device, g) for (f, *_), o in zip(layout, outs)]
    return pasts, flat_As, flat_Bs, layout


@pytest.mark.parametrize("ab_dtype", [F32, BF16])
def test_packed_matches_grouped_views(device, ab_dtype):
    pasts, flat_As, flat_Bs, layout = _packed_case(device, ab_dtype)
    scales = [0.5, 1.0, 2.0, -1.5]
    As = [flat_As[f][a:a + r] for f, a, _, r in layout]
    Bs = [flat_Bs[f][b:b + p.shape[0]] for (f, _, b, _), p in zip(layout, pasts)]
    loss_g, dAs, dBs = grouped_forgetting_penalty_forward(pasts, As, Bs, scales)
    for _ in range(2):            # the second call takes the cached tables
        loss, dA_flat, dB_flat = fpk.grouped_forgetting_penalty_packed(pasts, flat_As, flat_Bs, layout, scales)
        assert torch.equal(loss, loss_g)
        for (f, a, b, r), da, db in zip(layout, dAs, dBs):
            assert torch.equal(dA_flat[f][a:a + r], da) and torch.equal(dB_flat[f][b:b + db.shape[0]], db)
        # rows that no layer uses: exact zeros (even with CLORA_FAST_POISON=1)
        assert dA_flat[0][2:5].abs().max() == 0 and dB_flat[0][20:23].abs().max() == 0
        assert [t.shape for t in dA_flat] == [t.shape for t in flat_As] and dA_flat[0].dtype == F32


def test_packed_bad_layout(device):
    pasts, flat_As, flat_Bs, layout = _packed_case(device)
    with pytest.raises(ValueError, match=r"layout\[1\].*rows 8:10 of flat_As\[0\]"):
        fpk.grouped_forgetting_penalty_packed(pasts, flat_As, flat_Bs,
                                              [layout[0], (0, 8, 23, 2)] + layout[2:], 1.0)
    with pytest.raises(ValueError, match=r"flat_As\[0\] must be a contiguous 2-D tensor"):
        fpk.grouped_forgetting_penalty_packed(pasts, [flat_As[0].t().contiguous().t()] + flat_As[1:],
                                              flat_Bs, layout, 1.0)
    with pytest.raises(ValueError, match="layout has 3 entries for 4 pasts"):
        fpk.grouped_forgetting_penalty_packed(pasts, flat_As, flat_Bs, layout[:3], 1.0)
    with pytest.raises(ValueError, match=r"layout\[0\] and layout\[1\] overlap in flat_Bs\[0\]"):
        fpk.grouped_forgetting_penalty_packed(pasts, flat_As, flat_Bs, [layout[0], (0, 5, 19, 2)] + layout[2:], 1.0)


def test_table_by_fills_holds_every_address():
    """The capture-safe output table (one fill per entry) holds the same int64 values a host copy would,
    including addresses above 2^32 and 2^62."""
    ptrs = (0, 1, 2 ** 32 + 5, 140_737_488_355_328, 2 ** 62 + 3)
    t = fpk._table_by_fills(ptrs, torch.device("cpu"))
    assert t.dtype == torch.int64 and t.tolist() == list(ptrs)


def test_output_tables_live_in_one_pool_and_evict_with_their_aliases(device):
    """Output-address tables: a miss writes a slot of one pool allocated once per plan and stream (no
    device allocation per miss: a fresh table per miss moved the next step's outputs to other addresses,
    so on the H100 every training step missed and copied its table); the least recently used slot is
    overwritten, and every key naming it (the packed path's alias too) goes with it, so no key ever
    returns a slot that now holds other addresses."""
    fpk.clear_cache()
    past, A, B = _make(9, 7, 2, F32, F32, device)
    grouped_forgetting_penalty_forward([past, past[:5]], [A, A], [B, B[:5]], 1.0)
    plan = next(reversed(fpk._PLANS.values()))
    n = 2 * plan.n_layers + 1
    plan.out_tabs.clear()
    tabs = {}
    for k in range(3 * fpk._TAB_SLOTS):
        ptrs = tuple(1000 * k + j for j in range(n))
        t = plan.out_table(ptrs, device, alias=("alias", k))
        tabs[k] = t
        assert t.tolist() == list(ptrs)
        assert plan.cached_table(("alias", k), device) is t
        assert plan.out_table(ptrs, device) is t                      # a hit: the same tensor
        pool = next(iter(plan._tab_pools.values()))
        assert len(plan._tab_pools) == 1 and pool.shape == (fpk._TAB_SLOTS, n)
        assert t.untyped_storage().data_ptr() == pool.untyped_storage().data_ptr()
        live = [v for kk, v in plan.out_tabs.items() if kk[1][0] != "alias"]
        assert len(live) == min(k + 1, fpk._TAB_SLOTS)
        assert len({v[1] for v in live}) == len(live)                 # no two address tuples share a slot
        for j in range(max(0, k - fpk._TAB_SLOTS + 1), k + 1):        # the newest _TAB_SLOTS are all intact
            assert plan.cached_table(("alias", j), device).tolist() == [1000 * j + i for i in range(n)]
        for j in range(0, k - fpk._TAB_SLOTS + 1):                    # the older ones are gone, aliases too
            assert plan.cached_table(("alias", j), device) is None
    # a slot used through its alias only (the packed path's hits) is recent: a miss evicts another one
    hot = 3 * fpk._TAB_SLOTS - fpk._TAB_SLOTS
    for k in range(3 * fpk._TAB_SLOTS, 4 * fpk._TAB_SLOTS):
        assert plan.cached_table(("alias", hot), device) is tabs[hot]
        plan.out_table(tuple(1000 * k + j for j in range(n)), device, alias=("alias", k))
    assert plan.cached_table(("alias", hot), device).tolist() == [1000 * hot + i for i in range(n)]
    # a kernel launch reads the table it was given: the penalty is still right after the churn
    got = grouped_forgetting_penalty_forward([past, past[:5]], [A, A], [B, B[:5]], 1.0)[0]
    want = (reference.forgetting_penalty_grads(past, A, B, 1.0)[0]
            + reference.forgetting_penalty_grads(past[:5], A, B[:5], 1.0)[0])
    torch.testing.assert_close(got.cpu(), want.cpu().float(), rtol=_rtol(device, F32), atol=1e-6)


@pytest.mark.parametrize("where", ["A", "B"])
def test_inf_factor_gives_inf_loss_not_nan(where, device):
    """An inf in A or B on a tail tile (out/in not multiples of the tile): M at the padded positions was
    inf * 0 = NaN and made the loss NaN and spoiled the valid gradient rows; now as the reference."""
    g = torch.Generator().manual_seed(0)
    P = torch.randn(3, 5, generator=g) + 3.0
    A, B = torch.randn(2, 5, generator=g), torch.randn(3, 2, generator=g)
    (A if where == "A" else B)[1, 1] = float("inf")
    got = [t.cpu() for t in forgetting_penalty_forward(P.to(device), A.to(device), B.to(device), 1.0)]
    want = reference.forgetting_penalty_grads(P, A, B, 1.0)
    assert got[0].item() == want[0].item() == float("inf")
    for g_, w_ in zip(got[1:], want[1:]):
        assert torch.equal(torch.isnan(g_), torch.isnan(w_)) and torch.equal(torch.isinf(g_), torch.isinf(w_))
