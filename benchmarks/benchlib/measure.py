"""How each provider is measured: time, peak memory and activation memory.

Times: CUDA events around each call on a GPU (after warm-up), perf_counter on a CPU;
the inputs are rotated between calls so caches do not flatter; the median is reported.
"""

from __future__ import annotations

import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional

import torch

from .common import TRAINABLE

MiB = float(2 ** 20)


def prepare(inputs: List[Dict[str, torch.Tensor]], backward: bool) -> None:
    """Trainable tensors get requires_grad for fwd+bwd (the base weight stays frozen)."""
    for inp in inputs:
        for k in TRAINABLE:
            inp[k].requires_grad_(backward)


def step(fn: Callable, inp: Dict[str, torch.Tensor], backward: bool, dy=None):
    """One call: the forward alone (no graph), or forward + backward to every trainable
    input the provider uses, with cotangent ``dy``."""
    if not backward:
        with torch.no_grad():
            return fn(inp)
    y = fn(inp)
    grads = [inp[k] for k in TRAINABLE if inp[k].requires_grad]
    return torch.autograd.grad(y, grads, dy if dy is not None else torch.ones_like(y),
                               allow_unused=True)


def cotangent(inp: Dict[str, torch.Tensor], seed: int = 0) -> torch.Tensor:
    """A seeded dy shaped like the layer's output, x.shape[:-1] + (C_out,)."""
    x = inp["x"]
    g = torch.Generator(device="cpu").manual_seed(seed)
    shape = tuple(x.shape[:-1]) + (inp["weight"].shape[0],)
    return torch.randn(shape, generator=g).to(device=x.device, dtype=x.dtype)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def error_text(e: BaseException) -> str:
    """One line for a table: the exception's type and the first line of its message."""
    msg = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {msg}"


def _time_call(fn: Callable, inp, backward: bool, dy, device: torch.device) -> float:
    """One call in milliseconds: CUDA events on a GPU, perf_counter on a CPU."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        step(fn, inp, backward, dy)
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    step(fn, inp, backward, dy)
    return (time.perf_counter() - t0) * 1e3


def time_group(fns: Dict[str, Callable], inputs: List[Dict[str, torch.Tensor]],
               backward: bool, warmup: Dict[str, int], repeats: int) -> Dict[str, dict]:
    """Median, min and max of one call (ms) for each provider of one shape and mode.

    Interleaved: each round times every provider once, in turn, so a slow moment of a
    shared machine hits them all alike. Every call takes the next of ``inputs`` (rotated
    across providers too), so no call finds its inputs in a cache the previous one warmed.
    A provider that raises gets {"error": ...} and the others go on.
    """
    prepare(inputs, backward)
    device = inputs[0]["x"].device
    dy = cotangent(inputs[0]) if backward else None
    calls = 0
    out: Dict[str, dict] = {}
    times: Dict[str, List[float]] = {}
    for name, fn in fns.items():
        try:
            for _ in range(warmup[name]):
                step(fn, inputs[calls % len(inputs)], backward, dy)
                calls += 1
            _sync(device)
            times[name] = []
        except Exception as e:
            traceback.print_exc(file=sys.stderr)
            out[name] = dict(error=error_text(e))
    for _ in range(repeats):
        for name in list(times):
            try:
                times[name].append(_time_call(fns[name], inputs[calls % len(inputs)], backward,
                                              dy, device))
            except Exception as e:
                traceback.print_exc(file=sys.stderr)
                out[name] = dict(error=error_text(e))
                del times[name]
            calls += 1
    for name, ts in times.items():
        out[name] = dict(median_ms=statistics.median(ts), min_ms=min(ts), max_ms=max(ts),
                         repeats=repeats, warmup=warmup[name])
    return {name: out[name] for name in fns}


def peak_memory_mb(fn: Callable, inp: Dict[str, torch.Tensor], backward: bool) -> Optional[float]:
    """Peak CUDA memory of one call above what was allocated before it (MiB); None on CPU."""
    device = inp["x"].device
    if device.type != "cuda":
        return None
    dy = cotangent(inp) if backward else None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = step(fn, inp, backward, dy)
    _sync(device)
    del out
    return (torch.cuda.max_memory_allocated(device) - base) / MiB


def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr()), st.nbytes()


def saved_for_backward(fn: Callable, inp: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Activation memory of one training forward (MiB), from the tensors autograd saves
    for backward (torch.autograd.graph.saved_tensors_hooks), each storage counted once.

    saved_mb: everything saved; saved_new_mb: less the storages of the inputs and
    weights, i.e. what the layer itself keeps alive; retained_mb (CUDA only): memory
    still allocated while the graph lives, less the output, which also counts tensors a
    backend keeps outside autograd's saved tensors.
    """
    prepare([inp], True)
    device = inp["x"].device
    seen: Dict[tuple, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key, nbytes = _storage_key(t)
            seen[key] = max(seen.get(key, 0), nbytes)
        return t

    _sync(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(inp)
    _sync(device)
    retained = None
    if before is not None:
        out_bytes = y.untyped_storage().nbytes()
        retained = (torch.cuda.memory_allocated(device) - before - out_bytes) / MiB
    del y
    inputs = {_storage_key(t)[0] for t in inp.values() if isinstance(t, torch.Tensor)}
    total = sum(seen.values())
    new = sum(n for k, n in seen.items() if k not in inputs)
    return dict(saved_mb=total / MiB, saved_new_mb=new / MiB, retained_mb=retained)
