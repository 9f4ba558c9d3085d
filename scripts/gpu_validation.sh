#!/usr/bin/env bash
# The GPU validation run: ONE device call (<= 540 s of its 600) that builds the extension, runs the GPU
# tests, compute-sanitizer, the barrier-floor microbenchmark and the gpu-quick benchmark on a lent H200,
# and returns all of it in one tar.
#
#   bash scripts/gpu_validation.sh              # on the GPU machine: the whole run
#   bash scripts/gpu_validation.sh --dry-run    # anywhere (CI, through tests/test_gpu_validation.py)
#   bash scripts/gpu_validation.sh --unpack TAR [RESULTS_ROOT]   # the returned tar -> benchmarks/results/...
#   bash scripts/gpu_validation.sh --stage NAME DIR              # one stage by hand, no time limit
#   GV_STAGES="tests bench" GV_LIMIT_bench=240 bash scripts/gpu_validation.sh   # a subset, other limits
#
# From a session with a lent GPU (benchmarks/README.md, "GPU validation"):
#   run(command="RNN_FUSED_COMMIT=<git rev-parse HEAD here> bash scripts/gpu_validation.sh", timeout_s=600)
# The commit is passed in because .git does not travel to the device machine; the tree that ran is
# identified by source_sha256 (recorded there, printed here by --dry-run) in case it differs from the commit.
#
# Results are staged in /tmp and $OUT receives two files only (the device tool returns at most 8):
# $OUT/gpu-validation.tar.gz (unpacks to gpu-validation/) and $OUT/summary.txt, both rewritten after every
# stage, so a call cut short still returns what ran.
#
# Stages, in order. Each runs under its own `timeout` (SIGINT first, so pytest writes its JUnit XML and the
# benchmark its JSON, then SIGKILL), every stage runs whatever happened before, and no stage runs past the
# total deadline (540 s; the last 10 s are kept for packing). Limits, and the estimates behind them; the
# estimates come from this repository's 2-core dev box (no GPU, another build running) and counts, since
# nothing had run on a GPU yet:
#   environment  15 s  nvidia-smi x3 ~2 s; python3 importing torch + triton ~2 s here, + CUDA init ~2 s.
#   build       110 s  this stage itself, run here in a venv (MAX_JOBS=2, sm_90 only): 80 s quiet, 155 s
#                      loaded; alone, each .cu file took 29-33 s and each .cpp 5-12 s. With 16 cores all six
#                      compile side by side: the slowest file + pip's metadata step (5 s) + link: est. 45 s.
#   tests       110 s  ~455 tests (259 collect here; the cuda parametrisations of test_ops/test_bptt add
#                      ~195 on a GPU); most take 10-50 ms, test_triton's ~140 Triton JIT compiles
#                      (~0.5-1 s each, 7 autotune configs per step kernel) dominate: ~150-250 s serial, run
#                      over 8 pytest-xdist workers (on the machine): est. 50 s. --timeout 60 per test
#                      (pytest-timeout, thread method: a test stuck in a CUDA call loses its worker only).
#   memcheck     50 s  compute-sanitizer start + torch import + CUDA init under the tool (~15 s, a guess:
#                      nothing measured), 24 tiny CUDA runs + 9 Triton runs (~18 JIT compiles when the
#                      tests stage left no cache, ~13 s): est. 30 s.
#   racecheck    40 s  the same case, Triton kernels cached by memcheck; est. 25 s.
#   synccheck    30 s  only if the stages before left that much slack beyond the plan (not in the total).
#   barrier      30 s  nvcc of benchmarks/barrier_floor.cu took 16 s here (ATen headers), est. 8 s there;
#                      3 modes x 4 CTA counts x 71000 steps at 1-5 us: est. 3 s.
#   bench       175 s  gpu-quick: 40 cases x 4 providers, ~6 untimed calls + >= 0.1 s of samples each
#                      (~60 s), workloads + float64 yardsticks (~20 s), Triton: ~40 compiles (~30 s) and
#                      36 autotune keys x 7 configs x ~0.15 s (~40 s): est. 150 s. It also gets whatever
#                      slack the earlier stages left.
#   packing      10 s  reserved at the end (a tar of a few MB takes < 1 s).
# plan: environment 15 + build 110 + tests 110 + memcheck 50 + racecheck 40 + barrier 30 + bench 175 +
# packing 10 = 540 s. A dry run gives each of its checks >= 120 s, so that a loaded CI box does not time out;
# it takes ~40 s here, mostly nvcc and the pytest collection.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PYTHON=${PYTHON:-python3}
# The defect this script exists to avoid: a TRITON_INTERPRET inherited from anywhere is kept by
# tests/conftest.py (setdefault), and with it on, the "GPU" run tests the Triton interpreter (which copies
# CUDA tensors to the host) and compiles no Triton kernel. Real Triton everywhere below; the environment
# stage fails if Triton still reports its interpreter on.
unset TRITON_INTERPRET
export RNN_FUSED_TEST_GPU=1 PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

TOTAL=540
RESERVE=10
ALL_STAGES=(environment build tests memcheck racecheck synccheck barrier bench)
read -r -a STAGES <<< "${GV_STAGES:-${ALL_STAGES[*]}}"
declare -A LIMIT=([environment]=15 [build]=110 [tests]=110 [memcheck]=50 [racecheck]=40 [synccheck]=30
                  [barrier]=30 [bench]=175)
for s in "${ALL_STAGES[@]}"; do
  override=GV_LIMIT_$s
  [[ -n ${!override:-} ]] && LIMIT[$s]=${!override}
done
for s in "${STAGES[@]}"; do
  [[ -n ${LIMIT[$s]:-} ]] || { echo "unknown stage '$s' (stages: ${ALL_STAGES[*]})"; exit 2; }
done
declare -A WHAT=(
  [environment]="nvidia-smi, clocks, torch/CUDA/cuDNN/Triton versions, SM count, commit -> environment.json"
  [build]="TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation --no-deps -e . (in place)"
  [tests]="pytest -k 'cuda or triton or gpu' over test_cuda/ops/modules/triton/bptt/amp/compile, real Triton"
  [memcheck]="compute-sanitizer memcheck: scripts/sanitize_case.py (persistent, stepwise, triton)"
  [racecheck]="compute-sanitizer racecheck: the same case"
  [synccheck]="compute-sanitizer synccheck: the same case, only with that much slack left"
  [barrier]="benchmarks/barrier_floor.cu: us per empty step (and with h's L2 round trip) at 8/32/66/132 CTAs"
  [bench]="python -m rnn_fused.bench --preset gpu-quick (plus any slack left)"
)
TEST_FILES=(tests/test_cuda.py tests/test_ops.py tests/test_modules.py tests/test_triton.py tests/test_bptt.py
            tests/test_amp.py tests/test_compile.py)
TEST_SELECTION="cuda or triton or gpu"
TEST_TIMEOUT=60
TEST_WORKERS=8

plan_total() {
  local total=$RESERVE s
  for s in "${STAGES[@]}"; do [[ $s == synccheck ]] || total=$((total + LIMIT[$s])); done
  echo "$total"
}

limits_after() {  # the planned limits of the selected stages after $1
  local total=0 seen=0 s
  for s in "${STAGES[@]}"; do
    ((seen)) && [[ $s != synccheck ]] && total=$((total + LIMIT[$s]))
    [[ $s == "$1" ]] && seen=1
  done
  echo "$total"
}

print_plan() {
  local s
  echo "plan (every stage under its own timeout; all run whatever failed before):"
  for s in "${STAGES[@]}"; do
    printf "  %-12s %4d s  %s\n" "$s" "${LIMIT[$s]}" "${WHAT[$s]}"
  done
  printf "  %-12s %4d s  %s\n" packing "$RESERVE" "the tar and summary.txt into \$OUT (also after every stage)"
  [[ " ${STAGES[*]} " == *" synccheck "* ]] &&
    echo "  synccheck's ${LIMIT[synccheck]} s come from slack only and are not part of the total"
  echo "plan: total limit $(plan_total) s"
}

source_sha() {  # what ran, for when the tree differs from the commit (.git does not travel)
  find csrc rnn_fused scripts tests benchmarks setup.py pyproject.toml -type f \
       \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' -o -name '*.sh' \
          -o -name '*.toml' \) -not -path '*/__pycache__/*' -print0 2>/dev/null |
    LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16
}

find_tool() {  # find_tool NAME: the tool on PATH or in the CUDA toolkit, or nothing
  command -v "$1" 2>/dev/null && return
  local c
  for c in "${CUDA_HOME:-/usr/local/cuda}/bin/$1" /usr/local/cuda/bin/"$1" /usr/local/cuda/"$1"/"$1"; do
    [[ -x $c ]] && { echo "$c"; return; }
  done
}

dry() { [[ $GV_MODE == dry ]]; }

clocks_now() {  # the clocks right after a GPU stage: throttling shows here (read-only query)
  local smi
  smi=$(find_tool nvidia-smi) && "$smi" --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw \
    --format=csv
}

# --- the stages (each runs as `bash scripts/gpu_validation.sh --stage NAME DIR` under `timeout`) -------------

stage_environment() {
  local smi
  smi=$(find_tool nvidia-smi)
  echo "## $(date -u +%FT%TZ) $(uname -srm) $(hostname)"
  if [[ -n $smi ]]; then
    "$smi"
    "$smi" --format=csv --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,clocks.mem,\
clocks.max.mem,power.draw,power.limit,temperature.gpu,persistence_mode,compute_mode,mig.mode.current
    "$smi" -q -d CLOCK,PERFORMANCE
  else
    echo "nvidia-smi: not found"
  fi
  echo "## toolkit"
  "$(find_tool nvcc || echo nvcc)" --version 2>&1 | tail -2
  "$(find_tool compute-sanitizer || echo compute-sanitizer)" --version 2>&1 | head -2
  echo "## python"
  GV_SMI_CLOCKS=$([[ -n $smi ]] && "$smi" --query-gpu=clocks.sm,clocks.max.sm,clocks.mem,clocks.max.mem \
                  --format=csv,noheader 2>/dev/null) "$PYTHON" - "$1/environment.json" <<'EOF'
import importlib.metadata as md, json, os, platform, sys

import torch
import triton

info = {key: os.environ.get(var) for key, var in (
    ("date", "GV_DATE"), ("mode", "GV_MODE"), ("command", "GV_COMMAND"), ("commit", "RNN_FUSED_COMMIT"),
    ("git_dirty", "GV_DIRTY"), ("source_sha256", "RNN_FUSED_SOURCE_SHA256"), ("TRITON_INTERPRET", "TRITON_INTERPRET"),
    ("RNN_FUSED_TEST_GPU", "RNN_FUSED_TEST_GPU"), ("nvidia_smi_clocks_sm_maxsm_mem_maxmem", "GV_SMI_CLOCKS"))}
info.update(python=platform.python_version(), executable=sys.executable, platform=platform.platform(),
            torch=torch.__version__, cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None)
for package in ("triton", "numpy", "pytest", "pytest-timeout", "pytest-xdist"):
    try:
        info[package] = md.version(package)
    except md.PackageNotFoundError:
        info[package] = None
info["triton_interpret"] = bool(triton.knobs.runtime.interpret)  # rnn_fused.triton reads the same knob
info["gpu"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
                   "memory_GiB": round(p.total_memory / 2**30, 1), "l2_bytes": getattr(p, "L2_cache_size", None)}
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info, indent=1))
if info["triton_interpret"]:
    sys.exit("Triton's interpreter is on: the GPU stages would not compile a single Triton kernel")
if info["mode"] == "real" and info["gpu"] is None:
    sys.exit("torch sees no CUDA device")
EOF
}

stage_build() {
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_INDEX=1  # nothing can be downloaded there: never let pip try
  if dry; then
    echo "dry run: would run: TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PYTHON -m pip install" \
      "--no-build-isolation --no-deps -v -e ."
    "$PYTHON" -c "import setuptools, torch.utils.cpp_extension as c
print('setuptools', setuptools.__version__, 'CUDA_HOME', c.CUDA_HOME)"
    return
  fi
  # every line stamped with the seconds since the start: ninja's [k/6] lines then time each file, which is
  # what the next lease's build limit is sized from (pip builds in a temporary folder, .ninja_log goes too)
  local t0=${EPOCHREALTIME/./} line tenths
  "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . 2>&1 |
    while IFS= read -r line; do
      tenths=$(((${EPOCHREALTIME/./} - t0) / 100000))
      printf "%5d.%d %s\n" $((tenths / 10)) $((tenths % 10)) "$line"
    done
  local rc=${PIPESTATUS[0]}
  ((rc == 0)) || return "$rc"
  "$PYTHON" - <<'EOF'
import torch
from rnn_fused import _extension

error = _extension.load()
assert error is None, f"the extension does not load: {error}"
for op in ("recurrence_forward", "recurrence_backward"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"rnn_fused::{op}", "CUDA"), f"{op}: no CUDA kernel"
print("extension: loaded, CUDA kernels registered")
EOF
}

stage_tests() {
  local args=(-m pytest "${TEST_FILES[@]}" -k "$TEST_SELECTION" -q -rfEs -p no:cacheprovider)
  if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    args+=(--timeout "$TEST_TIMEOUT")
    # thread: a test stuck in a CUDA call is ended too (its process exits, xdist replaces the worker)
    "$PYTHON" -c "import xdist" 2>/dev/null && args+=(--timeout-method thread)
  else
    echo "pytest-timeout is not installed: no per-test timeout"
  fi
  if dry; then
    echo "dry run: collecting only (on a GPU: also -n $TEST_WORKERS --junitxml --durations=25)"
    "$PYTHON" "${args[@]}" --collect-only
    return
  fi
  if "$PYTHON" -c "import xdist" 2>/dev/null; then
    args+=(-n "$TEST_WORKERS" --dist load)
  else
    echo "pytest-xdist is not installed: one process"
  fi
  "$PYTHON" "${args[@]}" --junitxml "$1/tests.xml" --durations=25
}

sanitize() {  # sanitize TOOL DIR
  if dry; then
    echo "dry run: compute-sanitizer: $(find_tool compute-sanitizer || echo 'not found here')"
    "$PYTHON" scripts/sanitize_case.py --dry-run
    return
  fi
  local tool
  tool=$(find_tool compute-sanitizer) || true
  [[ -n $tool ]] || { echo "compute-sanitizer not found"; return 127; }
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$tool" --tool "$1" --error-exitcode 1 --print-limit 30 \
    "$PYTHON" scripts/sanitize_case.py
}

stage_memcheck() { sanitize memcheck "$1"; }
stage_racecheck() { sanitize racecheck "$1"; }
stage_synccheck() { sanitize synccheck "$1"; }

stage_barrier() {
  local nvcc inc bin
  nvcc=$(find_tool nvcc) || true
  bin=$GV_WORK/bin
  mkdir -p "$bin"
  inc=$("$PYTHON" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))" \
        2>/dev/null) || return
  if [[ -z $nvcc ]]; then
    dry && { echo "dry run: nvcc not found here: barrier_floor.cu not compiled"; return 0; }
    echo "nvcc not found"
    return 127
  fi
  # shellcheck disable=SC2086 # $inc is a list of -I flags
  "$nvcc" -O3 -arch=sm_90 -std=c++20 --expt-relaxed-constexpr $inc benchmarks/barrier_floor.cu \
    -o "$bin/barrier_floor" || return
  echo "compiled: $bin/barrier_floor"
  dry && return
  "$bin/barrier_floor" --json "$1/barrier_floor.json"
  local rc=$?
  clocks_now
  return $rc
}

stage_bench() {
  if dry; then
    "$PYTHON" -m rnn_fused.bench --preset gpu-quick --dry-run
    return
  fi
  "$PYTHON" -m rnn_fused.bench --preset gpu-quick --out "$1/bench-gpu-quick"
  local rc=$?
  clocks_now
  return $rc
}

# --- one line per stage of summary.txt, from its log --------------------------------------------------------

note() {  # note NAME: the line of the stage's log worth reading first
  local log=$R/$1.log
  case $1 in
    environment) [[ -f $R/environment.json ]] && "$PYTHON" - "$R/environment.json" <<'EOF'
import json, sys
e = json.load(open(sys.argv[1]))
gpu = e["gpu"] and f"{e['gpu']['name']} ({e['gpu']['sm_count']} SMs)"
interpreter = "ON" if e["triton_interpret"] else "off"
print(f"{gpu or 'no GPU'}, torch {e['torch']}, triton {e['triton']} (interpreter {interpreter})")
EOF
      ;;
    barrier) grep -E "^compiled|^sync .* 132 |not compiled" "$log" | tail -1 ;;
    tests) grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|tests? collected)|[0-9]+ tests? collected|no tests ran" \
             "$log" | tail -1 ;;
    memcheck|racecheck|synccheck)
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|sanitize_case:" "$log" | tail -2 | tr '\n' ' ' ;;
    build) grep -E "^extension:|Successfully installed|error:" "$log" | tail -1 ;;
    bench)
      grep -E "^[0-9]+ cases$" "$log"
      [[ -f $R/bench-gpu-quick/results.json ]] && "$PYTHON" - "$R/bench-gpu-quick/results.json" <<'EOF'
import collections, json, sys
doc = json.load(open(sys.argv[1]))
counts = collections.Counter(r["status"] for r in doc["results"])
print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + (" (interrupted)" if doc["interrupted"] else ""))
EOF
      ;;
    *) ;;
  esac
}

pack() {
  cp "$R/summary.txt" "$OUT/summary.txt"
  tar czf "$OUT/gpu-validation.tar.gz.part" -C "$GV_WORK" gpu-validation && mv "$OUT/gpu-validation.tar.gz.part" \
    "$OUT/gpu-validation.tar.gz"
}

run_stage() {  # run_stage NAME [LIMIT]: the stage under `timeout`, its log, its line in summary.txt
  local name=$1 limit=${2:-${LIMIT[$1]}} left grace t0 t1 rc status
  dry && ((limit < 120)) && limit=120  # the checks of a dry run, on a slow or loaded CI box, are not timed
  left=$((DEADLINE - RESERVE - $(date +%s)))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    printf "%-12s %-28s %7s %7s\n" "$name" "skipped: no time left" - "$limit" >> "$R/summary.txt"
    pack
    return
  fi
  grace=$((limit / 10 < 3 ? 3 : (limit / 10 > 15 ? 15 : limit / 10)))
  echo ">>> $name (limit ${limit} s)"
  t0=$(date +%s%N)
  timeout -k "$grace" -s INT "$((limit - grace))" "${DEFAULT_INT[@]}" bash "$0" --stage "$name" "$R" \
    > "$R/$name.log" 2>&1
  rc=$?
  t1=$(date +%s%N)
  case $rc in
    0) status=ok ;;
    124|137) status="TIMEOUT (exit $rc)" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  printf "%-12s %-28s %7.1f %7d  %s\n" "$name" "$status" "$(((t1 - t0) / 1000000))e-3" "$limit" "$(note "$name")" \
    >> "$R/summary.txt"
  if ((rc != 0)); then  # the reply carries the end of the output: the reason, for the next call to fix
    echo "--- $name: $status; the errors and the tail of gpu-validation/$name.log in the tar:"
    grep -n -m 15 -E "error|Error|FAILED|Traceback" "$R/$name.log"
    tail -n "$([[ $name == build ]] && echo 40 || echo 15)" "$R/$name.log"
  fi
  pack
}

# --- the returned tar -> benchmarks/results/<date>-<gpu>-<commit>/ -------------------------------------------

unpack() {  # unpack TAR [RESULTS_ROOT]
  local tar=$1 root=${2:-benchmarks/results} tmp name
  tmp=$(mktemp -d)
  tar xzf "$tar" -C "$tmp" || return
  name=$("$PYTHON" - "$tmp/gpu-validation/environment.json" <<'EOF'
import json, re, sys
env = json.load(open(sys.argv[1]))
gpu = (env.get("gpu") or {}).get("name") or "nogpu"
slug = re.sub(r"[^a-z0-9]", "", gpu.lower().split()[-1])
print(f"{env['date'][:10]}-{slug}-{(env.get('commit') or 'unknown')[:7]}")
EOF
) || return
  mkdir -p "$root/$name"
  cp -r "$tmp/gpu-validation/." "$root/$name/"
  # the verbose build log is for debugging on the spot; its tail is enough to keep
  if [[ -f $root/$name/build.log ]]; then
    tail -n 200 "$root/$name/build.log" > "$root/$name/build-tail.log"
    rm "$root/$name/build.log"
  fi
  rm -rf "$tmp"
  echo "$root/$name"
}

# --- main ----------------------------------------------------------------------------------------------------

case ${1:-} in
  --stage)
    [[ $# -eq 3 ]] || { echo "usage: $0 --stage NAME DIR"; exit 2; }
    GV_MODE=${GV_MODE:-real} GV_WORK=${GV_WORK:-$(dirname "$3")}
    R=$3
    "stage_$2" "$3"
    exit ;;
  --unpack)
    [[ $# -ge 2 ]] || { echo "usage: $0 --unpack TAR [RESULTS_ROOT]"; exit 2; }
    unpack "$2" "${3:-}"
    exit ;;
  --dry-run) GV_MODE=dry ;;
  "") GV_MODE=real ;;
  *) echo "usage: $0 [--dry-run | --unpack TAR [RESULTS_ROOT] | --stage NAME DIR]"; exit 2 ;;
esac

START=$(date +%s)
PLANNED=$(plan_total)
DEADLINE=$((START + (PLANNED < TOTAL ? PLANNED : TOTAL)))
GV_WORK=$(mktemp -d /tmp/gpu-validation.XXXXXX)
trap 'rm -rf "$GV_WORK"' EXIT  # the staging folder; what counts is in $OUT
R=$GV_WORK/gpu-validation
OUT=${OUT:-$(mktemp -d /tmp/gpu-validation-out.XXXXXX)}
mkdir -p "$R" "$OUT"
DEFAULT_INT=()  # a job started in the background may inherit SIGINT ignored; timeout's SIGINT must land
env --default-signal=INT true 2>/dev/null && DEFAULT_INT=(env --default-signal=INT)
RNN_FUSED_COMMIT=${RNN_FUSED_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
GV_DIRTY=unknown
git rev-parse HEAD > /dev/null 2>&1 && GV_DIRTY=$([[ -n $(git status --porcelain) ]] && echo yes || echo no)
RNN_FUSED_SOURCE_SHA256=$(source_sha)
GV_DATE=$(date -u +%FT%TZ)
GV_COMMAND="bash scripts/gpu_validation.sh${1:+ $1}"
for v in $(compgen -e | grep -E "^GV_(STAGES|LIMIT_)" | sort -r); do GV_COMMAND="$v='${!v}' $GV_COMMAND"; done
export GV_MODE GV_WORK GV_DATE GV_COMMAND GV_DIRTY RNN_FUSED_COMMIT RNN_FUSED_SOURCE_SHA256

print_plan | tee "$R/plan.txt"
{
  echo "gpu_validation ($GV_MODE run) $GV_DATE: commit $RNN_FUSED_COMMIT (dirty: $GV_DIRTY)," \
       "source_sha256 $RNN_FUSED_SOURCE_SHA256"
  echo "command: $GV_COMMAND; total limit $(plan_total) s"
  printf "%-12s %-28s %7s %7s  %s\n" stage status "wall s" "limit s" note
} > "$R/summary.txt"

for stage in "${STAGES[@]}"; do
  case $stage in
    synccheck)  # only on slack: what the earlier stages did not use, beyond what the later ones may need
      slack=$((DEADLINE - RESERVE - $(date +%s) - $(limits_after synccheck)))
      if dry || ((slack >= LIMIT[synccheck])); then
        run_stage synccheck
      else
        printf "%-12s %-28s %7s %7d\n" synccheck "skipped: ${slack} s of slack" - "${LIMIT[synccheck]}" \
          >> "$R/summary.txt"
      fi ;;
    bench) run_stage bench "$((DEADLINE - RESERVE - $(date +%s) - $(limits_after bench)))" ;;  # all the slack
    *) run_stage "$stage" ;;
  esac
done

printf "%-12s %-28s %7d %7d\n" total "" "$(($(date +%s) - START))" "$(plan_total)" >> "$R/summary.txt"
pack
echo
cat "$R/summary.txt"
[[ -f $R/barrier_floor.json ]] && grep -E "^(sync|l2)" "$R/barrier.log"
echo "results: $OUT/gpu-validation.tar.gz (unpacks to gpu-validation/), $OUT/summary.txt"
print_plan | tail -1
grep -qE "^(environment|build|tests|memcheck|racecheck|synccheck|barrier|bench) +(FAILED|TIMEOUT)" \
  "$R/summary.txt" && exit 1
exit 0
