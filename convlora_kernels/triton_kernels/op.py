"""The "triton" backend of ``conv_lora_linear`` (loaded by convlora_kernels.ops, which
checks the arguments): the layer of convlora_kernels.layer with the Triton stencil and dy
pass (launch.py). Importing this module never fails: without triton,
``unavailable_reason`` says so.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext, layer
from .._validate import MAX_FUSED_RANK, Problem

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


def unsupported(rank: int, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """None when these kernels can compute a call of rank ``rank`` in ``dtype`` on
    ``device``, else why not (an error message naming the argument and the way out)."""
    if dtype not in DTYPES:
        return (f"x: the triton backend takes float16, bfloat16 or float32 tensors, got "
                f"{dtype}; use backend='reference' for {dtype}")
    if rank > MAX_FUSED_RANK:
        return (f"lora_A: the triton backend supports ranks r <= {MAX_FUSED_RANK}, got "
                f"r = {rank}; use backend='auto' or 'reference'")
    return None


def conv_lora_linear(p: Problem, x4: Tensor, weight: Tensor, bias: Optional[Tensor],
                     lora_A: Tensor, lora_B: Tensor, conv_weight: Tensor, conv_bias: Tensor,
                     expert_index: Tensor, scaling: float, z: Optional[Tensor]) -> Tensor:
    """The layer on the Triton kernels: y (N, C_out) for x4 (B, H, W, C_in); the arguments
    were checked at the public boundary (ops.py) and p is their Problem. Raises only for
    what these kernels cannot do (``unsupported``)."""
    why = unsupported(p.rank, x4.dtype, x4.device)
    if why is not None:
        raise (TypeError if why.startswith("x:") else ValueError)(why)
    if triton is None:
        raise RuntimeError(unavailable_reason("triton", x4.device))
    return layer.conv_lora_linear("triton", p, x4, weight, bias, lora_A, lora_B, conv_weight,
                                  conv_bias, expert_index, scaling, z)
