#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): on one H100/H200 it finishes in under 8 minutes and
# writes benchmarks/results/gpu_check.json: ViT-B 16x112² and 16x224² training clips/s and MFU, data-wait
# share on the device path and streamed, peak memory, and a 2-epoch run of the real Ray Train loop.
#
#   bash benchmarks/gpu_check.sh                          # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu --quick     # dry run on a CPU: every section at toy sizes
#   bash benchmarks/gpu_check.sh --only environment vit_b_112   # some sections only
#
# Time is bounded twice: the Python side gives every section its own timeout inside a 450 s budget and
# kills a section's whole process tree when it runs over; this wrapper kills everything at 470 s. The
# JSON is rewritten after every section, so whatever ran is kept either way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout --kill-after=10 "${GPU_CHECK_HARD_LIMIT_S:-470}" "$PY" benchmarks/gpu_check.py --budget "${GPU_CHECK_BUDGET_S:-450}" "$@"
