"""The CUDA C++ backend (csrc/ -> clora_fast._C, wrapped by clora_fast._cuda).

CPU part (runs everywhere):
- without a GPU, ``_cuda.is_available()`` is False and every launcher raises a RuntimeError that
  says whether the extension is missing (with the build command) or the GPU is;
- when the extension is built here, ``build_info()`` works and the extension's own argument checks
  (which run before any CUDA call) raise errors that name the argument and its shape/dtype;
- the kernels themselves (csrc/kernels/*.cuh, unchanged source) run on the CPU under the CUDA
  emulation of csrc/emu/cuda_emu.h against float64 references (needs a C++20 compiler).

GPU part (@pytest.mark.gpu): the four launchers against clora_fast.reference in float64 on odd
shapes, every dtype, non-contiguous x, M = 0; the kernel's error must be at most twice the error of
plain torch in the same dtype, plus a small floor.  Skipped when the extension is not built, unless
CLORA_FAST_REQUIRE_CUDA_EXT=1 (then a missing extension fails the test).
"""
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from clora_fast import _cuda
from clora_fast import reference as ref

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA = torch.cuda.is_available()
BUILD_CMD = "CLORA_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e ."


def _cpu_args():
    x = torch.randn(5, 33)
    w = torch.randn(77, 33)
    a = torch.randn(16, 33)
    b = torch.randn(77, 16)
    return x, w, a, b


def _call_all_launchers():
    """Calls each launcher once; yields (name, exception or None)."""
    x, w, a, b = _cpu_args()
    xa = torch.zeros(5, 16)
    gy = torch.randn(5, 77)
    calls = {
        "segmented_lora_forward": lambda: _cuda.segmented_lora_forward(x, w, a, b, (0, 77), (1.0,)),
        "segmented_lora_backward": lambda: _cuda.segmented_lora_backward(gy, x, w, a, b, xa, (0, 77), (1.0,)),
        "forgetting_penalty_forward": lambda: _cuda.forgetting_penalty_forward(w, a, b, 1.0),
        "grouped_forgetting_penalty_forward": lambda: _cuda.grouped_forgetting_penalty_forward([w], [a], [b], [1.0]),
    }
    for name, fn in calls.items():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the test inspects it
            yield name, e
        else:
            yield name, None


# ---------------------------------------------------------------------------------------------
# CPU part
# ---------------------------------------------------------------------------------------------

@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_not_available_without_gpu():
    assert _cuda.is_available() is False
    reason = _cuda.unavailable_reason()
    assert reason is not None
    if _cuda.is_built():
        assert "no CUDA device" in reason
    else:
        assert BUILD_CMD in reason


@pytest.mark.skipif(HAS_CUDA, reason="checks the behaviour without a GPU")
def test_launchers_raise_clear_error_without_gpu():
    for name, err in _call_all_launchers():
        assert isinstance(err, RuntimeError), f"{name} raised {err!r}"
        msg = str(err)
        assert msg.startswith("clora_fast CUDA backend:"), msg
        if _cuda.is_built():
            assert "built but no CUDA device is available" in msg, msg
        else:
            assert "not built" in msg and BUILD_CMD in msg, msg


def test_not_built_error_names_the_build_command(monkeypatch, tmp_path):
    """With the extension missing (forced by pointing CLORA_FAST_CUDA_EXT at a missing file), every
    launcher raises a RuntimeError saying it is not built and how to build it -- GPU or not."""
    monkeypatch.setenv(_cuda.ENV_EXT_PATH, str(tmp_path / "missing_C.so"))
    monkeypatch.setattr(_cuda, "_state", {"loaded": False, "module": None, "error": None, "file": None})
    assert _cuda.is_built() is False
    assert _cuda.is_available() is False
    info = _cuda.build_info()
    assert info["built"] is False and "missing_C.so" in info["import_error"]
    for name, err in _call_all_launchers():
        assert isinstance(err, RuntimeError), f"{name} raised {err!r}"
        assert "is not built" in str(err) and BUILD_CMD in str(err), str(err)


def test_broken_extension_file_only_disables_backend(monkeypatch, tmp_path):
    """A file that is not a loadable module (e.g. built against another torch) must not break the
    import of clora_fast: the backend is just unavailable, with the loader's error in the message."""
    bad = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so"
    bad.write_bytes(b"not an ELF file")
    monkeypatch.setenv(_cuda.ENV_EXT_PATH, str(bad))
    monkeypatch.setattr(_cuda, "_state", {"loaded": False, "module": None, "error": None, "file": None})
    assert _cuda.is_built() is False
    with pytest.raises(RuntimeError, match="not built or does not import"):
        _cuda.forgetting_penalty_forward(*_cpu_args()[1:], 1.0)


def test_build_info():
    info = _cuda.build_info()
    assert info["built"] == _cuda.is_built()
    assert info["available"] == _cuda.is_available()
    assert info["build_hint"] == BUILD_CMD
    if info["built"]:
        assert info["build_system"] in ("setuptools", "cmake")
        assert info["torch_version"].split("+")[0].split(".")[:2] == torch.__version__.split("+")[0].split(".")[:2]
        assert isinstance(info["cuda_runtime_version"], int) and info["cuda_runtime_version"] >= 11000
        assert info["cuda_archs"] and info["module_file"]
    else:
        assert info["import_error"]


needs_ext = pytest.mark.skipif(not _cuda.is_built(), reason="clora_fast._C not built (" + BUILD_CMD + ")")


@needs_ext
def test_extension_argument_checks_name_the_argument():
    """The extension's TORCH_CHECKs run before any CUDA call, so they are testable on the CPU."""
    ext = _cuda._load()
    x, w, a, b = _cpu_args()
    with pytest.raises(RuntimeError, match=r"x must be a CUDA tensor, got shape \[5, 33\], dtype Float"):
        ext.segmented_lora_forward(x, w, a, b, [0, 77], [1.0], None)
    with pytest.raises(RuntimeError, match=r"x must be a CUDA tensor"):
        ext.segmented_lora_backward(torch.zeros(5, 77), x, w, a, b, torch.zeros(5, 16), [0, 77], [1.0],
                                    True, True, True)
    with pytest.raises(RuntimeError, match=r"pasts\[0\] must be a CUDA tensor, got shape \[77, 33\]"):
        ext.forgetting_penalty_forward(w, a, b, 1.0)
    with pytest.raises(RuntimeError, match="pasts is empty"):
        ext.grouped_forgetting_penalty_forward([], [], [], [])
    with pytest.raises(RuntimeError, match="must have the same length"):
        ext.grouped_forgetting_penalty_forward([w], [a, a], [b], [1.0])
    with pytest.raises(RuntimeError, match=r"x must be a CUDA tensor, got shape \[2, 5, 33\].*strides \[0, 33, 1\]"):
        ext.segmented_lora_forward(x.expand(2, 5, 33), w, a, b, [0, 77], [1.0], None)
    assert ext.table_cache_size() >= 0


@pytest.mark.slow
def test_kernels_under_cpu_emulation(tmp_path):
    """Compiles csrc/emu/emulate_kernels.cpp (the CUDA kernels' exact source under a CPU emulation of
    blocks, threads, __syncthreads, shared memory, warp shuffles and atomics) and runs its checks
    against float64 references: segmented epilogue / grad_xa / grad_B on fp32, fp16, bf16, ranks 1,
    16, 65, one and several segments, padded strides; the grouped penalty with mixed dtypes, padded
    past rows and layers without work."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    exe = tmp_path / "emulate_kernels"
    cmd = [cxx, "-std=c++20", "-O1", "-pthread", f"-I{torch_include}", f"-I{os.path.join(REPO, 'csrc')}",
           os.path.join(REPO, "csrc", "emu", "emulate_kernels.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and ("unrecognized command-line option" in res.stderr and "c++20" in res.stderr):
        pytest.skip(f"{cxx} does not support C++20")
    assert res.returncode == 0, res.stderr[-4000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and "ALL PASSED" in run.stdout, run.stdout[-6000:] + run.stderr[-2000:]
    assert "FAIL" not in run.stdout


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CLORA_FAST_TSAN") != "1",
                    reason="opt-in (minutes on 2 cores): CLORA_FAST_TSAN=1; .ci/build_cuda.sh sets it")
def test_kernels_race_free_under_thread_sanitizer(tmp_path):
    """The emulated kernels built with -fsanitize=thread: a missing __syncthreads (shared memory
    written by one thread and read by another without a barrier in between) is a reported data race."""
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    torch_include = os.path.join(os.path.dirname(torch.__file__), "include")
    exe = tmp_path / "emulate_kernels_tsan"
    cmd = [cxx, "-std=c++20", "-O1", "-g", "-fsanitize=thread", "-pthread", f"-I{torch_include}",
           f"-I{os.path.join(REPO, 'csrc')}", os.path.join(REPO, "csrc", "emu", "emulate_kernels.cpp"), "-o", str(exe)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0 and ("tsan" in res.stderr.lower() or "sanitize" in res.stderr.lower()):
        pytest.skip(f"{cxx} cannot build with -fsanitize=thread: {res.stderr[-300:]}")
    assert res.returncode == 0, res.stderr[-4000:]
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    run = subprocess.run([str(exe), "--quick"], capture_output=True, text=True, timeout=1200, env=env)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0 and "ALL PASSED" in run.stdout, run.stdout[-3000:] + run.stderr[-3000:]


def _load_find_cuda_home():
    import importlib.util
    spec = importlib.util.spec_from_file_location("clora_find_cuda_home", os.path.join(REPO, "csrc", "find_cuda_home.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fake_toolkit(root):
    (root / "bin").mkdir(parents=True)
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so").write_bytes(b"")
    nvcc = root / "bin" / "nvcc"
    # like the real one, -dryrun prints its install dir
    nvcc.write_text(f'#!/bin/sh\necho "#$ _HERE_={root}/bin"\necho "#$ TOP={root}/bin/.."\n')
    nvcc.chmod(0o755)
    return nvcc


def test_find_cuda_home_resolves_nvcc_wrapper(tmp_path, monkeypatch):
    """The toolkit root behind an nvcc *wrapper script* on PATH (the case where torch's guess,
    dirname(dirname(nvcc)), fails at link time with `cannot find -lcudart`)."""
    fch = _load_find_cuda_home()
    real = _fake_toolkit(tmp_path / "cuda-99.0")
    wrapper_dir = tmp_path / "usr_local_bin"
    wrapper_dir.mkdir()
    wrapper = wrapper_dir / "nvcc"
    wrapper.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapper_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("CUDA_HOME", str(wrapper_dir.parent))  # invalid: no lib64/libcudart.so -> ignored
    assert fch.find_cuda_home() == str(tmp_path / "cuda-99.0")
    assert fch._toolkit_behind_nvcc(str(wrapper)) == os.path.normpath(str(tmp_path / "cuda-99.0"))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda-99.0"))  # valid: taken as is
    assert fch.find_cuda_home() == str(tmp_path / "cuda-99.0")


def test_find_cuda_home_none_without_toolkit(tmp_path, monkeypatch):
    fch = _load_find_cuda_home()
    empty = tmp_path / "empty_bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "nope"))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setattr(fch, "FALLBACK_ROOTS", (str(tmp_path / "also_nope"),))
    assert fch.find_cuda_home() is None
    # a toolkit without libcudart (the `cannot find -lcudart` case) is not accepted either
    broken = tmp_path / "broken"
    _fake_toolkit(broken)
    (broken / "lib64" / "libcudart.so").unlink()
    monkeypatch.setenv("CUDA_HOME", str(broken))
    assert fch.find_cuda_home() is None


def test_setup_py_cuda_switch():
    """Default install never imports torch for the extension; a bad CLORA_FAST_BUILD_CUDA value is a clear error."""
    env = {k: v for k, v in os.environ.items() if k != "CLORA_FAST_BUILD_CUDA"}
    res = subprocess.run([sys.executable, "-X", "importtime", "setup.py", "--name"], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip().endswith("clora_fast"), res.stderr[-2000:]
    assert "import time:" in res.stderr
    assert not re.search(r"\|\s+torch\s*$", res.stderr, flags=re.M), "setup.py imported torch without CLORA_FAST_BUILD_CUDA=1"
    env["CLORA_FAST_BUILD_CUDA"] = "maybe"
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "CLORA_FAST_BUILD_CUDA must be 0 or 1, got 'maybe'" in res.stderr


def test_setup_py_host_extension_is_optional(tmp_path):
    """The C++ host extension (clora_fast._host) builds by default but a failed build only warns (the
    package then uses its Python path); CLORA_FAST_BUILD_HOST=1 makes the failure an error, and a bad value
    is a clear error."""
    env = {k: v for k, v in os.environ.items() if k not in ("CLORA_FAST_BUILD_CUDA", "CLORA_FAST_BUILD_HOST")}
    env.update(CC="/bin/false", CXX="/bin/false")          # a compiler that fails at once
    cmd = [sys.executable, "setup.py", "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp")]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "WARNING: the optional C++ extension clora_fast._host did not build" in res.stderr
    assert not list((tmp_path / "lib").rglob("_host*.so"))
    res = subprocess.run(cmd, cwd=REPO, env=dict(env, CLORA_FAST_BUILD_HOST="1"), capture_output=True, text=True)
    assert res.returncode != 0
    res = subprocess.run([sys.executable, "setup.py", "--name"], cwd=REPO, env=dict(env, CLORA_FAST_BUILD_HOST="x"),
                         capture_output=True, text=True)
    assert res.returncode != 0 and "CLORA_FAST_BUILD_HOST must be 0, 1 or auto, got 'x'" in res.stderr


# ---------------------------------------------------------------------------------------------
# GPU part
# ---------------------------------------------------------------------------------------------

def _gpu_ext_or_skip():
    if not _cuda.is_built():
        if os.environ.get("CLORA_FAST_REQUIRE_CUDA_EXT") == "1":
            pytest.fail("clora_fast._C is not built: " + str(_cuda.unavailable_reason()))
        pytest.skip("clora_fast._C not built (" + BUILD_CMD + ")")
    assert _cuda.is_available()


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _err(a, b):
    """max |a - b| relative to max |b| (b float64)."""
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def _assert_close_like_torch(name, got, want64, torch_got, dtype):
    e_k, e_t = _err(got, want64), _err(torch_got, want64)
    assert e_k <= 2 * e_t + FLOOR[dtype], f"{name}: kernel error {e_k:.3e} > 2 x torch error {e_t:.3e} + floor"


def _projection_inputs(M, K, offsets, r, dtype, bias, x_layout="contiguous", seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    L, N = len(offsets) - 1, offsets[-1]
    dev = "cuda"

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dev, dtype)

    if x_layout == "transposed":
        x = rnd(K, M).t()
    elif x_layout == "strided":
        x = rnd(M, 2 * K + 3)[:, 1:2 * K + 1:2]
    else:
        x = rnd(M, K)
    w = rnd(N, K, s=K ** -0.5)
    a = rnd(L * r, K, s=K ** -0.5)
    b = rnd(N, r, s=0.5)
    bb = rnd(N) if bias else None
    scales = tuple(0.5 + 0.25 * i for i in range(L))
    return x, w, a, b, bb, scales


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("offsets", [(0, 77), (0, 40, 77)], ids=["L1", "L2"])
@pytest.mark.parametrize("r", [1, 16, 65])
def test_segmented_projection_matches_reference(dtype, offsets, r):
    _gpu_ext_or_skip()
    M, K = 5, 33
    x, w, a, b, bias, scales = _projection_inputs(M, K, offsets, r, dtype, bias=(r != 1))
    y, xa = _cuda.segmented_lora_forward(x, w, a, b, offsets, scales, bias)
    assert y.shape == (M, offsets[-1]) and y.dtype == dtype and y.is_contiguous()
    assert xa.shape == (M, (len(offsets) - 1) * r) and xa.dtype == torch.float32

    d64 = [t.double() if t is not None else None for t in (x, w, a, b, bias)]
    y64 = ref.segmented_lora_projection(d64[0], d64[1], d64[2], d64[3], offsets, scales, d64[4])
    y_t = ref.segmented_lora_projection(x, w, a, b, offsets, scales, bias)
    _assert_close_like_torch("y", y, y64, y_t, dtype)
    _assert_close_like_torch("xa", xa, d64[0] @ d64[2].T, (x @ a.T).float(), dtype)

    # backward against float64 autograd, torch's own error measured in the same dtype
    gy = torch.randn(M, offsets[-1], device="cuda").to(dtype)
    dx, dA, dB = _cuda.segmented_lora_backward(gy, x, w, a, b, xa, offsets, scales)
    assert dx.dtype == dtype and dA.dtype == dtype and dB.dtype == dtype
    assert dx.shape == x.shape and dA.shape == a.shape and dB.shape == b.shape

    def grads(xx, ww, aa, bb_, bias_, gyy):
        xx, aa, bb_ = (t.detach().clone().requires_grad_(True) for t in (xx, aa, bb_))
        out = ref.segmented_lora_projection(xx, ww, aa, bb_, offsets, scales, bias_)
        out.backward(gyy)
        return xx.grad, aa.grad, bb_.grad

    g64 = grads(d64[0], d64[1], d64[2], d64[3], d64[4], gy.double())
    gt = grads(x, w, a, b, bias, gy)
    for name, got, want, tgot in zip(("dx", "dA", "dB"), (dx, dA, dB), g64, gt):
        _assert_close_like_torch(name, got, want, tgot, dtype)

    only_dB = _cuda.segmented_lora_backward(gy, x, w, a, b, xa, offsets, scales, need_dx=False, need_dA=False)
    assert only_dB[0] is None and only_dB[1] is None
    torch.testing.assert_close(only_dB[2], dB, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("x_layout", ["transposed", "strided"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_segmented_projection_non_contiguous_x(x_layout, dtype):
    _gpu_ext_or_skip()
    offsets = (0, 40, 77)
    x, w, a, b, bias, scales = _projection_inputs(37, 33, offsets, 16, dtype, bias=True, x_layout=x_layout)
    assert not x.is_contiguous()
    y, xa = _cuda.segmented_lora_forward(x, w, a, b, offsets, scales, bias)
    y_c, xa_c = _cuda.segmented_lora_forward(x.contiguous(), w, a, b, offsets, scales, bias)
    d64 = [t.double() for t in (x, w, a, b, bias)]
    y64 = ref.segmented_lora_projection(*d64[:4], offsets, scales, d64[4])
    _assert_close_like_torch("y", y, y64, ref.segmented_lora_projection(x, w, a, b, offsets, scales, bias), dtype)
    torch.testing.assert_close(y, y_c, rtol=1e-2 if dtype != torch.float32 else 1e-5, atol=1e-2 if dtype != torch.float32 else 1e-5)
    gy = torch.randn_like(y)
    dx, dA, dB = _cuda.segmented_lora_backward(gy, x, w, a, b, xa, offsets, scales)
    dx_c, dA_c, dB_c = _cuda.segmented_lora_backward(gy, x.contiguous(), w, a, b, xa_c, offsets, scales)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dx, dx_c, **tol)
    torch.testing.assert_close(dA, dA_c, **tol)
    torch.testing.assert_close(dB, dB_c, **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_segmented_projection_empty_batch(dtype):
    _gpu_ext_or_skip()
    offsets = (0, 40, 77)
    x, w, a, b, bias, scales = _projection_inputs(0, 33, offsets, 16, dtype, bias=True)
    y, xa = _cuda.segmented_lora_forward(x, w, a, b, offsets, scales, bias)
    assert y.shape == (0, 77) and xa.shape == (0, 32)
    gy = torch.zeros(0, 77, device="cuda", dtype=dtype)
    dx, dA, dB = _cuda.segmented_lora_backward(gy, x, w, a, b, xa, offsets, scales)
    assert dx.shape == (0, 33)
    assert torch.count_nonzero(dA) == 0 and dA.shape == a.shape
    assert torch.count_nonzero(dB) == 0 and dB.shape == b.shape


@pytest.mark.gpu
def test_segmented_projection_many_segments_and_rows():
    """Several row tiles, row chunks of the dB kernel, a one-column segment, 32 segments."""
    _gpu_ext_or_skip()
    offsets = tuple([0, 1] + [1 + 37 * i for i in range(1, 32)])
    x, w, a, b, bias, scales = _projection_inputs(1030, 65, offsets, 4, torch.float32, bias=False)
    y, xa = _cuda.segmented_lora_forward(x, w, a, b, offsets, scales)
    d64 = [t.double() for t in (x, w, a, b)]
    y64 = ref.segmented_lora_projection(*d64, offsets, scales)
    _assert_close_like_torch("y", y, y64, ref.segmented_lora_projection(x, w, a, b, offsets, scales), torch.float32)
    gy = torch.randn_like(y)
    dx, dA, dB = _cuda.segmented_lora_backward(gy, x, w, a, b, xa, offsets, scales)
    xx, aa, bb = (t.detach().clone().requires_grad_(True) for t in d64[:1] + d64[2:])
    ref.segmented_lora_projection(xx, d64[1], aa, bb, offsets, scales).backward(gy.double())
    for name, got, want in (("dx", dx, xx.grad), ("dA", dA, aa.grad), ("dB", dB, bb.grad)):
        assert _err(got, want) < 1e-4, name


@pytest.mark.gpu
def test_projection_argument_errors_on_gpu():
    _gpu_ext_or_skip()
    x, w, a, b, bias, scales = _projection_inputs(5, 33, (0, 77), 16, torch.float32, bias=True)
    with pytest.raises(RuntimeError, match=r"lora_B must be \[N, r\] = \[77, 16\], got lora_B shape \[77, 8\]"):
        _cuda.segmented_lora_forward(x, w, a, b[:, :8], (0, 77), scales, bias)
    with pytest.raises(RuntimeError, match="seg_offsets must end at N"):
        _cuda.segmented_lora_forward(x, w, a, b, (0, 70), scales, bias)
    with pytest.raises(RuntimeError, match="must share one dtype"):
        _cuda.segmented_lora_forward(x, w.half(), a, b, (0, 77), scales, bias)
    with pytest.raises(RuntimeError, match=r"bias must be a 1-D CUDA tensor \[N\]"):
        _cuda.segmented_lora_forward(x, w, a, b, (0, 77), scales, bias[:5])


def _penalty_inputs(out, inn, r, dtype, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    past = torch.randn(out, inn, generator=g).to("cuda", dtype)
    a = (torch.randn(r, inn, generator=g) * 0.3).to("cuda", dtype)
    b = (torch.randn(out, r, generator=g) * 0.3).to("cuda", dtype)
    return past, a, b


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("shape", [(77, 33, 1), (77, 33, 16), (5, 130, 65), (300, 200, 16)])
def test_forgetting_penalty_matches_reference(dtype, shape):
    _gpu_ext_or_skip()
    out, inn, r = shape
    past, a, b = _penalty_inputs(out, inn, r, dtype, seed=out + r)
    loss, dA, dB = _cuda.forgetting_penalty_forward(past, a, b, 0.75)
    assert loss.shape == () and loss.dtype == torch.float32
    assert dA.shape == (r, inn) and dB.shape == (out, r) and dA.dtype == dB.dtype == torch.float32
    want = ref.forgetting_penalty_grads(past.double(), a.double(), b.double(), 0.75)
    got_t = ref.forgetting_penalty_grads(past, a, b, 0.75)  # torch, fp32 math on the same inputs
    for name, got, w64, tg in zip(("loss", "dA", "dB"), (loss, dA, dB), want, got_t):
        _assert_close_like_torch(name, got, w64, tg, torch.float32)


@pytest.mark.gpu
def test_grouped_forgetting_penalty_one_launch_mixed_layers():
    _gpu_ext_or_skip()
    specs = [(77, 33, 16, torch.float32), (5, 130, 65, torch.bfloat16), (10, 10, 0, torch.float32),
             (129, 64, 3, torch.float16), (300, 200, 16, torch.float32)]
    pasts, As, Bs = [], [], []
    for i, (out, inn, r, dt) in enumerate(specs):
        p, a, b = _penalty_inputs(out, inn, r, dt, seed=i)
        pasts.append(p), As.append(a), Bs.append(b)
    # a past that is a row slice of a bigger matrix (timm's fused qkv): used in place
    big = torch.randn(3 * 64, 48, device="cuda")
    pasts.append(big[64:128]), As.append(torch.randn(4, 48, device="cuda") * 0.3)
    Bs.append(torch.randn(64, 4, device="cuda") * 0.3)
    scales = [0.5, 1.0, 1.0, 2.0, 0.25, 1.5]
    loss, dAs, dBs = _cuda.grouped_forgetting_penalty_forward(pasts, As, Bs, scales)
    total = 0.0
    for p, a, b, s, dA, dB in zip(pasts, As, Bs, scales, dAs, dBs):
        l64, dA64, dB64 = ref.forgetting_penalty_grads(p.double(), a.double(), b.double(), s)
        total += l64.item()
        assert _err(dA, dA64) < 1e-4 and _err(dB, dB64) < 1e-4
    assert abs(loss.item() - total) <= 1e-5 * abs(total)
    torch.cuda.synchronize()
    # the same call again hits the device-table cache and gives the same result
    n = _cuda._load().table_cache_size()
    loss2, _, _ = _cuda.grouped_forgetting_penalty_forward(pasts, As, Bs, scales)
    assert _cuda._load().table_cache_size() == n
    assert abs(loss2.item() - loss.item()) <= 1e-5 * abs(total)


@pytest.mark.gpu
def test_grouped_penalty_in_a_cuda_graph_uses_the_warm_up_table():
    """Inside a CUDA graph capture (a side stream) the device table comes from the eager warm-up call and the
    replays give the eager result; a table that no eager call uploaded is a clear error, not a CUDA error."""
    _gpu_ext_or_skip()
    pasts, As, Bs = [], [], []
    for out, inn, r, seed in ((96, 80, 8, 1), (40, 64, 8, 2)):
        p, a, b = _penalty_inputs(out, inn, r, torch.float32, seed)
        pasts.append(p), As.append(a), Bs.append(b)
    eager = _cuda.grouped_forgetting_penalty_forward(pasts, As, Bs, [1.0, 0.5])
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        captured = _cuda.grouped_forgetting_penalty_forward(pasts, As, Bs, [1.0, 0.5])
    _cuda._load().clear_table_cache()       # the graph keeps what it reads
    for _ in range(2):
        g.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured[0], eager[0])
        for x, y in zip([*captured[1], *captured[2]], [*eager[1], *eager[2]]):
            assert torch.equal(x, y)
    p, a, b = _penalty_inputs(33, 48, 4, torch.float32, 7)
    with pytest.raises(RuntimeError, match="not uploaded yet, and a CUDA graph capture cannot copy it"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            _cuda.grouped_forgetting_penalty_forward([p], [a], [b], [1.0])


@pytest.mark.gpu
def test_penalty_is_zero_for_zero_past():
    _gpu_ext_or_skip()
    past, a, b = _penalty_inputs(64, 64, 8, torch.float32, seed=3)
    loss, dA, dB = _cuda.forgetting_penalty_forward(torch.zeros_like(past), a, b, 1.0)
    assert loss.item() == 0.0 and torch.count_nonzero(dA) == 0 and torch.count_nonzero(dB) == 0


@pytest.mark.gpu
def test_penalty_argument_errors_on_gpu():
    _gpu_ext_or_skip()
    past, a, b = _penalty_inputs(77, 33, 16, torch.float32, seed=1)
    with pytest.raises(RuntimeError, match=r"lora_Bs\[0\] must be \[out, r\] = \[77, 16\]"):
        _cuda.forgetting_penalty_forward(past, a, b[:70], 1.0)
    with pytest.raises(RuntimeError, match=r"pasts\[1\] must be float32, float16 or bfloat16"):
        _cuda.grouped_forgetting_penalty_forward([past, past.double()], [a, a], [b, b], [1.0, 1.0])


@pytest.mark.gpu
def test_ops_run_on_cuda_backend_with_autograd():
    """Through clora_fast.ops (torch custom ops + registered autograd): outputs of the launchers must
    not alias each other (custom-op rule), and the gradients must match the reference backend."""
    _gpu_ext_or_skip()
    from clora_fast import ops
    past, a, b = _penalty_inputs(77, 33, 16, torch.float32, seed=5)
    grads = {}
    for backend in ("cuda", "reference"):
        aa, bb = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
        loss = ops.forgetting_penalty(past, aa, bb, scale=0.5, backend=backend)
        loss2 = ops.grouped_forgetting_penalty([past, past[:40]], [aa, aa], [bb, bb[:40]], scales=[0.5, 2.0],
                                               backend=backend)
        (3 * loss + loss2).backward()
        grads[backend] = (loss.detach(), loss2.detach(), aa.grad, bb.grad)
    for got, want in zip(grads["cuda"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    offsets, scales = (0, 40, 77), (0.5, 2.0)
    x, w, a2, b2, bias, _ = _projection_inputs(9, 33, offsets, 16, torch.float32, bias=True)
    outs = {}
    for backend in ("cuda", "reference"):
        xx, aa, bb = (t.clone().requires_grad_(True) for t in (x, a2, b2))
        y = ops.segmented_lora_projection(xx, w, aa, bb, offsets, scales, bias=bias, backend=backend)
        y.square().sum().backward()
        outs[backend] = (y.detach(), xx.grad, aa.grad, bb.grad)
    for got, want in zip(outs["cuda"], outs["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-v"]))
