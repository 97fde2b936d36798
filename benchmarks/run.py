"""Microbenchmark: Conv-LoRA backends against unfused PyTorch, plain LoRA and the frozen linear.

    python benchmarks/run.py                      # CPU subset in fp32: a few minutes on 2 cores
    python benchmarks/run.py --device cuda        # SAM ViT-B/L/H shapes in bf16, CUDA events
    python benchmarks/run.py --device cuda --preset gpu-check --compile --compile-only global-C768-r8

Prints a ratio table per shape and mode (see benchmarks/render.py for the columns) and
writes a JSON report with raw medians, floors, memory and the environment, plus a
markdown table and a PNG plot beside it (default: benchmarks/results/local/). On a CPU
only ratios are printed; absolute times are printed only for a GPU, with the card named.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (puts the checkout's package first on sys.path)
import floors  # noqa: E402
import measure  # noqa: E402
import render  # noqa: E402

import torch  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SCHEMA = 2


def _git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10,
                              cwd=common.ROOT).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def source_digest() -> str:
    """sha256 over the package, kernel, build and benchmark sources: names the code that
    ran even where the checkout has no git metadata (a copied working tree)."""
    h = hashlib.sha256()
    patterns = ["setup.py", "csrc/*", "convlora_kernels/**/*.py", "benchmarks/*.py",
                "benchmarks/*.sh"]
    files = sorted({f for p in patterns for f in glob.glob(os.path.join(common.ROOT, p),
                                                           recursive=True)})
    for f in files:
        h.update(os.path.relpath(f, common.ROOT).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read() + b"\0")
    return h.hexdigest()[:16]


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, argv) -> dict:
    """Everything needed to reproduce a report: versions, card, commit, command."""
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = dict(
        torch=torch.__version__, python=platform.python_version(),
        commit=os.environ.get("CONVLORA_BENCH_COMMIT") or _git("rev-parse", "HEAD"),
        dirty=bool(status) if status is not None else None, source_sha256=source_digest(),
        device=str(device), cpu=_cpu_name(), threads=torch.get_num_threads(),
        platform=platform.platform(),
        command=shlex.join(["python", "benchmarks/run.py"] + list(argv)),
        env_vars={k: v for k, v in sorted(os.environ.items())
                  if k.startswith(("CONVLORA_", "TORCH_CUDA_ARCH", "TRITON_", "OMP_", "MKL_"))
                  or k in ("CUDA_VISIBLE_DEVICES", "CUDA_HOME")},
        backends=common.backend_status(device),
    )
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1), cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    return env


def _measure_one(prov, inputs, backward, args) -> dict:
    """Time, then memory, of one provider on one shape and mode; errors are recorded."""
    try:
        row = measure.time_provider(prov.fn, inputs, backward, warmup=args.warmup,
                                    repeats=args.repeats)
    except Exception as e:  # one failing provider must not hide the others
        return dict(error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    try:
        row["peak_mb"] = measure.peak_memory_mb(prov.fn, inputs[0], backward)
        if backward:
            row.update(measure.saved_for_backward(prov.fn, inputs[0]))
    except Exception as e:
        row["memory_error"] = f"{type(e).__name__}: {e}"
    return row


def run(args, argv=(), on_shape=None) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    shapes = common.preset_shapes(args.preset, args.batch)
    if args.only:
        shapes = [s for s in shapes if any(o in s.name for o in args.only.split(","))]
    provs = common.providers(device, compile_reference=args.compile)
    report = dict(schema=SCHEMA, environment=environment(device, argv), args=vars(args),
                  baselines=dict(reference=common.REFERENCE, linear=common.LINEAR),
                  rates=floors.measure_rates(device, dtype), results=[])
    t_start = time.perf_counter()
    total = len(shapes) * 2 * len(provs)
    done = 0
    for shape in shapes:
        inputs = [common.make_inputs(shape, device, dtype, seed=args.seed + i)
                  for i in range(args.rotate)]
        index_bytes = inputs[0]["expert_index"].element_size()
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            for name, prov in provs.items():
                done += 1
                if name == common.COMPILED and args.compile_only and \
                        not any(o in shape.name for o in args.compile_only.split(",")):
                    continue
                count = floors.counts(shape.as_dict(), mode, prov.problem,
                                      torch.finfo(dtype).bits // 8, index_bytes)
                row = dict(shape=shape.as_dict(), mode=mode, provider=name,
                           problem=prov.problem, dtype=args.dtype,
                           floor=dict(floors.floor(count, report["rates"]), **count))
                elapsed = time.perf_counter() - t_start
                if args.time_budget and elapsed > args.time_budget:
                    row["skipped"] = f"time budget of {args.time_budget:.0f} s spent"
                else:
                    print(f"[{done}/{total}] {shape.name} {mode} {name}", file=sys.stderr,
                          flush=True)
                    row.update(_measure_one(prov, inputs, backward, args))
                report["results"].append(row)
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if on_shape:
            on_shape(report)
    report["wall_s"] = round(time.perf_counter() - t_start, 1)
    return report


def _write_json(report: dict, path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--preset", default=None, choices=common.PRESETS,
                   help="cpu: small shapes (default on CPU); sam: every SAM ViT-B/L/H shape "
                        "(default on CUDA); gpu-check: the ViT-B subset; smoke: tiny")
    p.add_argument("--batch", type=int, default=None, help="images per batch (SAM presets: 4)")
    p.add_argument("--only", default=None, help="keep shapes whose name contains one of "
                                                "these comma-separated strings")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    p.add_argument("--compile-only", default=None,
                   help="time the compiled reference only on shapes matching these strings")
    p.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 10 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="default: 10 on CPU, 100 on CUDA")
    p.add_argument("--rotate", type=int, default=None,
                   help="input sets cycled through (default: 2 on CPU, 4 on CUDA)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; rows not started by then are recorded as skipped")
    p.add_argument("--out", default=None, help="JSON report path; .md and .png go beside it "
                   "(default: benchmarks/results/local/<device>-<dtype>-<preset>.json)")
    args = p.parse_args(argv)
    is_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if is_cuda else "float32")
    args.preset = args.preset or ("sam" if is_cuda else "cpu")
    for name, on_gpu, on_cpu in (("warmup", 10, 2), ("repeats", 100, 10), ("rotate", 4, 2)):
        if getattr(args, name) is None:
            setattr(args, name, on_gpu if is_cuda else on_cpu)
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "local",
                                f"{args.device.split(':')[0]}-{args.dtype}-{args.preset}.json")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    report = run(args, argv, on_shape=lambda r: _write_json(r, args.out))
    _write_json(report, args.out)
    print(render.text_table(report))
    print(f"\nwrote {args.out}")
    for note in render.write_all(report, args.out):
        print(note)
    return report


if __name__ == "__main__":
    main()
