"""Hooks for the tests and the GPU check, kept out of the public surface.

    gelu_probe    exact GELU by the extension's shared host/device math (a build check)
"""

from __future__ import annotations

import functools

import torch

from . import _ext


@functools.lru_cache(maxsize=None)
def _register_probe_fake() -> None:
    torch.library.register_fake("convlora::gelu_probe")(lambda x: torch.empty_like(x))


def gelu_probe(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU computed by the extension's shared host/device math (a build check)."""
    from .ops import BackendUnavailableError

    mod, why = _ext.load()
    if mod is None:
        raise BackendUnavailableError(why)
    _register_probe_fake()
    return torch.ops.convlora.gelu_probe(x)
