"""The "triton" backend of ``conv_lora_linear`` (loaded by convlora_kernels.ops).

Three thin layers: the raw ops ``torch.ops.convlora_triton.conv_lora_fwd`` and
``conv_lora_bwd`` (torch.library custom ops with fake kernels, so torch.compile traces
through them without a graph break), autograd linking the two, and the plain function
``conv_lora_linear`` with the argument checks. Importing this module never fails:
without triton, ``unavailable_reason`` says so.
"""

from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._validate import as_map, check_inputs, out_shape

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

MAX_RANK = 64
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if triton is not None:
    from . import launch


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """None when the Triton kernels can run on ``device``, else a sentence saying why not."""
    if triton is None:
        return "triton is not installed: pip install triton"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("the Triton kernels take CPU tensors only under Triton's interpreter "
                    "(TRITON_INTERPRET=1)")
        if not launch.INTERPRETED:
            return ("TRITON_INTERPRET=1 was set after the Triton kernels were compiled for "
                    "the GPU; set it before importing convlora_kernels.triton_kernels")
        return None
    return f"the Triton kernels run on cuda tensors, not on {device.type}"


def conv_lora_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                     lora_B: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                     expert_index: Tensor, scaling: float, *,
                     scales: Optional[Sequence[int]] = None, interpolation: str = "bilinear",
                     hw: Optional[Tuple[int, int]] = None,
                     z: Optional[Tensor] = None, check_expert_index: bool = True) -> Tensor:
    """conv_lora_linear_ref computed by the Triton kernels (same arguments and result)."""
    p = check_inputs(x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index,
                     scaling, scales, interpolation, hw, z=z,
                     check_index_values=check_expert_index)
    if x.dtype not in DTYPES:
        raise TypeError(f"x: the triton backend takes float16, bfloat16 or float32 tensors, "
                        f"got {x.dtype}; use backend='reference' for {x.dtype}")
    if p.rank > MAX_RANK:
        raise ValueError(f"lora_A: the triton backend supports ranks r <= {MAX_RANK}, got "
                         f"r = {p.rank}")
    if triton is None:
        raise RuntimeError(unavailable_reason("triton", x.device))
    z4 = None if z is None else z.reshape(p.batch, p.height, p.width, p.rank)
    y = torch.ops.convlora_triton.conv_lora_fwd(
        as_map(x, p), weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index, z4,
        float(scaling), list(p.scales), p.interpolation)[0]
    return y.reshape(out_shape(x, p))


if triton is not None:

    @torch.library.custom_op("convlora_triton::conv_lora_fwd", mutates_args=())
    def conv_lora_fwd(x: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                      lora_B: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                      expert_index: Tensor, z: Optional[Tensor], scaling: float,
                      scales: List[int], interpolation: str
                      ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """x (B, H, W, C_in) -> (y (B, H, W, C_out), z (N, r) or (0,) when z is given,
        u (N, r) float32, perm (N,) int64, bounds (n + 1,) int32); the last four are
        kept for the backward."""
        y, z2, u, perm, bounds = launch.forward(
            x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index, z, scaling,
            scales, interpolation)
        return y, (z2 if z is None else x.new_empty(0)), u, perm, bounds

    @conv_lora_fwd.register_fake
    def _(x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index, z, scaling,
          scales, interpolation):
        n_tok = x.shape[0] * x.shape[1] * x.shape[2]
        rank = lora_A.shape[0]
        return (x.new_empty(tuple(x.shape[:-1]) + (weight.shape[0],)),
                x.new_empty((n_tok, rank) if z is None else (0,)),
                x.new_empty((n_tok, rank), dtype=torch.float32),
                x.new_empty((n_tok,), dtype=torch.int64),
                x.new_empty((conv_weight.shape[0] + 1,), dtype=torch.int32))

    @torch.library.custom_op("convlora_triton::conv_lora_bwd", mutates_args=())
    def conv_lora_bwd(dy: Tensor, x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                      conv_weight: Tensor, conv_bias: Tensor, z: Tensor, u: Tensor,
                      perm: Tensor, bounds: Tensor, has_z: bool, scaling: float,
                      scales: List[int], interpolation: str, needs: List[bool]
                      ) -> List[Tensor]:
        """Gradients of (x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, z);
        a (0,) tensor where needs is False."""
        grads = launch.backward(dy, x, weight, lora_A, lora_B, conv_weight, conv_bias, z, u,
                                perm, bounds, has_z, scaling, scales, interpolation, needs)
        return [x.new_empty(0) if g is None else g for g in grads]

    @conv_lora_bwd.register_fake
    def _(dy, x, weight, lora_A, lora_B, conv_weight, conv_bias, z, u, perm, bounds, has_z,
          scaling, scales, interpolation, needs):
        shapes = [x.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape,
                  conv_weight.shape, conv_bias.shape, x.shape[:-1] + lora_A.shape[:1]]
        return [x.new_empty(s if need else (0,)) for s, need in zip(shapes, needs)]

    def _setup_context(ctx, inputs, output):
        (x, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index, z, scaling,
         scales, interpolation) = inputs
        _, z2, u, perm, bounds = output
        ctx.has_z = z is not None
        ctx.has_bias = bias is not None
        ctx.scaling, ctx.scales, ctx.interpolation = scaling, scales, interpolation
        ctx.save_for_backward(x, weight, lora_A, lora_B, conv_weight, conv_bias,
                              z if z is not None else z2, u, perm, bounds)
        ctx.mark_non_differentiable(z2, u, perm, bounds)

    def _backward(ctx, dy, *_unused):
        x, weight, lora_A, lora_B, conv_weight, conv_bias, z, u, perm, bounds = \
            ctx.saved_tensors
        n = ctx.needs_input_grad
        needs = [n[0], n[1], ctx.has_bias and n[2], n[3] and not ctx.has_z, n[4], n[5], n[6],
                 ctx.has_z and n[8]]
        grads = torch.ops.convlora_triton.conv_lora_bwd(
            dy, x, weight, lora_A, lora_B, conv_weight, conv_bias, z, u, perm, bounds,
            ctx.has_z, ctx.scaling, ctx.scales, ctx.interpolation, needs)
        dx, dw, dbias, da, db, dcw, dcb, dz = [g if need else None
                                               for g, need in zip(grads, needs)]
        return dx, dw, dbias, da, db, dcw, dcb, None, dz, None, None, None

    conv_lora_fwd.register_autograd(_backward, setup_context=_setup_context)
