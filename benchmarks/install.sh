#!/usr/bin/env bash
# The set-up's two venvs, built from nothing by pip (as the Makefile did before tools/install.py) and by
# tools/install.py (uv, with a cache of its own that starts empty), side by side in one run:
#
#   bash benchmarks/install.sh [SCRATCH]      (default /tmp/vidray-install-bench; removed at the end)
#
# Prints one line per build: seconds of wall, the venv's size, and its count of compiled modules (both
# ways compile every module at install). Nothing else should run meanwhile (docs/benchmarks.md, section 8).
set -euo pipefail
cd "$(dirname "$0")/.."
scratch=${1:-/tmp/vidray-install-bench}
rm -rf "$scratch" && mkdir -p "$scratch"
trap 'rm -rf "$scratch"' EXIT
# The Makefile's pipeline venv pins, read from it so that the two cannot drift apart.
pipeline_pins=$(make -s --no-print-directory --eval 'print-pins: ; @echo $(PIPELINE_PINS)' print-pins)

build() {  # build NAME HOW PIP_ARGS...: a venv from nothing, timed
  local name=$1 how=$2; shift 2
  local venv="$scratch/$name" start
  python3 -m venv "$venv"
  start=$(date +%s.%N)
  if [ "$how" = pip ]; then
    "$venv/bin/python" -m pip install -q --upgrade pip > /dev/null
    "$venv/bin/python" -m pip install -q "$@" > /dev/null
  else
    UV_CACHE_DIR="$scratch/uv-cache" .venv/bin/python tools/install.py "$venv/bin/python" -q "$@"
  fi
  printf '%-22s %-4s %6.1f s %6s %7d .pyc\n' "$name" "$how" "$(echo "$(date +%s.%N) - $start" | bc)" \
    "$(du -sh "$venv" | cut -f1)" "$(find "$venv" -name '*.pyc' | wc -l)"
  rm -rf "$venv"
}

build main-pip pip -c constraints.txt -e '.[test]'
build main-uv uv -c constraints.txt -e '.[test]'
# shellcheck disable=SC2086  # the pins are words
build pipeline-pip pip $pipeline_pins
# shellcheck disable=SC2086
build pipeline-uv uv $pipeline_pins
