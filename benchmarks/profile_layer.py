"""Where one training step of ConvLoRALinear spends its time, by part of the layer.

    python benchmarks/profile_layer.py                      # compatibility mode, CPU
    python benchmarks/profile_layer.py --gating token --interpolation bilinear
    python benchmarks/profile_layer.py --device cuda --dtype bfloat16

A forward and backward with a dense output gradient (the module in training mode, router
included), profiled with torch.profiler over --steps steps after --warmup, at the
authors' shapes: (1, 64, 64, 768 -> 2304) and (25, 14, 14, 768 -> 2304), r = 3, 8 experts,
alpha 32 (--batch scales both). Self time per op is summed into parts:

    base GEMMs        x W0ᵀ + b and dy W0 (every adapter pays them)
    rank-r GEMMs      x Aᵀ, u Bᵀ, dy B, uᵀ dy, dz A, dzᵀ x (one side has r columns)
    stencil fwd/bwd   the expert convolutions (convlora::stencil_* or the Triton kernels)
    router            the routing op, its backward and the aux loss
    other             copies, adds, reshapes, autograd bookkeeping

and printed with the step's median wall time next to the frozen linear's (x W0ᵀ + b and its
input gradient alone) and the module's composition with its router outside the layer's op
(z = x Aᵀ and the router as their own autograd nodes, then conv_lora_linear with z), all
measured in the same run.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from convlora_kernels import ConvLoRALinear, conv_lora_linear

from benchlib import common

SHAPES = {"global": (1, 64, 64), "window": (25, 14, 14)}


def _part(name: str, shapes, r: int) -> str:
    if "stencil_fwd" in name or "stencil_forward" in name:
        return "stencil fwd"
    if "stencil_bwd" in name or "stencil_backward" in name or "stencil_scatter" in name:
        return "stencil bwd"
    if name in ("convlora_layer::route", "convlora_layer::route_backward") or \
            "cv_squared" in name:
        return "router"
    if name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::linear", "aten::matmul"):
        dims = [d for s in shapes or [] for d in s]
        return "rank-r GEMMs" if r in dims else "base GEMMs"
    return "other"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _interleaved_medians(fns, device, warmup, steps):
    """Median ms of each function, timed in turn within each round (this machine's speed
    drifts over a run, so side by side means interleaved)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, ts in zip(fns, times):
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            ts.append(time.perf_counter() - t)
    return [sorted(ts)[len(ts) // 2] * 1e3 for ts in times]


def profile_shape(name, bhw, args):
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    b, h, w = bhw
    b *= args.batch
    torch.manual_seed(0)
    c = args.channels
    layer = ConvLoRALinear(c, 3 * c, r=args.rank, num_experts=8, alpha=32, gating=args.gating,
                           interpolation=args.interpolation, backend=args.backend,
                           device=device, dtype=dtype).train()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.1)  # every term of the backward is live
    x = torch.randn(b, h, w, c, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(b, h, w, 3 * c, device=device, dtype=dtype)
    lin = torch.nn.Linear(c, 3 * c, device=device, dtype=dtype).requires_grad_(False)

    def step():
        layer(x).backward(dy)

    def frozen():
        lin(x).backward(dy)

    def router_outside():  # the module's composition before its router moved into the op
        z = F.linear(x, layer.lora_A)
        expert_index, _ = layer.router(z)
        conv_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                         layer.conv_weight, layer.conv_bias, expert_index, layer.scaling,
                         scales=layer.scales, interpolation=layer.interpolation,
                         backend=layer.backend, z=z, check_expert_index=False).backward(dy)

    ms, ms_lin, ms_out = _interleaved_medians((step, frozen, router_outside), device,
                                              args.warmup, args.steps)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        for _ in range(args.steps):
            step()
        _sync(device)
    parts = {}
    for ev in prof.key_averages(group_by_input_shape=True):
        t = ev.self_device_time_total if device.type == "cuda" else ev.self_cpu_time_total
        if t <= 0:
            continue
        part = _part(ev.key, ev.input_shapes, args.rank)
        parts[part] = parts.get(part, 0.0) + t / 1e3 / args.steps
    total = sum(parts.values())
    print(f"\n{name} ({b}, {h}, {w}, {c} -> {3 * c}), r = {args.rank}, gating={args.gating}, "
          f"interpolation={args.interpolation}, backend={args.backend}, {args.dtype}")
    print(f"  step (forward + backward, median of {args.steps}): {ms:.1f} ms; "
          f"frozen linear {ms_lin:.1f} ms; ratio {ms / ms_lin:.2f}")
    print(f"  the same with the router outside the layer's op: {ms_out:.1f} ms; ratio "
          f"{ms_out / ms_lin:.2f}")
    print(f"  {'part':16s} {'ms/step':>9s} {'share':>7s}   (profiled self time)")
    for part in ("base GEMMs", "rank-r GEMMs", "stencil fwd", "stencil bwd", "router", "other"):
        v = parts.get(part, 0.0)
        print(f"  {part:16s} {v:9.2f} {100 * v / total:6.1f}%")
    return dict(shape=name, step_ms=ms, frozen_ms=ms_lin, router_outside_ms=ms_out,
                parts=parts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES))
    p.add_argument("--backend", default="auto")
    p.add_argument("--gating", default="map", choices=("token", "map"))
    p.add_argument("--interpolation", default="bicubic", choices=("bilinear", "bicubic"))
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--channels", type=int, default=768)
    p.add_argument("--batch", type=int, default=1, help="images (windows: 25 per image)")
    p.add_argument("--shapes", default="global,window")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    return [profile_shape(n, SHAPES[n], args) for n in args.shapes.split(",")]


if __name__ == "__main__":
    main()
