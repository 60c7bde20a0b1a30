"""Install clora_fast.

The package is pure Python + Triton; ``kernels/`` is installed as
``clora_fast.kernels``.  Install torch first, then
``pip install --no-build-isolation -e ".[test]"`` (see README).

Host-side C++ extension (``csrc/merged_lora.cpp`` -> ``clora_fast._host``)
------------------------------------------------------------------------
A small C++-only extension (no CUDA toolkit needed): the merged-weight
projection as a C++ autograd Function, which saves the Python Function's host
time per call (the bottleneck at SD / ViT-B layer sizes).  Built by default
when torch's C++ headers and a compiler are there; when the build fails the
install goes on and the package uses the Python Function (same results).
``CLORA_FAST_BUILD_HOST=0`` skips it, ``=1`` makes a failed build an error.

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
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = ["csrc/lora_projection.cu", "csrc/forgetting_penalty.cu", "csrc/table_cache.cpp",
        "csrc/bindings.cpp"]
HOST_SRC = ["csrc/merged_lora.cpp"]
DEFAULT_ARCHS = "8.0;9.0"


def _cuda_build_requested():
    value = os.environ.get("CLORA_FAST_BUILD_CUDA", "0").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SystemExit(f"CLORA_FAST_BUILD_CUDA must be 0 or 1, got {value!r}")


def _host_build_mode():
    value = os.environ.get("CLORA_FAST_BUILD_HOST", "auto").strip().lower()
    if value in ("0", "false", "no", "off"):
        return "off"
    if value in ("1", "true", "yes", "on"):
        return "required"
    if value in ("", "auto"):
        return "auto"
    raise SystemExit(f"CLORA_FAST_BUILD_HOST must be 0, 1 or auto, got {value!r}")


# commands that compile (metadata-only calls such as `setup.py --name` or pip's dist_info never import torch)
_BUILD_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}


def host_extension():
    """The C++ host extension, or None (not wanted, not a build command, or torch is not importable)."""
    mode = _host_build_mode()
    if mode == "off" or not _BUILD_COMMANDS.intersection(sys.argv[1:]):
        return None
    try:
        from torch.utils.cpp_extension import CppExtension
    except ImportError as e:
        if mode == "required":
            raise SystemExit(f"CLORA_FAST_BUILD_HOST=1 but torch is not importable in the build environment ({e}); "
                             "install torch first and use `pip install --no-build-isolation`") from e
        print(f"clora_fast setup: torch not importable ({e}); skipping the optional clora_fast._host",
              file=sys.stderr)
        return None
    return CppExtension(name="clora_fast._host", sources=HOST_SRC, extra_compile_args=["-O3"])


def _build_ext_class():
    from torch.utils.cpp_extension import BuildExtension

    class Build(BuildExtension):
        """torch's BuildExtension (ninja); a failed build of the optional host extension is a warning, and
        the extension is then dropped (nothing to copy in place or into the wheel)."""

        def _optional(self, exts, e):
            if _host_build_mode() == "required" or any(x.name != "clora_fast._host" for x in exts):
                raise e
            print(f"clora_fast setup: WARNING: the optional C++ extension clora_fast._host did not build "
                  f"({type(e).__name__}: {e}); clora_fast uses its Python path instead (same results, more "
                  f"host time per call)", file=sys.stderr)
            self._failed = getattr(self, "_failed", set()) | {x.name for x in exts}

        def build_extensions(self):            # torch's compiler / ABI checks run here, before any extension
            try:
                super().build_extensions()
            except Exception as e:  # noqa: BLE001 - no compiler, headers mismatch, ...
                self._optional(self.extensions, e)
            failed = getattr(self, "_failed", set())
            self.extensions = [x for x in self.extensions if x.name not in failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # noqa: BLE001
                self._optional([ext], e)

    return Build.with_options(use_ninja=True)


def extension_kwargs():
    """``ext_modules`` / ``cmdclass``: the host extension (default) and the CUDA one (when requested)."""
    exts = [e for e in (host_extension(), *cuda_extensions()) if e is not None]
    if not exts:
        return {}
    return {"ext_modules": exts, "cmdclass": {"build_ext": _build_ext_class()}}


def cuda_extensions():
    """The CUDA extension as a one-element list, or [] when it is not requested."""
    if not _cuda_build_requested():
        return []
    try:
        import torch
    except ImportError as e:
        raise SystemExit("CLORA_FAST_BUILD_CUDA=1 but torch is not importable in the build environment "
                         f"({e}); install torch first and use `pip install --no-build-isolation`") from e
    if torch.version.cuda is None:
        raise SystemExit(f"CLORA_FAST_BUILD_CUDA=1 but torch {torch.__version__} is a CPU-only build; "
                         "install a CUDA build of torch")
    sys.path.insert(0, os.path.join(HERE, "csrc"))
    try:
        from find_cuda_home import find_cuda_home
    finally:
        sys.path.pop(0)
    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise SystemExit("CLORA_FAST_BUILD_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME to a "
                         "toolkit root holding bin/nvcc and lib64/libcudart.so, or put nvcc on PATH")
    # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    from torch.utils.cpp_extension import CUDAExtension

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
    return [ext]


setup(
    name="clora_fast",
    version="0.1.0",
    description="Fused Triton/CUDA kernels for C-LoRA continual customization",
    packages=["clora_fast", "clora_fast.integrations", "clora_fast.kernels"],
    package_dir={"clora_fast": "clora_fast", "clora_fast.kernels": "kernels"},
    package_data={"clora_fast": ["configs/*.json", "configs/*/*.json", "assets/*"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "safetensors>=0.4.5", "numpy", "tqdm"],   # floors: docs/COMPATIBILITY.md
    extras_require={
        "triton": ["triton>=3.0"],
        "test": [
            "pytest>=7",
            "hypothesis>=6",
            "peft>=0.13",
            "diffusers>=0.30",
            "transformers>=4.45",
            "timm>=1.0.9",
            "accelerate>=0.34",
            "scikit-learn>=1.3",
            "matplotlib>=3.7",
        ],
    },
    entry_points={"console_scripts": ["clora-fast=clora_fast.cli:main"]},
    **extension_kwargs(),
)
