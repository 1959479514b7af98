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

demo: setup
	$(PY) jobs/tune.py --config configs/demo.yaml

test: setup
	$(PY) -m pytest -q --durations=15

bench: setup
	bash benchmarks/run_all.sh

clean:
	rm -rf data/demo runs reports .pytest_cache
