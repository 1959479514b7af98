#!/usr/bin/env bash
# The CPU benchmark set: about 10 minutes on 2 idle cores (first run adds ~5 min to
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
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

if [ "${1:-}" = "--quick" ]; then
    OUT=benchmarks/results/quick
    mkdir -p "$OUT"
    $PY benchmarks/preprocess.py --preset quick --repeats 1 --out "$OUT/preprocess.json"
    $PY benchmarks/train_step.py --models tiny --batch 8 --steps 8 --warmup 2 --repeats 1 --out "$OUT/train_step_tiny.json"
    exit 0
fi

start=$(date +%s)
$PY benchmarks/make_inputs.py --preset full > /dev/null
$PY benchmarks/preprocess.py --preset full --repeats 2
$PY benchmarks/train_step.py --models tiny --batch 8 --steps 16 --warmup 3 --repeats 2
$PY benchmarks/train_step.py --models small --batch 4 --steps 4 --warmup 2 --repeats 2
echo "benchmarks done in $(( $(date +%s) - start )) s; results in benchmarks/results/" >&2
