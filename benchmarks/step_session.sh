#!/usr/bin/env bash
# One GPU-machine call for the kernel work (issue 3): GPU tests, the GLU launch sweep, then step
# benchmarks with memory phases.  Each RUNS entry is model:weights:checkpointing:paths, e.g.
#   llama-3.2-1b:bf16:on:stock,sftop   llama-3.2-1b:nf4:offload:sftop
#   export PYTHONPATH=$PWD/.device-site:$PWD HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
#   OUT=/tmp/o RUNS="llama-3.2-1b:bf16:on:stock,sftop" bash benchmarks/step_session.sh
# The device returns at most 8 files a call: end the command with
#   python3 benchmarks/bundle_results.py pack $OUT
# and unpack the one bundle.json here (see that script).
set -u
OUT=${OUT:-/tmp/step_session}; mkdir -p "$OUT"
log="$OUT/session.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$log"
python3 -c "import torch, triton, transformers, peft, bitsandbytes; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, bitsandbytes.__version__)" 2>&1 | tail -1 | tee -a "$log"
git log -1 --format='commit %h %s' 2>/dev/null | tee -a "$log"
if [ -n "${TESTS:-}" ]; then
  timeout ${TEST_TIMEOUT:-150} python3 -m pytest -q -p no:cacheprovider -o addopts="" $TESTS 2>&1 \
    | tail -${TEST_TAIL:-12} | tee -a "$log"
fi
if [ "${GLU_SWEEP:-0}" = 1 ]; then
  timeout 60 python3 benchmarks/glu_block_sweep.py --json "$OUT/glu_sweep.json" 2>&1 | tail -14 | tee -a "$log"
fi
for run in ${RUNS:-}; do
  IFS=: read -r model kind ckpt paths <<< "$run"
  flag=""; [ "$kind" = nf4 ] && flag="--4bit"
  echo "== $run $(date -u +%H:%M:%S)" | tee -a "$log"
  timeout ${STEP_BENCH_TIMEOUT:-200} python3 benchmarks/step_bench.py --model "$model" $flag --batch ${BATCH:-4} \
    --seq ${SEQ:-2048} --steps ${STEPS:-6} --warmup 3 --checkpointing "$ckpt" --paths "$paths" \
    ${PROFILE:+--profile} --memory-phases --json "$OUT/bench_${model}_${kind}_${ckpt}.json" 2>&1 \
    | grep -v -i "warn\|Writing model shards" | tail -${BENCH_TAIL:-40} | tee -a "$log"
done
echo "done $(date -u +%H:%M:%S)" | tee -a "$log"
