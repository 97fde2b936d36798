#!/usr/bin/env bash
# The GPU check: one command for a fresh GPU machine with nvcc and torch but no network.
#
#   bash benchmarks/gpu_check.sh OUT_DIR
#
# Stages, each under its own time limit (on the first H100 run the build took 101-143 s and
# the GPU tests over 90 s: all stages need about 12 minutes, more than the default budget,
# so a short lease names the stages it runs, CONVLORA_CHECK_STAGES below):
#   build      the extension from source (sm_XY of this card only), timed
#   tests      python -m pytest -m gpu -ra tests (SKIP on the CPU: they skip there)
#   memcheck   compute-sanitizer memcheck: probe op + backend "cuda", tiny fwd+bwd vs reference
#   racecheck  compute-sanitizer racecheck: the same, backend "cuda" only
#   memcheck-triton   compute-sanitizer memcheck of backend "triton" (SKIP if it is absent)
#   model      the CUDA stencil's cost model (benchmarks/cost_model.py: shared-memory
#              wavefronts, SASS, bytes -> est. H100 times; CPU only), printed before the
#              stencil stage measures the same kernels
#   model-triton   the Triton stencil's cost (benchmarks/cost_triton.py: its sm_90 SASS,
#              loops x trip counts -> est. H100 times; CPU only)
#   counters   the tile and map kernels' shared-memory wavefronts and warp instructions
#              read by Nsight Compute (ncu) on the problems the model counts, beside its
#              two wavefront counts and its instruction estimate (benchmarks/smem_counters.py;
#              then ncu's warp-state, scheduler and occupancy sections of the same kernels
#              at SAM's shapes; SKIP without a GPU, without ncu, or where ncu cannot
#              read the counters)
#   stencil    the stencil kernels alone (stencil_fwd, stencil_bwd; CUDA events) next to the
#              layer's fwd+bwd, plain LoRA and the eager reference (benchmarks/stencil_time.py);
#              for map routing the map programs next to the per-token ones
#              (CONVLORA_MAP_KERNELS=0 switches the layer to the latter); on the target
#              shape the layer also under the switches a GPU must settle
#              (stencil_time.LAYER_SWITCHES: the prep on a second stream, CONVLORA_PREP_STREAM;
#              the composed-weight stencil, CONVLORA_STENCIL_MMA; both)
#   kernels    where each stencil op's and the layer's GPU time goes: every kernel it launches
#              with its time (torch.profiler), one call alone against calls back to back
#              (benchmarks/kernel_profile.py; SKIP without a GPU)
#   plans      every candidate of the layer's plan, per fused backend, at SAM's shapes, and
#              the winners (benchmarks/plan_time.py; plans.json, the source of the
#              MEASURED table of convlora_kernels/plan.py)
#   module     ConvLoRALinear's training step (bf16, 4 images) with its router inside the
#              layer's op, next to the frozen linear and the router outside
#              (benchmarks/profile_layer.py, compatibility mode; module-token: token routing,
#              bilinear, r = 8)
#   segstep    one semantic-segmentation training step end to end (SamSegmenter, ViT-B,
#              batch 4, 1024x1024, bf16) per backend, plain LoRA and the frozen encoder
#              (benchmarks/seg_step.py; into bench.log)
#   segmem     a Conv-LoRA training step's peak memory and images/s, without and with
#              activation checkpointing (benchmarks/seg_step.py --memory; ViT-H, batch 4,
#              1024x1024, bf16 on a GPU)
#   bench      the GPU benchmark subset (ViT-B global and window maps, r = 8 and 3, token
#              routing, one map-routing row, the authors' setting (map, bicubic, r = 3) with
#              their layer when CONVLORA_AUTOGLUON_WHEEL names its wheel, bf16,
#              torch.compile on one shape)
# A stage that fails does not stop the others (a failed build skips the rest).
#
# Writes into OUT_DIR, at most 8 plain files: summary.txt (machine, versions, one line per
# stage), build.log, tests.log (the sanitizers' output too), plans.json, bench.log,
# bench.json, bench.md, bench.png.
# Exit status 0 when every stage passed (SKIP counts as passed), 1 otherwise.
#
# Settings (environment):
#   CONVLORA_CHECK_BUDGET   seconds for the whole script (default 450)
#   CONVLORA_CHECK_DEVICE   cuda (default), or cpu to exercise the script on a machine
#                           without a GPU (sanitizers skipped, smoke-sized benchmark)
#   CONVLORA_CHECK_SKIP_BUILD=1   use the extension already built in the checkout
#   CONVLORA_CHECK_BENCH_MIN   seconds kept for the bench stage (default 150)
#   CONVLORA_CHECK_STAGES   the stages to run, by name, e.g. "build tests stencil plans"
#                           (default: all); the others are recorded as SKIP. The model
#                           stages need no GPU: a short lease can leave them to the CPU.
#   CONVLORA_AUTOGLUON_WHEEL      the autogluon.multimodal wheel (the authors' layer)
#   PYTHON                  the interpreter (default: python)
#   COMPUTE_SANITIZER       path to compute-sanitizer (default: $CUDA_HOME/bin, /usr/local/cuda/bin, PATH)
# Wheels in .whl/ at the checkout's root are installed (offline, --no-deps) for any
# distribution that is missing, e.g. segment-anything, pytest, ninja, matplotlib.
set -euo pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash benchmarks/gpu_check.sh OUT_DIR" >&2
  exit 2
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# The extension is built in place (build_ext --inplace), not installed: the scripts
# import the checkout's package.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DEVICE=${CONVLORA_CHECK_DEVICE:-cuda}
BUDGET=${CONVLORA_CHECK_BUDGET:-450}
START=$(date +%s)
SUMMARY=$OUT/summary.txt
FAILED=0
STAGES=${CONVLORA_CHECK_STAGES:-}
selected() { [ -z "$STAGES" ] || [[ " $STAGES " == *" $1 "* ]]; }
BENCH_MIN=${CONVLORA_CHECK_BENCH_MIN:-150}  # seconds kept for the benchmark whatever precedes it
selected bench || BENCH_MIN=0
AFTER_BUILD=$((BENCH_MIN + 60))  # and for the tests after the build
: >"$SUMMARY"
for f in build.log tests.log plans.json bench.log bench.json bench.md bench.png; do
  rm -f "${OUT:?}/$f"  # a previous run's files, which the stages would append to
done

say() { echo "$*" | tee -a "$SUMMARY"; }

# Seconds a stage may take: its own limit, cut to what the whole budget has left less
# RESERVE seconds kept for the stages after it.
limit() {
  local want=$1 reserve=${2:-0} left
  left=$((START + BUDGET - reserve - $(date +%s)))
  if [ "$left" -lt "$want" ]; then want=$left; fi
  if [ "$want" -lt 0 ]; then want=0; fi
  echo "$want"
}

record() {  # record STAGE STATUS DETAIL
  printf '%-16s %-5s %s\n' "$1" "$2" "$3" | tee -a "$SUMMARY"
  if [ "$2" = FAIL ]; then FAILED=1; fi
}

# stage NAME LOG SECONDS CMD...: run CMD under timeout, append to LOG, record the outcome.
# A command's last "RESULT: ..." line, if it prints one, becomes the stage's detail;
# exit status 4 from a command means "nothing to check here" and records SKIP.
stage() {
  local name=$1 log=$2 secs=$3 rc=0 t0 dt detail offset
  shift 3
  if ! selected "$name"; then
    record "$name" SKIP "not in CONVLORA_CHECK_STAGES"
    return 0
  fi
  if [ "$secs" -lt 10 ]; then
    record "$name" SKIP "no time left in the ${BUDGET}s budget"
    return 0
  fi
  echo "=== $name: $* (limit ${secs}s)" >>"$log"
  offset=$(wc -c <"$log")
  t0=$(date +%s)
  timeout --kill-after=10 "$secs" "$@" >>"$log" 2>&1 || rc=$?
  dt=$(($(date +%s) - t0))
  detail=$(tail -c +"$((offset + 1))" "$log" | grep -a '^RESULT: ' | tail -n 1 |
    sed 's/^RESULT: [A-Z]* *//' || true)
  echo "=== $name: exit $rc after ${dt}s" >>"$log"
  if [ "$rc" -eq 0 ]; then
    record "$name" PASS "${dt}s${detail:+; $detail}"
  elif [ "$rc" -eq 4 ]; then
    record "$name" SKIP "${detail:-nothing to check}"
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    record "$name" FAIL "timed out after ${dt}s (see $(basename "$log"))"
  else
    record "$name" FAIL "exit $rc after ${dt}s${detail:+; $detail} (see $(basename "$log"))"
  fi
}

skip_rest() {  # skip_rest REASON STAGE...
  local why=$1
  shift
  for s in "$@"; do record "$s" SKIP "$why"; done
}

# ---- machine and versions -------------------------------------------------------------
say "convlora-kernels GPU check, $(date -u +%Y-%m-%dT%H:%M:%SZ), budget ${BUDGET}s, device $DEVICE"
if command -v git >/dev/null && git rev-parse HEAD >/dev/null 2>&1; then
  say "commit $(git rev-parse HEAD)$(git diff --quiet HEAD 2>/dev/null || echo ' (dirty)')"
  export CONVLORA_BENCH_COMMIT=${CONVLORA_BENCH_COMMIT:-$(git rev-parse HEAD)}
fi
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm \
    --format=csv 2>&1 | tee -a "$SUMMARY" || true
  nvidia-smi 2>&1 | head -n 20 >>"$SUMMARY" || true
else
  say "nvidia-smi: not found"
fi
# The toolkit, for compute-sanitizer (setup.py finds nvcc by itself): the first of these
# that holds a real toolkit (a wrapper script's folder holds no include/cuda.h).
CUDA_DIR=
NVCC=$(command -v nvcc || true)
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "${NVCC:+$(dirname "$(dirname "$(readlink -f "$NVCC")")")}" \
         /usr/local/cuda /usr/local/cuda-*; do
  if [ -z "$CUDA_DIR" ] && [ -n "$d" ] && [ -f "$d/include/cuda.h" ]; then CUDA_DIR=$d; fi
done
CUDA_DIR=${CUDA_DIR:-/usr/local/cuda}
say "toolkit $CUDA_DIR; nvcc: $("$CUDA_DIR/bin/nvcc" --version 2>/dev/null | grep -o 'release [0-9.]*' || echo 'not found')"
("$PY" - 2>&1 <<'EOF' | tee -a "$SUMMARY"
import os, platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cpus {os.cpu_count()}, cuda available {torch.cuda.is_available()}")
try:
    import triton
    print(f"triton {triton.__version__}")
except ImportError as e:
    print(f"triton: not importable ({e})")
EOF
) || true

if [ "$DEVICE" = cuda ]; then
  stage cuda-device "$OUT/tests.log" 60 "$PY" -c "
import torch
ok = torch.cuda.is_available()
print('RESULT:', 'PASS' if ok else 'FAIL', torch.cuda.get_device_name() if ok else 'torch sees no CUDA device')
raise SystemExit(0 if ok else 1)"
else
  record cuda-device SKIP "device $DEVICE: the stages run on the CPU"
fi

# ---- offline wheels for anything missing ----------------------------------------------
if ls .whl/*.whl >/dev/null 2>&1; then
  ("$PY" - 2>&1 <<'EOF' | tee -a "$SUMMARY"
import glob, importlib.metadata as md, os, re, subprocess, sys
missing = []
for w in sorted(glob.glob(".whl/*.whl")):
    dist = re.sub(r"[-_.]+", "-", os.path.basename(w).split("-")[0]).lower()
    try:
        md.version(dist)
    except md.PackageNotFoundError:
        missing.append(w)
if missing:
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                        "-q", *missing], capture_output=True, text=True)
    print(f"offline wheels installed: {' '.join(os.path.basename(m) for m in missing)}"
          f" (pip exit {r.returncode}) {r.stderr.strip()[-300:]}")
EOF
  ) || true
fi

# ---- build ----------------------------------------------------------------------------
if [ "${CONVLORA_CHECK_SKIP_BUILD:-0}" = 1 ]; then
  record build SKIP "CONVLORA_CHECK_SKIP_BUILD=1: using the extension already built"
else
  if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ] && command -v nvidia-smi >/dev/null; then
    # This card's architecture only: half the nvcc work of the default list.
    TORCH_CUDA_ARCH_LIST=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1 | tr -d ' ')
    export TORCH_CUDA_ARCH_LIST
  fi
  say "build: TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default} MAX_JOBS=${MAX_JOBS:-from setup.py}"
  rm -f convlora_kernels/_C*.so
  stage build "$OUT/build.log" "$(limit 240 "$AFTER_BUILD")" env FORCE_CUDA=1 "$PY" setup.py build_ext --inplace
  stage build-check "$OUT/build.log" "$(limit 60 "$AFTER_BUILD")" "$PY" -c "
import sys, torch
from convlora_kernels import _ext
mod, why = _ext.load()
ok = mod is not None and ('$DEVICE' != 'cuda' or _ext.has_cuda_kernels())
print('RESULT:', 'PASS' if ok else 'FAIL', mod.__file__ if mod else why,
      '(CUDA kernels: %s)' % _ext.has_cuda_kernels())
sys.exit(0 if ok else 1)"
fi

if grep -qE '^build(-check)? +FAIL' "$SUMMARY"; then
  skip_rest "the build failed" tests memcheck racecheck memcheck-triton model model-triton counters \
    stencil kernels plans module module-token segstep segmem bench
else
  # ---- GPU tests --------------------------------------------------------------------
  # Without a GPU the GPU-marked tests are collected and skip: the stage says so (SKIP).
  stage tests "$OUT/tests.log" "$(limit 150 "$BENCH_MIN")" bash -c '
    "$1" -m pytest -m gpu -ra -q -p no:cacheprovider tests || exit
    if [ "$2" != cuda ]; then
      echo "RESULT: SKIP device $2: the GPU tests were collected and skipped (see tests.log)"
      exit 4
    fi' gpu-tests "$PY" "$DEVICE"

  # ---- compute-sanitizer ------------------------------------------------------------
  SAN=${COMPUTE_SANITIZER:-}
  for c in "$CUDA_DIR/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer \
           /usr/local/cuda-*/bin/compute-sanitizer "$(command -v compute-sanitizer || true)"; do
    if [ -z "$SAN" ] && [ -n "$c" ] && [ -x "$c" ]; then SAN=$c; fi
  done
  if [ "$DEVICE" != cuda ]; then
    skip_rest "device $DEVICE: no sanitizer run" memcheck racecheck memcheck-triton
  elif [ -z "$SAN" ]; then
    record memcheck FAIL "compute-sanitizer not found (set COMPUTE_SANITIZER)"
    record racecheck FAIL "compute-sanitizer not found (set COMPUTE_SANITIZER)"
    record memcheck-triton SKIP "compute-sanitizer not found"
  else
    say "compute-sanitizer: $SAN ($("$SAN" --version 2>/dev/null | grep -o 'Version [0-9.]*' || true))"
    # No caching allocator, so an access past a tensor's end hits unallocated memory.
    export PYTORCH_NO_CUDA_MEMORY_CACHING=1
    SANOPT=(--error-exitcode 7 --print-limit 20 --target-processes application-only)
    stage memcheck "$OUT/tests.log" "$(limit 60 "$BENCH_MIN")" "$SAN" --tool memcheck "${SANOPT[@]}" \
      "$PY" benchmarks/sanitize_case.py --backends cuda
    stage racecheck "$OUT/tests.log" "$(limit 60 "$BENCH_MIN")" "$SAN" --tool racecheck "${SANOPT[@]}" \
      "$PY" benchmarks/sanitize_case.py --backends cuda
    stage memcheck-triton "$OUT/tests.log" "$(limit 50 "$BENCH_MIN")" "$SAN" --tool memcheck "${SANOPT[@]}" \
      "$PY" benchmarks/sanitize_case.py --backends triton --no-probe
    unset PYTORCH_NO_CUDA_MEMORY_CACHING
  fi

  # ---- the stencil kernels alone, next to the layer, after what the model expects -----
  # (most of it compiling the checked CPU build the model counts with: over a minute on a
  # busy 2-core machine, the torch-floor check saw 60 s run out)
  stage model "$OUT/bench.log" "$(limit 120 "$BENCH_MIN")" "$PY" benchmarks/cost_model.py
  stage model-triton "$OUT/bench.log" "$(limit 60 "$BENCH_MIN")" env -u TRITON_INTERPRET \
    "$PY" benchmarks/cost_triton.py
  stage counters "$OUT/bench.log" "$(limit 120 "$BENCH_MIN")" "$PY" benchmarks/smem_counters.py
  if [ "$DEVICE" = cuda ]; then STENCIL=(--device cuda); else STENCIL=(--device cpu --repeats 3); fi
  stage stencil "$OUT/bench.log" "$(limit 90 "$BENCH_MIN")" "$PY" benchmarks/stencil_time.py "${STENCIL[@]}"
  stage kernels "$OUT/bench.log" "$(limit 60 "$BENCH_MIN")" "$PY" benchmarks/kernel_profile.py
  # ---- the layer's candidates, side by side ---------------------------------------------
  if [ "$DEVICE" = cuda ]; then PLANS=(--device cuda --repeats 20); else PLANS=(--device cpu --repeats 3); fi
  # 200 s: four forward candidates and 2 x 2 backward ones on triton, 12 on cuda (one_kernel
  # autotunes four tiles per C, the two-source GEMM three per output width and K)
  stage plans "$OUT/bench.log" "$(limit 200 "$BENCH_MIN")" "$PY" benchmarks/plan_time.py "${PLANS[@]}" \
    --out "$OUT/plans.json"
  # ---- the module's training step: router inside the op against outside ----------------
  if [ "$DEVICE" = cuda ]; then
    MOD=(--device cuda --dtype bfloat16 --batch 4 --steps 20 --warmup 5)
  else
    MOD=(--device cpu --channels 64 --steps 2 --warmup 1)
  fi
  stage module "$OUT/bench.log" "$(limit 40 "$BENCH_MIN")" "$PY" benchmarks/profile_layer.py "${MOD[@]}"
  stage module-token "$OUT/bench.log" "$(limit 30 "$BENCH_MIN")" "$PY" benchmarks/profile_layer.py \
    "${MOD[@]}" --gating token --interpolation bilinear --rank 8 --shapes global
  # ---- one segmentation training step, end to end ---------------------------------------
  if [ "$DEVICE" = cuda ]; then SEG=(--device cuda); else SEG=(--device cpu --repeats 2); fi
  stage segstep "$OUT/bench.log" "$(limit 75 "$BENCH_MIN")" "$PY" benchmarks/seg_step.py "${SEG[@]}"
  if [ "$DEVICE" = cuda ]; then MEM=(--device cuda --model-type vit_h --batch 4 --repeats 3); else MEM=(--device cpu --batch 1,4 --repeats 1); fi
  stage segmem "$OUT/bench.log" "$(limit 90 "$BENCH_MIN")" "$PY" benchmarks/seg_step.py --memory "${MEM[@]}"
  # ---- benchmark subset ---------------------------------------------------------------
  # Whatever time is left, less a margin; rows not started in time are recorded as skipped.
  secs=$(limit 600)
  if [ "$DEVICE" = cuda ]; then
    BENCH=(--device cuda --preset gpu-check --compile --compile-only global-C768-r8)
  else
    BENCH=(--device cpu --preset smoke --repeats 3 --warmup 1)
  fi
  # The authors' layer needs its wheel (benchmarks/benchlib/authors.py); without network, only a
  # copy named by CONVLORA_AUTOGLUON_WHEEL.
  [ -n "${CONVLORA_AUTOGLUON_WHEEL:-}" ] || BENCH+=(--no-authors)
  stage bench "$OUT/bench.log" "$secs" "$PY" benchmarks/run.py "${BENCH[@]}" \
    --time-budget $((secs > 60 ? secs - 45 : secs / 2)) --out "$OUT/bench.json"
  # A run cut short still wrote every finished row: render what there is.
  if [ -f "$OUT/bench.json" ] && { [ ! -f "$OUT/bench.md" ] || [ "$OUT/bench.json" -nt "$OUT/bench.md" ]; }; then
    timeout 60 "$PY" benchmarks/render.py "$OUT/bench.json" >/dev/null 2>>"$OUT/bench.log" || true
  fi
fi

# ---- keep the logs short enough to fetch back -------------------------------------------
for f in "$OUT"/*.log; do
  [ -f "$f" ] || continue
  if [ "$(wc -c <"$f")" -gt 2000000 ]; then
    { head -c 500000 "$f"; printf '\n[... cut ...]\n'; tail -c 1400000 "$f"; } >"$f.cut"
    mv "$f.cut" "$f"
  fi
done

elapsed=$(($(date +%s) - START))
say "total ${elapsed}s; $([ "$FAILED" = 0 ] && echo 'all stages passed' || echo 'some stages FAILED')"
if [ -f "$OUT/bench.md" ]; then
  echo
  cat "$OUT/bench.md"
fi
exit "$FAILED"
