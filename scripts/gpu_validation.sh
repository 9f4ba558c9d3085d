#!/usr/bin/env bash
# The GPU validation run: build, tests, compute-sanitizer, benchmark.
#   export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16; bash scripts/gpu_validation.sh [STAGE...]
# STAGE: build tests sanitize bench overhead (default: all five). The device tool allows 10 minutes a command, so
# run them over several calls within one lease, e.g. `build tests`, then `build sanitize`, then
# `build bench` (the build is incremental: seconds when nothing changed).
# Writes everything under $OUT/gpu-validation/ and packs it into $OUT/gpu-validation.tar.gz (the device
# tool returns at most 8 files). Every step runs even if an earlier one failed; summary.txt lists the
# exit status of each. Copy the benchmark folder into benchmarks/results/ and commit it afterwards.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-validation-out}
R="$OUT/gpu-validation"
mkdir -p "$R"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
step() {  # step NAME TIMEOUT_S COMMAND...: runs COMMAND, logs to $R/NAME.log, records its status
  local name=$1 limit=$2; shift 2
  timeout "$limit" "$@" > "$R/$name.log" 2>&1
  echo "$name: exit $?" | tee -a "$R/summary.txt"
}
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"
  git rev-parse HEAD; } > "$R/environment.txt" 2>&1
stages=${*:-build tests sanitize bench overhead}
for stage in $stages; do
  case $stage in
    build) step build 900 python3 -m pip install --no-build-isolation --no-deps -e . ;;
    tests) step tests 900 python3 -m pytest -q tests/test_cuda.py tests/test_ops.py tests/test_modules.py \
             tests/test_triton.py tests/test_amp.py tests/test_compile.py tests/test_bptt.py ;;
    sanitize)
      for kernel in persistent stepwise; do
        for tool in memcheck racecheck synccheck; do
          RNN_FUSED_CUDA_KERNEL=$kernel step "sanitize-$tool-$kernel" 600 \
            compute-sanitizer --tool "$tool" --error-exitcode 1 python3 scripts/sanitize_case.py
        done
      done ;;
    bench) step bench 1800 python3 -m rnn_fused.bench --preset gpu-full --out "$R/bench-gpu-full" ;;
    overhead) step overhead 600 python3 -m rnn_fused.bench.overhead --backend cuda --preset standard \
                --rounds 50 --out "$R/bptt-options-cuda" ;;
    *) echo "unknown stage $stage (build tests sanitize bench overhead)"; exit 2 ;;
  esac
done
tar czf "$OUT/gpu-validation.tar.gz" -C "$OUT" gpu-validation
cat "$R/summary.txt"
