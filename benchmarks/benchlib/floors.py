"""The physical floor of each measured time: bytes over bandwidth or flops over matmul
rate, whichever is larger, with both rates measured on the device at the start of a run.

The counting model (what an ideal single-pass layer must move and compute) is written
out in benchmarks/NOTES.md; ``counts`` below is that model term by term, and a run's
JSON keeps every term so a reader can check it.
"""

from __future__ import annotations

import time
from typing import Dict

import torch

PROBLEMS = ("conv-lora", "lora", "linear")


def _timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Best time of one call in seconds (a floor wants the rate the device can reach)."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def measure_rates(device, dtype: torch.dtype) -> Dict[str, object]:
    """Achievable bandwidth (bytes/s, a large device copy: read + write) and matmul rate
    (flop/s, a large square GEMM in ``dtype``) on ``device``."""
    device = torch.device(device)
    gpu = device.type == "cuda"
    copy_bytes = (1 << 30) if gpu else (128 << 20)  # well past any cache
    n = 8192 if gpu else 1536
    buffers = [torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).fill_(1.0)
               for _ in range(2)]
    t_copy = _timed(lambda: buffers[1].copy_(buffers[0]), device, repeats=20 if gpu else 5,
                    warmup=3 if gpu else 1)
    buffers.clear()
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    t_mm = _timed(lambda: torch.mm(a, b), device, repeats=20 if gpu else 3, warmup=3 if gpu else 1)
    return dict(
        bandwidth_bytes_per_s=2 * copy_bytes / t_copy,
        matmul_flop_per_s=2 * n ** 3 / t_mm,
        method=(f"bandwidth: best of copy_ of {copy_bytes >> 20} MiB (bytes read + written); "
                f"matmul: best of torch.mm {n}x{n}x{n} in {str(dtype).replace('torch.', '')}"),
    )


def stencil_flops_per_token(rank: int, scales) -> float:
    """Flops of one token's expert (bilinear), averaged over the experts: one 3x3 conv
    output (odd scale) or four (even scale), each 9 r^2 multiply-adds."""
    outputs = [1 if s % 2 else 4 for s in scales]
    return 2 * 9 * rank * rank * sum(outputs) / len(outputs)


def counts(shape: dict, mode: str, problem: str, elem_bytes: int, index_bytes: int) -> dict:
    """Bytes and flops an ideal implementation of ``problem`` needs for one call.

    shape: Shape.as_dict(); mode: "fwd" or "fwd+bwd". Returns {"bytes", "flops",
    "terms": {name: (bytes, flops)}} with the terms of NOTES.md.
    """
    if problem not in PROBLEMS:
        raise ValueError(f"problem: expected one of {PROBLEMS}, got {problem!r}")
    if mode not in ("fwd", "fwd+bwd"):
        raise ValueError(f"mode: expected 'fwd' or 'fwd+bwd', got {mode!r}")
    n_tok, c, d, r = shape["tokens"], shape["channels"], shape["out_features"], shape["rank"]
    experts = shape["num_experts"]
    e, q = elem_bytes, index_bytes
    lora = problem in ("lora", "conv-lora")
    conv = problem == "conv-lora"
    conv_params = experts * (r * r * 9 + r)
    stencil = n_tok * stencil_flops_per_token(r, shape["scales"])
    terms = {
        "x read": (n_tok * c * e, 0),
        "y write": (n_tok * d * e, 0),
        "W0, b0 read": ((d * c + d) * e, 0),
        "base GEMM x W0^T": (0, 2 * n_tok * c * d),
    }
    if lora:
        terms["A, B read"] = ((r * c + d * r) * e, 0)
        terms["z = x A^T, y += s u B^T"] = (0, 2 * n_tok * r * (c + d))
    if conv:
        terms["expert_index read"] = (n_tok * q, 0)
        terms["conv params read"] = (conv_params * e, 0)
        terms["expert stencil"] = (0, stencil)
    if mode == "fwd+bwd":
        terms["dy read"] = (n_tok * d * e, 0)
        terms["dx write"] = (n_tok * c * e, 0)
        terms["W0 re-read"] = (d * c * e, 0)
        terms["dx GEMM dy W0"] = (0, 2 * n_tok * d * c)
        if lora:
            terms["x re-read (dA; z, u recomputed)"] = (n_tok * c * e, 0)
            terms["A, B re-read, dA, dB write"] = (2 * (r * c + d * r) * e, 0)
            terms["du, dB, dA, dz A into dx"] = (0, 4 * n_tok * r * (c + d))
        if conv:
            terms["expert_index re-read"] = (n_tok * q, 0)
            terms["conv params re-read, grads write"] = (2 * conv_params * e, 0)
            terms["stencil backward (input and weight)"] = (0, 2 * stencil)
    return dict(bytes=sum(b for b, _ in terms.values()), flops=sum(f for _, f in terms.values()),
                terms={k: list(v) for k, v in terms.items()})


def floor(count: dict, rates: dict) -> dict:
    """max(bytes / bandwidth, flops / matmul rate), in milliseconds, and which bound."""
    t_mem = count["bytes"] / rates["bandwidth_bytes_per_s"]
    t_flop = count["flops"] / rates["matmul_flop_per_s"]
    return dict(ms=1e3 * max(t_mem, t_flop), memory_ms=1e3 * t_mem, compute_ms=1e3 * t_flop,
                bound="memory" if t_mem >= t_flop else "compute")
