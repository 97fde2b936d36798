"""Host side of the Triton kernels: buffers, tile sizes, autotuning and the launch order.

The layer's GEMMs and the order of its passes are planned in convlora_kernels.layer; what
runs here is the Triton part of that plan:
    stencil_forward       sort tokens by expert (sort.py: a counting sort, two launches), then
                          stencil_fwd_kernel: u = z + E(z) from z neighbourhoods (N×r fp32)
    layer_forward         the "fused" forward: the same sort, then layer_forward_kernel:
                          the stencil, x W0ᵀ and the epilogue s·u Bᵀ + b, y written once
    dy_pass               dy_pass_kernel reads dy once: dL/du, dL/dlora_B (and dL/dbias)
    stencil_backward      "split" (BACKWARD_ENV): stencil_grad_kernel recomputes c_k, writes
                          g_k = dL/dc_k and dL/dconv_bias, then stencil_scatter_kernel
                          rebuilds the upsampled taps for dL/dconv_weight and dL/dz; or
                          "merged": stencil_bwd_kernel does both with the taps built once;
                          then gather_dz_kernel (deterministic mode) sums dL/dz over
                          neighbours in order, expert_sum_kernel the weight partials
Without deterministic algorithms the weight gradients and dL/dz are accumulated with
float atomics (relaxed: the sums need no ordering among themselves, only the kernel's end);
with them, each tile (the dy pass: each of at most DY_PARTIALS programs) writes its own
partial sums, reduced in a fixed order.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton

from .. import _switches
from . import dense, layer_forward, sort, stencil
from .tables import BORDER, next_pow2, stencil_tables

INTERPRETED = type(stencil.stencil_fwd_kernel).__name__ == "InterpretedFunction"

# A test hook: the value the outputs that the kernels must write completely are pre-filled
# with (None: plain torch.empty). Tests set NaN (monkeypatch launch.POISON), so a slot a kernel
# forgot shows in the results, or a finite value where a kernel must write NaN itself.
POISON: Optional[float] = None


def _empty(shape, dtype, device):
    """An output the kernels must write completely: torch.empty, or filled with POISON
    when a test sets it."""
    if POISON is not None and dtype.is_floating_point:
        return torch.full(shape, POISON, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _configs(options):
    return [triton.Config(meta, num_warps=w) for meta, w in options]


def _autotuned(kernel, options, **kw):
    """(tuned, untuned): the kernel autotuned over ``options``, and the same kernel with
    only the first candidate (no timing runs: the interpreter, or
    CONVLORA_TRITON_AUTOTUNE=0 to skip the compile-and-time cost of the first call)."""
    first = triton.autotune(_configs(options[:1]), **kw)(kernel)
    return (first if INTERPRETED else triton.autotune(_configs(options), **kw)(kernel)), first


AUTOTUNE_ENV = "CONVLORA_TRITON_AUTOTUNE"


def _tuned_or_first(pair):
    """The autotuned kernel of an _autotuned pair, or its first candidate alone when
    CONVLORA_TRITON_AUTOTUNE=0 or under torch.use_deterministic_algorithms: candidates
    with other warps or tiles sum in other orders, and which one wins the timing can
    differ between processes, so deterministic mode pins the first."""
    if torch.are_deterministic_algorithms_enabled():
        return pair[1]
    return pair[1] if _switches.get(AUTOTUNE_ENV, "1") == "0" else pair[0]


# Keys: the padded rank, the neighbourhood and the taps set the register footprint and
# the work per token; C_out sets the length of the y and dy loops. Each list starts with
# the candidate that compiles without register spills at the SAM shapes (sm_90).
_fwd = _autotuned(stencil.stencil_fwd_kernel, [({}, 8), ({}, 4)],
                  key=["RZ", "NBP", "TAPS", "BT", "SHARED_ROWS"])
_dy_pass = _autotuned(dense.dy_pass_kernel,
                      [({"BN": 64}, 8), ({"BN": 128}, 8), ({"BN": 64}, 4)],
                      key=["RP", "C_out", "NEED_DB", "NEED_DBIAS", "ATOMIC"],
                      reset_to_zero=["d_lora_b_ptr", "dbias_ptr"])
# BM (tokens) x BN (output columns) x BK: the fused forward's GEMM tile. Its stencil runs
# LAYER_FWD_BT tokens at a time. As the JIT builds them for sm_90 (compile_check), bf16,
# scales 1..8: at r = 8 every candidate is spill-free (202-254 registers, 40-76 KB of shared
# memory: one CTA per SM); at r = 32 bicubic they spill 450-1130 B.
LAYER_FWD_BT = 16
_layer_fwd = _autotuned(layer_forward.layer_forward_kernel,
                        [({"BM": 64, "BN": 64, "BK": 64}, 8),
                         ({"BM": 64, "BN": 128, "BK": 64}, 8),
                         ({"BM": 128, "BN": 64, "BK": 32}, 8),
                         ({"BM": 64, "BN": 64, "BK": 64}, 4)],
                        key=["C_in", "C_out", "RZ", "NBP", "TAPS", "HAS_BIAS", "SAVE_U"])
_grad = _autotuned(stencil.stencil_grad_kernel, [({}, 8), ({}, 4)],
                   key=["RZ", "NBP", "TAPS", "BT", "ATOMIC", "SHARED_ROWS"],
                   reset_to_zero=["db_ptr"])
_scatter = _autotuned(stencil.stencil_scatter_kernel, [({}, 8), ({}, 4)],
                      key=["RZ", "NBP", "TAPS", "BT", "ATOMIC"], reset_to_zero=["dw_ptr"],
                      restore_value=["dz_ptr"])
_bwd = _autotuned(stencil.stencil_bwd_kernel, [({}, 8), ({}, 4)],
                  key=["RZ", "NBP", "TAPS", "BT", "ATOMIC"],
                  reset_to_zero=["db_ptr", "dw_ptr"], restore_value=["dz_ptr"])

# The stencil's backward: "split" (stencil_grad_kernel writes g = dL/dc, then
# stencil_scatter_kernel; each builds the taps) or "merged" (stencil_bwd_kernel: taps built
# once, no g in memory, one launch). The byte count favours merged (it saves g's round trip,
# 2·N·taps²·r·4 bytes, and a second load of every z neighbourhood), the registers split:
# sm_90, bf16, bilinear r = 8, split needs 105-114 (grad, two programs per SM) and 146-172
# (scatter), merged 255 (one per SM), and merged spills at r = 16 and for bicubic (up to
# ~2 KB). Which is faster is for a GPU to tell (benchmarks/stencil_time.py times both); until
# then "split", the spill-free pair at the default configuration, runs.
BACKWARD_ENV = "CONVLORA_TRITON_BACKWARD"
BACKWARDS = ("split", "merged")


def backward_kernels() -> str:
    """The stencil backward that runs: BACKWARD_ENV when set, else "split"."""
    chosen = _switches.get(BACKWARD_ENV, "split")
    if chosen not in BACKWARDS:
        raise ValueError(f"{BACKWARD_ENV}: expected one of {BACKWARDS}, got {chosen!r}")
    return chosen


# The forward and the grad kernel's conv outputs: "shared" row passes (stencil.row_passes:
# each down-tap row's three row passes computed once and held while its nt conv outputs
# use them) or "per-output" (each conv output computes its own: nt times the row passes,
# nothing held). Multiply-adds per token of an even-scale expert, row passes + column
# passes (NBP²·RZ and 4·NBP·RZ each, 3 conv rows per conv output):
#     bicubic (nt = 4, NBP = 8)   per-output 48·(64 + 32)·RZ = 4608·RZ, shared 2304·RZ
#     bilinear (nt = 2, NBP = 4)  per-output 12·(16 + 16)·RZ = 384·RZ,  shared 288·RZ
# (odd scales, nt = 1: the same either way). What holding them costs, compile_check, sm_90,
# 8 warps: bicubic r = 8, forward and grad 162-181 -> 252-255 registers, no spills, one
# program per SM either way (65536 registers / 256 threads); bicubic r = 16 spills 336-440
# bytes; bilinear r = 8, 105-114 -> 128-180, which halves the programs per SM for 25% fewer
# multiply-adds. So "shared" runs for bicubic at r <= 8 (twice fewer multiply-adds at the
# same occupancy), "per-output" elsewhere; ROW_PASSES_ENV forces either for a GPU to compare
# (benchmarks/stencil_time.py times both). The backward kernels keep the per-output order:
# the scatter is at 240-255 registers already and spilled with any row pass held.
ROW_PASSES_ENV = "CONVLORA_TRITON_ROW_PASSES"
ROW_PASSES = ("shared", "per-output")


def shared_row_passes(taps: int, rz: int) -> bool:
    """Whether the forward and grad kernels hold the row passes (see ROW_PASSES_ENV)."""
    chosen = _switches.get(ROW_PASSES_ENV)
    if chosen is None:
        return taps == 4 and rz <= 8
    if chosen not in ROW_PASSES:
        raise ValueError(f"{ROW_PASSES_ENV}: expected one of {ROW_PASSES}, got {chosen!r}")
    return chosen == "shared"


DY_BT = 64      # tokens per row block of the dy pass (the M of its dots)
# programs of the deterministic dy pass, so its partials of dL/dB are DY_PARTIALS x C_out x
# r x 4 bytes at any N: 19 MB at C_out = 2304, r = 8; 84 MB at C_out = 1280, r = 64
# (one slot per row block took 1.3 GB there at N = 64·64·64)
DY_PARTIALS = 256
GATHER_BT = 64  # tokens per program of the dL/dz gather


NEIGHBOURHOOD_FLOATS = 2048
# the scatter's dL/dz block (Plan.rc): fp32 multiplies its dots exactly on the CUDA cores,
# which takes more registers than the 16-bit types' tensor-core dots
DZ_BLOCK_FLOATS = {torch.float32: 4096, torch.bfloat16: 1024, torch.float16: 1024}


class Plan:
    """Tile sizes, padding, precision and stencil tables of one call."""

    def __init__(self, height, width, rank, num_experts, scales, interpolation, dtype, device):
        ty, oy, tx, ox, ntaps, meta = stencil_tables(height, width, tuple(scales), interpolation,
                                                     device)
        self.tables = (ty, oy, tx, ox)
        self.ntaps = ntaps
        self.halo, self.nbp, self.taps = meta["halo"], meta["nb_pad"], meta["taps_max"]
        self.rows_y, self.rows_x = meta["rows_y"], meta["rows_x"]
        self.rank, self.num_experts = rank, num_experts
        self.rp = max(16, next_pow2(rank))  # tl.dot needs 16 on every side
        self.rz = max(4, next_pow2(rank))   # the conv's input side: 4 taps·RZ >= 16
        # The z neighbourhood, BT·NBP²·RZ floats, lives in registers (with its products in
        # the upsampled taps): at most NEIGHBOURHOOD_FLOATS, 8 per thread of the 8-warp
        # programs, and BT >= 16 (tl.dot's M). compile_check, sm_90, bf16, scales 1..8:
        # bilinear r = 8 then takes BT = 16, and the forward and grad kernels need 105-114
        # registers, so two 8-warp programs fit an SM (BT = 32: 198-227, one).
        self.bt = min(64, max(16, _pow2_floor(NEIGHBOURHOOD_FLOATS
                                              // (self.nbp ** 2 * self.rz))))
        # The scatter's dL/dz phase holds [BT, NBP, NBP, RC] floats of the neighbourhood's
        # gradient, RC channels at a time: at most DZ_BLOCK_FLOATS[dtype]. compile_check,
        # sm_90, r <= 16: no spills in any dtype or interpolation; bf16/fp16 bilinear take
        # RC = 4 and 128 registers (two 8-warp programs per SM; 146-172 with RC = r = 8);
        # fp32 bilinear r = 8 takes RC = 8 (RC = 4 spilled 8-16 bytes at 128); bicubic RC = 4.
        self.rc = min(self.rz, max(4, _pow2_floor(DZ_BLOCK_FLOATS.get(dtype, 1024)
                                                  // (self.bt * self.nbp ** 2))))
        self.prec = _precision(dtype)
        self.shared_rows = shared_row_passes(self.taps, self.rz)
        self.nexp_p = max(2, next_pow2(num_experts))

    def programs(self, n_tokens: int) -> int:
        """Enough programs for every expert's tiles: sum_e ceil(count_e / BT) <= this."""
        return triton.cdiv(n_tokens, self.bt) + self.num_experts

    def constexprs(self):
        """The stencil kernels' compile-time arguments (tile, padding, taps, precision)."""
        return dict(BT=self.bt, RZ=self.rz, RP=self.rp, NBP=self.nbp, HALO=self.halo,
                    TAPS=self.taps, NEXP_P=self.nexp_p, BORDER=BORDER, PREC=self.prec)


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


SORT_BLOCK = 256  # tokens per program of the counting sort


def sort_tokens(expert_index: torch.Tensor, num_experts: int):
    """(perm (N,) int64: token ids stably sorted by expert, bounds (n+1,) int32: where each
    expert's tokens start), by the counting sort of sort.py in two launches; indices below
    0 sort first and indices >= n last, outside every expert's range."""
    idx = expert_index.reshape(-1)
    if not idx.is_contiguous():
        idx = idx.contiguous()
    n_tok, dev = idx.numel(), idx.device
    perm = torch.empty(n_tok, dtype=torch.int64, device=dev)
    if n_tok == 0:
        return perm, torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
    bounds = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    blocks = triton.cdiv(n_tok, SORT_BLOCK)
    nbins = next_pow2(num_experts + 2)
    counts = torch.empty((blocks, nbins), dtype=torch.int32, device=dev)
    sort.expert_counts_kernel[(blocks,)](idx, counts, n_tok, num_experts, BLOCK=SORT_BLOCK,
                                         NBINS=nbins, num_warps=4)
    sort.expert_order_kernel[(blocks,)](idx, counts, perm, bounds, n_tok, num_experts, blocks,
                                        BLOCK=SORT_BLOCK, NBINS=nbins, CB=64, num_warps=4)
    return perm, bounds


def stencil_forward(z2, expert_index, conv_weight, conv_bias, scales, interpolation, height, width):
    """(u (N, r) float32 = z + E(z), perm, bounds) for z2 (N, r); perm and bounds (the
    tokens sorted by expert) are kept for stencil_backward."""
    n_tok, rank = z2.shape
    n_exp = conv_weight.shape[0]
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    perm, bounds = sort_tokens(expert_index, n_exp)
    # NaN until the stencil writes it: a token whose expert is out of range (unchecked
    # index) sorts outside every expert's tiles, and its output must be NaN, not garbage.
    u = torch.full((n_tok, rank), float("nan"), dtype=torch.float32, device=z2.device)
    if n_tok > 0:
        plan = Plan(height, width, rank, n_exp, scales, interpolation, z2.dtype, z2.device)
        _tuned_or_first(_fwd)[(plan.programs(n_tok),)](
            z2, perm, bounds, plan.ntaps, *plan.tables, conv_weight.contiguous(),
            conv_bias.contiguous(), u, height, width, rank, n_exp, plan.rows_y, plan.rows_x,
            z2.stride(0), SHARED_ROWS=plan.shared_rows, **plan.constexprs())
    return u, perm, bounds


def layer_forward(x2, weight, bias, lora_B, z2, expert_index, conv_weight, conv_bias,
                  scaling, scales, interpolation, height, width, save):
    """The fused forward (layer_forward.py): (y (N, C_out) in x's dtype, u (N, r) float32
    when save else (0, r), perm, bounds), as stencil_forward's (u, perm, bounds)."""
    n_tok, rank = z2.shape
    c_out, c_in = weight.shape
    n_exp = conv_weight.shape[0]
    dev = x2.device
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    lora_b = lora_B if lora_B.stride(-1) == 1 else lora_B.contiguous()
    perm, bounds = sort_tokens(expert_index, n_exp)
    y = _empty((n_tok, c_out), x2.dtype, dev)
    u = _empty((n_tok if save else 0, rank), torch.float32, dev)
    if n_tok > 0:
        plan = Plan(height, width, rank, n_exp, scales, interpolation, x2.dtype, dev)
        has_bias = bias is not None
        _tuned_or_first(_layer_fwd)[lambda meta: (triton.cdiv(n_tok, meta["BM"]) + n_exp,)](
            x2, weight, bias.contiguous() if has_bias else y, lora_b, z2, perm, bounds,
            plan.ntaps, *plan.tables, conv_weight.contiguous(), conv_bias.contiguous(), y, u,
            n_tok, c_in, c_out, height, width, rank, n_exp, plan.rows_y, plan.rows_x,
            float(scaling), x2.stride(0), weight.stride(0), lora_b.stride(0), z2.stride(0),
            HAS_BIAS=has_bias, SAVE_U=save, **dict(plan.constexprs(), BT=LAYER_FWD_BT))
    return y, u, perm, bounds


def dy_pass(dy2, lora_B, u, scaling, need_b, need_bias):
    """One pass over dy (N, C_out): (dL/du = scaling · dy B (N, r) float32,
    dL/dB = scaling · dyᵀ u or None, dL/dbias = Σ_t dy_t or None), in dy's dtype."""
    n_tok, c_out = dy2.shape
    rank = lora_B.shape[1]
    dev, dtype = dy2.device, dy2.dtype
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    u = u.to(torch.float32).contiguous()
    atomic = not torch.are_deterministic_algorithms_enabled()
    f32 = torch.float32
    # atomics: one program per row block; else at most DY_PARTIALS programs, each summing
    # its row blocks into its own partial slot (a buffer of fixed size, reduced in order)
    programs = triton.cdiv(n_tok, DY_BT)
    if not atomic:
        programs = min(programs, DY_PARTIALS)
    du = _empty((n_tok, rank), f32, dev)
    unused = torch.zeros(1, dtype=f32, device=dev)
    d_lora_b = _acc((c_out, rank), programs, atomic, dev) if need_b else unused
    d_bias = _acc((c_out,), programs, atomic, dev) if need_bias else unused
    lora_b = lora_B.contiguous()
    if n_tok > 0:
        _tuned_or_first(_dy_pass)[(programs,)](
            dy2, lora_b, u, du, d_lora_b, d_bias, n_tok, c_out, rank, float(scaling), dy2.stride(0),
            lora_b.stride(0), BT=DY_BT, RP=max(16, next_pow2(rank)), NEED_DB=need_b,
            NEED_DBIAS=need_bias, ATOMIC=atomic, PREC=_precision(dtype))
    return (du, _reduce_rows(d_lora_b, atomic, need_b, (c_out, rank), dtype),
            _reduce_rows(d_bias, atomic, need_bias, (c_out,), dtype))


def stencil_backward(du, z2, perm, bounds, conv_weight, conv_bias, scales, interpolation, height,
                     width):
    """(dL/dz (N, r) in z's dtype, dL/dconv_weight, dL/dconv_bias in conv_weight's dtype)
    from dL/du (N, r), which is only read."""
    n_tok, rank = z2.shape
    n_exp = conv_weight.shape[0]
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    plan = Plan(height, width, rank, n_exp, scales, interpolation, z2.dtype, z2.device)
    atomic = not torch.are_deterministic_algorithms_enabled()
    du32 = du if du.dtype == torch.float32 and du.is_contiguous() \
        else du.to(torch.float32).contiguous()
    d_cw, d_cb, dz = _stencil_backward(plan, z2, perm, bounds, conv_weight.contiguous(),
                                       conv_bias, du32, n_tok, height, width, atomic,
                                       z2.dtype)
    # A token whose expert is out of range got no tile: nothing of it reached its
    # neighbours, and its own dL/dz is NaN, as its output is.
    dz.masked_fill_(_out_of_range(perm, bounds)[:, None], float("nan"))
    return dz, d_cw.to(conv_weight.dtype), d_cb.to(conv_bias.dtype)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def _out_of_range(perm, bounds):
    """(N,) bool, without a host synchronisation: the tokens whose expert index is out of
    range, which the stable sort puts before bounds[0] or from bounds[-1] on."""
    pos = torch.arange(perm.numel(), device=perm.device)
    outside = (pos < bounds[0]) | (pos >= bounds[-1])
    bad = torch.empty_like(outside)
    bad[perm] = outside
    return bad


def _acc(shape, programs, atomic, dev):
    """A float32 accumulator: zeros for atomics, else one uninitialised slot per program."""
    if atomic:
        return torch.zeros(shape, dtype=torch.float32, device=dev)
    return _empty((programs,) + tuple(shape), torch.float32, dev)


def _reduce_rows(buf, atomic, needed, shape, dtype):
    if not needed:
        return None
    if atomic:
        return buf.to(dtype)
    if buf.shape[0] == 0:
        return torch.zeros(shape, dtype=dtype, device=buf.device)
    return buf.sum(0).to(dtype)  # torch's reduction is deterministic


def _stencil_backward(plan, z2, perm, bounds, cw, conv_bias, du, n_tok, height, width,
                      atomic, dtype):
    """(dL/dconv_weight, dL/dconv_bias, dL/dz in dtype) from du (N, r) float32."""
    dev, rank, n_exp = du.device, plan.rank, plan.num_experts
    f32 = torch.float32
    programs = plan.programs(n_tok)
    consts = plan.constexprs()
    nb = 2 * plan.halo + 1
    shapes = ((n_exp, rank), (n_exp, rank * rank * 9))
    if n_tok == 0 or atomic:
        d_cb, d_cw = (torch.zeros(s, dtype=f32, device=dev) for s in shapes)
    else:  # one slot per program, reduced per expert in tile order
        d_cb, d_cw = (_empty((programs, s[1]), f32, dev) for s in shapes)
    if n_tok == 0:
        dz = torch.zeros((0, rank), dtype=dtype, device=dev)
        return d_cw.reshape(n_exp, rank, rank, 3, 3).to(dtype), d_cb.to(dtype), dz
    ty, oy, tx, ox = plan.tables
    args = (z2, perm, bounds, plan.ntaps)
    geometry = (height, width, rank, n_exp, plan.rows_y, plan.rows_x, z2.stride(0))
    # atomics add the stencil's dL/dz onto a copy of du (the kernels read du itself);
    # otherwise per-token neighbour slots, zero where no tile writes (tokens with an
    # out-of-range expert), gathered below in a fixed order
    dz_buf = du.clone() if atomic else torch.zeros((n_tok, nb, nb, rank), dtype=f32,
                                                   device=dev)
    if backward_kernels() == "merged":
        _tuned_or_first(_bwd)[(programs,)](
            *args, ty, oy, tx, ox, cw, conv_bias.contiguous(), du, d_cb, d_cw, dz_buf,
            *geometry, ATOMIC=atomic, **consts)
    else:
        g = _empty((n_tok, plan.taps ** 2, rank), f32, dev)
        _tuned_or_first(_grad)[(programs,)](
            *args, ty, oy, tx, ox, cw, conv_bias.contiguous(), du, g, d_cb, *geometry,
            ATOMIC=atomic, SHARED_ROWS=plan.shared_rows, **consts)
        _tuned_or_first(_scatter)[(programs,)](
            *args, ty, tx, cw, g, d_cw, dz_buf, *geometry, ATOMIC=atomic, RC=plan.rc,
            **consts)
    if atomic:
        dz = dz_buf.to(dtype)
    else:
        d_cb = _expert_sum(d_cb, bounds, plan)
        d_cw = _expert_sum(d_cw, bounds, plan)
        dz = _empty((n_tok, rank), dtype, dev)
        dense.gather_dz_kernel[(triton.cdiv(n_tok, GATHER_BT),)](
            du, dz_buf, dz, n_tok, height, width, rank, BT=GATHER_BT, RP=plan.rp,
            HALO=plan.halo, num_warps=4)
    return d_cw.reshape(n_exp, rank, rank, 3, 3).to(dtype), d_cb.to(dtype), dz


def _expert_sum(part, bounds, plan):
    """(programs, L) per-tile partials -> (n_exp, L), summed in tile order."""
    length = part.shape[1]
    out = _empty((plan.num_experts, length), torch.float32, part.device)
    block = 256
    dense.expert_sum_kernel[(plan.num_experts, triton.cdiv(length, block))](
        part, bounds, plan.ntaps, out, plan.num_experts, length, BT=plan.bt,
        NEXP_P=plan.nexp_p,
        BLOCK=block, num_warps=4)
    return out
