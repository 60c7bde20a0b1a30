"""Install clora_fast.

The package is pure Python + Triton; ``kernels/`` is installed as
``clora_fast.kernels``.  Install torch first, then
``pip install --no-build-isolation -e ".[test]"`` (see README).

Optional CUDA C++ extension (``csrc/`` -> ``clora_fast._C``)
------------------------------------------------------------
Off by default, so that installs stay fast and work without a CUDA toolkit.
``CLORA_FAST_BUILD_CUDA=1 pip install --no-build-isolation -e .`` builds it
(it needs a CUDA build of torch and a CUDA toolkit; the build fails with a
clear message when either is missing).  ``CLORA_FAST_BUILD_CUDA=0`` (or unset)
never builds it.

- Toolkit: ``CUDA_HOME`` / ``CUDA_PATH`` when set, else the root behind the
  ``nvcc`` on ``PATH`` (wrapper scripts are resolved by asking ``nvcc -dryrun``
  for its install directory), else ``/usr/local/cuda``.  The root must hold
  ``bin/nvcc`` and ``lib64/libcudart.so`` (or ``lib/``).
- Architectures: ``TORCH_CUDA_ARCH_LIST`` (default ``"8.0;9.0"``: A100, H100/H200).
- Parallel compile jobs: ``MAX_JOBS`` (torch's ninja build).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = ["csrc/lora_projection.cu", "csrc/forgetting_penalty.cu", "csrc/table_cache.cpp",
        "csrc/bindings.cpp"]
DEFAULT_ARCHS = "8.0;9.0"


def _cuda_build_requested():
    value = os.environ.get("CLORA_FAST_BUILD_CUDA", "0").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"CLORA_FAST_BUILD_CUDA must be 0 or 1, got {value!r}")


def _has_cudart(root):
    for sub in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib"),
                os.path.join("targets", "sbsa-linux", "lib")):
        d = os.path.join(root, sub)
        if os.path.isdir(d) and any(f.startswith("libcudart.so") for f in os.listdir(d)):
            return True
    return False


def _valid_toolkit(root):
    return bool(root) and os.path.isfile(os.path.join(root, "bin", "nvcc")) and _has_cudart(root)


def _toolkit_behind_nvcc(nvcc):
    """The toolkit root of an ``nvcc`` on PATH, also when it is a wrapper script."""
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:  # nvcc -dryrun prints its install dir: "#$ TOP=/usr/local/cuda-13.0/bin/.."
        with tempfile.TemporaryDirectory() as tmp:
            src = os.path.join(tmp, "probe.cu")
            with open(src, "w") as f:
                f.write("\n")
            res = subprocess.run([nvcc, "-dryrun", "-c", src, "-o", os.path.join(tmp, "probe.o")],
                                 capture_output=True, text=True, timeout=60)
        for line in (res.stdout + res.stderr).splitlines():
            m = re.match(r"#\$ (TOP|_HERE_)=(.*)$", line.strip())
            if m:
                path = m.group(2).strip()
                candidates.append(os.path.normpath(path if m.group(1) == "TOP" else os.path.join(path, "..")))
    except (OSError, subprocess.SubprocessError):
        pass
    try:  # a shell wrapper: "exec /usr/local/cuda-13.0/bin/nvcc "$@""
        with open(nvcc, "r", errors="ignore") as f:
            text = f.read(4096)
        for m in re.finditer(r"(/[^\s\"']+)/bin/nvcc", text):
            candidates.append(m.group(1))
    except OSError:
        pass
    for c in candidates:
        if _valid_toolkit(c):
            return c
    return None


def find_cuda_home():
    """Root of a CUDA toolkit holding bin/nvcc and libcudart, or None."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root:
            if _valid_toolkit(root):
                return root
            print(f"clora_fast setup: {var}={root} has no bin/nvcc + lib64/libcudart.so, ignoring it",
                  file=sys.stderr)
    nvcc = shutil.which("nvcc")
    if nvcc:
        root = _toolkit_behind_nvcc(nvcc)
        if root:
            return root
    for root in ("/usr/local/cuda",):
        if _valid_toolkit(root):
            return root
    return None


def cuda_extension_kwargs():
    """``ext_modules`` / ``cmdclass`` for the CUDA extension, or {} when it is not requested."""
    if not _cuda_build_requested():
        return {}
    try:
        import torch
    except ImportError as e:
        raise SystemExit("CLORA_FAST_BUILD_CUDA=1 but torch is not importable in the build environment "
                         f"({e}); install torch first and use `pip install --no-build-isolation`") from e
    if torch.version.cuda is None:
        raise SystemExit(f"CLORA_FAST_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                         "install a CUDA build of torch")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise SystemExit("CLORA_FAST_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a "
                         "toolkit root holding bin/nvcc and lib64/libcudart.so, or put nvcc on PATH")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    archs = re.sub(r"[^0-9A-Za-z.+]+", "+", os.environ["TORCH_CUDA_ARCH_LIST"]).strip("+") or "unknown"
    defines = ["-DCLORA_FAST_BUILD_SYSTEM=setuptools", f"-DCLORA_FAST_ARCHS={archs}"]
    print(f"clora_fast setup: building clora_fast._C with CUDA_HOME={cuda_home}, "
          f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    ext = CUDAExtension(
        name="clora_fast._C",
        sources=CSRC,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"] + defines,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"] + defines,
        },
    )
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(
    name="clora_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for C-LoRA continual customization",
    packages=["clora_fast", "clora_fast.integrations", "clora_fast.kernels"],
    package_dir={"clora_fast": "clora_fast", "clora_fast.kernels": "kernels"},
    package_data={"clora_fast": ["configs/*.json", "configs/*/*.json", "assets/*"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "safetensors>=0.4", "numpy", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "peft>=0.13",
            "diffusers>=0.30",
            "transformers>=4.45",
            "timm>=1.0",
            "accelerate>=0.30",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["clora-fast=clora_fast.cli:main"]},
    **cuda_extension_kwargs(),
)
