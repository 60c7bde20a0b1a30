"""Find the CUDA toolkit root for building clora_fast._C (used by setup.py and .ci/build_cuda.sh).

The root must hold ``bin/nvcc`` and ``libcudart.so`` (``lib64/``, ``lib/`` or ``targets/*/lib``).
Order: ``CUDA_HOME`` / ``CUDA_PATH`` when valid; else the toolkit behind the ``nvcc`` on ``PATH``
-- also when that ``nvcc`` is a wrapper script, which torch's own guess (``dirname(dirname(nvcc))``)
gets wrong, failing at link time with ``cannot find -lcudart``: ``nvcc -dryrun`` prints its real
install directory (``#$ TOP=...``); else ``/usr/local/cuda``.

``python csrc/find_cuda_home.py`` prints the root (exit status 1 when none is found).
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile

FALLBACK_ROOTS = ("/usr/local/cuda",)


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
    for root in FALLBACK_ROOTS:
        if _valid_toolkit(root):
            return root
    return None


if __name__ == "__main__":
    root = find_cuda_home()
    if root is None:
        print("no CUDA toolkit found (need bin/nvcc and lib64/libcudart.so)", file=sys.stderr)
        sys.exit(1)
    print(root)
