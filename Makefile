# Two commands matter: `make demo` and `make test`. Both create/refresh the
# local venv first. torch is pinned through constraints.txt (CPU build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vidray-installed

.PHONY: setup ffmpeg-libs pipeline-env demo test test-quick bench clean

# tools/install.py: `pip install`, done by uv with pip's own configuration (34 s from nothing where pip
# takes 59: docs/benchmarks.md, section 8), and by pip where uv cannot.
$(STAMP): pyproject.toml constraints.txt tools/install.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/install.py $(PY) -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The three decoders (data.decoder): PyAV and decord wheels bring their own FFmpeg; torchcodec
# loads the system's FFmpeg shared libraries (versions 4-8). Installed with apt when torchcodec
# cannot load them (Debian/Ubuntu, as root; nothing to do when they are there). Where apt cannot
# run, set-up says so and the torchcodec tests fail naming the fix: CI exercises all three.
ffmpeg-libs: $(STAMP)
	@$(PY) -c "import torchcodec.decoders" 2>/dev/null || { \
	  if command -v apt-get > /dev/null && [ "$$(id -u)" -eq 0 ]; then \
	    echo "torchcodec: installing FFmpeg's shared libraries (apt-get install ffmpeg)"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg > /dev/null; \
	  fi; \
	  $(PY) -c "import torchcodec.decoders" 2>/dev/null || \
	    echo "WARNING: torchcodec cannot load FFmpeg's shared libraries: install them (Debian: apt-get install ffmpeg); until then data.decoder=torchcodec and its tests fail" >&2; \
	}

setup: $(STAMP) ffmpeg-libs

# A second venv for tests/test_pipeline_parity.py: what a user of an export has on a GPU node,
# transformers' pipeline with its video processor, which needs torchvision (and torchcodec to
# decode). PyPI's torchvision does not import beside the CPU torch of $(VENV) ("operator
# torchvision::nms does not exist"), so it gets PyPI's torch + torchvision pair: measured on
# x86_64, 37 s (89 s with pip) and 6.0 GB from local wheels (docs/benchmarks.md); no vidray in it. pyarrow and
# simplejpeg are there for tests/test_device_decode.py, which runs vidray's GPU JPEG path through
# torchvision's decoder on the CPU there (with vidray's source on PYTHONPATH). The aarch64
# pins are the machine doc's CPU pair plus torchcodec 0.8.1 (its release for torch 2.9): not measured.
PIPELINE_VENV ?= .venv-pipeline
PIPELINE_STAMP := $(PIPELINE_VENV)/.vidray-pipeline-installed
ifeq ($(shell uname -m),aarch64)
PIPELINE_TORCH := torch==2.9.1 torchvision==0.24.1 torchcodec==0.8.1
else
PIPELINE_TORCH := torch==2.14.1 torchvision==0.29.1 torchcodec==0.13.0
endif
PIPELINE_PINS := $(PIPELINE_TORCH) transformers==5.24.0 av==18.1.0 numpy==2.4.6 pyarrow==26.0.1 simplejpeg==1.9.0

# 5.9 GB once installed: refuse up front, in one line, rather than let pip die halfway with
# "No space left on device" (how CI failed once, on a disk full of old clones).
PIPELINE_FREE_GB := 7

$(PIPELINE_STAMP): Makefile | $(STAMP)
	@test -x $(PIPELINE_VENV)/bin/python || { \
	  free_kb=$$(df -Pk "$(dir $(abspath $(PIPELINE_VENV)))" | awk 'NR==2 {print $$4}'); \
	  if [ "$$free_kb" -lt $$(( $(PIPELINE_FREE_GB) * 1024 * 1024 )) ]; then \
	    echo "pipeline-env: $(PIPELINE_VENV) needs about $(PIPELINE_FREE_GB) GB free on its disk, $$(( free_kb / 1024 / 1024 )) GB are: free some space or set PIPELINE_VENV=<a folder on a bigger disk>" >&2; \
	    exit 1; \
	  fi; }
	test -x $(PIPELINE_VENV)/bin/python || $(PYTHON) -m venv $(PIPELINE_VENV)
	$(PY) tools/install.py $(PIPELINE_VENV)/bin/python -q $(PIPELINE_PINS)
	touch $(PIPELINE_STAMP)

pipeline-env: $(PIPELINE_STAMP)

# Where the tests look for it (tests/test_pipeline_parity.py and others), so that `make test
# PIPELINE_VENV=<a folder on a bigger disk>`, as the message above advises, is found there too.
VIDRAY_PIPELINE_PYTHON ?= $(abspath $(PIPELINE_VENV))/bin/python
export VIDRAY_PIPELINE_PYTHON

# The main job on the embedded default config (configs/demo.yaml). Run it again and it only
# prints the finished sweep's results; results live in ~/ray_results/demo (see README).
demo: setup
	$(PY) jobs/tune.py

# The whole suite, in two lanes side by side (tests/run_all.sh): the tests on the session's Ray head,
# and beside them the ones that need no Ray, then the ones with Ray clusters of their own. A plain
# `pytest` runs the same tests in one lane. Only the second lane's tests use the pipeline venv, so it
# is built there, first, while the Ray lane already runs: its 37 s of install leave the critical path.
test: setup
	bash tests/run_all.sh $(PY) $(MAKE) --no-print-directory pipeline-env

# The inner loop: everything that needs no Ray cluster and no end-to-end run.
test-quick: setup
	$(PY) -m pytest -q -m "not ray and not slow" --durations=5

bench: setup
	bash benchmarks/run_all.sh

# What `make demo` made: its videos and dataset here, its sweep and reports in ~/ray_results/demo.
clean:
	rm -rf data/demo .pytest_cache ~/ray_results/demo
