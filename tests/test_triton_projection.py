"""Tests of the Triton segmented LoRA projection (kernels/lora_projection.py).

On CPU the kernels run in the Triton interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), on CUDA natively.  Every output is compared with a float64
reference; the tolerance follows the flash-attention idiom: the kernel's error
against float64 must be at most twice the error of the same op computed by plain
PyTorch in the input dtype (plus a small floor).  Outputs are poisoned with NaN
before the kernels write (CLORA_FAST_POISON=1), so an unwritten entry fails.
"""
import contextlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clora_fast import reference
from clora_fast.kernels import lora_projection as lp
from clora_fast.kernels.lora_projection import segmented_lora_backward, segmented_lora_forward

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# floor added to 2 * (torch error), relative to the largest reference magnitude
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-4, torch.bfloat16: 2e-3}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("CLORA_FAST_POISON", "1")


@contextlib.contextmanager
def _torch_like_kernel(device):
    """On CUDA the kernels' fp32 dots use TF32: compare against torch with TF32 allowed."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def _make(M, K, offs, r, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    N, L = offs[-1], len(offs) - 1
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K ** 0.5
    a = torch.randn(L * r, K, generator=g) / K ** 0.5
    b = torch.randn(N, r, generator=g) / r ** 0.5
    bs = torch.randn(N, generator=g) if bias else None
    gy = torch.randn(M, N, generator=g)
    cast = (lambda t: None if t is None else t.to(device=device, dtype=dtype))
    return cast(x), cast(w), cast(a), cast(b), cast(bs), cast(gy)


def _ref(x, w, a, b, bs, gy, offs, scales, dtype, device):
    """(y, xa, dx, dA, dB) computed by torch autograd in ``dtype`` (xa in fp32 as the contract says)."""
    with _torch_like_kernel(device):
        ts = [t.detach().to(dtype).requires_grad_() for t in (x, w, a, b)]
        bb = None if bs is None else bs.detach().to(dtype)
        y = reference.segmented_lora_projection(*ts, offs, scales, bias=bb)
        y.backward(gy.to(dtype))
        xa_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        xa = x.to(xa_dtype) @ a.to(xa_dtype).T
    return y.detach(), xa, ts[0].grad, ts[2].grad, ts[3].grad


MAX_ERR = {}  # (dtype, output) -> largest kernel-vs-float64 error seen (for the report)


def _assert_close(name, got, ref64, lowp, dtype):
    assert torch.isfinite(got).all(), f"{name}: non-finite (unwritten?) entries"
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    err_t = (lowp.double() - ref64).abs().max().item() if got.numel() else 0.0
    mag = ref64.abs().max().item() if got.numel() else 0.0
    floor = FLOOR[dtype]
    if dtype == torch.float32 and got.is_cuda:
        # fp32 tl.dot is TF32 on the GPU (documented); cuBLAS may pick exact-fp32 kernels for tiny
        # shapes even with TF32 allowed, so the floor is TF32's own error level (2^-10 per product).
        floor = 2e-3
    tol = 2 * err_t + floor * max(1.0, mag)
    key = (str(dtype), name)
    MAX_ERR[key] = max(MAX_ERR.get(key, 0.0), err)
    assert err <= tol, f"{name} {dtype}: kernel err {err:.3e} > tol {tol:.3e} (torch err {err_t:.3e}, |ref| {mag:.3e})"


def _check_all(M, K, offs, r, dtype, device, scales, bias=True, seed=0, x_transform=None):
    x, w, a, b, bs, gy = _make(M, K, offs, r, dtype, device, bias=bias, seed=seed)
    if x_transform is not None:
        x = x_transform(x)
    y, xa = segmented_lora_forward(x, w, a, b, offs, scales, bias=bs)
    assert y.shape == (M, offs[-1]) and y.dtype == dtype and y.is_contiguous()
    assert xa.shape == (M, (len(offs) - 1) * r) and xa.dtype == torch.float32
    dx, dA, dB = segmented_lora_backward(gy, x, w, a, b, xa, offs, scales)
    assert dx.shape == x.shape and dx.dtype == dtype
    assert dA.shape == a.shape and dA.dtype == dtype
    assert dB.shape == b.shape and dB.dtype == dtype

    ref64 = _ref(x, w, a, b, bs, gy, offs, scales, torch.float64, device)
    lowp = _ref(x, w, a, b, bs, gy, offs, scales, dtype, device)
    for name, got, r64, lo in zip(("y", "xa", "dx", "dA", "dB"), (y, xa, dx, dA, dB), ref64, lowp):
        _assert_close(name, got, r64, lo, dtype)
    return y, xa, dx, dA, dB


# (M, K, seg_offsets, rank, scales, bias)
CASES = [
    pytest.param(5, 33, (0, 77), 1, (0.75,), True, id="1seg-r1"),
    pytest.param(5, 33, (0, 40, 77), 4, (0.5, 2.0), False, id="kv-r4"),
    pytest.param(5, 33, (0, 20, 51, 77), 16, (1.0, -0.5, 3.0), True, id="3seg-r16"),
    pytest.param(5, 33, (0, 40, 77), 65, (0.25, 1.5), True, id="kv-r65"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("M,K,offs,r,scales,bias", CASES)
def test_forward_backward_vs_float64(device, dtype, M, K, offs, r, scales, bias):
    _check_all(M, K, offs, r, dtype, device, scales, bias=bias)


def test_rank_128_and_multi_tile_segments(device):
    """Largest supported rank; segments wider than BLOCK_N (several tiles, xa written once)."""
    _check_all(3, 20, (0, 150, 170), 128, torch.float32, device, (1.0, 0.5))


def test_multiple_m_k_tiles_and_forced_split(device, monkeypatch):
    """M, K, N larger than one block and the split-reduction path (workspace + split sum)."""
    offs, scales = (0, 200, 300), (0.5, 1.25)
    base = _check_all(150, 200, offs, 8, torch.float32, device, scales, seed=3)
    calls = []

    def forced(programs, red_len, red_block, dev):
        calls.append(red_len)
        return 3

    monkeypatch.setattr(lp, "_split_heuristic", forced)
    split = _check_all(150, 200, offs, 8, torch.float32, device, scales, seed=3)
    assert len(calls) == 3  # dx, dA and dB asked for a split
    for name, u, v in zip(("dx", "dA", "dB"), base[2:], split[2:]):
        # the split only reorders fp32 sums: differences of a few ulps of the largest partial sum
        # (an entry with cancellation can differ by more than rtol of its own small value)
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5 * max(1.0, v.abs().max().item()), msg=name)


def test_launchers_compute_grids_without_triton_host_helpers(device, monkeypatch):
    """The launchers' grid and split arithmetic uses plain int helpers, not ``triton.cdiv`` /
    ``triton.next_power_of_2`` (constexpr functions in newer Tritons: microseconds per host call, 40 calls
    per grouped K/V forward + backward); the helpers agree with Triton's for every positive int."""
    import triton
    for n in list(range(1, 300)) + [1023, 1024, 1025, 2 ** 40 + 1]:
        assert lp._next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 3, 16, 64, 128):
            assert lp._cdiv(n, b) == triton.cdiv(n, b), (n, b)

    def refuse(*a, **k):
        raise AssertionError("a triton host helper was called by a launcher")
    monkeypatch.setattr(triton, "cdiv", refuse)
    monkeypatch.setattr(triton, "next_power_of_2", refuse)
    monkeypatch.setattr(lp, "_split_heuristic", lambda *a: 3)        # the split path's chunking too
    _check_all(150, 200, (0, 200, 300), 8, torch.float32, device, (0.5, 1.25), seed=3)


@pytest.mark.parametrize("layout", ["strided", "transposed"])
def test_non_contiguous_inputs(device, layout):
    M, K, offs, r, scales = 6, 24, (0, 30, 50), 4, (1.0, 0.5)
    if layout == "strided":
        tf = (lambda x: torch.stack([x, x], dim=2).reshape(x.shape[0], -1)[:, ::2])  # strides (2K, 2)
    else:
        tf = (lambda x: x.t().contiguous().t())             # strides (1, M)
    x0 = _make(M, K, offs, r, torch.float32, device)[0]
    assert not tf(x0).is_contiguous()
    torch.testing.assert_close(tf(x0), x0, rtol=0, atol=0)
    _check_all(M, K, offs, r, torch.float32, device, scales, x_transform=tf)


def test_non_contiguous_grad_and_params(device):
    M, K, offs, r, scales = 4, 24, (0, 30, 50), 4, (1.0, -2.0)
    x, w, a, b, bs, gy = _make(M, K, offs, r, torch.float32, device)
    w_nc = torch.stack([w, w], dim=2).reshape(w.shape[0], -1)[:, ::2]
    a_nc = a.t().contiguous().t()
    gy_nc = gy.t().contiguous().t()
    bs_nc = torch.stack([bs, bs], dim=1).reshape(-1)[::2]
    assert not bs_nc.is_contiguous() and torch.equal(bs_nc, bs)
    y, xa = segmented_lora_forward(x, w_nc, a_nc, b, offs, scales, bias=bs_nc)
    y0, xa0 = segmented_lora_forward(x, w, a, b, offs, scales, bias=bs)
    torch.testing.assert_close(y, y0)
    torch.testing.assert_close(xa, xa0)
    got = segmented_lora_backward(gy_nc, x, w_nc, a_nc, b, xa, offs, scales)
    exp = segmented_lora_backward(gy, x, w, a, b, xa0, offs, scales)
    for u, v in zip(got, exp):
        torch.testing.assert_close(u, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_m_zero(device, dtype):
    offs, r, K = (0, 7, 12), 3, 9
    x, w, a, b, bs, gy = _make(0, K, offs, r, dtype, device)
    y, xa = segmented_lora_forward(x, w, a, b, offs, (1.0, 2.0), bias=bs)
    assert y.shape == (0, 12) and y.dtype == dtype and xa.shape == (0, 6) and xa.dtype == torch.float32
    dx, dA, dB = segmented_lora_backward(gy, x, w, a, b, xa, offs, (1.0, 2.0))
    assert dx.shape == (0, K) and dx.dtype == dtype
    assert dA.shape == a.shape and dA.dtype == dtype and not dA.any()
    assert dB.shape == b.shape and dB.dtype == dtype and not dB.any()


def test_bias_on_off(device):
    M, K, offs, r, scales = 5, 16, (0, 20, 33), 2, (1.0, 1.0)
    x, w, a, b, bs, _ = _make(M, K, offs, r, torch.float32, device)
    y1, xa1 = segmented_lora_forward(x, w, a, b, offs, scales, bias=bs)
    y0, xa0 = segmented_lora_forward(x, w, a, b, offs, scales)
    torch.testing.assert_close(y1 - y0, bs.expand(M, -1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa1, xa0, rtol=0, atol=0)
    assert (y1 - y0).abs().min() > 0 or bs.abs().min() == 0


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (True, False, True), (False, False, False)],
                         ids=lambda n: "".join("1" if v else "0" for v in n))
def test_need_flags(device, need):
    M, K, offs, r, scales = 5, 20, (0, 24, 40), 4, (0.5, 2.0)
    x, w, a, b, bs, gy = _make(M, K, offs, r, torch.float32, device)
    _, xa = segmented_lora_forward(x, w, a, b, offs, scales, bias=bs)
    full = segmented_lora_backward(gy, x, w, a, b, xa, offs, scales)
    part = segmented_lora_backward(gy, x, w, a, b, xa, offs, scales,
                                   need_dx=need[0], need_dA=need[1], need_dB=need[2])
    for flag, f, p in zip(need, full, part):
        if flag:
            torch.testing.assert_close(p, f, rtol=0, atol=0)
        else:
            assert p is None


def test_tile_table_and_cache(device):
    t = lp.build_tile_table((0, 5, 300, 301), 128)
    assert t.dtype == torch.int32
    assert t.tolist() == [[0, 0, 5, 1], [1, 5, 133, 1], [1, 133, 261, 0], [1, 261, 300, 0], [2, 300, 301, 1]]
    c1 = lp._tile_table((0, 5, 300, 301), 128, device)
    assert c1 is lp._tile_table((0, 5, 300, 301), 128, device)
    assert c1.device.type == device.type and torch.equal(c1.cpu(), t)
    c2 = lp._tile_table((0, 5, 300, 301), 64, device)
    assert c2 is not c1 and c2.shape[0] == 1 + 5 + 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_outputs_round_to_nearest(device, dtype):
    """y and dx are the fp32 accumulators rounded to nearest (not truncated: the interpreter's
    own fp32->bf16 cast truncates, the kernels round by hand there)."""
    M, K, offs, r, scales = 8, 48, (0, 40, 96), 4, (1.0, 0.5)
    x, w, a, b, bs, gy = _make(M, K, offs, r, dtype, device)
    y, xa = segmented_lora_forward(x, w, a, b, offs, scales, bias=bs)
    dx, _, _ = segmented_lora_backward(gy, x, w, a, b, xa, offs, scales, need_dA=False, need_dB=False)
    ref = _ref(x, w, a, b, bs, gy, offs, scales, torch.float64, device)
    for name, got, r64 in (("y", y, ref[0]), ("dx", dx, ref[2])):
        # truncation never rounds away from zero; round-to-nearest does about half the time
        away = (got.double().abs() > r64.abs()).double().mean().item()
        assert away >= 0.2, f"{name}: only {away:.2f} of entries rounded away from zero (truncated?)"
        if device.type == "cpu":  # interpreter: exact fp32 dots, so nearly every entry is RNE(exact)
            same = (got == r64.to(dtype)).double().mean().item()
            assert same >= 0.9, f"{name}: only {same:.2f} of entries equal round-to-nearest of the exact value"


def test_split_heuristic_and_chunks(monkeypatch):
    """GPU branch of the split heuristic (faked SM count) and the chunking it feeds."""
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(lp, "_interpreting", lambda: False)
    monkeypatch.setattr(lp, "_num_sms", lambda idx: 132)
    # whole-UNet dx: 2 x 6 output tiles, 24960-long reduction in blocks of 64 -> split to fill 2 waves
    assert lp._split_heuristic(12, 24960, 64, cuda0) == 22
    assert lp._split_heuristic(264, 24960, 64, cuda0) == 1          # grid already fills the GPU
    assert lp._split_heuristic(12, 200, 64, cuda0) == 1             # reduction too short to split
    assert lp._split_heuristic(1, 10 ** 7, 64, cuda0) == 64          # capped
    assert lp._split_heuristic(12, 24960, 64, torch.device("cpu")) == 1
    monkeypatch.setattr(lp, "_interpreting", lambda: True)
    assert lp._split_heuristic(12, 24960, 64, cuda0) == 1
    for red_len, splits, block in [(24960, 22, 64), (154, 3, 64), (77, 5, 128), (1, 4, 16), (300, 3, 128)]:
        chunk, n = lp._split_chunks(red_len, splits, block)
        assert chunk % block == 0 and 1 <= n <= splits
        assert (n - 1) * chunk < red_len <= n * chunk  # covers everything, no empty split


def test_block_configs():
    """Interpreter: whole-problem blocks (few programs); GPU: the documented tile sizes."""
    c = lp._fwd_config(5, 33, [40, 37], 16, 4, True)
    assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"]) == (16, 64, 64)
    c = lp._fwd_config(1000, 768, [320, 1280], 16, 2, False)
    assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"]) == (128, 128, 64, 8, 3)
    c = lp._fwd_config(1000, 768, [320], 128, 4, False)
    assert (c["BLOCK_M"], c["num_warps"], c["num_stages"]) == (64, 8, 2)
    assert lp._rank_pad(1) == 16 and lp._rank_pad(16) == 16 and lp._rank_pad(17) == 32 and lp._rank_pad(65) == 128
    b = lp._bwd_config(154, 768, 24960, 512, [320, 1280], 16, 2, False)
    assert b["dx"]["BLOCK_J"] <= 32 and b["g"]["BLOCK_N"] == 128
    b = lp._bwd_config(5, 33, 77, 8, [40, 37], 16, 4, True)
    assert all(v["num_stages"] == 1 for v in b.values())
    # the H100-measured choices (benchmarks/tune_triton.py): few rows / many rows, bf16, r 16
    c = lp._fwd_config(154, 768, [320, 1280], 16, 2, False)
    assert (c["BLOCK_M"], c["BLOCK_N"], c["BLOCK_K"], c["num_warps"], c["num_stages"]) == (64, 64, 64, 4, 4)
    d = lp._bwd_config(154, 768, 24960, 512, [320, 1280], 16, 2, False)["dx"]
    assert (d["BLOCK_M"], d["BLOCK_K"], d["BLOCK_N"], d["num_warps"]) == (64, 128, 64, 4)
    d = lp._bwd_config(25216, 768, 1536, 32, [768, 768], 16, 2, False)["dx"]
    assert (d["BLOCK_M"], d["BLOCK_K"], d["BLOCK_N"], d["num_warps"], d["num_stages"]) == (128, 256, 64, 8, 3)


def test_poison_fills_nan(device):
    assert torch.isnan(lp._empty((3, 4), torch.bfloat16, device)).all()


def test_launcher_asserts_name_shapes(device):
    x, w, a, b, bs, gy = _make(3, 8, (0, 5, 10), 2, torch.float32, device)
    with pytest.raises(AssertionError, match=r"lora_B must be \[10, 2\]"):
        segmented_lora_forward(x, w, a, b[:, :1], (0, 5, 10), (1.0, 1.0))
    with pytest.raises(AssertionError, match="seg_offsets"):
        segmented_lora_forward(x, w, a, b, (0, 5, 9), (1.0, 1.0))
    with pytest.raises(AssertionError, match="one dtype"):
        segmented_lora_forward(x, w.half(), a, b, (0, 5, 10), (1.0, 1.0))
    with pytest.raises(AssertionError, match="grad_y"):
        segmented_lora_backward(gy[:, :4], x, w, a, b, torch.zeros(3, 4, device=device), (0, 5, 10), (1.0, 1.0))


# fewer examples on a GPU: every new shape pattern there costs Triton compiles (~0.3 s each)
@settings(max_examples=4 if torch.cuda.is_available() else 8, deadline=None, derandomize=True)
@given(M=st.integers(1, 20), K=st.integers(1, 40), sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
       r=st.integers(1, 20), bias=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       seed=st.integers(0, 1000))
def test_property_random_shapes(M, K, sizes, r, bias, dtype, seed):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    offs = [0]
    for s in sizes:
        offs.append(offs[-1] + s)
    scales = tuple(0.5 + 0.25 * i for i in range(len(sizes)))
    _check_all(M, K, tuple(offs), r, dtype, device, scales, bias=bias, seed=seed)


# ---------------------------------------------------------------------------------------------
# GPU only: realistic shapes (block configs, split reductions and TF32/bf16 dots of the GPU path)
# ---------------------------------------------------------------------------------------------
SD15_KV = [320] * 10 + [640] * 10 + [1280] * 12  # 16 attn2 layers x (K, V) of SD 1.5


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gpu_whole_unet_kv(dtype):
    device = torch.device("cuda")
    offs = [0]
    for s in SD15_KV:
        offs.append(offs[-1] + s)
    scales = tuple(1.0 for _ in SD15_KV)
    _check_all(154, 768, tuple(offs), 16, dtype, device, scales, bias=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("r", [4, 128])
def test_gpu_vit_kv_large_m(dtype, r):
    device = torch.device("cuda")
    _check_all(8 * 197, 768, (0, 768, 1536), r, dtype, device, (0.5, 0.5), bias=True)


def test_constant_tables_evict_least_recently_used(monkeypatch):
    """The launchers' constant tables (tiles, offsets, scales) are an LRU: a table every call uses survives any
    number of others passing through (a full clear, as before, freed the tables a captured CUDA graph reads by
    address), and the cache stays bounded."""
    monkeypatch.setattr(lp, "_CONST_CACHE", type(lp._CONST_CACHE)())
    cpu = torch.device("cpu")
    hot = lp._device_const(("hot",), lambda: torch.arange(3), cpu)
    for i in range(3 * lp._CONST_CACHE_MAX):
        lp._device_const(("other", i), lambda: torch.zeros(1), cpu)
        assert lp._device_const(("hot",), lambda: torch.arange(3), cpu) is hot
    assert len(lp._CONST_CACHE) == lp._CONST_CACHE_MAX
    assert ("cpu", None, ("other", 0)) not in lp._CONST_CACHE


@pytest.mark.gpu
def test_gpu_captured_projection_keeps_its_tables():
    """A fused projection captured in a CUDA graph after a warm-up call: the tables it took from the cache are kept
    for the process, so replays after the cache evicted everything still give the eager result.  A call whose
    table was never built (new scales) raises a clear error inside a capture."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    M, K, offs, r = 64, 96, (0, 40, 80), 8
    x = torch.randn(M, K, generator=g).to(device)
    w = torch.randn(80, K, generator=g).to(device) / K ** 0.5
    a = torch.randn(2 * r, K, generator=g).to(device) / K ** 0.5
    b = torch.randn(80, r, generator=g).to(device) * 0.1
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        segmented_lora_forward(x, w, a, b, offs, (0.5, 0.5))         # compiles; caches the tile table
    torch.cuda.current_stream().wait_stream(side)
    with pytest.raises(RuntimeError, match=r"launch table scales \(\(0.3125, 0.75\),\) is not built yet.*outside"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            segmented_lora_forward(x, w, a, b, offs, (0.3125, 0.75))
    scales = (0.5, 0.5)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got, _ = segmented_lora_forward(x, w, a, b, offs, scales)
    for i in range(2 * lp._CONST_CACHE_MAX):                        # evict every eager entry
        lp._device_const(("filler", i), lambda: torch.zeros(1), device)
    x.mul_(1.5)
    graph.replay()
    torch.cuda.synchronize()
    exp, _ = segmented_lora_forward(x, w, a, b, offs, scales)
    torch.testing.assert_close(got, exp, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# CPU-side check of the GPU build: compile every kernel ahead of time for sm_90 (Triton ships
# ptxas), with the launchers' block configs and the JIT's specialisation of unit strides and
# 16-divisible ints/pointers, and check shared memory fits an H100 and nothing spills.  Runs in a
# subprocess without TRITON_INTERPRET (under the interpreter @triton.jit gives uncompilable
# InterpretedFunctions): ``python tests/test_triton_projection.py --aot`` prints the JSON report.
# ---------------------------------------------------------------------------------------------
H100_SMEM = 227 * 1024
AOT_CASES = [("bf16", 16), ("bf16", 128), ("fp32", 16), ("fp32", 128)]


def _aot_sm90(fn, ptrs, ints, consts, num_warps, num_stages):
    """Compile ``fn`` for sm_90; returns (shared memory bytes, stack bytes or None)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, attrs, cons = {}, {}, dict(consts)
    dns = set(fn.do_not_specialize or [])
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in dns or i in dns:
            sig[name] = "i32"
        elif name in ptrs:
            sig[name] = "*" + ptrs[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif ints[name] == 1:      # the JIT specialises ints equal to 1
            sig[name], cons[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if ints[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cons, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    stack = None
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "k.cubin")
            with open(path, "wb") as f:
                f.write(k.asm["cubin"])
            out = subprocess.run([cuobjdump, "--dump-resource-usage", path], capture_output=True,
                                 text=True).stdout
        m = re.search(r"STACK:(\d+)", out)
        stack = int(m.group(1)) if m else None
    return k.metadata.shared, stack


def _aot_jobs(dt, r):
    """(name, kernel, pointer dtypes, int args, constexprs, config) at the whole-UNet K/V shape."""
    M, K, L, N = 154, 768, 32, 24960
    LR, es, rp = L * r, (4 if dt == "fp32" else 2), lp._rank_pad(r)
    prec = "ieee" if dt == "fp32" else "tf32"   # torch's default: fp32 matmuls without TF32
    segs = [320, 640, 1280]
    c = lp._fwd_config(M, K, segs, rp, es, False, prec)
    jobs = [("fwd", lp._seg_lora_fwd_kernel,
             dict(x_ptr=dt, w_ptr=dt, a_ptr=dt, b_ptr=dt, bias_ptr=dt, y_ptr=dt, xa_ptr="fp32",
                  tile_ptr="i32", scale_ptr="fp32"),
             dict(M=M, K=K, R=r, stride_xm=K, stride_xk=1, stride_wn=K, stride_wk=1, stride_ar=K,
                  stride_ak=1, stride_bn=r, stride_br=1, stride_bias=1, stride_ym=N, stride_yn=1, stride_xam=LR,
                  stride_xar=1),
             dict(HAS_BIAS=True, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], BLOCK_K=c["BLOCK_K"],
                  R_PAD=rp, INTERPRET=False, PREC=prec), c)]
    jobs.append(("fwd-nobias",) + jobs[0][1:4] + (dict(jobs[0][4], HAS_BIAS=False), c))
    bc = lp._bwd_config(M, K, N, LR, segs, rp, es, False, prec)
    c = bc["g"]
    jobs.append(("g", lp._seg_lora_bwd_g_kernel,
                 dict(dy_ptr=dt, b_ptr=dt, g_ptr="fp32", off_ptr="i32", scale_ptr="fp32"),
                 dict(M=M, R=r, stride_dym=N, stride_dyn=1, stride_bn=r, stride_br=1, stride_gm=LR,
                      stride_gr=1),
                 dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], R_PAD=rp, INTERPRET=False, PREC=prec), c))
    c = bc["db"]
    jobs.append(("db", lp._seg_lora_bwd_db_kernel,
                 dict(dy_ptr=dt, xa_ptr="fp32", out_ptr="fp32", tile_ptr="i32", scale_ptr="fp32"),
                 dict(M=M, R=r, m_chunk=64, stride_dym=N, stride_dyn=1, stride_xam=LR, stride_xar=1,
                      stride_os=N * r, stride_on=r, stride_or=1),
                 dict(BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], R_PAD=rp, INTERPRET=False, PREC=prec), c))
    c = bc["dx"]
    jobs.append(("dx", lp._seg_lora_bwd_dx_kernel,
                 dict(dy_ptr=dt, w_ptr=dt, g_ptr="fp32", a_ptr=dt, out_ptr="fp32"),
                 dict(M=M, N=N, K=K, LR=LR, n_chunk=3200, j_chunk=64, stride_dym=N, stride_dyn=1,
                      stride_wn=K, stride_wk=1, stride_gm=LR, stride_gj=1, stride_aj=K, stride_ak=1,
                      stride_os=M * K, stride_om=K, stride_ok=1),
                 dict(BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"], BLOCK_N=c["BLOCK_N"],
                      BLOCK_J=c["BLOCK_J"], INTERPRET=False, PREC=prec), c))
    c = bc["da"]
    jobs.append(("da", lp._seg_lora_bwd_da_kernel,
                 dict(g_ptr="fp32", x_ptr=dt, out_ptr=dt),
                 dict(M=M, K=K, LR=LR, m_chunk=M, stride_gm=LR, stride_gj=1, stride_xm=K, stride_xk=1,
                      stride_os=0, stride_oj=K, stride_ok=1),
                 dict(BLOCK_J=c["BLOCK_J"], BLOCK_K=c["BLOCK_K"], BLOCK_M=c["BLOCK_M"], INTERPRET=False, PREC=prec), c))
    if r == 16:
        jobs.append(("sum", lp._split_sum_kernel, dict(ws_ptr="fp32", out_ptr=dt), dict(S=4, P=M * K),
                     dict(BLOCK=512, INTERPRET=False), dict(num_warps=4, num_stages=1)))
    return jobs


def _aot_main():
    import json
    report = {}
    for dt, r in AOT_CASES:
        for name, fn, ptrs, ints, consts, cfg in _aot_jobs(dt, r):
            try:
                smem, stack = _aot_sm90(fn, ptrs, ints, consts, cfg["num_warps"], cfg["num_stages"])
                report[f"{dt}-{r}-{name}"] = dict(smem=smem, stack=stack)
            except Exception as e:  # reported to the test, which fails on it
                report[f"{dt}-{r}-{name}"] = dict(error=f"{type(e).__name__}: {e}"[-2000:])
    print("AOT-REPORT " + json.dumps(report))


@pytest.fixture(scope="module")
def aot_report(sm90_compiler):
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the real GPU tests compile and run the kernels")
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, "--aot"], capture_output=True, text=True, env=env,
                          timeout=600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("AOT-REPORT ")]
    assert proc.returncode == 0 and lines, f"AOT subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("AOT-REPORT "):])


@pytest.mark.parametrize("dt,r", AOT_CASES, ids=[f"{d}-r{r}" for d, r in AOT_CASES])
def test_kernels_compile_for_sm90(aot_report, dt, r):
    """Whole-UNet K/V shape (M=154, K=768, 32 segments): every kernel compiles for sm_90 with
    the launchers' configs, fits in H100 shared memory and spills no registers (Triton >= 3.6, the GPU
    machines' version and newer, which the configs were tuned with; Triton 3.3 spills up to 40 B in two
    of them - a little speed, not correctness - so older releases may spill at most 64 B)."""
    from clora_fast.kernels._triton_compat import TRITON_VERSION
    max_spill = 0 if TRITON_VERSION >= (3, 6) else 64
    entries = {k: v for k, v in aot_report.items() if k.startswith(f"{dt}-{r}-")}
    assert len(entries) == (7 if r == 16 else 6)
    for key, v in entries.items():
        assert "error" not in v, f"{key}: {v.get('error')}"
        assert v["smem"] <= H100_SMEM, f"{key}: {v['smem']} B shared memory > {H100_SMEM}"
        assert (v["stack"] or 0) <= max_spill, f"{key}: {v['stack']} B of register spills"


if __name__ == "__main__" and "--aot" in __import__("sys").argv:
    _aot_main()


@pytest.mark.parametrize("r", [1, 3])
def test_inf_in_x_gives_the_reference_pattern(device, r):
    """An inf in x: the padded rank columns of x @ A^T were inf * 0 = NaN and reached every output column
    through the zero-padded rows of B (a whole NaN row instead of the reference's inf / NaN pattern)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, generator=g)
    x[0, 1] = float("inf")
    w, a, b = torch.randn(4, 3, generator=g), torch.randn(r, 3, generator=g), torch.randn(4, r, generator=g)
    y, _ = segmented_lora_forward(*(t.to(device) for t in (x, w, a, b)), (0, 4), (1.0,))
    want = reference.segmented_lora_forward(x, w, a, b, (0, 4), (1.0,))[0]
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(want)) and torch.equal(torch.isinf(y.cpu()), torch.isinf(want))
