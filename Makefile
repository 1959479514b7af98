# Two commands matter: `make demo` and `make test`. Both create/refresh the
# local venv first. torch is pinned through constraints.txt (CPU build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vidray-installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default config (configs/demo.yaml). Run it again and it only
# prints the finished sweep's results; results live in ~/ray_results/demo (see README).
demo: setup
	$(PY) jobs/tune.py

test: setup
	$(PY) -m pytest -q --durations=15

bench: setup
	bash benchmarks/run_all.sh

# What `make demo` made: its videos and dataset here, its sweep and reports in ~/ray_results/demo.
clean:
	rm -rf data/demo .pytest_cache ~/ray_results/demo
