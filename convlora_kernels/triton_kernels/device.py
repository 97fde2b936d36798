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


# One int32 counter per (device, stream) for kernels whose last program to finish reduces
# the other programs' partial sums (last_program in the kernels): zero between launches,
# since that program sets it back to 0. Launches on one stream run in order, so one counter
# serves every such kernel there; a launch on another stream gets its own. Never freed: a
# captured CUDA graph keeps reading the address it captured.
_TICKETS: Dict[Tuple[str, Optional[int], int], torch.Tensor] = {}
_TICKETS_LOCK = threading.Lock()


def ticket_counter(device: torch.device) -> torch.Tensor:
    """The zeroed (1,) int32 counter of ``device`` and its current stream (above)."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device.type, device.index, stream)
    counter = _TICKETS.get(key)
    if counter is None:
        with _TICKETS_LOCK:
            counter = _TICKETS.get(key)
            if counter is None:
                counter = torch.zeros(1, dtype=torch.int32, device=device)
                _TICKETS[key] = counter
    return counter
