"""The "triton" backend: the layer of convlora_kernels.layer with the Triton stencil, the
one-kernel forward and the dy pass (convlora_kernels.triton_kernels.launch). The backend
interface is described in convlora_kernels.backends. Importing this module never fails:
without triton, ``unavailable_reason`` says so.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from .._validate import MAX_TRITON_RANK, rank_way_out

try:
    import triton  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised where triton is absent
    triton = None
    _MISSING = str(e)

DTYPES = (torch.float16, torch.bfloat16, torch.float32)

if triton is not None:
    from ..triton_kernels import launch


def kernels_missing() -> Optional[str]:
    """None when the Triton kernels are importable, else why not."""
    return None if triton is not None else _MISSING


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
    if rank > MAX_TRITON_RANK:
        return (f"lora_A: the triton backend supports ranks r <= {MAX_TRITON_RANK} (above, "
                f"its stencil kernels need more shared memory than a GPU has), got r = "
                f"{rank}; use {rank_way_out(rank)}")
    return None


def candidate_unavailable(candidate: str, backend: str) -> Optional[str]:
    return None  # every candidate of the plan has a Triton way


def stencil_index(expert_index: Tensor) -> Tensor:
    """One expert per token (N,): the kernels sort the tokens by expert."""
    return expert_index.reshape(-1)


def routed_index(expert: Tensor, gating: str, height: int, width: int) -> Tensor:
    return expert.repeat_interleave(height * width) if gating == "map" else expert


def routed_index_length(n_tok: int, gating: str, height: int, width: int) -> int:
    return n_tok


def early_prep(x2, rank, cw, cb, scales, interpolation, height, width):
    """None: the Triton stencil has no prep pass to start early."""
    return None


def stencil_forward(z2, idx, cw, cb, scales, interpolation, height, width, save, early=None):
    """(u float32, the token order sorted by expert, the experts' bounds in it)."""
    return launch.stencil_forward(z2, idx, cw, cb, scales, interpolation, height, width)


def stencil_backward(du, z2, perm, bounds, idx, cw, cb, scales, interpolation, height,
                     width):
    return launch.stencil_backward(du, z2, perm, bounds, cw, cb, scales, interpolation,
                                   height, width)


def saved_shapes(n_tok, rank, scales, interpolation, height, width, dtype, save,
                 forward_candidate):
    """Shapes and dtypes of (u, perm, bounds); the one-kernel forward keeps u only when a
    backward will read it."""
    n_exp = len(scales)
    kept = n_tok if save or forward_candidate != "one_kernel" else 0
    return [((kept, rank), torch.float32), ((n_tok,), torch.int64),
            ((n_exp + 1,), torch.int32)]


def dy_pass(dy2, lora_B, u, scaling, need_b, need_bias):
    return launch.dy_pass(dy2, lora_B, u, scaling, need_b, need_bias)


def two_source_gemm(a1, b1, a2, b2, alpha, bias=None):
    """C = a1 b1 + alpha · a2 b2 (+ bias), written once (triton_kernels/gemm.py)."""
    return launch.two_source_gemm(a1, b1, a2, b2, alpha, bias)


def layer_forward(x2, weight, bias, lora_B, z2, idx, cw, cb, scaling, scales, interpolation,
                  height, width, save):
    """The "one_kernel" forward candidate: (y, u, perm, bounds) from one Triton kernel."""
    return launch.layer_forward(x2, weight, bias, lora_B, z2, idx, cw, cb, scaling, scales,
                                interpolation, height, width, save)
