"""Microbenchmark: Conv-LoRA backends against unfused PyTorch, plain LoRA and the frozen linear.

    python benchmarks/run.py                 # the machine's: the SAM shapes on a GPU,
                                             # else the CPU subset in fp32 (a few minutes)
    python benchmarks/run.py --device cuda   # SAM ViT-B/L/H shapes in bf16, CUDA events
    python benchmarks/run.py --device cpu    # the CPU subset, GPU or not
    python benchmarks/run.py --device cuda --preset gpu-check --compile \
        --compile-only global-C768-r8        # what benchmarks/gpu_check.sh runs
    python benchmarks/run.py --preset compat # the paper's setting against the authors' layer

Prints a ratio table per shape and mode (see benchmarks/benchlib/render.py for the columns) and
writes a JSON report with raw medians, floors, memory and the environment, plus a
markdown table and a PNG plot beside it (default: benchmarks/results/local/). On a CPU
only ratios are printed; absolute times are printed only for a GPU, with the card named.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import torch

from benchlib import common, envinfo, floors, measure, render

SCHEMA = 2


def _memory(prov, inputs, backward) -> dict:
    """Peak memory (GPU) and, for fwd+bwd, activation memory; errors are recorded."""
    try:
        row = dict(peak_mb=measure.peak_memory_mb(prov.fn, inputs[0], backward))
        if backward:
            row.update(measure.saved_for_backward(prov.fn, inputs[0]))
        return row
    except Exception as e:
        return dict(memory_error=measure.error_text(e))


def _floor_entry(count: dict, rates: dict) -> dict:
    return dict(floors.floor(count, rates), bytes=count["bytes"], flops=count["flops"],
                terms=count["terms"])


def plan(shapes, provs, args):
    """[(shape, backward, provider names)]: the groups timed together, in order, each with
    the providers that apply to its shape. The compiled reference goes last: its compiles
    take longest, and a time budget then costs only it."""
    names = list(provs)
    def compiled_on(shape):
        return common.COMPILED in names and (
            not args.compile_only or any(o in shape.name for o in args.compile_only.split(",")))

    def eager(shape):
        return [n for n in names if n != common.COMPILED and
                (provs[n].applies is None or provs[n].applies(shape))]

    first = [(shape, backward, eager(shape)) for shape in shapes for backward in (False, True)]
    last = [(shape, backward, [common.COMPILED]) for shape in shapes if compiled_on(shape)
            for backward in (False, True)]
    return first + last


def run(args, argv=(), on_group=None) -> dict:
    """Every provider on every shape of the preset, forward and forward+backward.

    The device's bandwidth and matmul rate are measured before and after the rows; each
    floor uses the higher of the two (a busy moment must not lower the floor)."""
    t_start = time.perf_counter()
    device = torch.device(args.device)
    dtype = common.DTYPES[args.dtype]
    torch.manual_seed(args.seed)
    shapes = common.preset_shapes(args.preset, args.batch)
    if args.only:
        shapes = [s for s in shapes if any(o in s.name for o in args.only.split(","))]
    provs = common.providers(device, compile_reference=args.compile,
                             authors=args.authors and any(common.authors_applies(s)
                                                          for s in shapes))
    command = shlex.join(["python", "benchmarks/run.py"] + list(argv))
    env = envinfo.environment(device, command)
    if common.AUTHORS in provs:  # where the authors' layer was read from
        env["authors_layer"] = common.authors_provider()[1]
    report = dict(schema=SCHEMA, environment=env, args=vars(args),
                  baselines=dict(reference=common.REFERENCE, linear=common.LINEAR,
                                 authors=common.AUTHORS),
                  rates=floors.measure_rates(device, dtype), results=[])
    groups = plan(shapes, provs, args)
    current, inputs = None, None
    for done, (shape, backward, names) in enumerate(groups, 1):
        mode = "fwd+bwd" if backward else "fwd"
        if args.time_budget and time.perf_counter() - t_start > args.time_budget:
            measured = {n: dict(skipped=f"time budget of {args.time_budget:.0f} s spent")
                        for n in names}
        else:
            if shape != current:  # the same seeds give the same tensors if a shape comes back
                inputs = None
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                inputs = [common.make_inputs(shape, device, dtype, seed=args.seed + i)
                          for i in range(args.rotate)]
                current = shape
            print(f"[{done}/{len(groups)}] {shape.name} {mode}: {', '.join(names)}",
                  file=sys.stderr, flush=True)
            # torch.compile compiles on the first call and may recompile on the next ones
            warmup = {n: max(args.warmup, 3) if n == common.COMPILED else args.warmup
                      for n in names}
            measured = measure.time_group({n: provs[n].fn for n in names}, inputs, backward,
                                          warmup, args.repeats)
            for n, row in measured.items():
                if "error" not in row:
                    row.update(_memory(provs[n], inputs, backward))
        for n, row in measured.items():
            count = floors.counts(shape.as_dict(), mode, provs[n].problem, dtype.itemsize,
                                  common.INDEX_DTYPE.itemsize)
            report["results"].append(dict(shape=shape.as_dict(), mode=mode, provider=n,
                                          problem=provs[n].problem, dtype=args.dtype,
                                          floor=_floor_entry(count, report["rates"]), **row))
        if on_group:
            on_group(report)
    inputs = None
    # Table order: shapes as listed, fwd before fwd+bwd, providers as listed.
    order = {(s.name, b): i for i, (s, b) in enumerate((s, b) for s in shapes for b in (0, 1))}
    names = list(provs)
    report["results"].sort(key=lambda r: (order[(r["shape"]["name"], r["mode"] == "fwd+bwd")],
                                          names.index(r["provider"])))
    after = floors.measure_rates(device, dtype)
    report["rates_measured"] = [report["rates"], after]
    report["rates"] = dict(report["rates"], **{
        k: max(report["rates"][k], after[k])
        for k in ("bandwidth_bytes_per_s", "matmul_flop_per_s")})
    report["rates"]["method"] += "; the higher of a measurement before and after the rows"
    for row in report["results"]:
        row["floor"] = _floor_entry(row["floor"], report["rates"])
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
    p.add_argument("--device", default="auto",
                   help="auto (default): cuda when torch sees a GPU, else cpu; or cpu, cuda, "
                        "cuda:N")
    p.add_argument("--dtype", default=None, choices=sorted(common.DTYPES),
                   help=common.default_help("dtype"))
    p.add_argument("--preset", default=None, choices=common.PRESETS,
                   help="cpu: small shapes; sam: every SAM ViT-B/L/H shape; gpu-check: the "
                        "ViT-B subset; smoke: tiny. " + common.default_help("preset"))
    p.add_argument("--batch", type=int, default=None, help="images per batch (SAM presets: 4)")
    p.add_argument("--only", default=None, help="keep shapes whose name contains one of "
                                                "these comma-separated strings")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(reference)")
    p.add_argument("--compile-only", default=None,
                   help="time the compiled reference only on shapes matching these strings")
    p.add_argument("--warmup", type=int, default=None, help=common.default_help("warmup"))
    p.add_argument("--repeats", type=int, default=None, help=common.default_help("repeats"))
    p.add_argument("--rotate", type=int, default=None,
                   help="input sets cycled through; " + common.default_help("rotate"))
    p.add_argument("--authors", action=argparse.BooleanOptionalAction, default=True,
                   help="time the authors' layer (autogluon.multimodal's ConvLoRALinear, "
                        "read from its wheel: benchmarks/benchlib/authors.py) on map-routing bicubic "
                        "shapes; default: on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds; rows not started by then are recorded as skipped")
    p.add_argument("--out", default=None, help="JSON report path; .md and .png go beside it "
                   "(default: benchmarks/results/local/<device>-<dtype>-<preset>.json)")
    args = p.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
        print(f"device: {args.device} ("
              + ("torch sees a GPU: the SAM shapes in bf16" if args.device == "cuda"
                 else "torch sees no GPU: the CPU subset in float32") + "; --device to choose)",
              flush=True)
    args = argparse.Namespace(**common.fill_defaults(vars(args), args.device))
    if args.out is None:
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "local",
                                f"{args.device.split(':')[0]}-{args.dtype}-{args.preset}.json")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    report = run(args, argv, on_group=lambda r: _write_json(r, args.out))
    _write_json(report, args.out)
    print(render.text_table(report))
    print(f"\nwrote {args.out}")
    for note in render.write_all(report, args.out):
        print(note)
    return report


if __name__ == "__main__":
    main()
