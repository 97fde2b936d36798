"""The layer's forward as one Triton kernel: the expert stencil, the base GEMM and the
up-projection, with y written once (the "one_kernel" forward candidate of
convlora_kernels.plan).

Per program, BM tokens of one expert in the sorted order (as the stencil kernels take
them, stencil.expert_tile):
    1. u = z + E_e(z) for the BM tokens, BT at a time by stencil.tile_u (the stencil
       forward's own code), kept in registers [BM, RP];
    2. for each block of BN output columns: acc = x[tokens] W0ᵀ over C_in in steps of BK
       (the rows of x gathered by token id: each row is contiguous), then the epilogue
       acc += scaling · u Bᵀ + b, stored once into y[tokens].
So y is written once, C = b + s·u Bᵀ is never formed, and of rank r only z (read, with
its halo, by the stencil) and u (written when the backward needs it) touch memory.

Why sorted tiles and not raster tiles with z's halo recomputed from x: a raster tile
holds tokens of every expert (token routing), so its stencil would run every expert's
conv on every token (Σ_e taps_e² = 20 conv outputs per token for 8 bilinear experts of
scales 1..8, against 2.5 on average in the sorted order); and recomputing the halo's z
from x in a sorted tile reads (2·halo + 1)² rows of x per token. The price of sorted
tiles is the z GEMM (one read of x, N·C_in elements) before this kernel.

Counts at the target shape (4, 64, 64, 768 -> 2304), r = 8, 8 bilinear experts of scales
1..8, bf16, first autotuning candidate (BM = BN = BK = 64, 8 warps; one CTA per SM by
registers, docs/design.md "Triton kernel resources" has its registers and shared memory):
    programs      sum_e ceil(count_e / 64) + spares <= 256 + 8 = 264, two waves on 132 SMs
    DRAM          x 25 MB + W0 3.5 MB read, y 75 MB written once, z ~0.3 MB, u 0.5 MB
                  (training): ~105 MB, ~130 MB with the z GEMM before it; "bias_first"
                  moves ~280 MB (C written by one GEMM, read by the base GEMM): the
                  fused kernel saves C's write, ~23 µs at ~3.3 TB/s, if its GEMM runs
                  near the 72 µs compute floor
    L2 -> SM      every program reads its 64 rows of x once per column block (36 of them)
                  and all of W0 once: 2 bytes · N · C_in · C_out · (1/BM + 1/BN) = 1.8 GB,
                  against ~0.7 GB for a 128 x 256 vendor-BLAS tile; at a few TB/s of L2
                  bandwidth that can cost more than the 75 MB pass over y it saves, unless
                  the x rows stay in L1 across column blocks (98 KB per program).
    flops         the base GEMM's 58 GFLOP; the stencil ~2.5 conv outputs per token
So whether this kernel beats "bias_first" is a GPU measurement (benchmarks/plan_time.py,
a stage of gpu_check.sh); plan.choose never picks it by the byte model.

Tokens whose expert index is out of range (check_expert_index=False) sort outside every
expert's tiles; the programs past the last tile write their rows of y (and u) as NaN,
so every element of y is written by some program.
"""

import triton
import triton.language as tl

from .stencil import expert_tile, pad_cols, tile_ranges, tile_u


@triton.jit
def spare_rows(bounds_ptr, ntaps_ptr, n_exp, N, BM: tl.constexpr, NEXP_P: tl.constexpr):
    """For a program past the last expert tile: the sorted positions [BM] of the
    out-of-range tokens it covers and their validity. Those tokens sit before bounds[0]
    and from bounds[n_exp] on; spare program q takes the q-th block of BM of them.
    sum_e ceil(count_e / BM) + ceil(out_of_range / BM) <= ceil(N / BM) + n_exp, the grid,
    so every one is covered."""
    pid = tl.program_id(0).to(tl.int64)
    tiles = tile_ranges(bounds_ptr, ntaps_ptr, n_exp, BM, NEXP_P)[4]
    q = pid - tl.sum(tiles, 0)
    first = tl.load(bounds_ptr).to(tl.int64)
    last = tl.load(bounds_ptr + n_exp).to(tl.int64)
    v = q * BM + tl.arange(0, BM)
    pos = tl.where(v < first, v, v - first + last)
    return pos, pos < N


@triton.jit
def layer_forward_kernel(
        x_ptr,        # (N, C_in) x, row stride stride_xn
        w_ptr,        # (C_out, C_in) W0, row stride stride_wn
        bias_ptr,     # (C_out,) b (unused without HAS_BIAS)
        lora_b_ptr,       # (C_out, r) lora_B, row stride stride_bn
        z_ptr,        # (N, r) z = x Aᵀ, row stride stride_zn
        perm_ptr, bounds_ptr, ntaps_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, cw_ptr, cb_ptr,
        # (as for stencil.stencil_fwd_kernel)
        y_ptr,        # (N, C_out) output, contiguous
        u_ptr,        # (N, r) float32 output u (written with SAVE_U)
        N, C_in, C_out, H, W, r, n_exp, rows_y, rows_x, scaling, stride_xn, stride_wn,
        stride_bn, stride_zn,
        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BT: tl.constexpr,
        RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr, HALO: tl.constexpr,
        TAPS: tl.constexpr, NEXP_P: tl.constexpr, BORDER: tl.constexpr, PREC: tl.constexpr,
        HAS_BIAS: tl.constexpr, SAVE_U: tl.constexpr, HOLD: tl.constexpr,
        ZV: tl.constexpr):
    """y_t = x_t W0ᵀ + scaling · u_t Bᵀ + b for BM tokens of one expert (module doc)."""
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BM, NEXP_P)
    ci = tl.arange(0, RP)
    if e >= n_exp:  # out-of-range tokens, if any: NaN rows
        pos, valid = spare_rows(bounds_ptr, ntaps_ptr, n_exp, N, BM, NEXP_P)
        tok = tl.load(perm_ptr + pos, mask=valid, other=0)
        nan = tl.full([BM, BN], float("nan"), y_ptr.dtype.element_ty)
        for n0 in range(0, C_out, BN):
            cols = n0 + tl.arange(0, BN)
            tl.store(y_ptr + tok[:, None] * C_out + cols[None, :], nan,
                     mask=valid[:, None] & (cols[None, :] < C_out))
        if SAVE_U:
            tl.store(u_ptr + tok[:, None] * r + ci[None, :],
                     tl.full([BM, RP], float("nan"), tl.float32),
                     mask=valid[:, None] & (ci[None, :] < r))
        return

    # 1. the stencil, BT tokens at a time, into u [BM, RP]
    sub = tl.arange(0, BM // BT)
    u3 = tl.zeros([BM // BT, BT, RP], tl.float32)
    for j in range(BM // BT):
        _, _, us = tile_u(z_ptr, perm_ptr, e, start + j * BT, stop, ntaps_ptr, ty_ptr,
                          oy_ptr, tx_ptr, ox_ptr, cw_ptr, cb_ptr, H, W, r, rows_y, rows_x,
                          stride_zn, BT, RZ, RP, NBP, HALO, TAPS, BORDER, PREC, HOLD,
                          ZV)
        us = pad_cols(us, BT, RZ, RP)
        u3 = tl.where((sub == j)[:, None, None], us[None, :, :], u3)
    u = tl.reshape(u3, [BM, RP])
    offs = start + tl.arange(0, BM)
    tmask = offs < stop
    tok = tl.load(perm_ptr + offs, mask=tmask, other=0)
    if SAVE_U:
        tl.store(u_ptr + tok[:, None] * r + ci[None, :], u,
                 mask=tmask[:, None] & (ci[None, :] < r))
    uq = u.to(x_ptr.dtype.element_ty)  # rounded to x's dtype, as the reference rounds u

    # 2. the base GEMM over blocks of output columns, the rank-r term and b in the epilogue
    kk = tl.arange(0, BK)
    x_rows = x_ptr + tok[:, None] * stride_xn
    for n0 in range(0, C_out, BN):
        cols = n0 + tl.arange(0, BN)
        cmask = cols < C_out
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, C_in, BK):
            ks = k0 + kk
            kmask = ks < C_in
            xa = tl.load(x_rows + ks[None, :], mask=tmask[:, None] & kmask[None, :],
                         other=0.0)
            wb = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None],
                         mask=kmask[:, None] & cmask[None, :], other=0.0)
            acc = tl.dot(xa, wb, acc, input_precision=PREC)
        bt = tl.load(lora_b_ptr + cols[None, :] * stride_bn + ci[:, None],
                     mask=(ci[:, None] < r) & cmask[None, :], other=0.0)
        acc += scaling * tl.dot(uq, bt, input_precision=PREC)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + tok[:, None] * C_out + cols[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=tmask[:, None] & cmask[None, :])

