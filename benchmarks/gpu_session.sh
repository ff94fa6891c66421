#!/usr/bin/env bash
# One device call: install the carried wheels, then run the phases named as arguments, writing
# logs and JSON under $OUT (or ./gpu-out). Phases: env, tests, kernels, engine, interleaved, longest, grid, speed,
# ddp, peak, compare, workflows, families, packing. Phases on different GPUs can run side by side:
#   bash benchmarks/gpu_session.sh env tests kernels engine
#   CUDA_VISIBLE_DEVICES=0 bash benchmarks/gpu_session.sh speed & CUDA_VISIBLE_DEVICES=1 bash benchmarks/gpu_session.sh grid
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if [ ! -e /tmp/site/.installed ]; then  # once per machine: side-by-side phases share it
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  touch /tmp/site/.installed
fi
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 FTUNE_CACHE=/tmp/ftune-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SEQS=${SEQS:-2048,8192,16384}
GRID_PRESETS=${GRID_PRESETS:-llama-3.1-8b,qwen2.5-7b}
for phase in "$@"; do
  echo "=== $phase $(date +%T)"
  case $phase in
    env)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 -c "import torch, triton, transformers, peft, trl, bitsandbytes as b; print(torch.__version__, triton.__version__, transformers.__version__, peft.__version__, trl.__version__, b.__version__)"
      free -g | head -2 ;;
    tests)
      python3 -m pytest -m gpu -q -p no:cacheprovider ${TESTS:-tests} 2>&1 | tee "$OUT/gpu-tests.log" | tail -25 ;;
    kernels)
      for script in benchmarks/kernels/*.py; do
        python3 "$script" --out "$OUT/kernels.json" 2>&1 | tail -12
      done ;;
    engine)
      python3 benchmarks/bench_engine.py --seqs "$SEQS" --out "$OUT/engine.json" \
        --runs "${RUNS:-ftune+k:unsloth,hf:true,ftune:unsloth,ftune:true,hf:none}" 2>&1 | tee "$OUT/engine.log" ;;
    interleaved)  # the modes' speed, a step of each in turn in one process (host noise falls on both)
      python3 benchmarks/bench_interleaved.py --seqs "$SEQS" --modes "${MODES:-true,unsloth}" \
        --rounds "${ROUNDS:-30}" --out "$OUT/interleaved.json" 2>&1 | tee "$OUT/interleaved.log" ;;
    longest)
      python3 benchmarks/bench_engine.py --longest --seqs "${START:-32768}" --cap-gib "${CAP:-24}" \
        --out "$OUT/longest.json" --runs "${RUNS:-ftune+k:unsloth}" 2>&1 | tee "$OUT/longest.log" ;;
    grid)  # the memory model's grid (issue 5): modes x sequences x batch 1 and 4, per preset
      for preset in ${GRID_PRESETS//,/ }; do
        python3 benchmarks/bench_engine.py --preset "$preset" --seqs "${GRID_SEQS:-2048,8192,16384,32768}" \
          --batches 1,4 --steps 1 --out "$OUT/grid.json" --runs "${GRID_RUNS:-ftune+k:none,ftune+k:true,ftune+k:unsloth}"
      done ;;
    speed)  # smart at each budget against the fixed modes and the baseline, one card, one sequence length
      python3 benchmarks/bench_engine.py --seqs "${SPEED_SEQ:-8192}" --steps 3 --out "$OUT/speed.json" \
        --runs "${RUNS:-hf:true,ftune+k:none,ftune+k:true,ftune+k:unsloth,ftune+k:smart@16,ftune+k:smart@24,ftune+k:smart@40,ftune+k:smart@80}" ;;
    ddp)
      python3 benchmarks/bench_ddp.py --seq "${DDP_SEQ:-8192}" --steps "${DDP_STEPS:-20}" \
        --strategies "${STRATEGIES:-ddp}" --out "$OUT/ddp.json" ;;
    peak)  # what is alive at the step's peak
      python3 benchmarks/probe_peak.py --seq "${PEAK_SEQ:-8192}" --out "$OUT/peak.json" 2>&1 | tee "$OUT/peak.log" ;;
    compare)
      python3 -m ftune compare recipes/qlora-llama3-8b.yaml --ckpt none,true,unsloth --steps 4 --seq 8192 \
        --set model.preset=llama-3.1-8b --set model.name_or_path=null --set model.tokenizer=../data/quickstart/tokenizer \
        --out "$OUT/compare" ;;
    families)  # issues 22 and 23: each family's shape against transformers + peft, for speed and the estimate
      presets=${FAMILY_PRESETS:-gemma-2-9b,gemma-3-4b,phi-3-mini}
      for preset in ${presets//,/ }; do
        python3 benchmarks/bench_engine.py --preset "$preset" --seqs "${FAMILY_SEQS:-8192,16384}" --steps 3 \
          --out "$OUT/families.json" --runs "${RUNS:-ftune+k:unsloth,hf:true}" 2>&1 | grep -vE "^\s*$" | tail -8
      done ;;
    packing)  # issue 26: padding-free batches on the fixed mix, TRL at its best setting in the same call
      python3 benchmarks/bench_packing.py --preset llama-3.1-8b --steps "${PACKING_STEPS:-20}" \
        --runs "${PACKING_RUNS:-ftune-packed,trl}" --out "$OUT/packing.json" 2>&1 | tail -4 ;;
    workflows)
      python3 benchmarks/bench_workflows.py --preset llama-3.1-8b --workflows dpo,grpo --steps 6 --dpo-repeat 30 \
        --workdir /tmp/wf --timeout 240 --out "$OUT/workflows.json" ;;
  esac
done
echo "=== done $(date +%T)"
