#!/usr/bin/env bash
# The wheels `benchmarks/gpu.sh` installs on the lent GPU machine, whose python3 (3.12) has
# torch, numpy, pillow, opencv, click, tensorboard and tqdm but not the rest of what the project
# needs; nothing can be downloaded there. Run this here (pip reaches the registries), then carry
# .whl (git-ignored) with the device tool: run(command="bash benchmarks/gpu.sh", carry=[".whl"]).
# The versions are this machine's .venv's where it has them, so both run the same code.
#   PYVER=3.11 bash benchmarks/gpu-wheels.sh   # wheels for a 3.11 trial here instead
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.whl}
PACKAGES=(webdataset braceexpand simplejpeg pytorch-msssim)
specs=()
for name in "${PACKAGES[@]}"; do
  version=$(.venv/bin/python -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}' || true)
  specs+=("$name${version:+==$version}")
done
rm -rf "$DEST"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d "$DEST" "${specs[@]}"
ls -l "$DEST"
