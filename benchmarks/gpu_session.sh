#!/usr/bin/env bash
# One device call: install the carried wheels, then run the phases named as arguments, writing
# logs and JSON under $OUT (or ./gpu-out). Phases: env, tests, kernels, engine, longest.
#   bash benchmarks/gpu_session.sh env tests kernels engine
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1 FTUNE_CACHE=/tmp/ftune-cache HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
SEQS=${SEQS:-2048,8192,16384}
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
    longest)
      python3 benchmarks/bench_engine.py --longest --seqs "${START:-32768}" --cap-gib "${CAP:-24}" \
        --out "$OUT/longest.json" --runs "${RUNS:-ftune+k:unsloth}" 2>&1 | tee "$OUT/longest.log" ;;
  esac
done
echo "=== done $(date +%T)"
