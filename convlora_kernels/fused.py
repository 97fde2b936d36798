"""The "cpu" and "cuda" backends: the fused stencil kernels of convlora_kernels._C
(torch.ops.convlora.stencil_fwd / stencil_bwd: one pass over z; the backward from the
forward's saved pre-activations, weight gradients in fp32, deterministic, no atomics)
between the layer's GEMMs (BLAS on CPU, cuBLAS on CUDA), composed and planned in
convlora_kernels.layer.

The stencil ops are also registered here with fake kernels and autograd, so ``stencil``
can be used (and torch.compile-traced) on its own.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from . import _ext, layer
from ._validate import MAX_FUSED_RANK, Problem

INTERPOLATION_CODES = layer.INTERPOLATION_CODES
PREACT_SLOTS = layer.PREACT_SLOTS  # saved pre-activations per token, by interpolation code


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    mod, why = _ext.load()
    if mod is None:
        return why
    if backend == "cuda" and not _ext.has_cuda_kernels():
        return ("convlora_kernels._C was built without CUDA kernels (no nvcc or a CPU build of "
                f"torch at build time); rebuild it with: {_ext.REBUILD}")
    _register()
    return None


@functools.lru_cache(maxsize=None)
def _register() -> None:
    """Fake kernels and autograd for the C++ stencil ops (once, after _C is loaded)."""

    @torch.library.register_fake("convlora::stencil_fwd")
    def _(z, expert_index, conv_weight, conv_bias, scales, interpolation, height, width,
          save_preact):
        shape = (z.shape[0], PREACT_SLOTS[interpolation], z.shape[1]) if save_preact else (0,)
        return torch.empty_like(z), z.new_empty(shape, dtype=layer._acc_dtype(z.dtype))

    @torch.library.register_fake("convlora::stencil_bwd")
    def _(du, z, preact, expert_index, conv_weight, conv_bias, scales, interpolation, height,
          width):
        acc = layer._acc_dtype(z.dtype)
        return (torch.empty_like(z), conv_weight.new_empty(conv_weight.shape, dtype=acc),
                conv_bias.new_empty(conv_bias.shape, dtype=acc))

    def setup_context(ctx, inputs, output):
        z, expert_index, conv_weight, conv_bias, scales, interpolation, height, width, _ = inputs
        ctx.save_for_backward(z, output[1], expert_index, conv_weight, conv_bias)
        ctx.mark_non_differentiable(output[1])
        ctx.meta = (scales, interpolation, height, width)

    def backward(ctx, du, _dpreact):
        z, preact, expert_index, conv_weight, conv_bias = ctx.saved_tensors
        if preact.numel() == 0:  # the forward was told not to keep them: recompute
            preact = torch.ops.convlora.stencil_fwd(z, expert_index, conv_weight, conv_bias,
                                                    *ctx.meta, True)[1]
        dz, dw, db = torch.ops.convlora.stencil_bwd(du.contiguous(), z, preact, expert_index,
                                                    conv_weight, conv_bias, *ctx.meta)
        return (dz, None, dw.to(conv_weight.dtype), db.to(conv_bias.dtype), None, None, None,
                None, None)

    torch.library.register_autograd("convlora::stencil_fwd", backward,
                                    setup_context=setup_context)


def stencil(z: torch.Tensor, expert_index: torch.Tensor, conv_weight: torch.Tensor,
            conv_bias: torch.Tensor, scales: Sequence[int], interpolation: str, height: int,
            width: int) -> torch.Tensor:
    """u = z + E_e(z) for z (N, r) with N = B·H·W tokens and expert_index (N,) (differentiable).

    When a gradient may be asked for, the forward also keeps each token's conv
    pre-activations (N x 4 x r bilinear, N x 16 x r bicubic, float32), so the backward
    recomputes only what the weight gradient needs."""
    save = torch.is_grad_enabled() and (z.requires_grad or conv_weight.requires_grad or
                                        conv_bias.requires_grad)
    return torch.ops.convlora.stencil_fwd(
        z.contiguous(), expert_index.reshape(-1).to(torch.int32), conv_weight.contiguous(),
        conv_bias.contiguous(), list(scales), INTERPOLATION_CODES[interpolation], height, width,
        save)[0]


def unsupported(rank: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """None when these kernels can compute a call of rank ``rank`` in ``dtype`` on
    ``device``, else why not (an error message naming the argument and the way out)."""
    if device.type == "cuda" and dtype == torch.float64:
        return ("x: the cuda backend takes float32, float16 or bfloat16 tensors, got "
                "float64; use backend='cpu' or 'reference' for float64")
    if rank > MAX_FUSED_RANK:
        return (f"lora_A: the fused kernels support ranks up to {MAX_FUSED_RANK}, got "
                f"r = {rank}; use backend='auto' or 'reference'")
    return None


def conv_lora_linear(p: Problem, x4: torch.Tensor, weight, bias, lora_A, lora_B,
                     conv_weight, conv_bias, expert_index, scaling,
                     z: Optional[torch.Tensor]) -> torch.Tensor:
    """The layer on the fused kernels (convlora_kernels.layer): y (N, C_out) for x4
    (B, H, W, C_in); the arguments were checked at the public boundary (ops.py) and p is
    their Problem. Raises only for what these kernels cannot do (``unsupported``)."""
    why = unsupported(p.rank, x4.dtype, x4.device)
    if why is not None:
        raise (TypeError if why.startswith("x:") else ValueError)(why)
    return layer.conv_lora_linear("cuda" if x4.is_cuda else "cpu", p, x4, weight, bias,
                                  lora_A, lora_B, conv_weight, conv_bias, expert_index,
                                  scaling, z)


if _ext.load()[0] is not None:  # the ops exist once _C is loaded: complete them now
    _register()
