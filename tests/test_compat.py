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
