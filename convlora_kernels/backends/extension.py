"""The "cpu" and "cuda" backends: the fused stencil kernels of convlora_kernels._C
(torch.ops.convlora.stencil_fwd / stencil_bwd: one pass over z; the backward from the
GELU slopes of the pre-activations the forward saved, weight gradients in fp32,
deterministic, no atomics) between the layer's GEMMs (BLAS on CPU, cuBLAS on CUDA), composed and planned in
convlora_kernels.layer. The backend interface is described in convlora_kernels.backends.

The stencil ops are also registered here with fake kernels and autograd, so ``stencil``
can be used (and torch.compile-traced) on its own.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _ext, _switches
from .._compile import constant_under_compile
from .._validate import MAX_FUSED_RANK

INTERPOLATION_CODES = {"bilinear": 0, "bicubic": 1}
PREACT_SLOTS = {0: 4, 1: 16}  # saved slots (GELU' of a pre-activation) per token, by code
CPU_DY_ROWS = 512  # rows of dy per block of the cpu one-pass (fp32: 4.7 MB at C_out = 2304)

# Internal switches (docs/design.md, "Internal switches"): CONVLORA_MAP_KERNELS=0 runs the
# per-token stencil programs for map routing too; CONVLORA_STENCIL_SMEM_KB sets the
# shared memory one tile block may use (benchmarks/stencil_time.py times both on a GPU);
# CONVLORA_STENCIL_MMA=1 runs the per-token forward as tensor-core products of each
# token's 3 x 3 z cells by composed weights (tf32) for bfloat16 and float16 inputs at ranks
# up to 8, bilinear (off until a GPU run shows it faster: benchmarks/stencil_time.py times
# both); CONVLORA_PREP_STREAM=1 launches the layer's prep pass (the tap tables, padded
# weights and composed weights, which read the conv weights only) on a second CUDA stream
# before the down-projection, so it can run beside z = x Aᵀ and the router instead of
# between them and the stencil (off until a GPU run shows it faster: stencil_time.py times
# the layer both ways).
MAP_KERNELS_ENV = "CONVLORA_MAP_KERNELS"
SMEM_KB_ENV = "CONVLORA_STENCIL_SMEM_KB"
MMA_ENV = "CONVLORA_STENCIL_MMA"
PREP_STREAM_ENV = "CONVLORA_PREP_STREAM"


# --- availability --------------------------------------------------------------------------

def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    mod, why = _ext.load()
    if mod is None:
        return why
    if backend == "cuda" and not _ext.has_cuda_kernels():
        return ("convlora_kernels._C was built without CUDA kernels (no nvcc or a CPU build of "
                f"torch at build time); rebuild it with: {_ext.REBUILD}")
    _register()
    return None


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


def candidate_unavailable(candidate: str, backend: str) -> Optional[str]:
    if candidate == "one_kernel":
        return "the one-kernel forward is a Triton kernel: it runs with backend='triton'"
    if candidate == "two_source" and backend == "cpu":
        return ("the two-source GEMM is a Triton kernel: it runs with backend='cuda' or "
                "'triton' (the cpu backend's GEMMs are BLAS)")
    if candidate in ("one_pass", "two_source") and backend == "cuda":
        try:
            from . import triton as triton_backend
        except ImportError as e:  # pragma: no cover - the module guards its own imports
            return f"the Triton kernels cannot be imported ({e})"
        why = triton_backend.kernels_missing()
        if why is not None:
            return f"the Triton kernels cannot be imported ({why})"
    return None


# --- the switches --------------------------------------------------------------------------

def map_kernels_on() -> bool:
    return _switches.get(MAP_KERNELS_ENV, "1") != "0"


@constant_under_compile
def smem_kb() -> int:
    """The ops' smem_kb argument: 0 (the kernels' default budget) unless
    CONVLORA_STENCIL_SMEM_KB sets a number of KB in [1, 227]."""
    value = _switches.get(SMEM_KB_ENV)
    if not value:
        return 0
    try:
        kb = int(value)
    except ValueError:
        kb = 0
    if not 1 <= kb <= 227:
        raise ValueError(f"{SMEM_KB_ENV}: expected a number of KB in [1, 227], got {value!r}")
    return kb


@constant_under_compile
def mma_on() -> bool:
    """CONVLORA_STENCIL_MMA: "1" runs the stencil's forward and backward as composed-weight
    MMA where they can (the ops' mma argument), "0" (the default) as multiply-adds."""
    value = _switches.get(MMA_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{MMA_ENV}: expected 0 or 1, got {value!r}")
    return value == "1"


@constant_under_compile
def prep_stream_on() -> bool:
    """CONVLORA_PREP_STREAM: "1" starts the layer's prep pass ahead of the down-projection
    (early_prep), "0" (the default) runs it just before the stencil's forward."""
    value = _switches.get(PREP_STREAM_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{PREP_STREAM_ENV}: expected 0 or 1, got {value!r}")
    return value == "1"


def mma_for(dtype: torch.dtype) -> bool:
    """The ops' mma argument for inputs of ``dtype``: the switch, for the 16-bit dtypes
    only (tf32 operands keep more bits than they have; float32 stays exact)."""
    return dtype in (torch.bfloat16, torch.float16) and mma_on()


# --- the expert index ----------------------------------------------------------------------

def stencil_index(expert_index: Tensor) -> Tensor:
    """expert_index (B, H, W) as the C++ stencils take it, int32: (B,) when it is one expert
    per map by construction (expanded from (B, 1, 1), as the map router returns it), so the
    map kernels run (csrc/stencil_map.h); else one entry per token (N,)."""
    if expert_index.dim() == 3 and expert_index.stride(1) == 0 and \
            expert_index.stride(2) == 0 and map_kernels_on():
        return expert_index[:, 0, 0].to(torch.int32).contiguous()
    return expert_index.reshape(-1).to(torch.int32)


def _per_map(gating: str) -> bool:
    return gating == "map" and map_kernels_on()


def routed_index(expert: Tensor, gating: str, height: int, width: int) -> Tensor:
    """The router's expert per unit (map or token) as the stencil takes it: one per map
    stays one per map (the map kernels), unless they are switched off."""
    if gating == "map" and not _per_map(gating):
        return expert.repeat_interleave(height * width)
    return expert


def routed_index_length(n_tok: int, gating: str, height: int, width: int) -> int:
    return n_tok // (height * width) if _per_map(gating) else n_tok


# --- the stencil ---------------------------------------------------------------------------

def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' arithmetic and weight-gradient dtype for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _below_autograd(fn):
    """fn with the ops it calls dispatched below autograd: the layer differentiates the
    stencil by hand, so stencil_fwd's autograd wrapper (a Python dispatch on every call)
    stays out of it."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with torch._C._AutoDispatchBelowAutograd():
            return fn(*args, **kwargs)
    return run


class EarlyPrep:
    """A prep pass started by early_prep: its buffer, what it was made for (z's dtype and
    rank), and the stream that writes it (None: it was run in order, on the CPU)."""

    def __init__(self, prep: Tensor, dtype: torch.dtype, rank: int, stream):
        self.prep, self.dtype, self.rank, self.stream = prep, dtype, rank, stream

    def take(self, z2: Tensor) -> Optional[Tensor]:
        """The buffer for a forward on z2, once the current stream has waited for it; None
        when z2 is not what it was made for (another dtype: the forward preps again)."""
        if self.stream is not None:
            current = torch.cuda.current_stream(z2.device)
            current.wait_stream(self.stream)
            self.prep.record_stream(current)  # freed after the backward, on this stream
            self.stream = None
        if z2.dtype != self.dtype or z2.shape[1] != self.rank:
            return None
        return self.prep


_prep_streams = {}  # CUDA device index -> the stream early_prep launches on


@_below_autograd
def early_prep(x2, rank, cw, cb, scales, interpolation, height, width):
    """With CONVLORA_PREP_STREAM=1: the stencil's prep pass for z = x2 Aᵀ of rank ``rank``,
    started before z exists (it reads the conv weights only). On CUDA it runs on a second
    stream, after everything already queued on the current one, so the down-projection and
    the router can run beside it; stencil_forward waits for it (EarlyPrep.take) before the
    stencil's kernel, and keeps it for the backward when one follows. On the CPU it runs in
    order (the same buffer, the same forward). None when the switch is off."""
    if not prep_stream_on():
        return None
    code = INTERPOLATION_CODES[interpolation]
    z_like = x2.new_empty((0, rank))  # the prep reads z's dtype, rank and device only
    args = (z_like, cw, cb, scales, code, height, width, mma_for(x2.dtype))
    if x2.device.type != "cuda":
        return EarlyPrep(torch.ops.convlora.stencil_prep(*args), x2.dtype, rank, None)
    index = x2.device.index if x2.device.index is not None else torch.cuda.current_device()
    side = _prep_streams.get(index)
    if side is None:
        # the highest priority: its few blocks are dispatched as soon as an SM has room
        side = _prep_streams[index] = torch.cuda.Stream(device=x2.device, priority=-1)
    side.wait_stream(torch.cuda.current_stream(x2.device))
    with torch.cuda.stream(side):
        prep = torch.ops.convlora.stencil_prep(*args)
    # the weights (copies, when the caller's were not contiguous) are read on `side`: not
    # reused by the current stream before that read is done
    cw.record_stream(side)
    cb.record_stream(side)
    return EarlyPrep(prep, x2.dtype, rank, side)


@_below_autograd
def stencil_forward(z2, idx, cw, cb, scales, interpolation, height, width, save, early=None):
    """(u, the saved GELU slopes, the prep buffer) when a backward will follow (save): the
    forward and the backward share one prep pass (stencil_prep's tables and padded weights,
    and with mma the composed weights of both; early: early_prep's, when it started one);
    else (u, two empty tensors), the forward running its own prep."""
    code = INTERPOLATION_CODES[interpolation]
    mma = mma_for(z2.dtype)
    prep = early.take(z2) if early is not None else None
    if not save:
        u, pre = torch.ops.convlora.stencil_fwd(z2, idx, cw, cb, scales, code, height, width,
                                                False, smem_kb(), prep, mma)
        return u, pre, z2.new_empty(0, dtype=torch.uint8)
    # with mma, the composed weights of both passes too (unused by the map programs)
    if prep is None:
        prep = torch.ops.convlora.stencil_prep(z2, cw, cb, scales, code, height, width, mma)
    u, pre = torch.ops.convlora.stencil_fwd(z2, idx, cw, cb, scales, code, height, width, True,
                                            smem_kb(), prep, mma)
    return u, pre, prep


@_below_autograd
def stencil_backward(du, z2, preact, prep, idx, cw, cb, scales, interpolation, height,
                     width):
    code = INTERPOLATION_CODES[interpolation]
    kb = smem_kb()
    prep = prep if prep.numel() > 0 else None  # else the op runs its own prep
    mma = mma_for(z2.dtype)
    if preact.numel() == 0:  # the forward was told not to keep them: recompute
        preact = torch.ops.convlora.stencil_fwd(z2, idx, cw, cb, scales, code, height, width,
                                                True, kb, prep, mma)[1]
    dz, dw, db = torch.ops.convlora.stencil_bwd(du.to(z2.dtype).contiguous(), z2, preact, idx,
                                                cw, cb, scales, code, height, width, kb, prep,
                                                mma)
    return dz, dw.to(cw.dtype), db.to(cb.dtype)


def prep_bytes(rank, scales, code, height, width, dtype, mma=False) -> int:
    """The size of stencil_prep's output (uint8) for a call (code: the interpolation's;
    mma: stencil_prep's)."""
    return torch.ops.convlora.stencil_prep_bytes(rank, len(scales), code, height, width,
                                                 list(scales), dtype == torch.float64, mma)


def saved_shapes(n_tok, rank, scales, interpolation, height, width, dtype, save,
                 forward_candidate):
    """Shapes and dtypes of (u, saved0, saved1) of stencil_forward: u, the saved GELU
    slopes and the prep buffer when save, else u and two empty tensors."""
    code = INTERPOLATION_CODES[interpolation]
    slots = PREACT_SLOTS[code]
    prep = (prep_bytes(rank, scales, code, height, width, dtype, mma_for(dtype)),) if save \
        else (0,)
    return [((n_tok, rank), dtype), ((n_tok, slots, rank) if save else (0,), acc_dtype(dtype)),
            (prep, torch.uint8)]


# --- the dy pass ---------------------------------------------------------------------------

def dy_pass(dy2, lora_B, u, scaling, need_b, need_bias):
    """The "one_pass" dy candidate: on CUDA the Triton dy-pass kernel; on CPU row blocks of
    dy through both BLAS GEMMs while they are in cache. Returns (dL/du, dL/dB or None,
    dL/dbias or None)."""
    if dy2.device.type != "cpu":
        from . import triton as triton_backend

        return triton_backend.dy_pass(dy2, lora_B, u, scaling, need_b, need_bias)
    uq = u if u.dtype == dy2.dtype else u.to(dy2.dtype)
    bt = lora_B.t().contiguous()  # (r, C_out): the layout BLAS runs fastest on CPU
    d_bias = dy2.sum(0) if need_bias else None
    n = dy2.shape[0]
    du = dy2.new_empty((n, lora_B.shape[1]))
    d_bt = dy2.new_zeros(bt.shape) if need_b else None
    for i in range(0, n, CPU_DY_ROWS):
        rows = dy2[i:i + CPU_DY_ROWS]
        torch.mm(rows, bt.t(), out=du[i:i + CPU_DY_ROWS])
        if need_b:
            d_bt.addmm_(uq[i:i + CPU_DY_ROWS].t(), rows)
    du.mul_(scaling)
    d_b = d_bt.mul_(scaling).t() if need_b else None
    return du, d_b, d_bias


def two_source_gemm(a1, b1, a2, b2, alpha, bias=None):
    """The "two_source" candidates' GEMM, C = a1 b1 + alpha · a2 b2 (+ bias): a Triton
    kernel (cuda only: candidate_unavailable refuses it on cpu)."""
    from . import triton as triton_backend

    return triton_backend.two_source_gemm(a1, b1, a2, b2, alpha, bias)


# --- the stencil ops on their own ----------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _register() -> None:
    """Fake kernels and autograd for the C++ stencil ops (once, after _C is loaded)."""

    @torch.library.register_fake("convlora::stencil_prep")
    def _(z, conv_weight, conv_bias, scales, interpolation, height, width, mma=False):
        n = prep_bytes(z.shape[1], scales, interpolation, height, width, z.dtype, mma)
        return z.new_empty((n,), dtype=torch.uint8)

    @torch.library.register_fake("convlora::stencil_fwd")
    def _(z, expert_index, conv_weight, conv_bias, scales, interpolation, height, width,
          save_preact, smem_kb=0, prep=None, mma=False, raw_preact=False):
        shape = (z.shape[0], PREACT_SLOTS[interpolation], z.shape[1]) if save_preact else (0,)
        return torch.empty_like(z), z.new_empty(shape, dtype=acc_dtype(z.dtype))

    @torch.library.register_fake("convlora::stencil_bwd")
    def _(du, z, preact, expert_index, conv_weight, conv_bias, scales, interpolation, height,
          width, smem_kb=0, prep=None, mma=False):
        acc = acc_dtype(z.dtype)
        return (torch.empty_like(z), conv_weight.new_empty(conv_weight.shape, dtype=acc),
                conv_bias.new_empty(conv_bias.shape, dtype=acc))

    def setup_context(ctx, inputs, output):
        (z, expert_index, conv_weight, conv_bias, scales, interpolation, height, width, _,
         kb, prep, mma, raw_preact) = inputs
        # raw_preact saved C, not the slopes the backward reads: it recomputes them then
        slopes = output[1].new_empty(0) if raw_preact else output[1]
        ctx.save_for_backward(z, slopes, expert_index, conv_weight, conv_bias)
        ctx.mark_non_differentiable(output[1])
        ctx.meta = (scales, interpolation, height, width)
        ctx.smem_kb = kb
        ctx.mma = mma
        ctx.prep = prep  # a caller's stencil_prep output (not differentiable), or None

    def backward(ctx, du, _dpreact):
        z, preact, expert_index, conv_weight, conv_bias = ctx.saved_tensors
        if preact.numel() == 0:  # the forward was told not to keep them: recompute
            preact = torch.ops.convlora.stencil_fwd(z, expert_index, conv_weight, conv_bias,
                                                    *ctx.meta, True, ctx.smem_kb, ctx.prep,
                                                    ctx.mma)[1]
        dz, dw, db = torch.ops.convlora.stencil_bwd(du.contiguous(), z, preact, expert_index,
                                                    conv_weight, conv_bias, *ctx.meta,
                                                    ctx.smem_kb, ctx.prep, ctx.mma)
        return (dz, None, dw.to(conv_weight.dtype), db.to(conv_bias.dtype), None, None, None,
                None, None, None, None, None, None)

    torch.library.register_autograd("convlora::stencil_fwd", backward,
                                    setup_context=setup_context)


def stencil(z: torch.Tensor, expert_index: torch.Tensor, conv_weight: torch.Tensor,
            conv_bias: torch.Tensor, scales: Sequence[int], interpolation: str, height: int,
            width: int) -> torch.Tensor:
    """u = z + E_e(z) for z (N, r) with N = B·H·W tokens and expert_index (N,) (differentiable).

    When a gradient may be asked for, the forward also keeps the GELU slope of each
    token's conv pre-activations (N x 4 x r bilinear, N x 16 x r bicubic, float32), so the
    backward recomputes only what the weight gradient needs."""
    save = torch.is_grad_enabled() and (z.requires_grad or conv_weight.requires_grad or
                                        conv_bias.requires_grad)
    return torch.ops.convlora.stencil_fwd(
        z.contiguous(), expert_index.reshape(-1).to(torch.int32), conv_weight.contiguous(),
        conv_bias.contiguous(), list(scales), INTERPOLATION_CODES[interpolation], height, width,
        save, smem_kb(), None, mma_for(z.dtype))[0]


if _ext.load()[0] is not None:  # the ops exist once _C is loaded: complete them now
    _register()
