#!/usr/bin/env bash
# GPU benchmarks for a machine with PyTorch + CUDA and no network (see BENCHMARKS.md).
# The pure-Python wheels it lacks (diffusers, pydantic + pydantic-core, annotated-types,
# typing-inspection, tenacity) are carried in .whl/ and installed into /tmp/site, offline.
# Runs every benchmarks/gpu/bench_*_gpu.py, render first; results go to $OUT/*.json when OUT is set.
# Extra arguments for the render script: BENCH_RENDER_ARGS="--batches 1,8"; for the train script:
# BENCH_TRAIN_ARGS.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
status=0
scripts=(benchmarks/gpu/bench_render_gpu.py)
for script in benchmarks/gpu/bench_*_gpu.py; do
  [[ "$script" == benchmarks/gpu/bench_render_gpu.py ]] || scripts+=("$script")
done
for script in "${scripts[@]}"; do
  [[ -f "$script" ]] || continue
  echo "=== $script"
  if [[ "$script" == benchmarks/gpu/bench_render_gpu.py ]]; then
    # Render lever rows, most telling first, time-boxed (--budget-s 450 s since start; the hard stop
    # keeps it under ~8.5 min, and the JSON is rewritten after every row). Extra arguments:
    # BENCH_RENDER_ARGS="--rows eager,all-levers --budget-s 300".
    # shellcheck disable=SC2086
    timeout -k 10 "${BENCH_RENDER_TIMEOUT_S:-510}" python3 "$script" ${BENCH_RENDER_ARGS:-} || status=$?
  elif [[ "$script" == benchmarks/gpu/bench_train_gpu.py ]]; then
    # Train rows (time-boxed, 240 s by default): batch 2 with gradient checkpointing on, then off,
    # the largest batch that fits, then uncached. Extra arguments: BENCH_TRAIN_ARGS="--budget-s 180".
    # shellcheck disable=SC2086
    python3 "$script" ${BENCH_TRAIN_ARGS:-} || status=$?
  else
    python3 "$script" || status=$?
  fi
done
exit $status
