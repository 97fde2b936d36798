#!/usr/bin/env bash
# The torch floor check: build the extension against an older torch in a fresh virtual
# environment and run the tests there (those needing a GPU, triton or segment-anything
# skip as they do anywhere without them).
#
#   bash .ci/torch_floor.sh [TORCH_SPEC] [VENV_DIR]
#
# TORCH_SPEC defaults to the floor in pyproject.toml; any pip requirement works (a wheel
# file, "torch==2.13.0+cpu"). The build uses its own folder (CONVLORA_BUILD_TEMP) and a
# copy of the checkout, so the checkout's build and installed package are left alone.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
floor=$(sed -n 's/^dependencies = \["torch>=\([0-9.]*\)".*/\1/p' "$root/pyproject.toml")
spec="${1:-torch==$floor}"
venv="${2:-$(mktemp -d)/venv}"
work="$(mktemp -d)"
echo "+ torch floor check: $spec in $venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "$spec" setuptools wheel ninja numpy pytest pytest-benchmark matplotlib \
    safetensors
git -C "$root" ls-files -z | (cd "$root" && xargs -0 cp --parents -t "$work")
cd "$work"
CONVLORA_BUILD_TEMP="$work/build/temp" "$venv/bin/pip" install -q --no-build-isolation --no-deps -e .
"$venv/bin/python" -c "import torch, convlora_kernels._ext as e; print('torch', torch.__version__, '_C:', e.load()[0] is not None)"
"$venv/bin/python" -m pytest -q -x -p no:cacheprovider tests
