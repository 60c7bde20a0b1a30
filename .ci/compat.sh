#!/usr/bin/env bash
# The test suite on another dependency stack, in a throw-away venv and a clean clone of HEAD (the working
# tree and its built extensions are left alone); each stack downloads 3-5 GB of wheels. CI runs the floor
# and image stacks after the README's tests (.ci/run); run a stack by hand when a floor in setup.py or the README
# changes, and record the result in docs/COMPATIBILITY.md.
#
#   bash .ci/compat.sh floor     # the declared minimums: torch 2.4.1, Triton 3.0.0, transformers 4.45.2, ...
#   bash .ci/compat.sh mid       # mid-2025 releases: torch 2.7.1, Triton 3.3.1, transformers 4.53, diffusers 0.34
#   bash .ci/compat.sh image     # the lent GPU machines' image: torch 2.11.0, Triton 3.6.0, transformers 5.17
#   PYTHON=python3.9 bash .ci/compat.sh floor     # another interpreter (default: python3)
#   COMPAT_DIR=/tmp/x bash .ci/compat.sh floor    # keep the venv and the clone there (default: a temporary
#                                                 # folder, removed at the end)
#
# Exit code: pytest's (5 = no test collected is turned into 1); 3 when the stack could not be installed
# (registry unreachable, a wheel gone), so that CI can tell "could not test" from "tests failed".
set -euo pipefail
cd "$(dirname "$0")/.."
stack=${1:?usage: bash .ci/compat.sh floor|mid|image}
case "$stack" in
  floor)   # setup.py's floors (install_requires and the [test] extra)
    pins=("torch==2.4.1" "torchvision==0.19.1" "triton==3.0.0" "transformers==4.45.2" "diffusers==0.30.3"
          "peft==0.13.2" "timm==1.0.9" "accelerate==0.34.2" "safetensors==0.4.5" "numpy<2"
          "huggingface_hub<0.26") ;;
  mid)     # between the two: mid-2025 releases many users run (torch 2.7 / Triton 3.3, transformers 4.x)
    pins=("torch==2.7.1" "torchvision==0.22.1" "triton==3.3.1" "transformers==4.53.3" "diffusers==0.34.0"
          "peft==0.16.0" "timm==1.0.19" "accelerate==1.9.0" "numpy<2.3") ;;
  image)   # what the device machines run (device README); numpy < 2.4: Triton 3.6's interpreter breaks on 2.4
    pins=("torch==2.11.0" "torchvision==0.26.0" "triton==3.6.0" "transformers==5.17.0" "diffusers==0.42.1"
          "peft==0.21.0" "timm==1.0.29" "numpy<2.4") ;;
  *) echo "unknown stack '$stack' (floor, mid or image)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ -n "${COMPAT_DIR:-}" ]; then
  WORK=$COMPAT_DIR                     # kept (venv and clone) for a rerun
else
  WORK=$(mktemp -d /tmp/clora_compat.XXXXXX)
  trap 'rm -rf "$WORK"' EXIT           # 5-6 GB: removed however the script ends
fi
echo "== stack $stack with $($PY --version) in $WORK"
# the test tools: at most the versions these runs used (reproducible; older ones where Python needs them)
tools=("pytest<=9.2.0" "hypothesis<=6.170.17" "scikit-learn<=1.9.1" "matplotlib<=3.11.2" "tqdm<=4.70.1"
       "pybind11<=3.1.0" "ninja<=1.13.2" "open_clip_torch<=3.3.0")
git clone -q . "$WORK/src"
install() {
  "$PY" -m venv "$WORK/venv" && . "$WORK/venv/bin/activate" &&
  python -m pip install -q --upgrade pip setuptools wheel &&
  pip install -q "${pins[@]}" "${tools[@]}" &&
  (cd "$WORK/src" && pip install -q --no-build-isolation --no-deps -e .)
}
if ! install; then
  echo "== stack $stack: could not be installed" >&2
  exit 3
fi
cd "$WORK/src"
python - <<'EOF'
import importlib.metadata as md
print("versions:", ", ".join(f"{p} {md.version(p)}" for p in
      ("torch", "triton", "transformers", "diffusers", "peft", "timm", "numpy", "huggingface_hub")))
EOF
set +e
HF_HUB_OFFLINE=1 TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests
rc=$?
set -e
echo "== stack $stack: pytest exit $rc"
[ "$rc" -eq 5 ] && exit 1
exit "$rc"
