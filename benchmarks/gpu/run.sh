#!/usr/bin/env bash
# GPU benchmarks for a machine with PyTorch + CUDA and no network (see BENCHMARKS.md).
# The pure-Python wheels it lacks (diffusers, pydantic + pydantic-core, annotated-types,
# typing-inspection, tenacity) are carried in .whl/ and installed into /tmp/site, offline.
# Runs every benchmarks/gpu/bench_*_gpu.py, render first; results go to $OUT/*.json when OUT is set.
# The whole run is time-boxed to BENCH_BUDGET_S (default 480 s, one device session with start-up to
# spare): render's lever rows get 55% of it, train's rows 30%, the rest (scorers) what is left; each
# script skips rows that would not finish in its share and rewrites its JSON after every row.
# Extra arguments for the render script: BENCH_RENDER_ARGS="--rows eager,all-levers"; for the train
# script: BENCH_TRAIN_ARGS.
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
budget=${BENCH_BUDGET_S:-480}
render_s=$(( budget * 55 / 100 )); train_s=$(( budget * 30 / 100 )); start=$SECONDS
scripts=(benchmarks/gpu/bench_render_gpu.py)
for script in benchmarks/gpu/bench_*_gpu.py; do
  [[ "$script" == benchmarks/gpu/bench_render_gpu.py ]] || scripts+=("$script")
done
for script in "${scripts[@]}"; do
  [[ -f "$script" ]] || continue
  echo "=== $script"
  if [[ "$script" == benchmarks/gpu/bench_render_gpu.py ]]; then
    # Render lever rows, most telling first; the hard stop leaves 30 s past the row budget.
    # shellcheck disable=SC2086
    timeout -k 10 $(( render_s + 30 )) python3 "$script" --budget-s "$render_s" ${BENCH_RENDER_ARGS:-} || status=$?
  elif [[ "$script" == benchmarks/gpu/bench_train_gpu.py ]]; then
    # Train rows: batch 2 with gradient checkpointing on, then off, the largest batch that fits,
    # then uncached.
    # shellcheck disable=SC2086
    timeout -k 10 $(( train_s + 30 )) python3 "$script" --budget-s "$train_s" ${BENCH_TRAIN_ARGS:-} || status=$?
  else
    left=$(( budget - (SECONDS - start) ))
    (( left > 20 )) || { echo "skipped: $script (no time left of BENCH_BUDGET_S=$budget)"; continue; }
    timeout -k 10 "$left" python3 "$script" || status=$?
  fi
done
exit $status
