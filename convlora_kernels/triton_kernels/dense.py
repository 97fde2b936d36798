"""Triton kernels outside the stencil: one pass over dy for dL/du and dL/dlora_B (and
dL/dbias), the deterministic gather of dL/dz, and the fixed-order per-expert reduction of
per-tile weight-gradient partials."""

import triton
import triton.language as tl

from .router import last_program
from .stencil import tile_ranges


@triton.jit
def dy_pass_kernel(
        dy_ptr,       # (N, C_out) dL/dy, row stride stride_dyn
        lora_b_ptr,       # (C_out, r) lora_B, row stride stride_bn
        u_ptr,        # (N, r) float32 u from the forward
        du_ptr,       # (N, r) float32 output: dL/du = scaling · dy B
        d_lora_b_ptr,      # float32: (C_out, r) zero with ATOMIC, else (programs, C_out, r) partials
        dbias_ptr,    # float32: (C_out,) zero with ATOMIC, else (programs, C_out) partials
        counter_ptr,  # (1,) int32, zero (ATOMIC): device.ticket_counter
        db_out_ptr,   # (C_out, r) output in dy's dtype: dL/dB (ATOMIC and NEED_DB)
        dbias_out_ptr,  # (C_out,) output in dy's dtype: dL/dbias (ATOMIC and NEED_DBIAS)
        N, C_out, r, scaling, stride_dyn, stride_bn,
        BT: tl.constexpr, RP: tl.constexpr, BN: tl.constexpr, NEED_DB: tl.constexpr,
        NEED_DBIAS: tl.constexpr, ATOMIC: tl.constexpr, PREC: tl.constexpr):
    """Reads dy once: dL/du = scaling · dy B, dL/dB = scaling · dyᵀ u, dL/dbias = Σ_t dy_t.

    Program p takes the row blocks p, p + P, p + 2P, ... (P programs). With ATOMIC its sums
    of dL/dB and dL/dbias are added with atomics into accumulators that are zero before the
    launch (device.zeroed); the program that finishes last (router.last_program) writes
    them out in dy's dtype and zeroes them again: no launch before or after. Without
    ATOMIC each program's partial sums accumulate in its own slot, in row-block order, so
    the partial buffers hold P slots whatever N is, and the result is the same run to run.
    """
    pid = tl.program_id(0)
    progs = tl.num_programs(0)
    ci = tl.arange(0, RP)
    for blk in range(pid, tl.cdiv(N, BT), progs):
        rows = (blk * BT + tl.arange(0, BT)).to(tl.int64)  # blk * BT <= N fits int32
        rmask = rows < N
        later = blk > pid  # past this program's first row block: add to its slots
        u = tl.load(u_ptr + rows[:, None] * r + ci[None, :],
                    mask=rmask[:, None] & (ci[None, :] < r), other=0.0)
        uq = u.to(dy_ptr.dtype.element_ty)  # rounded to dy's dtype, as the reference does
        du = tl.zeros([BT, RP], tl.float32)
        for n0 in range(0, C_out, BN):
            cols = n0 + tl.arange(0, BN)
            cmask = cols < C_out
            dyc = tl.load(dy_ptr + rows[:, None] * stride_dyn + cols[None, :],
                          mask=rmask[:, None] & cmask[None, :], other=0.0)
            bch = tl.load(lora_b_ptr + cols[:, None] * stride_bn + ci[None, :],
                          mask=cmask[:, None] & (ci[None, :] < r), other=0.0)
            du += tl.dot(dyc, bch, input_precision=PREC)
            if NEED_DB:
                part = scaling * tl.dot(tl.trans(dyc), uq, input_precision=PREC)
                pm = cmask[:, None] & (ci[None, :] < r)
                if ATOMIC:
                    tl.atomic_add(d_lora_b_ptr + cols[:, None] * r + ci[None, :], part, mask=pm,
                                  sem="relaxed")
                else:
                    slot = d_lora_b_ptr + (pid * C_out + cols[:, None]) * r + ci[None, :]
                    part += tl.load(slot, mask=pm & later, other=0.0)
                    tl.store(slot, part, mask=pm)
            if NEED_DBIAS:
                sb = tl.sum(dyc.to(tl.float32), axis=0)
                if ATOMIC:
                    tl.atomic_add(dbias_ptr + cols, sb, mask=cmask, sem="relaxed")
                else:
                    slot_b = dbias_ptr + pid * C_out + cols
                    sb += tl.load(slot_b, mask=cmask & later, other=0.0)
                    tl.store(slot_b, sb, mask=cmask)
        tl.store(du_ptr + rows[:, None] * r + ci[None, :], scaling * du,
                 mask=rmask[:, None] & (ci[None, :] < r))
    if ATOMIC and (NEED_DB or NEED_DBIAS):
        if last_program(counter_ptr, progs):
            for n0 in range(0, C_out, BN):
                cols = n0 + tl.arange(0, BN)
                cmask = cols < C_out
                if NEED_DB:
                    at = cols[:, None] * r + ci[None, :]
                    pm = cmask[:, None] & (ci[None, :] < r)
                    acc = tl.load(d_lora_b_ptr + at, mask=pm, other=0.0, cache_modifier=".cg")
                    tl.store(db_out_ptr + at, acc.to(db_out_ptr.dtype.element_ty), mask=pm)
                    tl.store(d_lora_b_ptr + at, tl.zeros([BN, RP], tl.float32), mask=pm)
                if NEED_DBIAS:
                    acc_b = tl.load(dbias_ptr + cols, mask=cmask, other=0.0,
                                    cache_modifier=".cg")
                    tl.store(dbias_out_ptr + cols, acc_b.to(dbias_out_ptr.dtype.element_ty),
                             mask=cmask)
                    tl.store(dbias_ptr + cols, tl.zeros([BN], tl.float32), mask=cmask)
            tl.store(counter_ptr, 0)


@triton.jit
def gather_dz_kernel(
        du_ptr,       # (N, r) float32 dL/du (the residual's share of dL/dz)
        nb_ptr,       # (N, NB, NB, r) float32: token t's dL/dz at (h_t + a - HALO, w_t + b - HALO)
        dz_ptr,       # (N, r) output dL/dz in dz_ptr's dtype
        N, H, W, r,
        BT: tl.constexpr, RP: tl.constexpr, HALO: tl.constexpr):
    """dL/dz_j = dL/du_j + sum over the tokens t around j of t's share, in a fixed order."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BT + tl.arange(0, BT)
    rmask = rows < N
    ci = tl.arange(0, RP)
    cm = ci[None, :] < r
    acc = tl.load(du_ptr + rows[:, None] * r + ci[None, :], mask=rmask[:, None] & cm,
                  other=0.0)
    hw = rows % (H * W)
    h = hw // W
    w = hw % W
    nb = 2 * HALO + 1
    # a loop rather than unrolled: unrolled, all (2·HALO + 1)² loads are in flight at once
    # (255 registers and spills at HALO = 3)
    for ab in range(nb * nb):  # row-major over (a, b), a fixed order
        a = ab // nb
        b = ab % nb
        # the source token sits at (h - (a - HALO), w - (b - HALO))
        hs = h - (a - HALO)
        ws = w - (b - HALO)
        ok = rmask & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        src = rows - (a - HALO) * W - (b - HALO)
        acc += tl.load(nb_ptr + ((src[:, None] * nb + a) * nb + b) * r + ci[None, :],
                       mask=ok[:, None] & cm, other=0.0)
    tl.store(dz_ptr + rows[:, None] * r + ci[None, :], acc.to(dz_ptr.dtype.element_ty),
             mask=rmask[:, None] & cm)


@triton.jit
def expert_sum_kernel(
        part_ptr,     # (programs, L) float32 per-tile partial sums of the stencil kernels
        bounds_ptr,   # (n_exp + 1,) int32, as for the stencil kernels
        ntaps_ptr,    # (2·n_exp,) int32, as for the stencil kernels (their tile order)
        out_ptr,      # (n_exp, L) float32 output
        n_exp, L,
        BT: tl.constexpr, NEXP_P: tl.constexpr, BLOCK: tl.constexpr):
    """out[e] = sum of the partials of expert e's tiles, in tile order (deterministic);
    zero for an expert without tokens."""
    e = tl.program_id(0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ex, valid, _, _, tiles, ends = tile_ranges(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    sel = valid & (ex == e)
    last = tl.sum(tl.where(sel, ends, 0), 0)
    first = last - tl.sum(tl.where(sel, tiles, 0), 0)
    acc = tl.zeros([BLOCK], tl.float32)
    for t in range(first, last):
        acc += tl.load(part_ptr + t * L + cols, mask=cols < L, other=0.0)
    tl.store(out_ptr + e.to(tl.int64) * L + cols, acc, mask=cols < L)
