#!/usr/bin/env bash
# Builds the optional CUDA C++ extension (csrc/ -> clora_fast._C) both ways and checks the results.
#
#   1. setup.py:  CLORA_FAST_BUILD_CUDA=1 python setup.py build_ext --inplace  -> clora_fast/_C*.so
#   2. CMake:     cmake -S . -B build/ci-cmake && cmake --build ...           -> build/ci-cmake/_C*.so
#                 (+ `cmake --install` into a scratch prefix)
#   3. imports both (the CMake one through CLORA_FAST_CUDA_EXT), checks build_info(), and -- without
#      a GPU -- that calling a launcher raises the clear RuntimeError; with a GPU, runs the GPU tests;
#   4. runs tests/test_cuda_backend.py (incl. the kernels under CPU emulation, and under
#      ThreadSanitizer for shared-memory races) against the build.
#
# Called by .ci/run after the package install, with the venv's python on PATH as `python`.
# Environment: PYTHON (default python), CLORA_FAST_CI_ARCHS (default "9.0": one arch keeps the
# build short; the release default is "8.0;9.0"), MAX_JOBS (default 2),
# CLORA_FAST_TSAN=0 to skip the ThreadSanitizer pass, CLORA_FAST_CI_KEEP_EXT=0 to remove the in-place clora_fast/_C*.so at the end (default: keep it,
# so later test runs exercise the built extension; it is harmless without a GPU).
# Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
export TORCH_CUDA_ARCH_LIST="${CLORA_FAST_CI_ARCHS:-9.0}"
export MAX_JOBS="${MAX_JOBS:-2}"
T0=$(date +%s)
phase() { echo "== [build_cuda +$(( $(date +%s) - T0 ))s] $*"; }

phase "toolkit"
CUDA_ROOT="$("$PY" csrc/find_cuda_home.py)"
echo "CUDA toolkit root: $CUDA_ROOT; TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST; MAX_JOBS=$MAX_JOBS"
"$PY" -c "import torch; assert torch.version.cuda, 'torch is a CPU-only build'; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

phase "1/4 setup.py build_ext --inplace"
rm -f clora_fast/_C*.so
rm -rf build/ci-setuptools  # a clean build, independent of any developer build in build/temp.*
# CLORA_FAST_BUILD_HOST=0: the C++ host extension (clora_fast._host) was built by the package install
CLORA_FAST_BUILD_HOST=0 CLORA_FAST_BUILD_CUDA=1 CUDA_HOME="$CUDA_ROOT" "$PY" setup.py build_ext --inplace \
  --build-temp build/ci-setuptools
ls clora_fast/_C*.so

phase "2/4 CMake configure + build"
rm -rf build/ci-cmake build/ci-cmake-install
cmake -S . -B build/ci-cmake -DPython3_EXECUTABLE="$(command -v "$PY")" \
  -DCMAKE_CUDA_COMPILER="$CUDA_ROOT/bin/nvcc" -DTORCH_CUDA_ARCH_LIST="$TORCH_CUDA_ARCH_LIST"
cmake --build build/ci-cmake -j "$MAX_JOBS"
cmake --install build/ci-cmake --prefix build/ci-cmake-install
CMAKE_SO="$(ls build/ci-cmake/_C*.so)"
ls "$CMAKE_SO" build/ci-cmake-install/clora_fast/_C*.so

phase "3/4 import both builds"
check_build() {  # $1 = expected build system; CLORA_FAST_CUDA_EXT selects the file
  "$PY" - "$1" <<'EOF'
import sys
import torch
from clora_fast import _cuda

want = sys.argv[1]
info = _cuda.build_info()
print(want, info)
assert info["built"], info
assert info["build_system"] == want, (want, info)
assert info["torch_version"].split("+")[0] == torch.__version__.split("+")[0], info
if not torch.cuda.is_available():
    assert not _cuda.is_available()
    x = torch.randn(4, 8)
    for call in (lambda: _cuda.segmented_lora_forward(x, x, x, x, (0, 4), (1.0,)),
                 lambda: _cuda.forgetting_penalty_forward(x, x, x, 1.0),
                 lambda: _cuda.grouped_forgetting_penalty_forward([x], [x], [x], [1.0]),
                 lambda: _cuda.segmented_lora_backward(x, x, x, x, x, x, (0, 4), (1.0,))):
        try:
            call()
        except RuntimeError as e:
            assert "built but no CUDA device is available" in str(e), str(e)
        else:
            raise AssertionError("a launcher ran without a GPU")
    print("no GPU: launchers raise the clear RuntimeError")
else:
    assert _cuda.is_available()
    print("GPU present:", torch.cuda.get_device_name())
EOF
}
unset CLORA_FAST_CUDA_EXT
check_build setuptools
export CLORA_FAST_CUDA_EXT="$PWD/$CMAKE_SO"
check_build cmake
unset CLORA_FAST_CUDA_EXT

phase "4/4 tests/test_cuda_backend.py (setuptools build; GPU tests run when a GPU is present)"
# CLORA_FAST_TSAN=1: also the kernels' race check under ThreadSanitizer (~15 s of CPU).
CLORA_FAST_TSAN="${CLORA_FAST_TSAN:-1}" CLORA_FAST_REQUIRE_CUDA_EXT=1 "$PY" -m pytest -q tests/test_cuda_backend.py
CLORA_FAST_REQUIRE_CUDA_EXT=1 CLORA_FAST_CUDA_EXT="$PWD/$CMAKE_SO" "$PY" -m pytest -q tests/test_cuda_backend.py -m "not slow"

if [ "${CLORA_FAST_CI_KEEP_EXT:-1}" = "0" ]; then
  rm -f clora_fast/_C*.so
fi
phase "OK"
