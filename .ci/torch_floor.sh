#!/usr/bin/env bash
# The oldest supported stack, the one of the GPU machine the project is checked on:
# Python 3.12, torch 2.11.0 (CUDA 13 build), Triton 3.6.0, and the versions of the other
# packages that machine holds. In a fresh virtual environment and a copy of the checkout:
#   1. install that stack (needs PyPI: several GB for torch's CUDA wheels);
#   2. build the extension as benchmarks/gpu_check.sh builds it there
#      (setup.py build_ext --inplace, TORCH_CUDA_ARCH_LIST=9.0);
#   3. run the whole test suite (tests that need a GPU skip);
#   4. compile every Triton kernel for sm_90 under that Triton (compile_check --first);
#   5. run benchmarks/gpu_check.sh on the CPU (CONVLORA_CHECK_DEVICE=cpu): every stage that
#      can run without a GPU runs, the sanitizers skip with their reason.
# Run it before taking the code to a GPU machine; about 40 minutes on 2 cores.
#
#   bash .ci/torch_floor.sh [VENV_DIR] [OUT_DIR]
#
# Environment: PYTHON (default python3.12), TORCH_SPEC (default "torch==2.11.0
# triton==3.6.0 torchvision==0.26.0"), CUDA_HOME (default: as setup.py finds it),
# STEPS (default "tests compile gpucheck": a subset runs only those steps).
# A VENV_DIR that already holds the stack is reused (step 1 installs nothing new).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
py=${PYTHON:-python3.12}
spec=${TORCH_SPEC:-"torch==2.11.0 triton==3.6.0 torchvision==0.26.0"}
steps=${STEPS:-"tests compile gpucheck"}
venv="${1:-$(mktemp -d)/venv}"
out="${2:-$(mktemp -d)}"
work="$(mktemp -d)"
if [ ! -x "$venv/bin/python" ]; then
  if ! "$py" -V >/dev/null 2>&1; then  # pyenv's shim answers only for its active versions
    for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3; do
      if [ -x "$c" ]; then py=$c; fi
    done
  fi
  "$py" -V >/dev/null 2>&1 || { echo "$py does not run: set PYTHON to a Python 3.12" >&2; exit 2; }
  "$py" -m venv "$venv"
fi
echo "+ torch floor check: $spec in $venv ($("$venv/bin/python" -V)); logs in $out"
# The other packages at the GPU machine's versions where the tests read them (numpy 2.5,
# transformers 5.17); the rest as requirements.txt has them.
# shellcheck disable=SC2086
"$venv/bin/pip" install -q $spec numpy==2.5.2 transformers==5.17.0 setuptools wheel ninja \
    pytest pytest-benchmark matplotlib safetensors segment-anything pillow tqdm
git -C "$root" ls-files -z | (cd "$root" && xargs -0 cp --parents -t "$work")
cd "$work"
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
# built in place, not installed: the benchmark scripts (and the tests that run them) import
# the copy's package
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  "$venv/bin/python" setup.py build_ext --inplace \
    >"$out/build.log" 2>&1 || { tail -n 40 "$out/build.log"; exit 1; }
"$venv/bin/python" -c "
import sys, torch, triton
from convlora_kernels import _ext
mod, why = _ext.load()
print(f'python {sys.version.split()[0]}, torch {torch.__version__}, triton {triton.__version__},',
      f'_C: {mod.__file__ if mod else why} (CUDA kernels: {_ext.has_cuda_kernels()})')
sys.exit(0 if mod is not None else 1)"
status=0
for step in $steps; do
  case $step in
    tests)
      echo "+ pytest tests"
      "$venv/bin/python" -m pytest -q -ra -p no:cacheprovider tests 2>&1 | tee "$out/tests.log" |
        tail -n 30 || status=1 ;;
    compile)
      echo "+ compile_check --first --arch 90"
      env -u TRITON_INTERPRET "$venv/bin/python" -m convlora_kernels.triton_kernels.compile_check \
        --first --arch 90 >"$out/compile_check.log" 2>&1 || status=1
      tail -n 5 "$out/compile_check.log" ;;
    gpucheck)
      echo "+ CONVLORA_CHECK_DEVICE=cpu benchmarks/gpu_check.sh"
      CONVLORA_CHECK_DEVICE=cpu CONVLORA_CHECK_SKIP_BUILD=1 CONVLORA_CHECK_BUDGET=1800 \
        PYTHON="$venv/bin/python" bash benchmarks/gpu_check.sh "$out/gpu_check" >/dev/null 2>&1 ||
        status=1
      cat "$out/gpu_check/summary.txt" ;;
    *) echo "unknown step $step" >&2; exit 2 ;;
  esac
done
exit "$status"
