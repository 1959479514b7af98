#!/usr/bin/env bash
# `make test`: the whole suite, as two lanes side by side.
#
#   tests/run_all.sh PYTHON [COMMAND...]
#
# PYTHON: the venv's (the Makefile passes .venv's; for a part of the suite, run pytest itself).
# COMMAND: run first in the lane beside, before its tests: the Makefile's `make pipeline-env`, the
# second venv that only that lane's tests use (37 s from nothing, a no-op once built), so it is
# built while the Ray lane already runs. If it fails, that lane fails without running its tests.
#
# * The Ray lane, `-m "ray and not own_cluster"`: every test on the session's loopback head, in order,
#   as a plain `pytest` runs them. Its console and --durations come first.
# * The lane beside it, two pytest processes one after the other:
#   - `-m "not ray"` (`make test-quick`'s tests, and the slow ones that run no Ray): no Ray at all
#     (tests/conftest.py fails a test here that starts Ray in its process);
#   - then `-m own_cluster`: the tests that start Ray clusters of their own (the benchmark smokes, the
#     installed package, `ray job submit`, the multi-node test), one at a time. They wait on their
#     clusters' starts and stops much of their time, which the Ray lane beside them fills: run in the Ray
#     lane, they were about a third of its wall, on the path `make test` waits for (docs/benchmarks.md,
#     section 8).
#
# The three marker expressions split the suite (tests/conftest.py marks every `ray` test that does not
# use the session's cluster `own_cluster`). Why lanes, and not pytest-xdist: docs/benchmarks.md,
# section 8. Exit status: non-zero if either lane failed.
set -uo pipefail
# A crash of a lane's pytest (a segfault at the interpreter's exit, after every test passed: stop 51) prints the
# Python stack of every thread, so it names its cause; pytest's own fault handler is off by then.
export PYTHONFAULTHANDLER=1

python=${1:?usage: tests/run_all.sh PYTHON [COMMAND...]}
shift
cd "$(dirname "$0")/.."

beside_log=$(mktemp -t vidray-tests-no-ray.XXXXXX)
exec 3>&2  # the console's stderr, for the one line that must not wait for the log below
(
  if [ $# -gt 0 ] && ! "$@"; then
    echo "make test: \`$*\` failed, so the tests that run no Ray did not run (its output is printed at the end)" >&3
    exit 1
  fi
  # The lane beside writes no pytest cache: two sessions writing one .pytest_cache would race.
  "$python" -m pytest -q -m "not ray" -p no:cacheprovider --durations=5
  without_ray=$?
  echo
  echo "======== then, beside the Ray lane: the tests with Ray clusters of their own (-m own_cluster) ========"
  "$python" -m pytest -q -m own_cluster -p no:cacheprovider --durations=5
  own_cluster=$?
  [ "$without_ray" -eq 0 ] && [ "$own_cluster" -eq 0 ]
) > "$beside_log" 2>&1 &
beside=$!
# Ctrl-C or a failure here must not leave the other lane running: the lane, and its children (the
# set-up's make, or its pytest), by their process ids. The lane's pytest takes SIGTERM as Ctrl-C
# (tests/conftest.py): its fixtures stop what its tests started, their own Ray clusters included.
trap 'kill "$beside" $(pgrep -P "$beside") 2> /dev/null; rm -f "$beside_log"' EXIT

"$python" -m pytest -q -m "ray and not own_cluster" --durations=15
ray_status=$?

wait "$beside"
beside_status=$?
echo
echo "======== run beside it: the tests that run no Ray (-m \"not ray\"), then those with clusters of their own ========"
cat "$beside_log"
if [ "$ray_status" -ne 0 ] || [ "$beside_status" -ne 0 ]; then
  echo "make test: FAILED (Ray lane exit $ray_status, other lane exit $beside_status)" >&2
  exit 1
fi
echo "make test: both lanes passed"
