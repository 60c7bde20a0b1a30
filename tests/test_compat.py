"""The dependency floors setup.py declares are the versions `.ci/compat.sh floor` tests (docs/COMPATIBILITY.md)."""
import os
import re
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, ".ci", "compat.sh")


def _declared_floors():
    src = open(os.path.join(REPO, "setup.py"), encoding="utf-8").read()
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)>=([0-9.]+)"', src))


def _floor_pins():
    src = open(SCRIPT, encoding="utf-8").read()
    block = src[src.index("  floor)"):src.index(";;", src.index("  floor)"))]
    return dict(re.findall(r'"([A-Za-z0-9_.-]+)==([0-9.]+)"', block))


def test_every_declared_floor_is_the_tested_one():
    """Each `pkg>=X` of setup.py (install_requires and the extras) has a `pkg==Y` pin in the floor stack with
    Y starting with X's components (torch>=2.4 <-> 2.4.1): raising a floor without testing it fails here."""
    floors, pins = _declared_floors(), _floor_pins()
    untested = {"pytest", "hypothesis", "scikit-learn", "matplotlib"}   # test tools, not library dependencies
    assert {"torch", "triton", "transformers", "diffusers", "peft", "timm", "safetensors"} <= set(floors)
    for pkg, low in floors.items():
        if pkg in untested:
            continue
        assert pkg in pins, f"setup.py declares {pkg}>={low} but .ci/compat.sh floor does not test it"
        want = low.split(".")
        assert pins[pkg].split(".")[:len(want)] == want, f"{pkg}: declared >={low}, tested =={pins[pkg]}"


def test_compat_script_refuses_an_unknown_stack():
    subprocess.run(["bash", "-n", SCRIPT], check=True)
    res = subprocess.run(["bash", SCRIPT, "nightly"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "unknown stack 'nightly'" in res.stderr


# ---------------------------------------------------------------- Triton 3.0 / 3.1 on Hopper
def test_hopper_compiler_abort_is_old_triton_on_sm90_only(monkeypatch):
    import torch

    from clora_fast.kernels import _triton_compat as tc
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    cuda = torch.device("cuda", 0)
    for version, want in (((3, 0), True), ((3, 1), True), ((3, 2), False), ((3, 6), False)):
        monkeypatch.setattr(tc, "TRITON_VERSION", version)
        assert tc.hopper_compiler_abort(cuda) is want, version
        assert tc.hopper_compiler_abort(torch.device("cpu")) is False
    monkeypatch.setattr(tc, "TRITON_VERSION", (3, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert tc.hopper_compiler_abort(cuda) is False        # the bug is in the Hopper (wgmma) code path only


def test_launchers_refuse_the_configs_old_triton_aborts_on(monkeypatch, device):
    """Where hopper_compiler_abort holds, the projection forward at rank > 64 with 16-bit operands and the
    penalty with da_trans + tf32x3 raise a clear error before compiling (the compiler would abort the
    process); rank 64 and the other penalty precisions pass the check."""
    import pytest
    import torch

    from clora_fast.kernels import _triton_compat as tc
    from clora_fast.kernels import forgetting_penalty as fpk
    from clora_fast.kernels import lora_projection as lp
    monkeypatch.setattr(tc, "hopper_compiler_abort", lambda device: True)
    monkeypatch.setattr(lp, "_interpreting", lambda: False)
    x, w = (torch.randn(*s, dtype=torch.bfloat16, device=device) for s in ((3, 8), (4, 8)))
    a, b = (torch.randn(*s, dtype=torch.bfloat16, device=device) for s in ((65, 8), (4, 65)))
    with pytest.raises(RuntimeError, match=r"aborts the process compiling the fused projection forward at rank 65 "
                                           r"with torch.bfloat16.*Triton 3\.2"):
        lp.segmented_lora_forward(x, w, a, b, (0, 4), (1.0,))
    # rank 64 passes the check and runs (interpreted on the CPU: TRITON_INTERPRET is set for the session)
    lp.segmented_lora_forward(x, w, a[:64], b[:, :64].contiguous(), (0, 4), (1.0,))
    past, A, B = torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    args = ([past], [A], [B], (1.0,), torch.device("cpu"), False)
    with pytest.raises(RuntimeError, match="aborts the process compiling the penalty kernel with da_trans=True"):
        fpk._Plan(*args, "tf32x3", True, None, None, None, da_trans=True)
    for precision, da_trans in (("tf32", True), ("tf32x3", False)):
        fpk._Plan(*args, precision, True, None, None, None, da_trans=da_trans)
