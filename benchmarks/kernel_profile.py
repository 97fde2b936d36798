"""Where a call's GPU time goes: every CUDA kernel it launches, with its time (torch.profiler).

    python benchmarks/kernel_profile.py                 # CUDA: bf16, stencil_time.py's shapes
    python benchmarks/kernel_profile.py --shapes global-4x64x64-C768-r8

Per shape and call (the stencil ops alone as stencil_time.py calls them, at the per-token
bilinear shapes the composed-weight forward too (CONVLORA_STENCIL_MMA), the Triton
stencil under the layer's default switches, then the layer's forward+backward on the cuda
backend next to plain LoRA and the frozen linear), three times per call:
  alone      one call between two CUDA events after a synchronisation: what
             stencil_time.py reports, the host's launch work included where the GPU
             waits for it
  pipelined  many calls back to back between two events, over the count: the host's
             work hidden behind the GPU's wherever the GPU is the slower
  kernels    the sum of the call's kernel times (profiler, per call)
and the kernels themselves: launches per call and microseconds per call. "alone" well above
"kernels" says the call waits on the host (launch overhead, host-side preparation); the
kernel list says which kernel to look at. Needs a GPU: exit 4 (gpu_check.sh: SKIP) without.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stencil_time  # noqa: E402
from benchlib import common, measure  # noqa: E402


def _pipelined_us(fn, inputs, backward, dy, calls):
    measure._sync(inputs[0]["x"].device)
    t0 = time.perf_counter()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(calls):
        measure.step(fn, inputs[i % len(inputs)], backward, dy)
    end.record()
    host = (time.perf_counter() - t0) / calls * 1e6
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / calls, host


def _kernels(fn, inputs, backward, dy, calls):
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            measure.step(fn, inputs[i % len(inputs)], backward, dy)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if e.device_type != DeviceType.CUDA:
            continue
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = e.self_cuda_time_total
        rows.append((us / calls, e.count / calls, e.key))
    return sorted(rows, reverse=True)


def profile_call(name, fn, inputs, backward, calls):
    dy = measure.cotangent(inputs[0]) if backward else None
    for i in range(5):
        measure.step(fn, inputs[i % len(inputs)], backward, dy)
    alone_us = statistics.median(measure._time_call(fn, inputs[i % len(inputs)], backward, dy,
                                                    inputs[0]["x"].device)
                                 for i in range(calls)) * 1e3
    pipe_us, host_us = _pipelined_us(fn, inputs, backward, dy, calls)
    rows = _kernels(fn, inputs, backward, dy, calls)
    total = sum(r[0] for r in rows)
    print(f"  {name}{' fwd+bwd' if backward else ''}: alone {alone_us:.1f} us, pipelined "
          f"{pipe_us:.1f} us (host {host_us:.1f} us per call), kernels {total:.1f} us in "
          f"{sum(r[1] for r in rows):.0f} launches")
    for us, n, key in rows:
        print(f"      {us:8.1f} us  x{n:4.1f}  {key[:110]}")
    return alone_us, pipe_us, total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="", help="comma-separated names (default: all)")
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("RESULT: SKIP no GPU: nothing to profile")
        return 4
    device, dtype = torch.device("cuda"), torch.bfloat16
    want = [s.strip() for s in args.shapes.split(",") if s.strip()]
    print(f"{torch.cuda.get_device_name()}, {dtype}, torch {torch.__version__}")
    result = None
    for name, shape, interp in stencil_time.shapes("cuda"):
        if want and name not in want:
            continue
        inputs = [common.make_inputs(shape, device, dtype, seed=s) for s in range(2)]
        print(f"\n{name} ({shape.gating} routing, {interp})")
        fns = stencil_time._stencil_fns(inputs[0], interp)
        if interp == "bilinear" and shape.gating == "token":  # and the composed weights
            fns.update(stencil_time._stencil_fns(inputs[0], interp, suffix=" mma", mma=True))
        for k, fn in fns.items():
            a, pp, kern = profile_call(k, fn, inputs, False, args.calls)
            if result is None and k == "stencil-fwd":
                result = f"{name}: stencil fwd alone {a:.1f} us, pipelined {pp:.1f} us, " \
                         f"kernels {kern:.1f} us"
        # the Triton stencil under the layer's default switches
        for k, fn in stencil_time._triton_stencil_fns(inputs[0], interp, defaults=True).items():
            profile_call(k, fn, inputs, False, args.calls)
        measure.prepare(inputs, True)
        for k, fn in {"conv-lora[cuda]": stencil_time._layer("cuda", interp),
                      common.PLAIN_LORA: common.plain_lora,
                      common.LINEAR: common.frozen_linear}.items():
            profile_call(k, fn, inputs, True, args.calls)
    print(f"\nRESULT: {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
