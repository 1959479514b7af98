#!/usr/bin/env bash
# The prepared GPU check (benchmarks/gpu_check.py): on one H100/H200 it finishes in under 7 minutes and
# writes gpu_check.json (under $OUT when set, else benchmarks/results/): ViT-B 16x112² and 16x224²
# training clips/s and MFU, eager and compiled; the device cache's load and batch rates; nvjpeg decode;
# and a 2-epoch run of the real Ray Train loop. docs/benchmarks.md ("The GPU check") has the device call.
#
#   WHEELS=.gpu-wheels bash benchmarks/gpu_check.sh        # on the lent GPU machine (bash benchmarks/gpu_prepare.sh first, here)
#   bash benchmarks/gpu_check.sh --device cpu --quick      # dry run on a CPU: every section at toy sizes
#   bash benchmarks/gpu_check.sh --only environment vit_b  # some sections only
#
# WHEELS: a folder of wheels for the image's python3 (gpu_prepare.sh makes it); they are installed with
# `pip install --no-index --no-deps --target $WHEELS_SITE` (default /tmp/vidray-site), which goes first
# on PYTHONPATH, so Ray's workers import them too. The machine has no virtual environment of ours.
#
# Time is bounded twice: the Python side gives every section its own timeout inside a 400 s budget and
# kills a section's whole process tree when it runs over; this wrapper kills everything at 415 s. The
# JSON is rewritten after every section, so whatever ran is kept either way.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export RAY_USAGE_STATS_ENABLED=0 RAY_DEDUP_LOGS=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false RAY_AUTH_MODE=disabled
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
if [ -n "${WHEELS:-}" ]; then
    SITE=${WHEELS_SITE:-/tmp/vidray-site}
    started=$EPOCHREALTIME
    rm -rf "$SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check --target "$SITE" "$WHEELS"/*.whl
    GPU_CHECK_INSTALL_S=$(awk "BEGIN {printf \"%.1f\", $EPOCHREALTIME - $started}")
    export GPU_CHECK_INSTALL_S
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check] installed $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS into $SITE in $GPU_CHECK_INSTALL_S s" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "[gpu_check] $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')" >&2
exec timeout --kill-after=10 "${GPU_CHECK_HARD_LIMIT_S:-415}" "$PY" benchmarks/gpu_check.py --budget "${GPU_CHECK_BUDGET_S:-400}" "$@"
