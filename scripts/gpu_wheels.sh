#!/usr/bin/env bash
# Peers for the offline GPU machine, as cp312 manylinux wheels in .whl/ (git-ignored, <= 40 MiB):
# `bash scripts/run gpu` installs them there with --no-index. Run here, where a registry is reachable.
#
# The GPU image (python 3.12, torch 2.11, triton 3.6, transformers 5.17) already has TRL's other
# needs (accelerate, pandas, pyarrow, xxhash, fsspec, huggingface-hub, psutil, pyyaml, jinja2,
# numpy, packaging, tqdm, filelock, requests); it lacks the peers themselves and datasets with its
# dill and multiprocess. Versions are the ones the test suite runs against here.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
WHEELS=(
  "trl==1.16.0" "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
  "datasets==5.2.0" "dill==0.4.1" "multiprocess==0.70.19"
)
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --disable-pip-version-check -d .whl "${WHEELS[@]}"
echo "wheels in .whl/:"
ls -1 .whl
size=$(du -sk .whl | cut -f1)
echo "total $((size / 1024)) MiB ($size KiB; limit 40 MiB)"
[ "$size" -le $((40 * 1024)) ] || { echo "too large for the GPU machine's tree" >&2; exit 1; }
# What the chosen wheels need beyond one another (for the record; the image provides these).
for w in .whl/*.whl; do
  { unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true; } |
    sed "s|^Requires-Dist: |  $(basename "$w" | cut -d- -f1) needs |"
done
