"""Hooks for the tests and the GPU check, kept out of the public surface.

    gelu_probe    exact GELU by the extension's shared host/device math (a build check)
    gelu_slope_probe   the stencils' GELU and slope, as a float32 or a 16-bit call has them
"""

from __future__ import annotations

import functools

import torch

from . import _ext


@functools.lru_cache(maxsize=None)
def _register_probe_fake() -> None:
    torch.library.register_fake("convlora::gelu_probe")(lambda x: torch.empty_like(x))
    torch.library.register_fake("convlora::gelu_slope_probe")(
        lambda x, sixteen_bit: (torch.empty_like(x), torch.empty_like(x)))


def gelu_probe(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU computed by the extension's shared host/device math (a build check)."""
    from .ops import BackendUnavailableError

    mod, why = _ext.load()
    if mod is None:
        raise BackendUnavailableError(why)
    _register_probe_fake()
    return torch.ops.convlora.gelu_probe(x)


def gelu_slope_probe(x: torch.Tensor, sixteen_bit: bool):
    """(GELU(x), GELU'(x)) for float32 x as the stencils compute them for a call on float32
    inputs (the exact form) or, with sixteen_bit, on float16 or bfloat16 ones."""
    from .ops import BackendUnavailableError

    mod, why = _ext.load()
    if mod is None:
        raise BackendUnavailableError(why)
    _register_probe_fake()
    return torch.ops.convlora.gelu_slope_probe(x, sixteen_bit)
