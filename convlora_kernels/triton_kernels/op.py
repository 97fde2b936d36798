"""The "triton" backend of ``conv_lora_linear`` (loaded by convlora_kernels.ops): the
argument checks, then the layer of convlora_kernels.layer with the Triton stencil and dy
pass (launch.py). Importing this module never fails: without triton,
``unavailable_reason`` says so.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _ext, layer
from .._validate import MAX_FUSED_RANK, as_map, check_inputs, out_shape

try:
    import triton  # noqa: F401
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

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
        if not _ext.triton_interpreter_requested():
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
    if p.rank > MAX_FUSED_RANK:
        raise ValueError(f"lora_A: the triton backend supports ranks r <= {MAX_FUSED_RANK}, got "
                         f"r = {p.rank}")
    if triton is None:
        raise RuntimeError(unavailable_reason("triton", x.device))
    y = layer.conv_lora_linear("triton", p, as_map(x, p), weight, bias, lora_A, lora_B,
                               conv_weight, conv_bias, expert_index, scaling, z)
    return y.reshape(out_shape(x, p))
