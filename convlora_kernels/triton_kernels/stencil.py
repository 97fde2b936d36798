"""Triton kernels for the Conv-LoRA stencil: the forward u = z + E(z) and its backward,
either split in two passes that each recompute what they need (stencil_grad_kernel, then
stencil_scatter_kernel) or merged in one (stencil_bwd_kernel); launch.py says which runs.

Notation (docs/design.md, The math): z = x Aᵀ (N×r), token t = (b, h, w) with expert e and scale s,
    c_k = conv_bias_e + sum_{dy,dx} W_e[:, :, dy, dx] · U_k(dy, dx)     conv output k
    u_t = z_t + sum_k omega_k · GELU(c_k)                               k = (ky, kx)
    U_k(dy, dx) = sum_{a,b} Ty[h, ky, dy, a] · Tx[w, kx, dx, b] · z[h+a-HALO, w+b-HALO]
with the tables T, omega of tables.py (Up_s, the conv's zero padding and Down_s).

Tiles: tokens are sorted by expert (stable), and each program takes up to BT tokens of
one expert, so the scale, the number of conv outputs and W_e are the same across the
tile, and each row dy of the 3x3 conv is one tl.dot of [BT, 3·r] (the three taps dx side
by side) with [3·r, r]. The z neighbourhood of each token, [BT, NBP, NBP, RZ] with
NBP >= 2·HALO + 1, is loaded once per tile. Channels are zero-padded: to RZ >= 4 on the
conv's input side (so 4·RZ >= 16, as tl.dot needs) and to RP >= 16 on its output side.

U is separable: the row pass v = sum_a Ty[h, ky, dy, a] · z[h+a-HALO, :] (NBP²·RZ
multiply-adds a token, row_pass) depends on (ky, dy) only, the column pass on kx (4·NBP·RZ
for the three dx, col_pass). With SHARED_ROWS the forward and grad kernels compute each
down-tap row's three row passes once for its nt conv outputs (launch.ROW_PASSES_ENV has the
counts and when it applies); otherwise each conv output computes its own.

Under map routing (one expert per map) these programs run as they are: the sort puts a
map's tokens in one expert's tiles, so each tile already uses one expert's tables and
weights. What the C++ map programs add (csrc/stencil_map.h: the tile's conv-output and
upsampled grids listed once, halo work scattered to per-block partials instead of
recomputed) rests on data-dependent lists in shared memory, which Triton does not expose.
"""

import triton
import triton.language as tl


@triton.jit
def tile_ranges(bounds_ptr, ntaps_ptr, n_exp, BT: tl.constexpr, NEXP_P: tl.constexpr):
    """The experts in tile order, heaviest first, per slot j < n_exp: (expert, valid,
    lo, hi (its sorted-token range), tiles = ceil((hi - lo) / BT), ends = cumsum(tiles)).

    bounds_ptr: (n_exp + 1,) int32, where each expert's tokens start in the sorted order;
    ntaps_ptr: (2·n_exp,) int32, each expert's down taps per axis, then the experts by
    decreasing taps (tables.stencil_tables), so the tiles with the most conv outputs run in
    the first wave and the last wave holds the light ones.
    """
    ev = tl.arange(0, NEXP_P)
    valid = ev < n_exp
    ex = tl.load(ntaps_ptr + n_exp + ev, mask=valid, other=0)
    lo = tl.load(bounds_ptr + ex, mask=valid, other=0).to(tl.int64)
    hi = tl.load(bounds_ptr + ex + 1, mask=valid, other=0).to(tl.int64)
    tiles = (hi - lo + BT - 1) // BT
    return ex, valid, lo, hi, tiles, tl.cumsum(tiles, 0)


@triton.jit
def expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT: tl.constexpr, NEXP_P: tl.constexpr):
    """This program's expert e and its sorted-token range [start, stop): expert e owns
    ceil(count_e / BT) consecutive programs, in the order of tile_ranges; programs past
    the last tile get e = n_exp and an empty range."""
    pid = tl.program_id(0).to(tl.int64)
    ex, valid, lo, hi, tiles, ends = tile_ranges(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    j = tl.sum((ends <= pid).to(tl.int32), 0)  # the slot, <= n_exp
    sel = tl.arange(0, NEXP_P) == j
    e = tl.where(j < n_exp, tl.sum(tl.where(sel, ex, 0), 0), n_exp)
    first = tl.sum(tl.where(sel, ends - tiles, 0), 0)
    start = tl.sum(tl.where(sel, lo, 0), 0) + (pid - first) * BT
    stop = tl.sum(tl.where(sel, hi, 0), 0)
    return e, start, stop


@triton.jit
def table_row(h, n, rows, BORDER: tl.constexpr):
    """tables.row_of: the table row of index h on an axis of length n."""
    return tl.where(h < BORDER, h, tl.where(h >= n - BORDER, h - (n - rows), BORDER))


@triton.jit
def load_tile(z_ptr, perm_ptr, start, stop, H, W, r, rows_y, rows_x, stride_zn,
              BT: tl.constexpr, RZ: tl.constexpr, NBP: tl.constexpr, HALO: tl.constexpr,
              BORDER: tl.constexpr):
    """Token ids, validity, table rows and the z neighbourhood [BT, NBP, NBP, RZ] (fp32)."""
    offs = start + tl.arange(0, BT)
    tmask = offs < stop
    tok = tl.load(perm_ptr + offs, mask=tmask, other=0).to(tl.int64)
    hw = tok % (H * W)
    bi = tok // (H * W)
    h = hw // W
    w = hw % W
    # table rows are < 2·BORDER + 1: int32 keeps the table addressing cheap
    hr = table_row(h, H, rows_y, BORDER).to(tl.int32)
    wr = table_row(w, W, rows_x, BORDER).to(tl.int32)
    a = tl.arange(0, NBP)[None, :, None, None]
    b = tl.arange(0, NBP)[None, None, :, None]
    ch = tl.arange(0, RZ)[None, None, None, :]
    hh = h[:, None, None, None] + a - HALO
    ww = w[:, None, None, None] + b - HALO
    m = (tmask[:, None, None, None] & (a <= 2 * HALO) & (b <= 2 * HALO) & (ch < r)
         & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W))
    znb = tl.load(z_ptr + ((bi[:, None, None, None] * H + hh) * W + ww) * stride_zn + ch,
                  mask=m, other=0.0).to(tl.float32)
    return tok, tmask, hr, wr, znb


@triton.jit
def row_weights(ty_ptr, e, hr, ky, dy, rows_y, NBP: tl.constexpr, TAPS: tl.constexpr):
    """wy [BT, NBP] = Ty[h, ky, dy, :]: how conv row dy of the conv outputs in down-tap row
    ky combines the neighbourhood's rows."""
    return tl.load(ty_ptr + (((e * rows_y + hr[:, None]) * TAPS + ky) * 3 + dy) * NBP
                   + tl.arange(0, NBP)[None, :])


@triton.jit
def col_weights(tx_ptr, e, wr, kx, rows_x, NBP: tl.constexpr, TAPS: tl.constexpr):
    """wx [BT, 4, NBP] = Tx[w, kx, dx, :] for the conv columns dx < 3, zero for dx = 3: how
    they combine the neighbourhood's columns (the same for the three conv rows)."""
    dxv = tl.arange(0, 4)[None, :, None]
    return tl.load(tx_ptr + (((e * rows_x + wr[:, None, None]) * TAPS + kx) * 3 + dxv) * NBP
                   + tl.arange(0, NBP)[None, None, :], mask=dxv < 3, other=0.0)


@triton.jit
def row_pass(znb, ty_ptr, e, hr, ky, dy, rows_y, NBP: tl.constexpr, TAPS: tl.constexpr):
    """The rows of the upsampled taps for conv row dy of down-tap row ky: v [BT, NBP(b), RZ]
    = sum_a Ty[h, ky, dy, a] znb[t, a, b, :] (NBP²·RZ multiply-adds a token), the same for
    every down-tap column kx."""
    return rows_combined(row_weights(ty_ptr, e, hr, ky, dy, rows_y, NBP, TAPS), znb)


@triton.jit
def rows_combined(wy, znb):
    """v [BT, NBP(b), RZ] = sum_a wy[t, a] znb[t, a, b, :]."""
    return tl.sum(wy[:, :, None, None] * znb, axis=1)


@triton.jit
def col_pass(v, wx, BT: tl.constexpr, RZ: tl.constexpr):
    """The conv's inputs in one row for one conv output: U[t, dx·RZ + i] = sum_b wx[t, dx, b]
    v[t, b, i] for dx = 0, 1, 2 and zero for dx = 3 (padding), so the conv row is one tl.dot
    [BT, 4·RZ] x [4·RZ, RP] (4·NBP·RZ multiply-adds a token)."""
    up = tl.sum(wx[:, :, :, None] * v[:, None, :, :], axis=2)  # [BT, 4(dx), RZ]
    return tl.reshape(up, [BT, 4 * RZ])


@triton.jit
def conv_row_offsets(r, RZ: tl.constexpr, RP: tl.constexpr):
    """Offsets (add dy·3) and mask of W_e[o, i, dy, dx] laid out as [4·RZ (dx, i), RP (o)]."""
    return conv_row_offsets_from(r, 0, RZ, RP)


@triton.jit
def conv_row_offsets_from(r, c0, RC: tl.constexpr, RP: tl.constexpr):
    """conv_row_offsets for the input channels c0 + [0, RC): [4·RC (dx, i), RP (o)]."""
    rho = tl.arange(0, 4 * RC)[:, None]
    dx = rho // RC
    i = c0 + rho % RC
    o = tl.arange(0, RP)[None, :]
    return o * (r * 9) + i * 9 + dx, (dx < 3) & (i < r) & (o < r)


@triton.jit
def conv_output(v0, v1, v2, wx, cw_ptr, cb, e, r, BT: tl.constexpr, RZ: tl.constexpr,
                RP: tl.constexpr, PREC: tl.constexpr):
    """c_k = conv_bias_e + sum_{dy,dx} W_e[:, :, dy, dx] U_k(dy, dx): [BT, RP], from the
    row passes v0, v1, v2 of its down-tap row and the column weights wx of its column."""
    offs, wmask = conv_row_offsets(r, RZ, RP)
    wbase = cw_ptr + e * (r * r * 9) + offs
    c = tl.zeros([BT, RP], tl.float32) + cb[None, :]
    c += tl.dot(col_pass(v0, wx, BT, RZ),
                tl.load(wbase, mask=wmask, other=0.0).to(tl.float32), input_precision=PREC)
    c += tl.dot(col_pass(v1, wx, BT, RZ),
                tl.load(wbase + 3, mask=wmask, other=0.0).to(tl.float32), input_precision=PREC)
    c += tl.dot(col_pass(v2, wx, BT, RZ),
                tl.load(wbase + 6, mask=wmask, other=0.0).to(tl.float32), input_precision=PREC)
    return c


@triton.jit
def conv_output_recomputed(znb, cw_ptr, cb, ty_ptr, tx_ptr, e, hr, wr, ky, kx, r, rows_y,
                           rows_x, BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr,
                           NBP: tl.constexpr, TAPS: tl.constexpr, PREC: tl.constexpr):
    """conv_output for conv output (ky, kx) with its row passes computed here, one conv row
    at a time (nothing held across conv outputs: fewer registers, nt times the row passes)."""
    offs, wmask = conv_row_offsets(r, RZ, RP)
    c = tl.zeros([BT, RP], tl.float32) + cb[None, :]
    for dy in range(3):
        up, wy, wx = upsampled_taps(znb, ty_ptr, tx_ptr, e, hr, wr, ky, kx, dy, rows_y,
                                    rows_x, BT, RZ, NBP, TAPS)
        w = tl.load(cw_ptr + e * (r * r * 9) + offs + dy * 3, mask=wmask,
                    other=0.0).to(tl.float32)
        c += tl.dot(up, w, input_precision=PREC)
    return c


@triton.jit
def gelu(c):
    """Exact GELU: c · Φ(c) = 0.5 c (1 + erf(c / √2))."""
    return 0.5 * c * (1.0 + tl.math.erf(c * 0.7071067811865476))


@triton.jit
def gelu_grad(c):
    """d GELU / dc = Φ(c) + c · φ(c), φ(c) = exp(-c²/2) / √(2π)."""
    return 0.5 * (1.0 + tl.math.erf(c * 0.7071067811865476)) + \
        c * 0.3989422804014327 * tl.exp(-0.5 * c * c)


@triton.jit
def down_weight(oy_ptr, ox_ptr, e, hr, wr, ky, kx, rows_y, rows_x, TAPS: tl.constexpr):
    """omega_k = omega_y[h, ky] · omega_x[w, kx], [BT]."""
    return tl.load(oy_ptr + (e * rows_y + hr) * TAPS + ky) * \
        tl.load(ox_ptr + (e * rows_x + wr) * TAPS + kx)


@triton.jit
def row_passes(znb, ty_ptr, e, hr, ky, rows_y, NBP: tl.constexpr, TAPS: tl.constexpr):
    """row_pass for the three conv rows of down-tap row ky: (v0, v1, v2)."""
    return (row_pass(znb, ty_ptr, e, hr, ky, 0, rows_y, NBP, TAPS),
            row_pass(znb, ty_ptr, e, hr, ky, 1, rows_y, NBP, TAPS),
            row_pass(znb, ty_ptr, e, hr, ky, 2, rows_y, NBP, TAPS))


@triton.jit
def tile_u(z_ptr, perm_ptr, e, start, stop, ntaps_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr,
           cw_ptr, cb_ptr, H, W, r, rows_y, rows_x, stride_zn,
           BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
           HALO: tl.constexpr, TAPS: tl.constexpr, BORDER: tl.constexpr, PREC: tl.constexpr,
           SHARED_ROWS: tl.constexpr):
    """u_t = z_t + E_e(z)_t for the sorted tokens [start, min(stop, start + BT)) of expert
    e: (token ids [BT], validity [BT], u [BT, RP] fp32; columns past r are zero, rows
    past the range are not meaningful)."""
    tok, tmask, hr, wr, znb = load_tile(z_ptr, perm_ptr, start, stop, H, W, r, rows_y,
                                        rows_x, stride_zn, BT, RZ, NBP, HALO, BORDER)
    ci = tl.arange(0, RP)
    cmask = tmask[:, None] & (ci[None, :] < r)
    u = tl.load(z_ptr + tok[:, None] * stride_zn + ci[None, :], mask=cmask,
                other=0.0).to(tl.float32)
    cb = tl.load(cb_ptr + e * r + ci, mask=ci < r, other=0.0).to(tl.float32)
    nt = tl.load(ntaps_ptr + e)
    if SHARED_ROWS:
        for ky in range(0, nt):
            v0, v1, v2 = row_passes(znb, ty_ptr, e, hr, ky, rows_y, NBP, TAPS)
            for kx in range(0, nt):
                c = conv_output(v0, v1, v2, col_weights(tx_ptr, e, wr, kx, rows_x, NBP, TAPS),
                                cw_ptr, cb, e, r, BT, RZ, RP, PREC)
                om = down_weight(oy_ptr, ox_ptr, e, hr, wr, ky, kx, rows_y, rows_x, TAPS)
                u += om[:, None] * gelu(c)
    else:
        for k in range(0, nt * nt):
            c = conv_output_recomputed(znb, cw_ptr, cb, ty_ptr, tx_ptr, e, hr, wr, k // nt,
                                       k % nt, r, rows_y, rows_x, BT, RZ, RP, NBP, TAPS, PREC)
            om = down_weight(oy_ptr, ox_ptr, e, hr, wr, k // nt, k % nt, rows_y, rows_x, TAPS)
            u += om[:, None] * gelu(c)
    return tok, tmask, u


@triton.jit
def upsampled_taps(znb, ty_ptr, tx_ptr, e, hr, wr, ky, kx, dy, rows_y, rows_x,
                   BT: tl.constexpr, RZ: tl.constexpr, NBP: tl.constexpr,
                   TAPS: tl.constexpr):
    """The conv's inputs in row dy for conv output k = (ky, kx), both passes:
    (U [BT, 4·RZ] of col_pass, wy [BT, NBP], wx [BT, 4, NBP])."""
    wy = row_weights(ty_ptr, e, hr, ky, dy, rows_y, NBP, TAPS)
    wx = col_weights(tx_ptr, e, wr, kx, rows_x, NBP, TAPS)
    return col_pass(rows_combined(wy, znb), wx, BT, RZ), wy, wx


@triton.jit
def row_backward(up, wy, wx, g, w, dw, dznb, BT: tl.constexpr, RZ: tl.constexpr,
                 PREC: tl.constexpr):
    """One conv row of one conv output, given its upsampled taps (up, wy, wx of
    upsampled_taps) and g = dL/dc: (dw + upᵀ g, dznb + the gather's transpose applied to
    dL/dU = g W_e[:, :, dy]ᵀ)."""
    dw += tl.dot(tl.trans(up), g, input_precision=PREC)  # [4·RZ (dx, i), RP (o)]
    return dw, dz_row(wy, wx, g, w, dznb, BT, RZ, PREC)


@triton.jit
def dz_row(wy, wx, g, w, dznb, BT: tl.constexpr, RZ: tl.constexpr, PREC: tl.constexpr):
    """dznb + the gather's transpose (weights wy, wx of upsampled_taps) applied to
    dL/dU = g W_e[:, :, dy]ᵀ, for one conv row of one conv output: the column pass's
    transpose (4·NBP·RZ multiply-adds a token), then the row pass's (NBP²·RZ)."""
    dup = tl.reshape(tl.dot(g, tl.trans(w), input_precision=PREC), [BT, 4, RZ])
    dv = tl.sum(wx[:, :, :, None] * dup[:, :, None, :], axis=1)  # [BT, NBP(b), RZ]
    return dznb + wy[:, :, None, None] * dv[:, None, :, :]


@triton.jit
def store_dz(dz_ptr, dznb, tok, tmask, H, W, r, c0, RZ: tl.constexpr, NBP: tl.constexpr,
             HALO: tl.constexpr, ATOMIC: tl.constexpr):
    """A tile's dL/dz of its tokens' neighbourhoods, channels c0 + [0, RZ) of dznb [BT, NBP,
    NBP, RZ]: added into dz (N, r) with ATOMIC, else stored in each token's own slots
    (N, NB, NB, r). The addresses are each token's own row (int64) plus an int32 offset: a
    neighbour in the map lies in the same image, so its row is the token's + (da·W + db)."""
    a = tl.arange(0, NBP)[None, :, None, None]
    b = tl.arange(0, NBP)[None, None, :, None]
    ch = c0 + tl.arange(0, RZ)[None, None, None, :]
    m = tmask[:, None, None, None] & (a <= 2 * HALO) & (b <= 2 * HALO) & (ch < r)
    if ATOMIC:
        hw = (tok % (H * W)).to(tl.int32)
        h = hw // W
        w = hw % W
        hh = h[:, None, None, None] + a - HALO
        ww = w[:, None, None, None] + b - HALO
        m = m & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
        rel = ((a - HALO) * W + (b - HALO)) * r + ch
        tl.atomic_add((dz_ptr + tok * r)[:, None, None, None] + rel, dznb,
                      mask=m, sem="relaxed")
    else:
        nb = 2 * HALO + 1
        tl.store((dz_ptr + tok * (nb * nb * r))[:, None, None, None] + (a * nb + b) * r + ch,
                 dznb, mask=m)


@triton.jit
def stencil_fwd_kernel(
        z_ptr,        # (N, r) z = x Aᵀ, row stride stride_zn
        perm_ptr,     # (N,) int64, token ids sorted by expert
        bounds_ptr,   # (n_exp + 1,) int32, first sorted position of each expert
        ntaps_ptr,    # (2·n_exp,) int32, down taps per axis of each expert, then the
                      # experts heaviest first (tile_ranges)
        ty_ptr, oy_ptr, tx_ptr, ox_ptr,  # float32 stencil tables (tables.py)
        cw_ptr,       # (n_exp, r, r, 3, 3) conv_weight, contiguous
        cb_ptr,       # (n_exp, r) conv_bias, contiguous
        u_ptr,        # (N, r) float32 output: u = z + E(z)
        H, W, r, n_exp, rows_y, rows_x, stride_zn,
        BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
        HALO: tl.constexpr, TAPS: tl.constexpr, NEXP_P: tl.constexpr, BORDER: tl.constexpr,
        PREC: tl.constexpr, SHARED_ROWS: tl.constexpr):
    """u_t = z_t + E_{e_t}(z)_t."""
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    if e >= n_exp:
        return
    tok, tmask, u = tile_u(z_ptr, perm_ptr, e, start, stop, ntaps_ptr, ty_ptr, oy_ptr, tx_ptr,
                           ox_ptr, cw_ptr, cb_ptr, H, W, r, rows_y, rows_x, stride_zn, BT, RZ,
                           RP, NBP, HALO, TAPS, BORDER, PREC, SHARED_ROWS)
    ci = tl.arange(0, RP)
    tl.store(u_ptr + tok[:, None] * r + ci[None, :], u,
             mask=tmask[:, None] & (ci[None, :] < r))


@triton.jit
def stencil_grad_kernel(
        z_ptr, perm_ptr, bounds_ptr, ntaps_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, cw_ptr,
        cb_ptr,       # as in stencil_fwd_kernel
        du_ptr,       # (N, r) float32, dL/du
        g_ptr,        # (N, TAPS², r) float32 output: g_k = omega_k · du ⊙ GELU'(c_k)
        db_ptr,       # float32: (n_exp, r) with ATOMIC, else (programs, r) partial sums
        H, W, r, n_exp, rows_y, rows_x, stride_zn,
        BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
        HALO: tl.constexpr, TAPS: tl.constexpr, NEXP_P: tl.constexpr, BORDER: tl.constexpr,
        PREC: tl.constexpr, ATOMIC: tl.constexpr, SHARED_ROWS: tl.constexpr):
    """Backward, part 1: recompute each conv output (as tile_u does, SHARED_ROWS alike) and
    form g_k = dL/dc_k; dL/dconv_bias_e = sum over the expert's tokens and conv outputs of
    g_k."""
    pid = tl.program_id(0).to(tl.int64)
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    ci = tl.arange(0, RP)
    if e >= n_exp:  # past the last tile; the reduction reads only the tiles' slots
        return
    tok, tmask, hr, wr, znb = load_tile(z_ptr, perm_ptr, start, stop, H, W, r, rows_y,
                                        rows_x, stride_zn, BT, RZ, NBP, HALO, BORDER)
    cmask = tmask[:, None] & (ci[None, :] < r)
    du = tl.load(du_ptr + tok[:, None] * r + ci[None, :], mask=cmask, other=0.0)
    cb = tl.load(cb_ptr + e * r + ci, mask=ci < r, other=0.0).to(tl.float32)
    nt = tl.load(ntaps_ptr + e)
    db = tl.zeros([RP], tl.float32)
    if SHARED_ROWS:
        for ky in range(0, nt):
            v0, v1, v2 = row_passes(znb, ty_ptr, e, hr, ky, rows_y, NBP, TAPS)
            for kx in range(0, nt):
                c = conv_output(v0, v1, v2, col_weights(tx_ptr, e, wr, kx, rows_x, NBP, TAPS),
                                cw_ptr, cb, e, r, BT, RZ, RP, PREC)
                om = down_weight(oy_ptr, ox_ptr, e, hr, wr, ky, kx, rows_y, rows_x, TAPS)
                g = om[:, None] * du * gelu_grad(c)
                tl.store(g_ptr + (tok[:, None] * (TAPS * TAPS) + ky * nt + kx) * r
                         + ci[None, :], g, mask=cmask)
                db += tl.sum(g, axis=0)
    else:
        for k in range(0, nt * nt):
            c = conv_output_recomputed(znb, cw_ptr, cb, ty_ptr, tx_ptr, e, hr, wr, k // nt,
                                       k % nt, r, rows_y, rows_x, BT, RZ, RP, NBP, TAPS, PREC)
            om = down_weight(oy_ptr, ox_ptr, e, hr, wr, k // nt, k % nt, rows_y, rows_x, TAPS)
            g = om[:, None] * du * gelu_grad(c)
            tl.store(g_ptr + (tok[:, None] * (TAPS * TAPS) + k) * r + ci[None, :], g,
                     mask=cmask)
            db += tl.sum(g, axis=0)
    if ATOMIC:
        tl.atomic_add(db_ptr + e * r + ci, db, mask=ci < r, sem="relaxed")
    else:
        tl.store(db_ptr + pid * r + ci, db, mask=ci < r)


@triton.jit
def stencil_scatter_kernel(
        z_ptr, perm_ptr, bounds_ptr, ntaps_ptr, ty_ptr, tx_ptr, cw_ptr,  # as in forward
        g_ptr,        # (N, TAPS², r) float32, from stencil_grad_kernel
        dw_ptr,       # float32: (n_exp, r, r, 3, 3) with ATOMIC, else (programs, r, r, 3, 3)
        dz_ptr,       # ATOMIC: (N, r) float32 holding dL/du, += the stencil's dL/dz;
                      # else (N, NB, NB, r) float32: each token's dL/dz of its neighbours
        H, W, r, n_exp, rows_y, rows_x, stride_zn,
        BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
        HALO: tl.constexpr, TAPS: tl.constexpr, NEXP_P: tl.constexpr, BORDER: tl.constexpr,
        PREC: tl.constexpr, ATOMIC: tl.constexpr, RC: tl.constexpr):
    """Backward, part 2, with U = U_k(dy, dx) recomputed:
        dL/dW_e[:, :, dy, dx] = sum_{t, k} g_k ⊗ U          (fp32, per tile)
        dL/dU = g_k W_e[:, :, dy, dx]
        dL/dz[h+a-HALO, w+b-HALO] += Ty[.., a] Tx[.., b] dL/dU   (the transpose of the gather)
    in two phases, so the z neighbourhood and its gradient ([BT, NBP, NBP, RZ] each) are never
    in registers together: first dL/dW, one conv row at a time over the conv outputs (holds
    z's neighbourhood), then dL/dz, RC channels at a time (launch.Tiling.rc) over the conv
    outputs and rows (holds one [BT, NBP, NBP, RC] block of its gradient). With both live,
    the bicubic neighbourhood (8 x 8) spilled 50-770 bytes at r <= 16 (sm_90); now no
    variant at r <= 16 spills (compile_check).
    Cost of the split: a tile reads its g (BT·TAPS²·r·4 bytes, 8 KB for bicubic at r = 8)
    3 + ceil(r / RC) times instead of 3, re-reads that stay in L1/L2 (DRAM sees g once), and
    rebuilds the tap weights (two table rows per conv output and row) in the second phase.
    """
    pid = tl.program_id(0).to(tl.int64)
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    if e >= n_exp:
        return
    tok, tmask, hr, wr, znb = load_tile(z_ptr, perm_ptr, start, stop, H, W, r, rows_y,
                                        rows_x, stride_zn, BT, RZ, NBP, HALO, BORDER)
    ci = tl.arange(0, RP)
    cmask = tmask[:, None] & (ci[None, :] < r)
    nt = tl.load(ntaps_ptr + e)
    offs, wmask = conv_row_offsets(r, RZ, RP)
    for row in tl.static_range(3):  # the conv row dy, unrolled
        dw = tl.zeros([4 * RZ, RP], tl.float32)
        for k in range(0, nt * nt):
            g = tl.load(g_ptr + (tok[:, None] * (TAPS * TAPS) + k) * r + ci[None, :],
                        mask=cmask, other=0.0)
            up, wy, wx = upsampled_taps(znb, ty_ptr, tx_ptr, e, hr, wr, k // nt, k % nt, row,
                                        rows_y, rows_x, BT, RZ, NBP, TAPS)
            dw += tl.dot(tl.trans(up), g, input_precision=PREC)
        if ATOMIC:
            tl.atomic_add(dw_ptr + e * (r * r * 9) + offs + row * 3, dw, mask=wmask,
                          sem="relaxed")
        else:
            tl.store(dw_ptr + pid * (r * r * 9) + offs + row * 3, dw, mask=wmask)

    # dL/dz, RC channels at a time (launch.Tiling.rc: one [BT, NBP, NBP, RC] block in registers)
    for c0 in range(0, r, RC):
        coffs, cmask_w = conv_row_offsets_from(r, c0, RC, RP)
        dznb = tl.zeros([BT, NBP, NBP, RC], tl.float32)
        for k in range(0, nt * nt):
            g = tl.load(g_ptr + (tok[:, None] * (TAPS * TAPS) + k) * r + ci[None, :],
                        mask=cmask, other=0.0)
            for dy in range(3):
                w = tl.load(cw_ptr + e * (r * r * 9) + coffs + dy * 3, mask=cmask_w,
                            other=0.0).to(tl.float32)
                wy = row_weights(ty_ptr, e, hr, k // nt, dy, rows_y, NBP, TAPS)
                wx = col_weights(tx_ptr, e, wr, k % nt, rows_x, NBP, TAPS)
                dznb = dz_row(wy, wx, g, w, dznb, BT, RC, PREC)
        store_dz(dz_ptr, dznb, tok, tmask, H, W, r, c0, RC, NBP, HALO, ATOMIC)


@triton.jit
def stencil_bwd_kernel(
        z_ptr, perm_ptr, bounds_ptr, ntaps_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, cw_ptr,
        cb_ptr,       # as in stencil_fwd_kernel
        du_ptr,       # (N, r) float32, dL/du
        db_ptr,       # float32: (n_exp, r) with ATOMIC, else (programs, r) partial sums
        dw_ptr,       # float32: (n_exp, r, r, 3, 3) with ATOMIC, else (programs, r, r, 3, 3)
        dz_ptr,       # ATOMIC: (N, r) float32 holding dL/du, += the stencil's dL/dz;
                      # else (N, NB, NB, r) float32: each token's dL/dz of its neighbours
        H, W, r, n_exp, rows_y, rows_x, stride_zn,
        BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
        HALO: tl.constexpr, TAPS: tl.constexpr, NEXP_P: tl.constexpr, BORDER: tl.constexpr,
        PREC: tl.constexpr, ATOMIC: tl.constexpr):
    """The stencil's backward in one pass per tile. For each conv output k, with the three
    rows' upsampled taps U built once:
        c_k = conv_bias_e + sum_dy U_dy W_e[:, :, dy]ᵀ,  g_k = omega_k · dL/du ⊙ GELU'(c_k)
        dL/dconv_bias_e += sum_t g_k,  dL/dW_e[:, :, dy] += U_dyᵀ g_k          (per tile)
        dL/dz[h+a-HALO, w+b-HALO] += Ty[.., a] Tx[.., b] (g_k W_e[:, :, dy])  (the gather's
                                                                              transpose)
    """
    pid = tl.program_id(0).to(tl.int64)
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    if e >= n_exp:  # past the last tile; the reductions read only the tiles' slots
        return
    tok, tmask, hr, wr, znb = load_tile(z_ptr, perm_ptr, start, stop, H, W, r, rows_y,
                                        rows_x, stride_zn, BT, RZ, NBP, HALO, BORDER)
    ci = tl.arange(0, RP)
    cmask = tmask[:, None] & (ci[None, :] < r)
    du = tl.load(du_ptr + tok[:, None] * r + ci[None, :], mask=cmask, other=0.0)
    cb = tl.load(cb_ptr + e * r + ci, mask=ci < r, other=0.0).to(tl.float32)
    offs, wmask = conv_row_offsets(r, RZ, RP)
    wbase = cw_ptr + e * (r * r * 9) + offs
    w0 = tl.load(wbase, mask=wmask, other=0.0).to(tl.float32)
    w1 = tl.load(wbase + 3, mask=wmask, other=0.0).to(tl.float32)
    w2 = tl.load(wbase + 6, mask=wmask, other=0.0).to(tl.float32)
    db = tl.zeros([RP], tl.float32)
    dw0 = tl.zeros([4 * RZ, RP], tl.float32)
    dw1 = tl.zeros([4 * RZ, RP], tl.float32)
    dw2 = tl.zeros([4 * RZ, RP], tl.float32)
    dznb = tl.zeros([BT, NBP, NBP, RZ], tl.float32)
    nt = tl.load(ntaps_ptr + e)
    for k in range(0, nt * nt):
        ky = k // nt
        kx = k % nt
        # the three rows' taps, built once for c_k and for the backward
        up0, wy0, wx0 = upsampled_taps(znb, ty_ptr, tx_ptr, e, hr, wr, ky, kx, 0, rows_y,
                                       rows_x, BT, RZ, NBP, TAPS)
        up1, wy1, wx1 = upsampled_taps(znb, ty_ptr, tx_ptr, e, hr, wr, ky, kx, 1, rows_y,
                                       rows_x, BT, RZ, NBP, TAPS)
        up2, wy2, wx2 = upsampled_taps(znb, ty_ptr, tx_ptr, e, hr, wr, ky, kx, 2, rows_y,
                                       rows_x, BT, RZ, NBP, TAPS)
        c = cb[None, :] + tl.dot(up0, w0, input_precision=PREC)
        c += tl.dot(up1, w1, input_precision=PREC)
        c += tl.dot(up2, w2, input_precision=PREC)
        om = down_weight(oy_ptr, ox_ptr, e, hr, wr, ky, kx, rows_y, rows_x, TAPS)
        g = om[:, None] * du * gelu_grad(c)
        db += tl.sum(g, axis=0)
        dw0, dznb = row_backward(up0, wy0, wx0, g, w0, dw0, dznb, BT, RZ, PREC)
        dw1, dznb = row_backward(up1, wy1, wx1, g, w1, dw1, dznb, BT, RZ, PREC)
        dw2, dznb = row_backward(up2, wy2, wx2, g, w2, dw2, dznb, BT, RZ, PREC)
    if ATOMIC:
        tl.atomic_add(db_ptr + e * r + ci, db, mask=ci < r, sem="relaxed")
        dwp = dw_ptr + e * (r * r * 9) + offs
        tl.atomic_add(dwp, dw0, mask=wmask, sem="relaxed")
        tl.atomic_add(dwp + 3, dw1, mask=wmask, sem="relaxed")
        tl.atomic_add(dwp + 6, dw2, mask=wmask, sem="relaxed")
    else:
        tl.store(db_ptr + pid * r + ci, db, mask=ci < r)
        dwp = dw_ptr + pid * (r * r * 9) + offs
        tl.store(dwp, dw0, mask=wmask)
        tl.store(dwp + 3, dw1, mask=wmask)
        tl.store(dwp + 6, dw2, mask=wmask)

    store_dz(dz_ptr, dznb, tok, tmask, H, W, r, 0, RZ, NBP, HALO, ATOMIC)
