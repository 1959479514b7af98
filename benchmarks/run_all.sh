#!/usr/bin/env bash
# The CPU benchmark set: about 14 minutes on 2 idle cores (first run adds ~5 min to
# encode the input videos, cached in benchmarks/.cache). Writes benchmarks/results/*.json;
# docs/benchmarks.md explains the numbers.
#
#   bash benchmarks/run_all.sh           # the set docs/benchmarks.md reports
#   bash benchmarks/run_all.sh --quick   # shorter inputs, fewer steps (~4 min): a check that it all runs
#
# On a GPU machine, add the base model (16x112^2 and 16x224^2, bf16 autocast, MFU):
#   python benchmarks/train_step.py --device cuda --models base --sizes 112 224 --batch 32 --cpus $(nproc)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled

if [ "${1:-}" = "--quick" ]; then
    OUT=benchmarks/results/quick
    mkdir -p "$OUT"
    $PY benchmarks/preprocess.py --preset quick --repeats 1 --out "$OUT/preprocess.json"
    $PY benchmarks/train_step.py --models tiny --batch 8 --steps 8 --warmup 2 --repeats 1 --out "$OUT/train_step_tiny.json"
    $PY benchmarks/scaling.py --preset quick --repeats 1 --out "$OUT/scaling.json"
    exit 0
fi

REPEATS=${REPEATS:-1}
start=$(date +%s)
$PY benchmarks/make_inputs.py --preset full > /dev/null
$PY benchmarks/make_inputs.py --preset mixed > /dev/null
# pyav_sequential and the before/after comparison are in docs/benchmarks.md, not in the 10-minute set.
# One video per shard: the 10 input videos make 10 Ray tasks, as a real dataset's hundreds of shards would.
$PY benchmarks/preprocess.py --preset full --repeats "$REPEATS" --videos-per-shard 1 \
    --methods decord_1thread decord_threads torchcodec_1thread pyav_seek pyav_lean pyav_lean_x2 \
    vidray_1cpu "vidray_$(nproc)cpu" vidray_1cpu_decord vidray_1cpu_torchcodec
# Users' own footage: 6-60 s, 360p-720p, portrait and rotated phone clips (make_inputs.py --preset mixed).
$PY benchmarks/preprocess.py --preset mixed --repeats "$REPEATS" --videos-per-shard 1 \
    --methods decord_1thread torchcodec_1thread pyav_lean pyav_lean_x2 vidray_1cpu "vidray_$(nproc)cpu" \
    vidray_1cpu_decord vidray_1cpu_torchcodec --out benchmarks/results/preprocess_mixed.json
$PY benchmarks/train_step.py --models tiny --batch 8 --steps 12 --warmup 3 --repeats "$REPEATS"
$PY benchmarks/train_step.py --models small --batch 2 --steps 3 --warmup 1 --repeats "$REPEATS" --methods plain_1thr raytrain_cached
# Preprocessing on 1 and 2 loopback nodes (vidray.local_cluster): docs/scaling.md.
$PY benchmarks/scaling.py --preset full --repeats "$REPEATS"
$PY benchmarks/scaling.py --preset mixed --repeats "$REPEATS" --out benchmarks/results/scaling_mixed.json
echo "benchmarks done in $(( $(date +%s) - start )) s; results in benchmarks/results/" >&2
