#!/usr/bin/env bash
# One GPU-machine session for the kernels: benchmarks first (the numbers docs/benchmarks.md
# reports), then the kernel test-suite on CUDA (fp32 + bf16 cases).  Results go to $OUT.
#   export PYTHONPATH=$PWD/.device-site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1; bash benchmarks/step_gpu_run.sh
set -u
OUT=${OUT:-/tmp/step_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)"
for spec in ${STEP_BENCH_SPECS:-"llama-3.2-1b:bf16" "llama-3.2-1b:nf4"}; do
  model=${spec%%:*}; kind=${spec##*:}
  flag=""; [ "$kind" = nf4 ] && flag="--4bit"
  timeout ${STEP_BENCH_TIMEOUT:-240} python3 benchmarks/step_bench.py --model "$model" $flag --batch ${BATCH:-4} \
    --seq ${SEQ:-2048} --steps ${STEPS:-10} --warmup 3 --profile --json "$OUT/bench_${model}_${kind}.json"
done
if [ "${SKIP_TESTS:-0}" = 0 ]; then
  timeout ${TEST_TIMEOUT:-200} python3 -m pytest tests/kernels -q -p no:cacheprovider --maxfail=20 \
    -o addopts="" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
fi
