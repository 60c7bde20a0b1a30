"""Test configuration.

Without a GPU, Triton kernels run in the interpreter: set TRITON_INTERPRET=1
before the first launch (before anything imports triton is safest).
"""
import os

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture
def device():
    """The device the kernel tests run on: CUDA when present, else CPU (interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture(scope="session")
def sm90_compiler():
    """Skip a test that compiles kernels for sm_90 through ``triton.compile(ASTSource(..., constexprs=...))``
    when the installed Triton has no such API (Triton 3.0's takes ``constants=``); the kernels themselves
    are still tested through the interpreter there."""
    import inspect

    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"no Triton ahead-of-time compiler API: {e}")
    if "constexprs" not in inspect.signature(ASTSource.__init__).parameters:
        import triton
        pytest.skip(f"Triton {triton.__version__}'s ASTSource takes no constexprs= "
                    "(the sm_90 compile checks need a newer Triton)")
