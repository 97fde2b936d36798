"""Host side of the Triton kernels: buffers, tile sizes, autotuning and the launch order.

The layer's GEMMs and the order of its passes are in convlora_kernels.layer, the choice
among its candidates in convlora_kernels.plan; what runs here is the Triton part:
    stencil_forward       sort tokens by expert (sort.py: a counting sort, two launches), then
                          stencil_fwd_kernel: u = z + E(z) from z neighbourhoods (N×r fp32)
    layer_forward         the "one_kernel" forward: the same sort, then layer_forward_kernel:
                          the stencil, x W0ᵀ and the epilogue s·u Bᵀ + b, y written once
    dy_pass               dy_pass_kernel reads dy once: dL/du, dL/dlora_B (and dL/dbias)
    two_source_gemm       gemm.py: C = A1 B1 + alpha · A2 B2 (+ bias) written once, the
                          "two_source" forward (y) and dx candidates
    stencil_backward      "split" (BACKWARD_ENV): stencil_grad_kernel recomputes c_k, writes
                          g_k = dL/dc_k and dL/dconv_bias, then stencil_scatter_kernel
                          rebuilds the upsampled taps for dL/dconv_weight and dL/dz; or
                          "merged" (the default): stencil_bwd_kernel runs their phases in
                          one launch (the taps built once for c_k and dL/dW where that
                          fits); split with the z cells held where that was measured
                          faster (backward_plan: bicubic at r <= 4, atomic sums);
                          then gather_dz_kernel (deterministic mode) sums dL/dz over
                          neighbours in order, expert_sum_kernel the weight partials
Without deterministic algorithms the weight gradients and dL/dz are accumulated with
float atomics (relaxed: the sums need no ordering among themselves, only the kernel's end);
with them, each tile (the dy pass: each of at most DY_PARTIALS programs) writes its own
partial sums, reduced in a fixed order.
"""

from __future__ import annotations

import warnings
from typing import Optional, Tuple

import torch
import triton

from .. import _switches
from . import dense, gemm, layer_forward, sort, stencil
from .device import on_tensors_device, ticket_counter, zeroed
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
    """(meta, warps), (meta, warps, stages) or (meta, warps, stages, maxnreg) ->
    triton.Config."""
    return [triton.Config(o[0], num_warps=o[1], **({"num_stages": o[2]} if len(o) > 2 else {}),
                          **({"maxnreg": o[3]} if len(o) > 3 else {}))
            for o in options]


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


# Keys: C_out sets the length of the y and dy loops. Each list starts with the candidate
# that compiles without register spills at the SAM shapes (sm_90). The stencil kernels
# are not autotuned: their tile (Tiling) fixes their warps, one token's ZV channels a
# thread.
_DY_KEY = ["RP", "C_out", "NEED_DB", "NEED_DBIAS", "ATOMIC"]
_dy_pass = _autotuned(dense.dy_pass_kernel,
                      [({"BN": 64}, 8), ({"BN": 128}, 8), ({"BN": 64}, 4)], key=_DY_KEY)
# fp32's own: its dots are three tf32 products, and software-pipelined (the default three
# stages) every candidate above spilled 8-80 bytes at r <= 16 in some specialisation under
# Triton 3.6 or 3.8 (ptxas caps the registers for occupancy); unpipelined, these build
# without spills under both (compile_check)
_dy_pass_f32 = _autotuned(dense.dy_pass_kernel,
                          [({"BN": 32}, 8, 1), ({"BN": 128}, 8, 1)], key=_DY_KEY)
# BM (tokens) x BN (output columns) x BK: the one-kernel forward's GEMM tile. Its stencil runs
# LAYER_FWD_BT tokens at a time, so the stencil's registers and the GEMM tile's share one
# program: the first candidate is the one that builds without spills at r <= 16 for sm_90
# (docs/design.md, "Triton kernel resources", generated by compile_check; one program per SM).
# 64 tokens in 8 warps: ZV = RZ / 4 channels a thread (layer_forward_zv) spans them with
# no thread repeating another's work. fp32 takes 32 (its dots as three tf32 products hold
# three times the fragments: at 64 it spilled 272-440 bytes at r = 16).
LAYER_FWD_BT = {torch.float32: 32}
LAYER_FWD_WARPS = 8


def layer_forward_bt(dtype: torch.dtype) -> int:
    """Tokens of the one-kernel forward's stencil at a time in ``dtype``."""
    return LAYER_FWD_BT.get(dtype, 64)


def layer_forward_zv(tiling: "Tiling") -> int:
    """ZV of the one-kernel forward's stencil: at most RZ / 4 (a warp then spans
    64 / LAYER_FWD_WARPS tokens or fewer), 1 where the tile's is."""
    return max(1, min(tiling.zv, tiling.rz // 4)) if tiling.zv > 1 else 1


_layer_fwd = _autotuned(layer_forward.layer_forward_kernel,
                        [({"BM": 64, "BN": 64, "BK": 64}, 8),
                         ({"BM": 64, "BN": 128, "BK": 64}, 8),
                         ({"BM": 128, "BN": 64, "BK": 32}, 8),
                         ({"BM": 64, "BN": 64, "BK": 64}, 4)],
                        key=["C_in", "C_out", "RZ", "NBP", "TAPS", "HAS_BIAS", "SAVE_U"])
# fp32's own tiles: its dots (the base GEMM's and the stencil's) are three tf32 products,
# three times the operand fragments, and at the 16-bit tiles every candidate spilled 8-160
# bytes (compile_check); at these, none does at r <= 16. The 4-warp ones get register
# caps: left to themselves ptxas capped them at 168 (three programs an SM) at r = 8 and
# spilled 8-16 bytes; at 255 the 32 x 32 tile spilled 24-40 at r = 16 under Triton 3.6,
# at 232 the 64 x 16 one 16 (these caps: none, under 3.6 and 3.8).
_layer_fwd_f32 = _autotuned(layer_forward.layer_forward_kernel,
                            [({"BM": 32, "BN": 64, "BK": 32}, 8),
                             ({"BM": 32, "BN": 32, "BK": 32}, 4, 3, 232),
                             ({"BM": 32, "BN": 64, "BK": 16}, 4, 3, 255)],
                            key=["C_in", "C_out", "RZ", "NBP", "TAPS", "HAS_BIAS", "SAVE_U"])
# The two-source GEMM's tiles (BM x BN x BK, warps, pipeline stages), per dtype: fp32's
# exact dots run on the CUDA cores and take far more registers per output than the 16-bit
# types' MMAs, so its tiles are a quarter the size and its K steps 16 (the rank's too:
# GEMM_RANK_STEP). Every tile builds without spills for sm_90 at r <= 64 (compile_check),
# and for sm_80 but 128 x 256, Hopper's usual bf16 tile, which spills there and which
# _hopper_tiles leaves out below sm_90. The first of each list, the one deterministic mode
# and the interpreter take, fits either's shared memory. Autotuning chooses among the
# rest on the GPU. Key: the output width, K1 and the padded rank (M, the tokens, changes
# with every batch).
def _hopper_tiles(configs, named_args, **kwargs):
    dev = named_args["c_ptr"].device
    if dev.type == "cuda" and torch.cuda.get_device_capability(dev)[0] >= 9:
        return configs
    return [c for c in configs if c.kwargs["BN"] < 256]


_GEMM_KEY = ["N", "K1", "RK", "HAS_BIAS"]
_two_source = _autotuned(gemm.two_source_gemm_kernel,
                         [({"BM": 128, "BN": 128, "BK": 64, "GROUP_M": 8}, 8, 3),
                          ({"BM": 64, "BN": 128, "BK": 64, "GROUP_M": 8}, 4, 4),
                          ({"BM": 128, "BN": 256, "BK": 64, "GROUP_M": 8}, 8, 3)],
                         key=_GEMM_KEY, prune_configs_by={"early_config_prune": _hopper_tiles})
_two_source_f32 = _autotuned(gemm.two_source_gemm_kernel,
                             [({"BM": 64, "BN": 64, "BK": 16, "GROUP_M": 8}, 4, 3),
                              ({"BM": 64, "BN": 128, "BK": 16, "GROUP_M": 8}, 8, 3)],
                             key=_GEMM_KEY)
# the rank's K step: the whole padded rank in one dot, but 16 for fp32 (as its BK)
GEMM_RANK_STEP = {torch.float32: 16}

# The stencil's backward: "split" (stencil_grad_kernel writes g = dL/dc, then
# stencil_scatter_kernel; each loads the tile and builds the taps) or "merged"
# (stencil_bwd_kernel: the same phases in one program per tile, the tile loaded once and,
# where they fit, each conv output's taps built once for c_k and dL/dW; g still goes
# through the program's own rows, read back after a barrier, so dL/dz is formed in the
# scatter's chunks and nothing spills that the split pair does not). Merged saves a launch,
# a second load of every z neighbourhood and (taps once) a third of the tap building; split
# runs two programs where merged runs one. On the first GPU run (an H100,
# benchmarks/results/h100: stencil_time.py, bf16, r = 8 bilinear and r = 3 bicubic, the
# cells held and loaded) merged took 8-31% less time than split in all six comparisons, so
# "merged" runs unless BACKWARD_ENV says "split". Where merged would spill
# (merged_builds: fp32 with held cells at RZ = 16) split runs whatever the switch
# (runs_merged: with a warning once where the switch asked for merged).
BACKWARD_ENV = "CONVLORA_TRITON_BACKWARD"
BACKWARDS = ("split", "merged")


def merged_taps_once(rz: int, dtype: torch.dtype) -> bool:
    """Whether the merged backward builds each conv output's taps once, for c_k and for
    dL/dW (stencil.grad_dw_phase), or twice as the split pair does (grad_phase, then
    dw_phase): once where they fit beside the dL/dW sums without spilling, the 16-bit
    dtypes at RZ <= 8 (compile_check: 240-255 registers; at RZ = 16 once spills ~300 bytes,
    twice none; fp32's three tf32 products a dot spill either way, twice less)."""
    return rz <= 8 and dtype != torch.float32


def backward_kernels() -> str:
    """The stencil backward asked for: BACKWARD_ENV when set, else "merged"."""
    chosen = _switches.get(BACKWARD_ENV, "merged")
    if chosen not in BACKWARDS:
        raise ValueError(f"{BACKWARD_ENV}: expected one of {BACKWARDS}, got {chosen!r}")
    return chosen


# Each stencil program's z cells (stencil.py: NB² cells of [BT, RZ], NB = 2·halo + 1):
# "held" (loaded once per tile, kept in registers across the tile's conv outputs) or
# "loaded" (each conv row loads the cells it combines again: NB² loads of [BT, RZ] per
# conv row, L1 hits, fewer registers). Tiling holds them when a thread's share fits
# CELL_FLOATS (bilinear at r <= 8; bicubic's 49 cells and bilinear r = 16 do not);
# Z_CELLS_ENV forces either for a GPU to compare (benchmarks/stencil_time.py times both).
Z_CELLS_ENV = "CONVLORA_TRITON_Z_CELLS"
Z_CELLS = ("held", "loaded")


def hold_z_cells(cell_floats: int) -> bool:
    """Whether the stencil programs hold their z cells (see Z_CELLS_ENV), cell_floats =
    the floats of NB² cells a thread holds."""
    chosen = _switches.get(Z_CELLS_ENV)
    if chosen is None:
        return cell_floats <= CELL_FLOATS
    if chosen not in Z_CELLS:
        raise ValueError(f"{Z_CELLS_ENV}: expected one of {Z_CELLS}, got {chosen!r}")
    return chosen == "held"


# The forward's own choice where a GPU measured it: on the first H100 run
# (benchmarks/results/h100, stencil_time.py, bf16) the bicubic forward at r = 3 (RZ = 4)
# took 175 us with its cells held against 331 us loaded, and held it builds without spills
# in the 16-bit dtypes (compile_check: 254 registers). Its backward keeps them loaded: held,
# the merged backward spills 112-160 bytes; the split pair builds without spills under
# Triton 3.6 (under 3.8 the deterministic scatter spills 16 bytes), and that run timed it
# at 322 us against 435 for the merged one loaded (merged held, spilling: 292; split
# loaded: 628), so there the backward with atomic sums runs split with its cells held in
# bfloat16 (SPLIT_HOLDS, backward_plan; deterministic sums and float16 keep merged and
# loaded cells: held, their scatter spills under 3.8).
# Elsewhere the forward takes the backward's choice.
FORWARD_HOLDS = {("bicubic", 4)}
SPLIT_HOLDS = {("bicubic", 4)}


def _held_where_measured(holds, dtypes, cell_floats: int, interpolation: str, rz: int,
                         dtype: torch.dtype) -> bool:
    """hold_z_cells, or True where a GPU measured holding faster ((interpolation, rz) in
    ``holds``, ``dtype`` in ``dtypes``) and Z_CELLS_ENV does not force a choice."""
    if _switches.get(Z_CELLS_ENV) is None and dtype in dtypes and \
            (interpolation, rz) in holds:
        return True
    return hold_z_cells(cell_floats)


def hold_z_cells_forward(cell_floats: int, interpolation: str, rz: int,
                         dtype: torch.dtype) -> bool:
    """hold_z_cells for the stencil forward (FORWARD_HOLDS, the 16-bit dtypes)."""
    return _held_where_measured(FORWARD_HOLDS, (torch.bfloat16, torch.float16), cell_floats,
                                interpolation, rz, dtype)


def hold_z_cells_split(cell_floats: int, interpolation: str, rz: int,
                       dtype: torch.dtype) -> bool:
    """hold_z_cells for the split backward where backward_plan takes it for its held cells
    (SPLIT_HOLDS, in bfloat16, where it was timed and builds without spills under Triton
    3.6 and 3.8; float16's scatter spills 24 bytes held under 3.8)."""
    return _held_where_measured(SPLIT_HOLDS, (torch.bfloat16,), cell_floats, interpolation,
                                rz, dtype)


DY_BT = 64      # tokens per row block of the dy pass (the M of its dots)
# programs of the deterministic dy pass, so its partials of dL/dB are DY_PARTIALS x C_out x
# r x 4 bytes at any N: 19 MB at C_out = 2304, r = 8; 84 MB at C_out = 1280, r = 64
# (one slot per row block took 1.3 GB there at N = 64·64·64)
DY_PARTIALS = 256
GATHER_BT = 64  # tokens per program of the dL/dz gather


# Floats a thread may take for a stencil tile's NB² z cells, or the scatter's cells of
# dL/dz: 36 at the target (bilinear, r = 8: 9 cells of a token's 4 channels), where the
# forward takes 164 registers (three 4-warp programs per SM; tests/test_triton.py holds
# <= 168), the grad and scatter kernels 164-168 (three) and the merged backward 226 (two),
# none spilling.
CELL_FLOATS = 36
# Whether Tiling sizes the stencil kernels for a GPU's registers (the z cells held where
# they fit, dL/dz in channel chunks and row passes). The interpreter has no registers to
# fit, and its time goes by the operations a program runs: it takes the configuration with
# the fewest (cells held, one chunk, one pass), which runs the same kernel code; tests set
# this to run the GPU's configurations under it.
GPU_TILING = not INTERPRETED
# A stencil program: STENCIL_BT tokens in STENCIL_WARPS warps (Tiling)
STENCIL_BT = 64
STENCIL_WARPS = 4


def stencil_tile(dtype: torch.dtype):
    """(tokens, warps) of a stencil program: STENCIL_BT in STENCIL_WARPS, half the tokens in
    fp32, whose dots are three tf32 products (three times the operand fragments): at 64
    tokens its scatter and merged backward spilled 150-400 bytes at r = 8, at 32 none
    (compile_check)."""
    return (STENCIL_BT // 2 if dtype == torch.float32 else STENCIL_BT), STENCIL_WARPS


def padded_rank(rank: int) -> int:
    """RZ, the stencil kernels' rank: a power of two, and 4 taps·RZ >= 16 for the conv."""
    return max(4, next_pow2(rank))


def f32_register_cap(kernel: str, hold: bool, rz: int) -> Optional[int]:
    """The registers (ptxas' maxnreg) an fp32 stencil program may take, or None: ptxas'
    own choice. Left to itself, ptxas caps some of them for occupancy (168 registers,
    three 4-warp programs an SM) and spills 8 bytes to fit: the forward and grad kernels
    that load their cells (bicubic) at RZ = 16 under Triton 3.8, the grad kernel that
    holds them at RZ = 8 under 3.6. Given the cap, it allocates without spilling: 168 for
    the kernels that load their cells (at RZ = 8 and 16, 3.6 and 3.8), 184 (two programs
    an SM) for the grad kernel holding its cells at RZ <= 8 (at 168 it spills 8 bytes
    under 3.6). The forward holding its cells at RZ <= 8 (3.8 capped it at 128 and spilled
    16 bytes) gets 168, the merged backward holding them at RZ = 4 (3.6: 128, 8 bytes)
    184, and the scatter and merged backward that load them 240 (3.8 allocates them
    204-230; 3.6 capped them at 128-168 and spilled 16-48 bytes) (compile_check --dtypes
    fp32)."""
    if kernel in ("fwd", "grad") and not hold:
        return 168
    if kernel == "grad" and rz <= 8:
        return 184
    if kernel == "fwd" and rz <= 8:
        return 168
    if kernel == "bwd" and hold and rz <= 4:
        return 184
    if kernel in ("scatter", "bwd") and not hold:
        return 240
    return None


def merged_builds(rz: int, hold: bool, dtype: torch.dtype) -> bool:
    """Whether the merged backward (BACKWARD_ENV) builds without spills: not in fp32 with
    the cells held at RZ = 16 (bilinear), where at 255 registers it spills 24-64 bytes
    whatever its chunks (RC, AH) or cells (compile_check); the split pair runs there."""
    return not (dtype == torch.float32 and hold and rz >= 16)


_MERGED_REFUSED = set()  # the (RZ, dtype) a forced merged backward was refused at, warned


def runs_merged(tiling: "Tiling") -> bool:
    """Whether the stencil backward runs merged: BACKWARD_ENV asks for it and it builds
    without spills there (tiling.merged). Where it was asked for and does not, the split
    pair runs, with a warning once per padded rank and dtype, so a timing of "merged"
    there is not silently one of split."""
    if backward_kernels() != "merged":
        return False
    if tiling.merged:
        return True
    key = (tiling.rz, tiling.dtype)
    if _switches.get(BACKWARD_ENV) == "merged" and key not in _MERGED_REFUSED:
        _MERGED_REFUSED.add(key)
        warnings.warn(f"{BACKWARD_ENV}=merged: the merged stencil backward spills registers "
                      f"in {tiling.dtype} with its z cells held at padded rank {tiling.rz}, "
                      "so the split pair (stencil_grad_kernel, stencil_scatter_kernel) runs "
                      "instead", RuntimeWarning, stacklevel=2)
    return False


def backward_plan(tiling: "Tiling", atomic: bool) -> Tuple[bool, bool]:
    """(merged, hold) of the stencil backward: runs_merged and the tiling's cells, except
    where holding the cells was measured faster with the split pair (SPLIT_HOLDS) and the
    sums are atomic: split with its cells held, unless BACKWARD_ENV asks for merged (the
    deterministic scatter spills 16 bytes held under Triton 3.8, so it keeps them loaded)."""
    if atomic and tiling.hold_split and not tiling.hold and \
            _switches.get(BACKWARD_ENV) != "merged":
        return False, True
    return runs_merged(tiling), tiling.hold


class Tiling:
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
        self.rz = padded_rank(rank)
        # BT = 64 tokens a tile in 4 warps (32 in fp32: stencil_tile): the tile's dots
        # place 16 rows a warp, so fewer tokens a warp would replicate them. A thread
        # takes ZV channels of a token at once (stencil.z_cell: 4 when the rank is a power
        # of two, so its rows load 4 channels at once; at most RZ / 2, so a warp spans at
        # most 16 tokens, and no more than leaves every thread a distinct part of a
        # [BT, RZ] tensor; else 1), and a tile's [BT, RZ] tensors are BT·RZ / 128 floats a
        # thread.
        self.bt, self.warps = stencil_tile(dtype)
        self.zv = min(4, self.rz // 2, self.bt * self.rz // (32 * self.warps)) \
            if rank == self.rz else 1
        per_thread = self.bt * self.rz // (32 * self.warps)
        nb = 2 * self.halo + 1
        cells = nb * nb
        gpu = GPU_TILING
        self.hold = hold_z_cells(cells * per_thread if gpu else 0)
        self.hold_fwd = hold_z_cells_forward(cells * per_thread, interpolation, self.rz,
                                             dtype) if gpu else self.hold
        self.hold_split = hold_z_cells_split(cells * per_thread, interpolation, self.rz,
                                             dtype) if gpu else self.hold
        # the scatter's dL/dz, RC channels at a time: NB² cells within half CELL_FLOATS a
        # thread (the dot that forms dL/dU and the table weights take the rest), RC >= 4
        # (4·RC >= 16, tl.dot's K)
        self.rc = min(self.rz, max(4, _pow2_floor(CELL_FLOATS // 2 * self.rz
                                                  // (cells * per_thread)))) if gpu else self.rz
        # ... and AH rows of the neighbourhood at a time: AH·NB cells of BT·RC / 128
        # floats a thread within CELL_FLOATS (bicubic's 7 rows in passes of 2), half that
        # in fp32, whose dots take three tf32 products' operands (bicubic's scatter at r =
        # 3 and 8 took 255 registers and spilled 8 bytes at 5 rows a pass; at 2, ~210)
        rc_floats = max(1, self.bt * self.rc // (32 * self.warps))
        self.ah = max(1, min(nb, CELL_FLOATS // (nb * rc_floats)
                             // (2 if dtype == torch.float32 else 1))) if gpu else nb
        # fp32's dots as three tf32 products (near fp32's rounding on the tensor cores):
        # "ieee" runs them on the CUDA cores with a dot's whole K a thread, which spilled
        # kilobytes in every stencil kernel (compile_check)
        self.prec = "tf32x3" if dtype == torch.float32 else _precision(dtype)
        self.nexp_p = max(2, next_pow2(num_experts))
        self.taps_once = merged_taps_once(self.rz, dtype)
        self.dtype = dtype
        self.merged = merged_builds(self.rz, self.hold, dtype) if gpu else True

    def programs(self, n_tokens: int) -> int:
        """Enough programs for every expert's tiles: sum_e ceil(count_e / BT) <= this."""
        return triton.cdiv(n_tokens, self.bt) + self.num_experts

    def constexprs(self):
        """The stencil kernels' compile-time arguments (tile, padding, taps, precision)."""
        return dict(BT=self.bt, RZ=self.rz, RP=self.rp, NBP=self.nbp, HALO=self.halo,
                    TAPS=self.taps, NEXP_P=self.nexp_p, BORDER=BORDER, PREC=self.prec,
                    HOLD=self.hold, ZV=self.zv)

    def layer_forward_constexprs(self, dtype: torch.dtype):
        """constexprs() for the one-kernel forward's stencil: layer_forward_bt(dtype) tokens
        at a time, layer_forward_zv channels a thread, its cells held when a thread's share
        of LAYER_FWD_WARPS warps fits CELL_FLOATS (always under the interpreter)."""
        bt = layer_forward_bt(dtype)
        share = (2 * self.halo + 1) ** 2 * max(1, bt * self.rz // (32 * LAYER_FWD_WARPS))
        return dict(self.constexprs(), BT=bt, ZV=layer_forward_zv(self),
                    HOLD=hold_z_cells(share if GPU_TILING else 0))

    def launch(self, kernel: str, hold: Optional[bool] = None):
        """The stencil kernels' launch options (no software pipelining: their loops' loads
        are L1 hits of the tile's own rows), and in fp32 the register cap
        f32_register_cap gives ``kernel`` ("fwd", "grad", "scatter" or "bwd") with its cells
        held or not (``hold``, else the tiling's choice for it)."""
        options = dict(num_warps=self.warps, num_stages=1)
        if hold is None:
            hold = self.hold_fwd if kernel == "fwd" else self.hold
        cap = f32_register_cap(kernel, hold, self.rz) if self.dtype == torch.float32 else None
        if cap is not None:
            options["maxnreg"] = cap
        return options


def aligned_z(z2: torch.Tensor, tiling: "Tiling") -> torch.Tensor:
    """z2 (N, r) with unit channel stride and, when the tile loads ZV channels at once,
    rows starting at multiples of ZV elements (a copy of N·r elements otherwise)."""
    if z2.stride(-1) != 1 or z2.stride(0) % tiling.zv:
        return z2.contiguous()
    return z2


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


SORT_BLOCK = 256  # tokens per program of the counting sort


@on_tensors_device
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


@on_tensors_device
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
        tiling = Tiling(height, width, rank, n_exp, scales, interpolation, z2.dtype, z2.device)
        z2 = aligned_z(z2, tiling)
        stencil.stencil_fwd_kernel[(tiling.programs(n_tok),)](
            z2, perm, bounds, tiling.ntaps, *tiling.tables, conv_weight.contiguous(),
            conv_bias.contiguous(), u, height, width, rank, n_exp, tiling.rows_y, tiling.rows_x,
            z2.stride(0), **dict(tiling.constexprs(), HOLD=tiling.hold_fwd),
            **tiling.launch("fwd"))
    return u, perm, bounds


@on_tensors_device
def layer_forward(x2, weight, bias, lora_B, z2, expert_index, conv_weight, conv_bias,
                  scaling, scales, interpolation, height, width, save):
    """The one-kernel forward (layer_forward.py): (y (N, C_out) in x's dtype, u (N, r) float32
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
        tiling = Tiling(height, width, rank, n_exp, scales, interpolation, x2.dtype, dev)
        z2 = aligned_z(z2, tiling)
        has_bias = bias is not None
        tuners = _layer_fwd_f32 if x2.dtype == torch.float32 else _layer_fwd
        _tuned_or_first(tuners)[lambda meta: (triton.cdiv(n_tok, meta["BM"]) + n_exp,)](
            x2, weight, bias.contiguous() if has_bias else y, lora_b, z2, perm, bounds,
            tiling.ntaps, *tiling.tables, conv_weight.contiguous(), conv_bias.contiguous(), y, u,
            n_tok, c_in, c_out, height, width, rank, n_exp, tiling.rows_y, tiling.rows_x,
            float(scaling), x2.stride(0), weight.stride(0), lora_b.stride(0), z2.stride(0),
            HAS_BIAS=has_bias, SAVE_U=save, **tiling.layer_forward_constexprs(x2.dtype))
    return y, u, perm, bounds


@on_tensors_device
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
    du = _empty((n_tok, rank), f32, dev)
    if n_tok == 0:
        return (du, torch.zeros((c_out, rank), dtype=dtype, device=dev) if need_b else None,
                torch.zeros((c_out,), dtype=dtype, device=dev) if need_bias else None)
    # atomics: one program per row block, adding into accumulators that are zero between
    # launches, read out by the last program; else at most DY_PARTIALS programs, each
    # summing its row blocks into its own partial slot (a buffer of fixed size, reduced in
    # order by torch)
    programs = triton.cdiv(n_tok, DY_BT)
    unused = torch.empty(1, dtype=f32, device=dev)  # a pointer the kernel never follows
    d_b_out = _empty((c_out, rank), dtype, dev) if need_b and atomic else None
    d_bias_out = _empty((c_out,), dtype, dev) if need_bias and atomic else None
    if atomic:
        acc = zeroed(dev, c_out * rank + c_out, f32)  # dL/dB, then dL/dbias
        d_lora_b, d_bias = acc[:c_out * rank], acc[c_out * rank:]
    else:
        programs = min(programs, DY_PARTIALS)
        d_lora_b = _empty((programs, c_out, rank), f32, dev) if need_b else unused
        d_bias = _empty((programs, c_out), f32, dev) if need_bias else unused
    lora_b = lora_B.contiguous()
    _tuned_or_first(_dy_pass_f32 if dtype == f32 else _dy_pass)[(programs,)](
        dy2, lora_b, u, du, d_lora_b, d_bias, ticket_counter(dev) if atomic else unused,
        unused if d_b_out is None else d_b_out, unused if d_bias_out is None else d_bias_out,
        n_tok, c_out, rank, float(scaling), dy2.stride(0), lora_b.stride(0), BT=DY_BT,
        RP=max(16, next_pow2(rank)), NEED_DB=need_b, NEED_DBIAS=need_bias, ATOMIC=atomic,
        PREC=_precision(dtype))
    if atomic:
        return du, d_b_out, d_bias_out
    # torch's reduction of the partial slots is deterministic
    return (du, d_lora_b.sum(0).to(dtype) if need_b else None,
            d_bias.sum(0).to(dtype) if need_bias else None)


@on_tensors_device
def two_source_gemm(a1, b1, a2, b2, alpha, bias=None):
    """C = a1 b1 + alpha · a2 b2 (+ bias) in a1's dtype, written once (gemm.py): a1 (M, K1),
    b1 (K1, N), a2 (M, K2), b2 (K2, N), any strides (the b operands are parameter views);
    a2 and b2 are cast to a1's dtype when they differ (u is float32 on this backend)."""
    m, k1 = a1.shape
    n, k2 = b1.shape[1], a2.shape[1]
    dtype = a1.dtype
    a2 = a2 if a2.dtype == dtype else a2.to(dtype)
    b2 = b2 if b2.dtype == dtype else b2.to(dtype)
    c = _empty((m, n), dtype, a1.device)
    if m == 0 or n == 0:
        return c
    has_bias = bias is not None
    grid = lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)  # noqa: E731
    tuners = _two_source_f32 if dtype == torch.float32 else _two_source
    _tuned_or_first(tuners)[grid](
        a1, b1, a2, b2, bias if has_bias else c, c, m, n, k1, k2, float(alpha),
        a1.stride(0), a1.stride(1), b1.stride(0), b1.stride(1), a2.stride(0), a2.stride(1),
        b2.stride(0), b2.stride(1), c.stride(0), HAS_BIAS=has_bias,
        RK=max(16, next_pow2(min(k2, GEMM_RANK_STEP.get(dtype, 64)))), PREC=_precision(dtype))
    return c


@on_tensors_device
def stencil_backward(du, z2, perm, bounds, conv_weight, conv_bias, scales, interpolation, height,
                     width):
    """(dL/dz (N, r) in z's dtype, dL/dconv_weight, dL/dconv_bias in conv_weight's dtype)
    from dL/du (N, r), which is only read."""
    n_tok, rank = z2.shape
    n_exp = conv_weight.shape[0]
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    tiling = Tiling(height, width, rank, n_exp, scales, interpolation, z2.dtype, z2.device)
    z2 = aligned_z(z2, tiling)
    atomic = not torch.are_deterministic_algorithms_enabled()
    du32 = du if du.dtype == torch.float32 and du.is_contiguous() \
        else du.to(torch.float32).contiguous()
    d_cw, d_cb, dz = _stencil_backward(tiling, z2, perm, bounds, conv_weight.contiguous(),
                                       conv_bias, du32, n_tok, height, width, atomic,
                                       z2.dtype)
    # A token whose expert is out of range got no tile: nothing of it reached its
    # neighbours, and its own dL/dz is NaN, as its output is.
    nan_out_of_range(dz, perm, bounds)
    return dz, d_cw.to(conv_weight.dtype), d_cb.to(conv_bias.dtype)


def _precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


NAN_BLOCK = 64  # sorted positions per program of nan_out_of_range (a [64, RP] tile)


def nan_out_of_range(out, perm, bounds):
    """Sets the rows of out (N, r), contiguous, of the tokens whose expert index is out of
    range to NaN, without a host synchronisation (sort.nan_out_of_range_kernel)."""
    n_tok, rank = out.shape
    if n_tok == 0:
        return
    sort.nan_out_of_range_kernel[(triton.cdiv(n_tok, NAN_BLOCK),)](
        perm, bounds, out, n_tok, bounds.numel() - 1, rank, BLOCK=NAN_BLOCK,
        RP=max(2, next_pow2(rank)), num_warps=4)


def _stencil_backward(tiling, z2, perm, bounds, cw, conv_bias, du, n_tok, height, width,
                      atomic, dtype):
    """(dL/dconv_weight, dL/dconv_bias, dL/dz in dtype) from du (N, r) float32."""
    dev, rank, n_exp = du.device, tiling.rank, tiling.num_experts
    f32 = torch.float32
    programs = tiling.programs(n_tok)
    consts = tiling.constexprs()
    nb = 2 * tiling.halo + 1
    shapes = ((n_exp, rank), (n_exp, rank * rank * 9))
    if n_tok == 0 or atomic:
        d_cb, d_cw = (torch.zeros(s, dtype=f32, device=dev) for s in shapes)
    else:  # one slot per program, reduced per expert in tile order
        d_cb, d_cw = (_empty((programs, s[1]), f32, dev) for s in shapes)
    if n_tok == 0:
        dz = torch.zeros((0, rank), dtype=dtype, device=dev)
        return d_cw.reshape(n_exp, rank, rank, 3, 3).to(dtype), d_cb.to(dtype), dz
    ty, oy, tx, ox = tiling.tables
    args = (z2, perm, bounds, tiling.ntaps)
    geometry = (height, width, rank, n_exp, tiling.rows_y, tiling.rows_x, z2.stride(0))
    # atomics add the stencil's dL/dz onto a copy of du (the kernels read du itself);
    # otherwise per-token neighbour slots, zero where no tile writes (tokens with an
    # out-of-range expert), gathered below in a fixed order
    dz_buf = du.clone() if atomic else torch.zeros((n_tok, nb, nb, rank), dtype=f32,
                                                   device=dev)
    g = _empty((n_tok, tiling.taps ** 2, rank), f32, dev)
    merged, hold = backward_plan(tiling, atomic)
    consts = dict(consts, HOLD=hold)
    if merged:
        stencil.stencil_bwd_kernel[(programs,)](
            *args, ty, oy, tx, ox, cw, conv_bias.contiguous(), du, g, d_cb, d_cw, dz_buf,
            *geometry, ATOMIC=atomic, RC=tiling.rc, AH=tiling.ah,
            TAPS_ONCE=tiling.taps_once, **consts, **tiling.launch("bwd"))
    else:
        stencil.stencil_grad_kernel[(programs,)](
            *args, ty, oy, tx, ox, cw, conv_bias.contiguous(), du, g, d_cb, *geometry,
            ATOMIC=atomic, **consts, **tiling.launch("grad", hold))
        stencil.stencil_scatter_kernel[(programs,)](
            *args, ty, tx, cw, g, d_cw, dz_buf, *geometry, ATOMIC=atomic, RC=tiling.rc,
            AH=tiling.ah, **consts, **tiling.launch("scatter", hold))
    if atomic:
        dz = dz_buf.to(dtype)
    else:
        d_cb = _expert_sum(d_cb, bounds, tiling)
        d_cw = _expert_sum(d_cw, bounds, tiling)
        dz = _empty((n_tok, rank), dtype, dev)
        dense.gather_dz_kernel[(triton.cdiv(n_tok, GATHER_BT),)](
            du, dz_buf, dz, n_tok, height, width, rank, BT=GATHER_BT, RP=tiling.rp,
            HALO=tiling.halo, num_warps=4)
    return d_cw.reshape(n_exp, rank, rank, 3, 3).to(dtype), d_cb.to(dtype), dz


def _expert_sum(part, bounds, tiling):
    """(programs, L) per-tile partials -> (n_exp, L), summed in tile order."""
    length = part.shape[1]
    out = _empty((tiling.num_experts, length), torch.float32, part.device)
    block = 256
    dense.expert_sum_kernel[(tiling.num_experts, triton.cdiv(length, block))](
        part, bounds, tiling.ntaps, out, tiling.num_experts, length, BT=tiling.bt,
        NEXP_P=tiling.nexp_p,
        BLOCK=block, num_warps=4)
    return out
