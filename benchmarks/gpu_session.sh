#!/usr/bin/env bash
# One GPU-machine call for the numbers docs/benchmarks.md reports, in order of what they depend on:
#   1. GPU tests of the packed attention, the compile-once guard, the patched models and a demo run;
#   2. the whole-run benchmark (benchmarks/whole_run.py: TRL recipe vs `sftop run`);
#   3. the step benchmark, stock vs sftop, bf16 and NF4 (benchmarks/step_gpu_run.sh);
#   4. sftop's path alone with offloaded checkpointing (peak memory vs speed).
# Optional: SPY=1 profiles a second sftop whole run with py-spy (carried in .device-site).
#   export PYTHONPATH=$PWD/.device-site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; OUT=/tmp/o bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu_session}; mkdir -p "$OUT"
log="$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log"
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -o addopts="" \
    tests/kernels/test_varlen_attention.py tests/kernels/test_compile_once.py tests/kernels/test_patch_models.py \
    tests/train/test_gpu_training.py 2>&1 | tail -15 | tee -a "$log"
fi
if [ "${SKIP_WHOLE:-0}" = 0 ]; then
  timeout 300 python3 benchmarks/whole_run.py --out /tmp/whole 2>&1 | grep -v Warning | tail -9 | tee -a "$log"
  cp /tmp/whole/whole_run.json "$OUT/" 2>/dev/null
fi
if [ "${SKIP_STEP:-0}" = 0 ]; then
  STEPS=${STEPS:-8} SKIP_TESTS=1 STEP_BENCH_TIMEOUT=${STEP_BENCH_TIMEOUT:-170} OUT="$OUT" \
    STEP_BENCH_SPECS="${STEP_BENCH_SPECS:-llama-3.2-1b:bf16 llama-3.2-1b:nf4}" bash benchmarks/step_gpu_run.sh 2>&1 \
    | grep -v Warning | tee -a "$log"
fi
if [ "${SKIP_OFFLOAD:-0}" = 0 ]; then
  timeout 120 python3 benchmarks/step_bench.py --model llama-3.2-1b --batch 4 --seq 2048 --steps ${STEPS:-8} \
    --warmup 3 --paths sftop --checkpointing offload --json "$OUT/bench_llama-3.2-1b_bf16_offload.json" 2>&1 \
    | grep -v Warning | tail -3 | tee -a "$log"
fi
if [ "${SPY:-0}" = 1 ]; then
  spy=$(ls .device-site/py_spy-*.data/scripts/py-spy 2>/dev/null | head -1)
  chmod +x "$spy"
  SFTOP_HOME=/tmp/whole/spy-home timeout 150 "$spy" record --nonblocking -r 200 -f raw -o "$OUT/spy_raw.txt" -- \
    python3 -m sftop run /tmp/whole/whole-run.toml --run-dir /tmp/whole/spy-run 2>&1 | tail -2 | tee -a "$log"
  gzip -f "$OUT/spy_raw.txt"
fi
