#!/usr/bin/env bash
# A dry run HERE of the GPU check as the lent H200 machine will run it (docs/benchmarks.md, "The GPU
# check"): Python 3.12 with only the image's packages at its versions where they matter (torch 2.11.0,
# torchvision 0.26.0, transformers 5.17.0, numpy 2.5.2; no Ray, PyAV, pydantic, decord, torchcodec,
# wandb), a copy of what a device call sends (the working tree's tracked and untracked-not-ignored
# files, plus the carried .gpu-wheels/) with no .venv and no ../shared, python3 first on PATH, and the
# device call's own command, on the CPU at toy sizes (--device cpu --quick).
#
#   bash benchmarks/gpu_prepare.sh && bash benchmarks/gpu_dryrun.sh
#
# The environment is built once (~3 min, ~5.3 GB: PyPI's torch 2.11.0 is the CUDA 13 build with its
# CUDA libraries, as in the image; it runs on the CPU here) in $GPU_IMAGE_VENV (/tmp/vidray-gpu-image),
# from $PY312 (python3.12 on PATH: pyenv's 3.12 here; the image has 3.12.3).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GPU_IMAGE_VENV:-/tmp/vidray-gpu-image}
PY312=${PY312:-python3.12}
WORK=${GPU_DRYRUN_DIR:-/tmp/vidray-gpu-dryrun}
[ -d .gpu-wheels ] || { echo "no .gpu-wheels/: run bash benchmarks/gpu_prepare.sh first" >&2; exit 1; }

if [ ! -x "$VENV/bin/python3" ]; then
    "$PY312" -m venv "$VENV"
    # The image's packages that vidray or Ray touch (the device tool's KINDS.md lists them all).
    "$VENV/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 transformers==5.17.0 numpy==2.5.2 \
        safetensors==0.8.0 huggingface_hub==1.33.0 tokenizers==0.23.2 triton==3.6.0 pyarrow pandas matplotlib \
        tensorboard pytest psutil pyyaml requests click msgpack protobuf filelock packaging aiohttp fsspec pillow \
        grpcio prometheus-client attrs
    # PyPI's newest typer pulls pydantic in; the image has typer without it.
    "$VENV/bin/pip" uninstall -q -y pydantic pydantic-core annotated-types typing-inspection tzdata
fi
for absent in ray av pydantic decord torchcodec wandb jsonschema simplejpeg; do
    if "$VENV/bin/python3" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$absent') is None)"; then
        echo "gpu_dryrun: $VENV has $absent, which the GPU image lacks" >&2
        exit 1
    fi
done

# What a device call sends: tracked and untracked-not-ignored files, and the carried folder.
rm -rf "$WORK"
mkdir -p "$WORK/repo" "$WORK/out"
(git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 -I{} cp --parents -- {} "$WORK/repo/" 2>/dev/null || true
cp -r .gpu-wheels "$WORK/repo/"
echo "gpu_dryrun: sent $(du -sb "$WORK/repo" | cut -f1) bytes to $WORK/repo (no ../shared, no .venv)"

cd "$WORK/repo"
env -i HOME="$HOME" PATH="$VENV/bin:/usr/bin:/bin" OUT="$WORK/out" WHEELS=.gpu-wheels \
    GPU_CHECK_BUDGET_S=${GPU_CHECK_BUDGET_S:-900} GPU_CHECK_HARD_LIMIT_S=${GPU_CHECK_HARD_LIMIT_S:-930} \
    bash benchmarks/gpu_check.sh --device cpu --quick "$@"
echo "gpu_dryrun: results in $WORK/out"
