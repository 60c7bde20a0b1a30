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


@pytest.fixture
def recording_aot_eager():
    """``f(graphs)``: a torch.compile backend that appends ``(graph module, example inputs)`` of each graph dynamo
    hands it to the list ``graphs``, then compiles it with aot_eager (no C compiler needed)."""
    def make(graphs):
        from torch._dynamo.backends.debugging import aot_eager

        def backend(gm, example_inputs):
            graphs.append((gm, example_inputs))
            return aot_eager(gm, example_inputs)
        return backend
    return make


@pytest.fixture
def graph_tensor_inputs(recording_aot_eager):
    """``f(fn, *args)``: compile ``fn`` (fullgraph, aot_eager), run it once and return ``(name, static)`` for each
    tensor input of its one graph: ``static`` when dynamo marked it a static address (parameters, module tensors),
    which CUDA graphs (mode="reduce-overhead") read in place; every other input is copied into the graph's memory
    at each replay."""
    def inputs(fn, *args):
        graphs = []
        torch._dynamo.reset()
        torch.compile(fn, backend=recording_aot_eager(graphs), fullgraph=True)(*args)
        assert len(graphs) == 1
        gm, example = graphs[0]
        places = [n for n in gm.graph.nodes if n.op == "placeholder"]
        return [(n.name, n.meta.get("tensor_dict", {}).get("_dynamo_static_input_type") is not None)
                for n, t in zip(places, example) if isinstance(t, torch.Tensor)]
    return inputs
