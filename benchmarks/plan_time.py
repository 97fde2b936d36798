"""Every candidate of the layer's plan (convlora_kernels.plan), timed side by side.

    python benchmarks/plan_time.py                       # CPU, fp32, the CPU target shapes
    python benchmarks/plan_time.py --device cuda         # bf16, SAM's ViT-B shapes
    python benchmarks/plan_time.py --out plans.json      # also write the winners

Per shape and fused backend: the forward alone under each forward candidate
(CONVLORA_LAYER_FORWARD), and forward+backward under each combination of candidates (with
CONVLORA_LAYER_DY and CONVLORA_LAYER_DX), interleaved with plain eager LoRA and the frozen
linear. Each row is a
ratio to plain LoRA and to the frozen linear (on a GPU also microseconds, with the card
named). The winner of each switch is the candidate with the fewest modeled bytes unless
another one's time summed over the shapes is more than 2% smaller; ``--out`` writes them,
per (device type, backend), in the form of the MEASURED table of convlora_kernels/plan.py,
with the card, torch version and commit.
The last line, "RESULT: ...", names the winners.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch

from convlora_kernels import _switches, conv_lora_linear, plan

from benchlib import common, measure

SHAPES = {
    # name: (batch, H, W, C, r)
    "cuda": [("global-4x64x64-C768-r8", 4, 64, 64, 768, 8),
             ("window-100x14x14-C768-r8", 100, 14, 14, 768, 8),
             ("global-4x64x64-C1280-r8", 4, 64, 64, 1280, 8)],
    "cpu": [("cpu-1x32x32-C768-r8", 1, 32, 32, 768, 8),
            ("cpu-1x64x64-C768-r8", 1, 64, 64, 768, 8)],
}


SIGNIFICANT = 0.02  # a measured winner replaces the modeled choice when this much faster


def _under(env, fn):
    """fn with the switches of ``env`` forced for the call."""
    def call(inp):
        with _switches.forced(env):
            return fn(inp)
    return call


def _layer(backend):
    return lambda inp: conv_lora_linear(*common._conv_lora_args(inp), backend=backend,
                                        check_expert_index=False)


def _runnable(candidates, backend):
    return [c for c in candidates if plan.unavailable(c, backend) is None]


def _label(fwd, dy=None, dx=None):
    return f"{fwd}" if dy is None else f"{fwd} + {dy} + {dx}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=None, help="default: 30 on CUDA, 11 on CPU")
    p.add_argument("--out", default=None, help="write the winners here (JSON)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    repeats = args.repeats or (30 if gpu else 11)
    warm = 3 if gpu else 1
    card = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"{card}, {dtype}, torch {torch.__version__}")
    backends = common.fused_backends(device)
    if not backends:
        print("RESULT: no fused backend runs here")
        return 4
    totals = {}  # (backend, switch, candidate) -> summed median ms over the shapes
    for name, b, h, w, c, r in SHAPES["cuda" if gpu else "cpu"]:
        shape = common.Shape(name, b, h, w, c, r)
        inputs = [common.make_inputs(shape, device, dtype, seed=s) for s in range(2)]
        print(f"\n{name} (token routing, bilinear), {len(backends)} backend(s)")
        for backend in backends:
            fwds, dys, dxs = (_runnable(names, backend) for _, names in plan.SWITCHES)
            fwd_fns = {_label(f): _under({plan.FORWARD_ENV: f}, _layer(backend))
                       for f in fwds}
            both_fns = {_label(f, d, x): _under({plan.FORWARD_ENV: f, plan.DY_ENV: d,
                                                 plan.DX_ENV: x}, _layer(backend))
                        for f, d, x in itertools.product(fwds, dys, dxs)}
            peers = {common.PLAIN_LORA: common.plain_lora, common.LINEAR: common.frozen_linear}
            for backward, fns in ((False, fwd_fns), (True, both_fns)):
                fns = dict(fns, **peers)
                res = measure.time_group(fns, inputs, backward, {k: warm for k in fns},
                                         repeats)
                med = {k: v.get("median_ms") for k, v in res.items()}
                what = "fwd+bwd" if backward else "fwd"
                print(f"  [{backend}] {what}")
                for k, ms in med.items():
                    if ms is None:
                        print(f"    {k:40s} error: {res[k]['error']}")
                        continue
                    us = f"{ms * 1e3:9.1f} us  " if gpu else ""
                    print(f"    {k:40s} {us}{ms / med[common.PLAIN_LORA]:6.3f} x plain LoRA  "
                          f"{ms / med[common.LINEAR]:6.3f} x frozen linear")
                for k in fns:
                    if k in peers or med[k] is None:
                        continue
                    # the forward decides the forward switch; fwd+bwd, summed over the
                    # other switches' candidates, the dy and dx switches
                    if backward:
                        _, d, x = k.split(" + ")
                        keys = [(backend, plan.DY_ENV, d), (backend, plan.DX_ENV, x)]
                    else:
                        keys = [(backend, plan.FORWARD_ENV, k)]
                    for key in keys:
                        totals[key] = totals.get(key, 0.0) + med[k]
    winners = {}
    for backend in backends:
        for switch, names in plan.SWITCHES:
            timed = {c: totals[(backend, switch, c)] for c in names
                     if (backend, switch, c) in totals}
            if not timed:
                continue
            # The modeled choice stands unless another candidate is clearly faster: a
            # difference inside run-to-run noise is no reason to leave the model.
            model = plan.by_model(_runnable(names, backend))
            best = min(timed, key=timed.get)
            if model in timed and timed[best] > (1 - SIGNIFICANT) * timed[model]:
                best = model
            winners.setdefault(backend, {})[switch] = best
    print()
    for backend, entry in winners.items():
        for switch, cand in entry.items():
            others = ", ".join(f"{c} {totals[(backend, switch, c)]:.3f} ms"
                               for (bk, sw, c) in totals if bk == backend and sw == switch)
            print(f"[{backend}] {switch}={cand}  (summed medians: {others})")
    if args.out:
        report = dict(card=card, device_type=device.type, dtype=str(dtype),
                      torch=torch.__version__, commit=os.environ.get("CONVLORA_BENCH_COMMIT"),
                      repeats=repeats, shapes=[s[0] for s in SHAPES["cuda" if gpu else "cpu"]],
                      measured={f"{device.type}/{b}": e for b, e in winners.items()},
                      summed_median_ms={f"{b}/{s}/{c}": ms for (b, s, c), ms in totals.items()})
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    print("RESULT: " + "; ".join(f"{b}: " + ", ".join(f"{s}={c}" for s, c in e.items())
                                 for b, e in winners.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
