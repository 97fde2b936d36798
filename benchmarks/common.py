"""Shared pieces of the microbenchmarks: shapes, providers and timing.

A provider is a callable taking the inputs dict and returning the layer output;
every provider of one shape sees the same tensors, so they are timed side by side.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from convlora_kernels import available_backends, conv_lora_linear, conv_lora_linear_ref


@dataclass(frozen=True)
class Shape:
    """One benchmark problem: a (B, H, W, C) map through a C -> 3C qkv layer."""

    name: str
    batch: int
    height: int
    width: int
    channels: int
    rank: int
    num_experts: int = 8
    gating: str = "token"

    @property
    def tokens(self) -> int:
        return self.batch * self.height * self.width

    def as_dict(self):
        return dict(asdict(self), out_features=3 * self.channels, tokens=self.tokens)


# SAM's image encoder: global blocks see (B, 64, 64, C), windowed blocks (B*25, 14, 14, C).
def sam_shapes(batch: int, channels=(768, 1024, 1280), ranks=(3, 8, 32)) -> List[Shape]:
    out = []
    for c in channels:
        for r in ranks:
            out.append(Shape(f"global-C{c}-r{r}", batch, 64, 64, c, r))
            out.append(Shape(f"window-C{c}-r{r}", batch * 25, 14, 14, c, r))
    return out


# Small enough for a 2-core CPU: the layer shape of the CPU speed target.
CPU_SHAPES = [
    Shape("cpu-1x32x32-C768-r8", 1, 32, 32, 768, 8),
    Shape("cpu-1x32x32-C768-r8-map", 1, 32, 32, 768, 8, gating="map"),
    Shape("cpu-4x14x14-C768-r3", 4, 14, 14, 768, 3),
]


def make_inputs(shape: Shape, device, dtype, seed: int = 0) -> Dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    c, r, n = shape.channels, shape.rank, shape.num_experts

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)

    if shape.gating == "token":
        idx = torch.randint(0, n, (shape.batch, shape.height, shape.width), generator=g)
    else:
        idx = torch.randint(0, n, (shape.batch, 1, 1), generator=g).expand(
            shape.batch, shape.height, shape.width).contiguous()
    return dict(
        x=rnd(shape.batch, shape.height, shape.width, c),
        weight=rnd(3 * c, c, std=1 / math.sqrt(c)),
        bias=rnd(3 * c, std=0.1),
        lora_A=rnd(r, c, std=1 / math.sqrt(c)),
        lora_B=rnd(3 * c, r, std=0.1),
        conv_weight=rnd(n, r, r, 3, 3, std=1 / math.sqrt(9 * r)),
        conv_bias=rnd(n, r, std=0.1),
        expert_index=idx.to(device),
        scaling=32.0 / r,
    )


TRAINABLE = ("x", "lora_A", "lora_B", "conv_weight", "conv_bias")


def conv_lora_provider(backend: str) -> Callable:
    def run(inp):
        return conv_lora_linear(inp["x"], inp["weight"], inp["bias"], inp["lora_A"],
                                inp["lora_B"], inp["conv_weight"], inp["conv_bias"],
                                inp["expert_index"], inp["scaling"], backend=backend)
    return run


def plain_lora(inp):
    return F.linear(inp["x"], inp["weight"], inp["bias"]) + \
        inp["scaling"] * F.linear(F.linear(inp["x"], inp["lora_A"]), inp["lora_B"])


def frozen_linear(inp):
    return F.linear(inp["x"], inp["weight"], inp["bias"])


def providers(device, compile_reference: bool = False) -> Dict[str, Callable]:
    """Fused backends available here, the references, plain LoRA and the frozen linear."""
    out = {f"conv-lora[{b}]": conv_lora_provider(b)
           for b in available_backends(device) if b != "reference"}
    out["conv-lora[reference]"] = conv_lora_provider("reference")
    if compile_reference:
        compiled = torch.compile(conv_lora_linear_ref)
        out["conv-lora[reference+compile]"] = lambda inp: compiled(
            inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"],
            inp["conv_weight"], inp["conv_bias"], inp["expert_index"], inp["scaling"])
    out["plain-lora"] = plain_lora
    out["frozen-linear"] = frozen_linear
    return out


def _step(fn: Callable, inp: Dict[str, torch.Tensor], backward: bool, dy=None):
    if not backward:
        with torch.no_grad():
            return fn(inp)
    y = fn(inp)
    grads = [inp[k] for k in TRAINABLE if inp[k].requires_grad]
    return torch.autograd.grad(y, grads, dy if dy is not None else torch.ones_like(y),
                               allow_unused=True)


def time_provider(fn: Callable, inputs: List[Dict[str, torch.Tensor]], backward: bool,
                  warmup: int = 3, repeats: int = 15) -> Dict[str, float]:
    """Median and spread of one call, rotating through ``inputs`` so caches do not flatter.

    CUDA: CUDA events around each call; CPU: perf_counter. Returns milliseconds.
    """
    if backward:
        for inp in inputs:
            for k in TRAINABLE:
                inp[k].requires_grad_(True)
    x0 = inputs[0]["x"]
    dy = None
    if backward:
        with torch.no_grad():
            dy = torch.randn_like(fn(inputs[0]))
    is_cuda = x0.device.type == "cuda"
    for i in range(warmup):
        _step(fn, inputs[i % len(inputs)], backward, dy)
    times = []
    for i in range(repeats):
        inp = inputs[i % len(inputs)]
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            _step(fn, inp, backward, dy)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            _step(fn, inp, backward, dy)
            times.append((time.perf_counter() - t0) * 1e3)
    return dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                repeats=repeats)


def peak_memory_mb(fn: Callable, inp: Dict[str, torch.Tensor], backward: bool) -> Optional[float]:
    if inp["x"].device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    _step(fn, inp, backward)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20
