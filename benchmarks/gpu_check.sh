#!/usr/bin/env bash
# One command for a lent GPU machine (device tool): GPU test suite, then the benchmarks, within DEADLINE_S
# (default 470 s: under the 8 minutes issue 5 asks for; a device call with timeout_s 500 leaves time to
# rerun), everything written under $OUT in at most 5 files.
#
#   device run (repo root):   bash benchmarks/gpu_check.sh            carry: [".whl"] (diffusers wheel, see below)
#                             recommended: TUNE_S=60 TUNE_ARGS=--skip-projection bash benchmarks/gpu_check.sh
#                             with timeout_s 500 (the defaults below are sized for that call)
#   here, to try the set-up:  bash benchmarks/gpu_check.sh --setup-only   (prints the PYTHONPATH it builds)
#   here, a dry run (CPU):    SKIP_TESTS=1 BUILD_HOST=0 BENCH_ARGS=--quick PYTHON=/work/venv/bin/python \
#                             OUT=/tmp/gc bash benchmarks/gpu_check.sh    (the whole pipeline on tiny shapes)
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
#     BUILD_HOST=0 (at most HOST_BUILD_TIMEOUT s, default 100); a failed build leaves the Python path.
#   - the optional CUDA extension (csrc/ -> clora_fast._C): built only with BUILD_CUDA=1 (setup.py build_ext
#     --inplace, CLORA_FAST_BUILD_CUDA=1, sm_90, MAX_JOBS=16, at most CUDA_BUILD_TIMEOUT s, default 180); its
#     time comes out of the benchmarks' budgets. Otherwise backend "cuda" is reported as n/a.
#
# Tests: pytest -q $TESTS -m "$PYTEST_MARK" (default TESTS: the files whose tests run kernels or models on the
# GPU: ops, Triton penalty and projection, diffusers, ViT, controller, CUDA backend, selfcheck; TESTS=tests runs
# every file; the CLI, bank and multi-process files test the host side, which CI covers) (default PYTEST_MARK
# "not slow": the slow marker is for slower CPU-only tests, which CI runs; PYTEST_MARK= runs everything), at most
# TEST_TIMEOUT (default 130 s; the default files took 103 s on the H100 on 2026-11-27), under pytest-xdist
# (PYTEST_WORKERS, default 8; 0 = serial) when it is importable.
# Benchmarks, in this order (BENCHES: a subset of "ops e2e scaling host"; the order stays):
#   1. the three that carry the targets, each with its own --gpu-budget: ops OPS_BUDGET (120 s), e2e
#      E2E_BUDGET (110 s), scaling SCALING_BUDGET (40 s). When the time left before the deadline cannot hold
#      every remaining one (budget + its overhead: start-up, the last case, the report; ops 20, e2e 25,
#      scaling 12 s), all the remaining budgets shrink in the same proportion.
#   2. then only with what is left before the deadline: bench_host (HOST_BUDGET, default 30 s), the
#      block-config sweep benchmarks/tune_triton.py when TUNE_S > 0 (at most TUNE_S s; TUNE_ARGS e.g.
#      --skip-projection), the Nsight Compute profiles of benchmarks/profile_kernels.py (at most NCU_S s,
#      default 90, NCU_CASE_S = 45 s per case; NCU_S=0 skips them; ncu from the PATH, else
#      /opt/nvidia/nsight-compute*/ or /usr/local/cuda*/bin/).
#   Every step runs under `timeout -k 5` and ends COLLECT_S (10 s) before the deadline at the latest; a
#   benchmark stopped by it (SIGTERM) still writes its report of what it measured.
# OPS_ARGS / E2E_ARGS / SCALING_ARGS / HOST_ARGS go to one benchmark only (e.g. OPS_ARGS="--dtypes bf16
# --ranks 16"); BENCH_ARGS is appended to every benchmark's arguments (e.g. BENCH_ARGS=--quick SKIP_TESTS=1
# PYTHON=/work/venv/bin/python to try the whole pipeline on a CPU machine). SKIP_TESTS=1 / SKIP_BENCH=1 skip
# a part.
#
# Files back in $OUT (default benchmarks/out/gpu), refreshed after every step (a call killed from outside
# still returns what was measured): gpu_check.log (everything printed), pytest.log, RESULTS_gpu.md (the
# PASS/MISS/N/A lines + every benchmark's report), results.jsonl (all JSON lines, one "bench" key added),
# bench_out.tar.gz (the raw per-benchmark files, logs and PNG plots).
set -uo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 2
OUT=${OUT:-$REPO/benchmarks/out/gpu}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
T0=$(date +%s)
DEADLINE_S=${DEADLINE_S:-470}
TEST_TIMEOUT=${TEST_TIMEOUT:-130}
GPU_TESTS="tests/test_ops.py tests/test_triton_penalty.py tests/test_triton_projection.py tests/test_diffusers.py
           tests/test_vit.py tests/test_controller.py tests/test_cuda_backend.py tests/test_selfcheck.py"
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
  say "building the C++ host extension clora_fast._host (timeout ${HOST_BUILD_TIMEOUT:-100}s)"
  CLORA_FAST_BUILD_HOST=1 CLORA_FAST_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-16} \
    timeout -k 5 "${HOST_BUILD_TIMEOUT:-100}" "$PY" setup.py -q build_ext --inplace > "$WORK/host_build.log" 2>&1
  rc=$?
  tail -n 5 "$WORK/host_build.log"
  say "host extension build exit code $rc (non-zero: the Python path is used)"
fi

# ---------------------------------------------------------------- 2b. optional CUDA extension
if [ $setup_only = 0 ] && [ "${BUILD_CUDA:-0}" = "1" ]; then
  say "building the CUDA extension (timeout ${CUDA_BUILD_TIMEOUT:-180}s)"
  CLORA_FAST_BUILD_HOST=0 CLORA_FAST_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timeout -k 5 "${CUDA_BUILD_TIMEOUT:-180}" "$PY" setup.py -q build_ext --inplace > "$WORK/cuda_build.log" 2>&1
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

# ---------------------------------------------------------------- collect: $RES -> $OUT (after every step)
# RESULTS_gpu.md (PASS/MISS/N/A lines + every report so far), results.jsonl (all JSON lines, a "bench" key
# added), bench_out.tar.gz (the raw files); rewritten after every step, so that a call killed from outside (the
# device tool's limit) still returns everything measured before it
collect() {
  [ -f "$WORK/cuda_build.log" ] && cp "$WORK/cuda_build.log" "$RES/"
  [ -f "$WORK/host_build.log" ] && cp "$WORK/host_build.log" "$RES/"
  {
    echo "# GPU check $(date -u '+%Y-%m-%d %H:%M UTC'), commit ${CLORA_COMMIT:-unknown} (+$(elapsed)s)"
    echo
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/- GPU: /'
    echo "- pytest exit code: ${PYTEST_RC:-not run yet} ($(grep -E '(passed|failed|error)' "$OUT/pytest.log" 2>/dev/null | tail -n 1))"
    echo
    echo "## Targets"
    echo
    for b in ops e2e scaling host; do
      [ -f "$RES/bench_$b.log" ] && grep -E "^(PASS|MISS|N/A|INFO) " "$RES/bench_$b.log" | sed 's/^/- /'
    done
    for f in "$RES"/ops*.md "$RES"/e2e*.md "$RES"/scaling*.md "$RES"/host*.md "$RES"/ncu_*.md "$RES"/tune.md; do
      [ -f "$f" ] || continue
      echo
      sed 's/^# /## /' "$f"
    done
  } > "$OUT/RESULTS_gpu.md.tmp" && mv -f "$OUT/RESULTS_gpu.md.tmp" "$OUT/RESULTS_gpu.md"
  "$PY" - "$RES" "$OUT/results.jsonl" <<'EOF'
import json, os, sys
res, dst = sys.argv[1], sys.argv[2]
with open(dst + ".tmp", "w") as out:
    for name in sorted(os.listdir(res)):
        if name.endswith(".jsonl"):
            for line in open(os.path.join(res, name)):
                try:                # a line cut short by a killed writer is left out
                    d = json.loads(line)
                except ValueError:
                    continue
                d["bench"] = name[:-len(".jsonl")]
                out.write(json.dumps(d, sort_keys=True) + "\n")
os.replace(dst + ".tmp", dst)
EOF
  tar -czf "$OUT/bench_out.tar.gz.tmp" -C "$WORK" results && mv -f "$OUT/bench_out.tar.gz.tmp" "$OUT/bench_out.tar.gz"
}

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
  say "pytest -q ${TESTS:-(the GPU test files)} -m '$PYTEST_MARK' (timeout ${TEST_TIMEOUT}s; 'slow' = slower CPU-only tests that CI runs;"\
      "the CPU smoke tests of the benchmarks are left out: the real runs follow)"
  # pytest-xdist (in the device image): the Triton JIT compiles, not the GPU, bound the suite's time
  XDIST=
  if "$PY" -c "import xdist" 2>/dev/null && [ "${PYTEST_WORKERS:-8}" != "0" ]; then
    XDIST="-n ${PYTEST_WORKERS:-8}"
  fi
  timeout -k 5 "$TEST_TIMEOUT" "$PY" -m pytest --maxfail=20 -q -rf -p no:cacheprovider $XDIST ${TESTS:-$GPU_TESTS} \
    -m "$PYTEST_MARK" --ignore=tests/test_benchmarks.py -o addopts="" > "$OUT/pytest.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/pytest.log"
  [ $rc = 124 ] || [ $rc = 137 ] && say "pytest TIMED OUT after ${TEST_TIMEOUT}s"
  say "pytest exit code $rc"
  PYTEST_RC=$rc
else
  PYTEST_RC=skipped
fi
collect

# ---------------------------------------------------------------- 6. benchmarks
# Plan: the benchmarks that carry the targets first, ops -> e2e -> scaling, each with its own --gpu-budget
# (OPS_BUDGET 120 s, E2E_BUDGET 110 s, SCALING_BUDGET 40 s: sized from the H100 runs of 2026-11-27), all of them
# shrunk in proportion when the time left before the deadline cannot hold what the remaining ones need
# (budget + start-up/last-case/report overhead each). Then, only with the time still left before the deadline:
# bench_host (HOST_BUDGET, default 30 s), the block-config sweep (TUNE_S), the Nsight Compute profiles (NCU_S).
# Every step has a hard `timeout -k 5` that ends it COLLECT_S before the deadline at the latest, and $OUT is
# refreshed after every step (a call killed from outside still returns what was measured).
COLLECT_S=${COLLECT_S:-10}
budget_of() { case $1 in ops) echo "${OPS_BUDGET:-120}" ;; e2e) echo "${E2E_BUDGET:-110}" ;;
                         scaling) echo "${SCALING_BUDGET:-40}" ;; host) echo "${HOST_BUDGET:-30}" ;; esac; }
# seconds beyond --gpu-budget: python start-up + imports, the case running when the budget ends, report/plot
over_of() { case $1 in ops) echo 20 ;; e2e) echo 25 ;; scaling) echo 12 ;; host) echo 15 ;; esac; }

run_bench() {  # name budget_s: bench_<name>.py with --gpu-budget budget_s, never past the deadline
  local name=$1 budget=$2 over hard
  over=$(over_of "$name")
  hard=$(( budget + over + 30 ))
  local cap=$(( $(left) - COLLECT_S ))
  [ $hard -gt $cap ] && hard=$cap
  if [ "$budget" -lt 10 ] || [ $hard -lt 25 ]; then
    say "bench_$name: SKIPPED, only $(left)s left before the deadline"
    return
  fi
  say "bench_$name: --gpu-budget ${budget}s (hard timeout ${hard}s; $(left)s left before the deadline)"
  local own="$(echo "$name" | tr a-z A-Z)_ARGS"   # OPS_ARGS / E2E_ARGS / SCALING_ARGS / HOST_ARGS
  timeout -k 5 "$hard" "$PY" "benchmarks/bench_$name.py" --out "$RES" --gpu-budget "$budget" --plot \
    ${BENCH_ARGS:-} ${!own:-} > "$RES/bench_$name.log" 2>&1
  local rc=$?
  grep -E "^(PASS|MISS|N/A|INFO) |^wrote |^ERROR |Traceback|Error" "$RES/bench_$name.log" | tail -n 40
  [ $rc = 124 ] || [ $rc = 137 ] && say "bench_$name HIT ITS HARD TIMEOUT (${hard}s)"
  say "bench_$name exit code $rc"
  collect
}

if [ "${SKIP_BENCH:-0}" != "1" ]; then
  BENCHES=${BENCHES:-ops e2e scaling host}
  TARGET_BENCHES=
  for n in ops e2e scaling; do case " $BENCHES " in *" $n "*) TARGET_BENCHES="$TARGET_BENCHES $n" ;; esac; done
  todo=$TARGET_BENCHES
  for name in $TARGET_BENCHES; do
    need=0
    for n in $todo; do need=$(( need + $(budget_of "$n") + $(over_of "$n") )); done
    avail=$(( $(left) - COLLECT_S ))
    b=$(budget_of "$name")
    o=$(over_of "$name")
    if [ $avail -lt $need ]; then      # not enough for all that is left: every remaining one shrinks alike
      b=$(( (b + o) * avail / need - o ))
      say "bench_$name: ${need}s wanted by$todo, ${avail}s left: budget shrunk to ${b}s"
    fi
    run_bench "$name" "$b"
    todo=${todo# $name}
  done
  # leftovers: only what is left before the deadline
  case " $BENCHES " in *" host "*)
    b=$(budget_of host)
    l=$(( $(left) - COLLECT_S - $(over_of host) - 5 ))
    [ $b -gt $l ] && b=$l
    run_bench host "$b" ;;
  esac
fi

# ---------------------------------------------------------------- 6b. optional block-config sweep
# TUNE_S seconds at most (0 = off), only out of what is left before the deadline
if [ "${TUNE_S:-0}" -gt 0 ]; then
  tb=$(( $(left) - COLLECT_S - 20 ))
  [ "$TUNE_S" -lt $tb ] && tb=$TUNE_S
  if [ $tb -ge 15 ]; then
    hard=$(( tb + 15 ))
    [ $hard -gt $(( $(left) - COLLECT_S )) ] && hard=$(( $(left) - COLLECT_S ))
    say "tune_triton: --budget ${tb}s (hard timeout ${hard}s)"
    timeout -k 5 "$hard" "$PY" benchmarks/tune_triton.py --out "$RES" --budget "$tb" ${TUNE_ARGS:-} \
      > "$RES/tune.log" 2>&1
    say "tune_triton exit code $?"
    grep -E "^ERROR |Traceback" "$RES/tune.log" | tail -n 5
    cat "$RES/tune.md" 2>/dev/null
    collect
  else
    say "tune_triton: SKIPPED, $(left)s left before the deadline"
  fi
fi

# ---------------------------------------------------------------- 6c. kernel profiles (Nsight Compute)
# NCU_S seconds at most (default 90; 0 = off) out of what is left, NCU_CASE_S (default 45: python + CUDA start
# under ncu, the warm-up launches and ncu's replay passes) per case of NCU_CASES (default: the penalty's main
# kernel, bf16 and controller fp32): benchmarks/profile_kernels.py runs it, ncu reads the counters (clocks left
# alone), the summary (occupancy, throughputs, warp stalls) goes into RESULTS_gpu.md. ncu: the PATH, else the
# newest /opt/nvidia/nsight-compute*/ncu or /usr/local/cuda*/bin/ncu.
NCU_S=${NCU_S:-90}
NCU_CASE_S=${NCU_CASE_S:-45}
NCU=$(command -v ncu 2>/dev/null)
if [ -z "$NCU" ]; then
  for c in $(ls -d /opt/nvidia/nsight-compute*/ncu /usr/local/cuda*/bin/ncu 2>/dev/null | sort -rV); do
    [ -x "$c" ] && { NCU=$c; break; }
  done
fi
if [ "$NCU_S" -gt 0 ] && [ -z "$NCU" ]; then
  say "ncu: not found (PATH, /opt/nvidia/nsight-compute*, /usr/local/cuda*/bin): no kernel profiles"
elif [ "$NCU_S" -gt 0 ]; then
  spent=0
  for case in ${NCU_CASES:-penalty_bf16 penalty_ctl}; do
    per=$NCU_CASE_S
    if [ $(( spent + per )) -gt "$NCU_S" ] || [ "$(left)" -lt $(( per + COLLECT_S + 5 )) ]; then
      say "ncu $case: SKIPPED ($(left)s left before the deadline, ${spent}s of NCU_S=${NCU_S}s spent)"
      continue
    fi
    kern=$("$PY" benchmarks/profile_kernels.py --kernel-of "$case")
    say "ncu $case ($kern, $NCU, at most ${per}s)"
    timeout -k 5 "$per" "$NCU" --clock-control none --kernel-name "regex:$kern" --launch-skip 3 --launch-count 1 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --csv --page details \
      "$PY" benchmarks/profile_kernels.py --case "$case" > "$RES/ncu_$case.csv" 2> "$RES/ncu_$case.err"
    say "ncu $case exit code $?"
    spent=$(( spent + per ))
    "$PY" benchmarks/profile_kernels.py --summarize "$RES/ncu_$case.csv" > "$RES/ncu_$case.md" 2>&1
    sed -n '1,40p' "$RES/ncu_$case.md" | grep -v "^<details" | head -n 30
    collect
  done
fi

# ---------------------------------------------------------------- 7. collect (<= 5 files in $OUT)
collect
say "done in $(elapsed)s; files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
echo "==================== SUMMARY ===================="
grep -E "^- (GPU|pytest)" "$OUT/RESULTS_gpu.md"
for b in ops e2e scaling host; do
  [ -f "$RES/bench_$b.log" ] && grep -E "^(PASS|MISS|N/A|INFO) " "$RES/bench_$b.log"
done
# let tee write the last lines into gpu_check.log before the command returns
exec 1>&- 2>&-
[ -n "$TEE_PID" ] && wait "$TEE_PID" 2>/dev/null
exit 0
