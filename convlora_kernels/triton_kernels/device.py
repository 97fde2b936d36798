"""Triton launches go to the current CUDA device, not to their tensors' device: every
host function that launches is wrapped so its tensors' device is current while it runs
(and so its launches are ordered on that device's current stream, with torch's own ops
on those tensors)."""

from __future__ import annotations

import functools
import threading
from typing import Dict, Optional, Tuple

import torch


def on_tensors_device(fn):
    """fn run with the CUDA device of its first tensor argument current; unchanged for CPU
    tensors (the interpreter), meta tensors, and when that device is current already."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if dev is None or dev.type != "cuda" or dev.index is None or \
                dev.index == torch.cuda.current_device():
            return fn(*args, **kwargs)
        with torch.cuda.device(dev):
            return fn(*args, **kwargs)

    return wrapped


# Buffers that are zero between launches, per (device, stream, size): an int32 counter for
# kernels whose last program to finish reduces the other programs' partial sums
# (router.last_program), and float32 accumulators that a kernel's programs add into with
# atomics and its last program reads out and zeroes again. Launches on one stream run in
# order, so one buffer serves every such kernel there; a launch on another stream gets its
# own. Never freed: a captured CUDA graph keeps reading the addresses it captured (a model
# has a few layer shapes, so a few buffers).
_ZEROED: Dict[Tuple[str, Optional[int], int, torch.dtype, int], torch.Tensor] = {}
_ZEROED_LOCK = threading.Lock()


def zeroed(device: torch.device, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """The (numel,) buffer of ``device`` and its current stream that is zero between
    launches (above)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream, dtype, numel)
    buf = _ZEROED.get(key)
    if buf is None:
        with _ZEROED_LOCK:
            buf = _ZEROED.get(key)
            if buf is None:
                buf = torch.zeros(numel, dtype=dtype, device=device)
                _ZEROED[key] = buf
    return buf


def ticket_counter(device: torch.device) -> torch.Tensor:
    """The (1,) int32 counter of ``device`` and its current stream, zero between launches."""
    return zeroed(device, 1, torch.int32)
