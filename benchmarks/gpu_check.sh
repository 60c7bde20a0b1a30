#!/usr/bin/env bash
# One command for a lent GPU machine (device tool): GPU test suite, then every benchmark, in < 8 minutes,
# everything written under $OUT in at most 5 files.
#
#   device run (repo root):   bash benchmarks/gpu_check.sh            carry: [".whl"] (diffusers wheel, see below)
#   here, to try the set-up:  bash benchmarks/gpu_check.sh --setup-only   (prints the PYTHONPATH it builds)
#
# What it needs there and what it does about it (installs nothing it cannot find there):
#   - torch, triton, transformers, peft, timm, matplotlib: from the image's python3.
#   - diffusers: not in the image. `bash benchmarks/fetch_wheels.sh` here puts its wheel in .whl/ (git-ignored);
#     name ".whl" in the call's carry. It is installed with --no-index --no-deps into /tmp/clora_site. Without
#     it the SD parts (diffusers tests, SD end-to-end) report "n/a (diffusers not importable)".
#   - clora_fast without pip install: setup.py maps the top-level kernels/ to clora_fast.kernels, so the repo
#     root on PYTHONPATH is not enough. The script builds a symlink farm: $WORK/pkg/clora_fast/ holds a link to
#     every entry of clora_fast/ plus clora_fast/kernels -> kernels/, and $WORK/pkg goes first on PYTHONPATH.
#     PYTHONSAFEPATH=1 keeps `python -m pytest` (run from the repo root) from putting the repo root, with its
#     kernel-less clora_fast/, ahead of the farm.
#   - the C++ host extension (csrc/merged_lora.cpp -> clora_fast._host, C++ only, ~30-60 s): built unless
#     BUILD_HOST=0 (at most HOST_BUILD_TIMEOUT s, default 150); a failed build leaves the Python path.
#   - the optional CUDA extension (csrc/ -> clora_fast._C): built only with BUILD_CUDA=1 (setup.py build_ext
#     --inplace, CLORA_FAST_BUILD_CUDA=1, sm_90, MAX_JOBS=16, at most CUDA_BUILD_TIMEOUT s); its time comes out
#     of the benchmarks' budgets. Otherwise backend "cuda" is reported as n/a.
#
# Tests: pytest -q ${TESTS:-tests} -m "$PYTEST_MARK" (TESTS: a subset of test files; BENCHES: a subset of
# "host ops e2e scaling") (default "not slow": the slow marker is for slower CPU-only tests,
# which CI runs; PYTEST_MARK= runs everything).
# Budget: DEADLINE_S (default 440 s) for the whole script; pytest gets at most TEST_TIMEOUT (150 s); the
# benchmarks share what is left (host 8%, then ops 45%, e2e 35%, scaling 20%), each with --gpu-budget for its measuring and
# a hard `timeout` above it (NCU_S seconds, default 50, are kept back for the Nsight Compute profiles of
# benchmarks/profile_kernels.py when ncu is on the PATH; NCU_S=0 skips them). TUNE_S=S adds
# benchmarks/tune_triton.py (block-config sweep) with that budget, also kept back from the benchmarks,
# after them (TUNE_ARGS e.g. --skip-projection). OPS_ARGS / E2E_ARGS / SCALING_ARGS go to one benchmark only
# (e.g. OPS_ARGS="--dtypes bf16 --ranks 16"), OPS_BUDGET / E2E_BUDGET / SCALING_BUDGET fix one benchmark's
# --gpu-budget instead of its share. Tests run under pytest-xdist (PYTEST_WORKERS, default 8; 0 = serial) when it is importable.
# SKIP_TESTS=1 / SKIP_BENCH=1 skip a part; BENCH_ARGS is appended to every
# benchmark's arguments (e.g. BENCH_ARGS=--quick SKIP_TESTS=1 PYTHON=/work/venv/bin/python to try the whole
# pipeline on a CPU machine).
#
# Files back in $OUT (default benchmarks/out/gpu): gpu_check.log (everything printed), pytest.log,
# RESULTS_gpu.md (summary of PASS/MISS + every benchmark's table), results.jsonl (all JSON lines, one
# "bench" key added), bench_out.tar.gz (the raw per-benchmark files and PNG plots).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-$REPO/benchmarks/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
DEADLINE_S=${DEADLINE_S:-440}
TEST_TIMEOUT=${TEST_TIMEOUT:-150}
WORK=$(mktemp -d /tmp/clora_gpu_check.XXXXXX)
RES=$WORK/results
mkdir -p "$RES"
SITE=/tmp/clora_site

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE_S - $(date +%s) + T0 )); }
say() { echo "[gpu_check +$(elapsed)s] $*"; }

setup_only=0
[ "${1:-}" = "--setup-only" ] && setup_only=1

TEE_PID=
if [ $setup_only = 0 ]; then
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
  TEE_PID=$!
fi

# ---------------------------------------------------------------- 1. diffusers from the carried wheels
if [ $setup_only = 0 ] && ls "$REPO"/.whl/*.whl >/dev/null 2>&1; then
  say "installing carried wheels into $SITE: $(cd "$REPO/.whl" && ls *.whl | tr '\n' ' ')"
  if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
       "$REPO"/.whl/*.whl; then
    say "WARNING: wheel install failed; SD parts will report n/a"
  fi
elif [ $setup_only = 0 ]; then
  say "no .whl/ carried: diffusers comes from the image if it has one, else SD parts report n/a"
fi

# ---------------------------------------------------------------- 2a. C++ host extension (clora_fast._host)
# the merged K/V projection's autograd Function in C++ (less host time per call); BUILD_HOST=0 skips it
if [ $setup_only = 0 ] && [ "${BUILD_HOST:-1}" = "1" ]; then
  say "building the C++ host extension clora_fast._host (timeout ${HOST_BUILD_TIMEOUT:-150}s)"
  CLORA_FAST_BUILD_HOST=1 CLORA_FAST_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-16} \
    timeout "${HOST_BUILD_TIMEOUT:-150}" "$PY" setup.py -q build_ext --inplace > "$WORK/host_build.log" 2>&1
  rc=$?
  tail -n 5 "$WORK/host_build.log"
  say "host extension build exit code $rc (non-zero: the Python path is used)"
fi

# ---------------------------------------------------------------- 2b. optional CUDA extension
if [ $setup_only = 0 ] && [ "${BUILD_CUDA:-0}" = "1" ]; then
  say "building the CUDA extension (timeout ${CUDA_BUILD_TIMEOUT:-180}s)"
  CLORA_FAST_BUILD_HOST=0 CLORA_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout "${CUDA_BUILD_TIMEOUT:-180}" "$PY" setup.py -q build_ext --inplace > "$WORK/cuda_build.log" 2>&1
  rc=$?
  tail -n 30 "$WORK/cuda_build.log"
  say "CUDA extension build exit code $rc"
fi

# ---------------------------------------------------------------- 3. import path (symlink farm)
FARM=$WORK/pkg
mkdir -p "$FARM/clora_fast"
for f in "$REPO"/clora_fast/* "$REPO"/clora_fast/.[!.]*; do
  [ -e "$f" ] || continue
  ln -s "$f" "$FARM/clora_fast/$(basename "$f")"
done
if [ -e "$FARM/clora_fast/kernels" ]; then
  say "WARNING: clora_fast/kernels exists in the package dir; leaving it"
else
  ln -s "$REPO/kernels" "$FARM/clora_fast/kernels"
fi
export PYTHONPATH="$FARM:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONSAFEPATH=1
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "ERROR: $PY is older than Python 3.11: PYTHONSAFEPATH (which keeps the repo's kernel-less clora_fast/ off"\
      "sys.path) does not exist there"
  exit 2
fi
export PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1
export MPLBACKEND=Agg
export CLORA_COMMIT=${CLORA_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}

if [ $setup_only = 1 ]; then
  trap 'rm -rf "$WORK"' EXIT
  echo "PYTHONPATH=$PYTHONPATH"
  "$PY" - <<'EOF'
import os, clora_fast, clora_fast.kernels
print("clora_fast", clora_fast.__file__)
print("clora_fast.kernels", clora_fast.kernels.__file__)
print("kernels_realpath", os.path.realpath(clora_fast.kernels.__file__))
print("backends", clora_fast.available_backends())
EOF
  exit $?
fi

# ---------------------------------------------------------------- 4. environment
say "repo commit $CLORA_COMMIT, work dir $WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | head -5
"$PY" - <<'EOF' 2>&1
import sys, importlib.metadata as md
print("python", sys.version.split()[0])
for p in ("torch", "triton", "transformers", "peft", "timm", "diffusers", "huggingface_hub", "matplotlib"):
    try:
        print(p, md.version(p))
    except Exception as e:
        print(p, "MISSING", type(e).__name__)
import torch
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import clora_fast, clora_fast.kernels
    print("clora_fast from", clora_fast.__file__, "backends", clora_fast.available_backends())
except Exception as e:
    print("clora_fast import FAILED:", type(e).__name__, e)
try:
    import diffusers
    print("diffusers importable", diffusers.__version__)
except Exception as e:
    print("diffusers NOT importable:", type(e).__name__, e)
EOF

# ---------------------------------------------------------------- 5. tests
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  PYTEST_MARK=${PYTEST_MARK-not slow}
  say "pytest -x -q tests -m '$PYTEST_MARK' (timeout ${TEST_TIMEOUT}s; 'slow' = slower CPU-only tests that CI runs;"\
      "the CPU smoke tests of the benchmarks are left out: the real runs follow)"
  # pytest-xdist (in the device image): the Triton JIT compiles, not the GPU, bound the suite's time
  XDIST=
  if "$PY" -c "import xdist" 2>/dev/null && [ "${PYTEST_WORKERS:-8}" != "0" ]; then
    XDIST="-n ${PYTEST_WORKERS:-8}"
  fi
  timeout "$TEST_TIMEOUT" "$PY" -m pytest --maxfail=20 -q -rf -p no:cacheprovider $XDIST ${TESTS:-tests} \
    -m "$PYTEST_MARK" --ignore=tests/test_benchmarks.py -o addopts="" > "$OUT/pytest.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/pytest.log"
  [ $rc = 124 ] && say "pytest TIMED OUT after ${TEST_TIMEOUT}s"
  say "pytest exit code $rc"
  PYTEST_RC=$rc
else
  PYTEST_RC=skipped
fi

# ---------------------------------------------------------------- 6. benchmarks
# seconds kept back from the benchmarks for the kernel profiles (6b) when ncu is there (and TUNE_S for 6c)
NCU_S=${NCU_S:-50}
command -v ncu >/dev/null 2>&1 || NCU_S=0
run_bench() {  # name share_percent fixed_overhead_s [extra args]
  local name=$1 share=$2 over=$3; shift 3
  local l budget hard
  l=$(( $(left) - NCU_S - ${TUNE_S:-0} ))     # kept back for the profiles (6b) and the sweep (6c)
  budget=$(( (l - 60) * share / 100 - over ))
  [ $budget -lt 15 ] && budget=15
  local own_budget="$(echo "$name" | tr a-z A-Z)_BUDGET"   # OPS_BUDGET / E2E_BUDGET / SCALING_BUDGET: fixed s
  [ -n "${!own_budget:-}" ] && budget=${!own_budget}
  hard=$(( budget + over + 60 ))
  # never past the deadline (+30 s for collecting): a hung benchmark cannot push the script over 8 minutes
  [ $hard -gt $(( l + 30 )) ] && hard=$(( l + 30 ))
  if [ $hard -lt 30 ]; then
    say "bench_$name: SKIPPED, only ${l}s left before the deadline"
    return
  fi
  say "bench_$name: --gpu-budget ${budget}s (hard timeout ${hard}s; ${l}s left overall)"
  local own="$(echo "$name" | tr a-z A-Z)_ARGS"   # OPS_ARGS / E2E_ARGS / SCALING_ARGS: this benchmark only
  timeout "$hard" "$PY" "benchmarks/bench_$name.py" --out "$RES" --gpu-budget "$budget" --plot "$@" ${BENCH_ARGS:-} \
    ${!own:-} > "$RES/bench_$name.log" 2>&1
  local rc=$?
  grep -E "^(PASS|MISS|N/A|INFO) |^wrote |Traceback|Error" "$RES/bench_$name.log" | tail -n 40
  say "bench_$name exit code $rc"
}

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  # shares of what is left after the tests: ops 45%, e2e 35% (of the rest: 64%), scaling gets the rest
  BENCHES=${BENCHES:-host ops e2e scaling}
  case " $BENCHES " in *" host "*) run_bench host 8 10 ;; esac    # launches + host time per call (~20 s)
  case " $BENCHES " in *" ops "*) run_bench ops 45 25 ;; esac
  case " $BENCHES " in *" e2e "*) run_bench e2e 64 30 ;; esac
  case " $BENCHES " in *" scaling "*) run_bench scaling 90 15 ;; esac
fi

# ---------------------------------------------------------------- 6b. kernel profiles (Nsight Compute)
# NCU_S seconds (default 50, 0 = off; off without ncu) for one warm launch per case of NCU_CASES (default: the
# penalty's main kernel, bf16 and controller fp32): benchmarks/profile_kernels.py runs it, ncu reads the
# counters (clocks left alone), the summary (occupancy, throughputs, warp stalls) goes into RESULTS_gpu.md.
if [ "$NCU_S" -gt 0 ] && [ "$(left)" -gt 20 ]; then
  cases=(${NCU_CASES:-penalty_bf16 penalty_ctl})
  for case in "${cases[@]}"; do
    per=$(( NCU_S / ${#cases[@]} ))
    [ "$(left)" -lt $(( per + 10 )) ] && { say "ncu $case: SKIPPED, $(left)s left"; continue; }
    kern=$("$PY" benchmarks/profile_kernels.py --kernel-of "$case")
    say "ncu $case ($kern, at most ${per}s)"
    timeout "$per" ncu --clock-control none --kernel-name "regex:$kern" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --csv --page details \
      "$PY" benchmarks/profile_kernels.py --case "$case" > "$RES/ncu_$case.csv" 2> "$RES/ncu_$case.err"
    say "ncu $case exit code $?"
    "$PY" benchmarks/profile_kernels.py --summarize "$RES/ncu_$case.csv" > "$RES/ncu_$case.md" 2>&1
    sed -n '1,40p' "$RES/ncu_$case.md" | grep -v "^<details" | head -n 30
  done
fi

# ---------------------------------------------------------------- 6c. optional block-config sweep
if [ "${TUNE_S:-0}" -gt 0 ] && [ "$(left)" -gt 30 ]; then
  tb=$(( TUNE_S < $(left) - 20 ? TUNE_S : $(left) - 20 ))
  say "tune_triton: --budget ${tb}s"
  timeout $(( tb + 60 )) "$PY" benchmarks/tune_triton.py --out "$RES" --budget "$tb" ${TUNE_ARGS:-} \
    > "$RES/tune.log" 2>&1
  say "tune_triton exit code $?"
  cat "$RES/tune.md" 2>/dev/null
fi

# ---------------------------------------------------------------- 7. collect (<= 5 files in $OUT)
{
  echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC'), commit $CLORA_COMMIT"
  echo
  nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/- GPU: /'
  echo "- pytest exit code: $PYTEST_RC ($(grep -E '(passed|failed|error)' "$OUT/pytest.log" 2>/dev/null | tail -n 1))"
  echo
  echo "## Targets"
  echo
  cat "$RES"/bench_*.log 2>/dev/null | grep -E "^(PASS|MISS|N/A|INFO) " | sed 's/^/- /'
  for f in "$RES"/host*.md "$RES"/ops*.md "$RES"/scaling*.md "$RES"/e2e*.md "$RES"/ncu_*.md "$RES"/tune.md; do
    [ -f "$f" ] || continue
    echo
    sed 's/^# /## /' "$f"
  done
} > "$OUT/RESULTS_gpu.md"
"$PY" - "$RES" "$OUT/results.jsonl" <<'EOF'
import json, os, sys
res, dst = sys.argv[1], sys.argv[2]
with open(dst, "w") as out:
    for name in sorted(os.listdir(res)):
        if name.endswith(".jsonl"):
            for line in open(os.path.join(res, name)):
                if line.strip():
                    d = json.loads(line)
                    d["bench"] = name[:-len(".jsonl")]
                    out.write(json.dumps(d, sort_keys=True) + "\n")
EOF
[ -f "$WORK/cuda_build.log" ] && cp "$WORK/cuda_build.log" "$RES/"
[ -f "$WORK/host_build.log" ] && cp "$WORK/host_build.log" "$RES/"
tar -czf "$OUT/bench_out.tar.gz" -C "$WORK" results
say "done in $(elapsed)s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "==================== SUMMARY ===================="
grep -E "^- (GPU|pytest)" "$OUT/RESULTS_gpu.md"
cat "$RES"/bench_*.log 2>/dev/null | grep -E "^(PASS|MISS|N/A|INFO) "
# let tee write the last lines into gpu_check.log before the command returns
exec 1>&- 2>&-
[ -n "$TEE_PID" ] && wait "$TEE_PID" 2>/dev/null
exit 0
