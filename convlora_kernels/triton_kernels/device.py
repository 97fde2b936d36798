"""Triton launches go to the current CUDA device, not to their tensors' device: every
host function that launches is wrapped so its tensors' device is current while it runs
(and so its launches are ordered on that device's current stream, with torch's own ops
on those tensors)."""

from __future__ import annotations

import functools

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
