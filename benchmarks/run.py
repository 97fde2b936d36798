"""Microbenchmark: Conv-LoRA backends against unfused PyTorch, plain LoRA and the frozen linear.

    python benchmarks/run.py                         # CPU subset, a few minutes on 2 cores
    python benchmarks/run.py --device cuda --preset sam --dtype bfloat16 --out results/x.json

Prints a ratio table per shape and mode: each provider's time over the frozen linear's
(the floor of any adapter) and the reference's time over the provider's. On CPU only
ratios are printed; the JSON holds the raw medians too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import CPU_SHAPES, make_inputs, peak_memory_mb, providers, sam_shapes, time_provider  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=os.path.dirname(os.path.abspath(__file__))
                              ).stdout.strip() or None
    except OSError:
        return None


def environment(device) -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), commit=_commit(),
               device=str(device), cpu=platform.processor() or platform.machine(),
               threads=torch.get_num_threads())
    if device.type == "cuda":
        env.update(card=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
        try:
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True).stdout.strip()
        except OSError:
            pass
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shapes = CPU_SHAPES if args.preset == "cpu" else sam_shapes(args.batch)
    if args.only:
        shapes = [s for s in shapes if args.only in s.name]
    provs = providers(device, compile_reference=args.compile)
    results = []
    total = len(shapes) * 2 * len(provs)
    done = 0
    for shape in shapes:
        inputs = [make_inputs(shape, device, dtype, seed=i) for i in range(args.rotate)]
        for backward in (False, True):
            mode = "fwd+bwd" if backward else "fwd"
            for name, fn in provs.items():
                done += 1
                print(f"[{done}/{total}] {shape.name} {mode} {name}", file=sys.stderr, flush=True)
                try:
                    t = time_provider(fn, inputs, backward, warmup=args.warmup,
                                      repeats=args.repeats)
                    t["peak_mb"] = peak_memory_mb(fn, inputs[0], backward)
                except Exception as e:  # one failing provider must not hide the others
                    t = dict(error=f"{type(e).__name__}: {e}")
                results.append(dict(shape=shape.as_dict(), mode=mode, provider=name,
                                    dtype=args.dtype, **t))
    return dict(environment=environment(device), results=results)


def ratio_table(report: dict, show_ms: bool) -> str:
    rows = report["results"]
    lines = []
    keys = sorted({(r["shape"]["name"], r["mode"]) for r in rows},
                  key=lambda k: ([r["shape"]["name"] for r in rows].index(k[0]), k[1] != "fwd"))
    for shape_name, mode in keys:
        group = {r["provider"]: r for r in rows
                 if r["shape"]["name"] == shape_name and r["mode"] == mode}
        floor = group.get("frozen-linear", {}).get("median_ms")
        ref = group.get("conv-lora[reference]", {}).get("median_ms")
        lines.append(f"\n{shape_name}  {mode}")
        head = f"  {'provider':32s} {'x frozen linear':>16s} {'speedup vs ref':>15s}"
        lines.append(head + (f" {'median ms':>10s}" if show_ms else ""))
        for name, r in group.items():
            if "error" in r:
                lines.append(f"  {name:32s} {r['error']}")
                continue
            m = r["median_ms"]
            over_floor = f"{m / floor:16.2f}" if floor else f"{'-':>16s}"
            speedup = f"{ref / m:15.2f}" if ref else f"{'-':>15s}"
            row = f"  {name:32s} {over_floor} {speedup}"
            lines.append(row + (f" {m:10.3f}" if show_ms else ""))
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES),
                   help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--preset", default=None, choices=["cpu", "sam"],
                   help="cpu: small shapes (default on CPU); sam: SAM ViT-B/L/H shapes")
    p.add_argument("--batch", type=int, default=4, help="images per batch for --preset sam")
    p.add_argument("--only", default=None, help="keep shapes whose name contains this")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rotate", type=int, default=2, help="input sets cycled through")
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    is_cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if is_cuda else "float32")
    args.preset = args.preset or ("sam" if is_cuda else "cpu")
    report = run(args)
    report["args"] = vars(args)
    print(ratio_table(report, show_ms=is_cuda))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
