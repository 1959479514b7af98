#!/usr/bin/env bash
# Run HERE, in the checkout a device call sends, before the GPU check's `run` call (docs/benchmarks.md,
# "The GPU check"): downloads the Python 3.12 x86-64 wheels the lent H200 machine's image lacks into
# .gpu-wheels/ (ignored by git; the call names it in `carry`), so the check installs them there with
# `pip install --no-index --no-deps --target` (benchmarks/gpu_check.sh, WHEELS=.gpu-wheels).
#
#   bash benchmarks/gpu_prepare.sh            # ~1 min: downloads ~86 MB, repacks Ray, checks the size
#
# What the image lacks (the device tool's KINDS.md lists its packages): pydantic and its three
# helpers (vidray.config), Ray and the one requirement of Ray's that is missing there, jsonschema
# with its three helpers, and simplejpeg (0.4 MB: the jpeg store's reader, vidray/data/store.py, which
# vidray.data.dataset imports). typing-extensions travels too: pydantic 2.14 needs >= 4.16 and the image's
# version is not known. Not carried: PyAV (35.8 MB; no section needs it: the GPU decode section is
# nvjpeg through torchvision, which the image has), decord, torchcodec, wandb, Ray's extras.
#
# Ray's wheel (79.3 MB) is larger than one call may carry (64 MiB with the working tree); 34.5 MB of
# it is ray/jars/ray_dist.jar, the Java worker, which a Python-only run never loads. The wheel is
# rewritten without ray/jars/ (its RECORD without those lines), every other file byte for byte:
# ~45 MB, so everything travels in ONE call and no part of the check depends on a machine staying
# warm between calls.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${GPU_WHEELS_DIR:-.gpu-wheels}
PY=${PY:-python3}
# Pinned to what the project's venv runs (constraints.txt and its resolution), cp312 builds.
WHEELS=(
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
    ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 simplejpeg==1.9.0
)
# 64 MiB per call, less what else travels: the working tree (~1.3 MB) and a margin.
LIMIT_BYTES=$((60 * 1024 * 1024))

rm -rf "$DIR" "$DIR.download"
mkdir -p "$DIR.download"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DIR.download" "${WHEELS[@]}"

"$PY" - "$DIR.download" "$DIR" <<'EOF'
import base64, hashlib, shutil, sys, zipfile
from pathlib import Path

source, target = Path(sys.argv[1]), Path(sys.argv[2])
target.mkdir(parents=True)
DROP = ("ray/jars/",)  # the Java worker: never loaded by a Python-only Ray

for wheel in sorted(source.glob("*.whl")):
    if not wheel.name.startswith("ray-"):
        shutil.copy2(wheel, target / wheel.name)
        continue
    # Rewrite Ray's wheel without DROP; RECORD loses the dropped lines, every other file is kept as is.
    out = target / wheel.name
    with zipfile.ZipFile(wheel) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as zout:
        for info in zin.infolist():
            if info.filename.startswith(DROP):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line + b"\n" for line in data.splitlines() if not line.decode().startswith(DROP))
            zout.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)
    print(f"{wheel.name}: {wheel.stat().st_size / 1e6:.1f} MB -> {out.stat().st_size / 1e6:.1f} MB without {', '.join(DROP)}")
EOF
rm -rf "$DIR.download"
ls -l "$DIR"
total=$(du -cb "$DIR"/*.whl | tail -1 | cut -f1)
tree=$( (git ls-files -z; git ls-files -z --others --exclude-standard) | xargs -0 du -cb 2>/dev/null | awk '/\ttotal$/ {s += $1} END {print s}')
echo "wheels: $total bytes; working tree: $tree bytes; one call carries at most 67108864"
if [ "$total" -gt "$LIMIT_BYTES" ]; then
    echo "gpu_prepare: the wheels take $total bytes, more than the $LIMIT_BYTES planned for one call" >&2
    exit 1
fi
