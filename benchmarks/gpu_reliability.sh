#!/usr/bin/env bash
# Issue 27's reliability cases on a GPU, with the 8B recipe's shape (preset llama-3.1-8b, random
# weights) and the quickstart's data and tokenizer (no download): a CUDA out-of-memory mid-run, a
# host-RAM shortfall for offload, SIGTERM during GRPO's generation, and what a checkpoint costs.
# Each case's log goes to $OUT/<case>.log; a summary table is printed last.
#   OUT=/tmp/out bash benchmarks/gpu_reliability.sh
set -u
OUT=${OUT:-/tmp/ftune-reliability}
mkdir -p "$OUT"
export FTUNE_CACHE=${FTUNE_CACHE:-/tmp/ftune-cache}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
RUN=(python "$ROOT/benchmarks/instrumented_train.py" train)
SHAPE=(--set model.name_or_path=null --set model.preset=${PRESET:-llama-3.1-8b} --set "model.tokenizer=$ROOT/data/quickstart/tokenizer"
       --set model.attn_implementation=auto --set lora.target_modules=auto)
SFT=("$ROOT/recipes/qlora-llama3-8b.yaml" "${SHAPE[@]}" --set "data.source=$ROOT/data/quickstart/sft.jsonl"
     --set data.split=train --set data.max_length=2048 --set training.batch_size=4 --set training.grad_accum=1
     --set training.logging_steps=1 --set training.warmup_steps=1)
check() {  # the checkpoints of a run folder, each with ftune's verdict
  python - "$1" <<'PY'
import sys
from ftune.checkpoints import checkpoint_problem, checkpoints
found = checkpoints(sys.argv[1])
print("checkpoints:", ", ".join(f"{p.name} ({checkpoint_problem(p) or 'sound'})" for p in found) or "none")
PY
}

echo "== out of memory at step 5 (checkpoints every 2 steps; saves timed)"
rm -rf /tmp/r-oom
FTUNE_TIME_SAVES=1 FTUNE_INJECT_OOM_AT_STEP=5 "${RUN[@]}" "${SFT[@]}" --set training.max_steps=8 \
  --set training.save_steps=2 --set training.output_dir=/tmp/r-oom > "$OUT/oom.log" 2>&1
echo "exit $?" | tee -a "$OUT/oom.log"
check /tmp/r-oom | tee -a "$OUT/oom.log"
echo "-- the same command again, without the injection"
FTUNE_TIME_SAVES=1 "${RUN[@]}" "${SFT[@]}" --set training.max_steps=8 --set training.save_steps=2 \
  --set training.output_dir=/tmp/r-oom > "$OUT/oom-resume.log" 2>&1
echo "exit $?" | tee -a "$OUT/oom-resume.log"

echo "== host memory short for offload (psutil reports 1 GiB available)"
rm -rf /tmp/r-host
FTUNE_INJECT_HOST_AVAILABLE=$((1 << 30)) "${RUN[@]}" "${SFT[@]}" --set training.max_steps=3 \
  --set training.output_dir=/tmp/r-host > "$OUT/host.log" 2>&1
echo "exit $?" | tee -a "$OUT/host.log"
check /tmp/r-host | tee -a "$OUT/host.log"

echo "== SIGTERM during GRPO generation"
rm -rf /tmp/r-grpo
"${RUN[@]}" "$ROOT/recipes/grpo-llama3-8b.yaml" "${SHAPE[@]}" --set "data.source=$ROOT/data/quickstart/grpo.jsonl" \
  --set data.subset=null --set data.fields={} --set data.max_length=64 --set grpo.num_generations=4 \
  --set grpo.max_completion_length=384 --set training.batch_size=4 --set training.grad_accum=1 \
  --set training.max_steps=20 --set training.save_steps=1 --set training.logging_steps=1 \
  --set training.output_dir=/tmp/r-grpo > "$OUT/grpo.log" 2>&1 &
pid=$!
until grep -q '"step": 1,' /tmp/r-grpo/metrics.jsonl 2>/dev/null || ! kill -0 $pid 2>/dev/null; do sleep 0.2; done
sleep 2  # into step 2, whose time is mostly generation
date +"SIGTERM sent at %T" | tee -a "$OUT/grpo.log"
kill -TERM $pid
wait $pid
echo "exit $?" | tee -a "$OUT/grpo.log"
check /tmp/r-grpo | tee -a "$OUT/grpo.log"

echo "== summary"
for case in oom oom-resume host grpo; do
  echo "-- $case"; grep -E "exit |checkpoints:|written in|out of memory|host memory|Stopped|resuming|notice|warning" "$OUT/$case.log" | tail -12
done
