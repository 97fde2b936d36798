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
tile. Every tensor is two-dimensional, [BT, channels] or [BT]: a token's z neighbourhood
is NB x NB cells (NB = 2·HALO + 1) of [BT, RZ] each, a tuple of separate tensors indexed
by static loops (tl.static_range) over the cells, so the taps are element-wise
multiply-adds in the threads that hold the cells, with no reduction across threads:

    row pass     v_b = sum_a Ty[h, ky, dy, a] · z[a, b]       (NB² cells, per conv row dy)
    column pass  U_dx = sum_b Tx[w, kx, dx, b] · v_b            (dx = 0, 1, 2)

and the conv row is one tl.dot of the three taps side by side, [BT, 4·RZ] (cat_taps: tl.join
with a fourth tap of zeros so that 4·RZ >= 16) with W_e's row [4·RZ, RP]
(conv_row_weights). Channels are zero-padded: to RZ >= 4 on the conv's input side and to
RP >= 16 on its output side (tl.dot's sizes). Where r <= 8 the GELU and what follows it
run on the first RP / 2 columns of a conv output only (live_cols: no data moves), and g is
stored and read back at that width.

With HOLD the z cells are loaded once per tile and held across the conv outputs (NB² ·
RZ · BT floats: launch.Tiling keeps them within a budget per thread); without (bicubic's
49 cells), each conv row loads the cells it combines (L1 hits: the tile's tokens' rows).

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
def tile_tokens(perm_ptr, start, stop, H, W, rows_y, rows_x, BT: tl.constexpr,
                BORDER: tl.constexpr):
    """The tile's token ids [BT] (int64), validity, map position (h, w) and table rows."""
    offs = start + tl.arange(0, BT)
    tmask = offs < stop
    tok = tl.load(perm_ptr + offs, mask=tmask, other=0).to(tl.int64)
    hw = (tok % (H * W)).to(tl.int32)
    h = hw // W
    w = hw % W
    # table rows are < 2·BORDER + 1: int32 keeps the table addressing cheap
    return tok, tmask, h, w, table_row(h, H, rows_y, BORDER), table_row(w, W, rows_x, BORDER)


@triton.jit
def z_cell(z_ptr, tok, live, h, w, H, W, r, stride_zn, a, b, HALO: tl.constexpr,
           RZ: tl.constexpr, ZV: tl.constexpr):
    """z at (h + a - HALO, w + b - HALO) of the tokens where ``live``, [BT, RZ] fp32; zero
    outside the map (the neighbour's row is the token's + (a - HALO)·W + b - HALO: the
    same image). ZV > 1: r = RZ and the rows start at multiples of ZV elements, so a
    thread loads ZV channels of a token at once (Triton's layout follows the load's
    vector width: [1, ZV] a thread)."""
    ch = tl.arange(0, RZ)
    hh = h + (a - HALO)
    ww = w + (b - HALO)
    ok = live & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
    row = (tok + ((a - HALO) * W + (b - HALO))) * stride_zn
    if ZV > 1:
        return tl.load(z_ptr + tl.multiple_of(row, ZV)[:, None] + ch[None, :],
                       mask=ok[:, None], other=0.0).to(tl.float32)
    else:
        return tl.load(z_ptr + row[:, None] + ch[None, :],
                       mask=ok[:, None] & (ch < r)[None, :], other=0.0).to(tl.float32)


@triton.jit
def z_cells(z_ptr, tok, tmask, h, w, H, W, r, stride_zn, HALO: tl.constexpr,
            RZ: tl.constexpr, ZV: tl.constexpr):
    """The NB² cells of every token's neighbourhood, row-major (a, b): a tuple."""
    cells = ()
    for a in tl.static_range(2 * HALO + 1):
        for b in tl.static_range(2 * HALO + 1):
            cells = cells + (z_cell(z_ptr, tok, tmask, h, w, H, W, r, stride_zn, a, b, HALO,
                                    RZ, ZV),)
    return cells


@triton.jit
def row_weights(ty_ptr, e, hr, ky, dy: tl.constexpr, rows_y, NBP: tl.constexpr,
                TAPS: tl.constexpr, HALO: tl.constexpr):
    """(Ty[h, ky, dy, a] for a < NB): how conv row dy of the conv outputs in down-tap row
    ky combines the neighbourhood's rows, a tuple of [BT]."""
    base = ty_ptr + (((e * rows_y + hr) * TAPS + ky) * 3 + dy) * NBP
    wy = ()
    for a in tl.static_range(2 * HALO + 1):
        wy = wy + (tl.load(base + a),)
    return wy


@triton.jit
def col_weights(tx_ptr, e, wr, kx, rows_x, NBP: tl.constexpr, TAPS: tl.constexpr,
                HALO: tl.constexpr):
    """(Tx[w, kx, dx, b] for dx < 3, b < NB), dx-major: how the conv columns combine the
    neighbourhood's columns (the same for the three conv rows), a tuple of [BT]."""
    wx = ()
    for dx in tl.static_range(3):
        base = tx_ptr + (((e * rows_x + wr) * TAPS + kx) * 3 + dx) * NBP
        for b in tl.static_range(2 * HALO + 1):
            wx = wx + (tl.load(base + b),)
    return wx


@triton.jit
def col_base(tx_ptr, e, wr, kx, rows_x, NBP: tl.constexpr, TAPS: tl.constexpr):
    """Tx[w, kx, 0, :] of each token: pointers [BT] (dx at + dx·NBP, b at + b)."""
    return tx_ptr + ((e * rows_x + wr) * TAPS + kx) * 3 * NBP


@triton.jit
def cat_taps(u0, u1, u2, BT: tl.constexpr, RC: tl.constexpr):
    """The three taps of a conv row side by side, [BT, 4·RC]: column i·4 + 2·m + j holds
    tap dx = j + 2·m of channel i (dx = 3: zeros), conv_row_weights' order."""
    return tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, tl.zeros_like(u2))), [BT, 4 * RC])


@triton.jit
def split_taps(t, BT: tl.constexpr, RC: tl.constexpr):
    """A dot's output [BT, 4·RC] in the order of conv_row_weights(..., SPLIT=True) -> (tap 0,
    tap 1, tap 2), [BT, RC] each: column 2·RC·m + 2·i + j holds tap dx = j + 2·m of channel
    i. The tap's bits are the column's lowest and highest, and a dot's accumulator holds
    columns 2c, 2c + 1 and every eighth on from them in one thread, so the split moves no
    data between threads (cat_taps' order, the tap in the two lowest bits, cost two
    shared-memory round trips with barriers a conv row)."""
    lo, hi = tl.split(tl.permute(tl.reshape(t, [BT, 2, RC, 2]), (0, 2, 3, 1)))  # m split
    t0, t1 = tl.split(lo)
    t2, _ = tl.split(hi)
    return t0, t1, t2


@triton.jit
def conv_row_taps(cells, wy, wx, wxp, z_ptr, tok, tmask, h, w, H, W, r, stride_zn,
                  BT: tl.constexpr, RZ: tl.constexpr, NBP: tl.constexpr, HALO: tl.constexpr,
                  HOLD: tl.constexpr, ZV: tl.constexpr):
    """The conv's inputs in one conv row of one conv output, [BT, 4·RZ] (cat_taps): the
    row pass with the row weights wy, then the column pass with the column weights.
    HOLD: the z cells from ``cells``, the column weights from ``wx`` (col_weights), all
    unrolled. Otherwise a loop over the neighbourhood's columns b, each loading its NB
    cells (only the rows whose weight is not zero: an upsampled row combines 4 of
    bicubic's 7) and its three column weights (wxp: Tx[w, kx, 0, :] of each token), so
    one column's cells are live at a time (unrolled, the compiler issues every load of
    the row first and spills)."""
    NB: tl.constexpr = 2 * HALO + 1
    u0 = tl.zeros([BT, RZ], tl.float32)
    u1 = tl.zeros([BT, RZ], tl.float32)
    u2 = tl.zeros([BT, RZ], tl.float32)
    if HOLD:
        for b in tl.static_range(NB):
            v = tl.zeros([BT, RZ], tl.float32)
            for a in tl.static_range(NB):
                v += wy[a][:, None] * cells[a * NB + b]
            u0 += wx[b][:, None] * v
            u1 += wx[NB + b][:, None] * v
            u2 += wx[2 * NB + b][:, None] * v
    else:
        for b in range(0, NB):
            v = tl.zeros([BT, RZ], tl.float32)
            for a in tl.static_range(NB):
                v += wy[a][:, None] * z_cell(z_ptr, tok, tmask & (wy[a] != 0.0), h, w, H, W,
                                             r, stride_zn, a, b, HALO, RZ, ZV)
            u0 += tl.load(wxp + b)[:, None] * v
            u1 += tl.load(wxp + NBP + b)[:, None] * v
            u2 += tl.load(wxp + 2 * NBP + b)[:, None] * v
    return cat_taps(u0, u1, u2, BT, RZ)


@triton.jit
def cdf2_and_gauss(c):
    """(1 + erf(c / √2), e^(-c²/2)) for calls on 16-bit inputs: erfc from Abramowitz and
    Stegun's 7.1.26, k (a1 + k (a2 + ... + k a5)) e^(-t²) with k = 1 / (1 + p |t|),
    t = c / √2, its e^(-t²) shared with φ (the C++ stencils' gelu_as_and_grad,
    csrc/convlora_math.h: within 4.3e-7 of float64, far below a 16-bit value's rounding)."""
    k = 1.0 / (1.0 + 0.23164189 * tl.abs(c))
    poly = k * (0.254829592 + k * (-0.284496736 + k * (1.421413741 + k * (-1.453152027
                                                                          + k * 1.061405429))))
    e = tl.exp2(c * (c * -0.7213475204444817))
    q = poly * e
    return tl.where(c >= 0.0, 2.0 - q, q), e


@triton.jit
def gelu(c, SIXTEEN: tl.constexpr):
    """GELU: c · Φ(c) = 0.5 c (1 + erf(c / √2)); exact (erf) unless SIXTEEN (16-bit
    inputs: cdf2_and_gauss)."""
    if SIXTEEN:
        cdf2, _ = cdf2_and_gauss(c)
    else:
        cdf2 = 1.0 + tl.math.erf(c * 0.7071067811865476)
    return 0.5 * c * cdf2


@triton.jit
def gelu_grad(c, SIXTEEN: tl.constexpr):
    """d GELU / dc = Φ(c) + c · φ(c), φ(c) = exp(-c²/2) / √(2π); exact unless SIXTEEN."""
    if SIXTEEN:
        cdf2, e = cdf2_and_gauss(c)
    else:
        cdf2 = 1.0 + tl.math.erf(c * 0.7071067811865476)
        e = tl.exp(-0.5 * c * c)
    return 0.5 * cdf2 + c * 0.3989422804014327 * e


@triton.jit
def live_cols(c, BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr):
    """The columns of a conv output [BT, RP] that can hold channels: the first RP / 2 when
    RZ <= RP / 2 (r <= 8: RP is 16, tl.dot's least N), else all. A dot's [BT, 16] output
    puts columns 0-7 and 8-15 in separate 8-wide fragments of the same threads, so taking
    the first half moves no data, and the GELU and what follows it run on half the
    elements."""
    if 2 * RZ <= RP:
        lo, hi = tl.split(tl.permute(tl.reshape(c, [BT, 2, RP // 2]), (0, 2, 1)))
        return lo
    else:
        return c


@triton.jit
def live_range(RZ: tl.constexpr, RP: tl.constexpr):
    """tl.arange over live_cols' columns."""
    return tl.arange(0, RP // 2 if 2 * RZ <= RP else RP)


@triton.jit
def load_g(g_ptr, tok, tmask, k, r, BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr,
           TAPS: tl.constexpr):
    """g_k of the tile's tokens as [BT, RP] (zero past r; rows past the tile's range zero),
    read as live_cols' columns."""
    ci = live_range(RZ, RP)
    g = tl.load(g_ptr + (tok[:, None] * (TAPS * TAPS) + k) * r + ci[None, :],
                mask=tmask[:, None] & (ci[None, :] < r), other=0.0)
    return pad_cols(g, BT, RZ, RP)


@triton.jit
def pad_cols(c, BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr):
    """live_cols inverted: [BT, RP] with zeros in the columns live_cols drops."""
    if 2 * RZ <= RP:
        return tl.reshape(tl.permute(tl.join(c, tl.zeros_like(c)), (0, 2, 1)), [BT, RP])
    else:
        return c


@triton.jit
def down_weight(oy_ptr, ox_ptr, e, hr, wr, ky, kx, rows_y, rows_x, TAPS: tl.constexpr):
    """omega_k = omega_y[h, ky] · omega_x[w, kx], [BT]."""
    return tl.load(oy_ptr + (e * rows_y + hr) * TAPS + ky) * \
        tl.load(ox_ptr + (e * rows_x + wr) * TAPS + kx)


@triton.jit
def conv_row_offsets(r, dy: tl.constexpr, c0, RC: tl.constexpr, RP: tl.constexpr,
                     SPLIT: tl.constexpr):
    """Offsets and mask of W_e[o, c0 + i, dy, dx] in a (r, r, 3, 3) block, laid out as
    [4·RC, RP (o)]: row i·4 + 2·m + j for dx = j + 2·m (cat_taps' columns), or with SPLIT
    2·RC·m + 2·i + j (split_taps')."""
    kappa = tl.arange(0, 4 * RC)[:, None]
    if SPLIT:
        i = c0 + (kappa // 2) % RC
        dx = kappa % 2 + 2 * (kappa // (2 * RC))
    else:
        i = c0 + kappa // 4
        dx = (kappa // 2) % 2 + 2 * (kappa % 2)
    o = tl.arange(0, RP)[None, :]
    return o * (r * 9) + i * 9 + dy * 3 + dx, (dx < 3) & (i < r) & (o < r)


@triton.jit
def conv_row_weights(cw_ptr, e, r, dy: tl.constexpr, c0, RC: tl.constexpr, RP: tl.constexpr,
                     SPLIT: tl.constexpr):
    """W_e's conv row dy, input channels c0 + [0, RC), as [4·RC, RP] fp32
    (conv_row_offsets; zero past r and for dx = 3)."""
    offs, m = conv_row_offsets(r, dy, c0, RC, RP, SPLIT)
    return tl.load(cw_ptr + e * (r * r * 9) + offs, mask=m, other=0.0).to(tl.float32)


@triton.jit
def conv_output(cells, c, w0, w1, w2, ty_ptr, tx_ptr, e, hr, wr, ky, kx, rows_y, rows_x,
                z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT: tl.constexpr,
                RZ: tl.constexpr, NBP: tl.constexpr, HALO: tl.constexpr, TAPS: tl.constexpr,
                HOLD: tl.constexpr, ZV: tl.constexpr, PREC: tl.constexpr):
    """c (holding conv_bias_e) + sum_dy U_k(dy) W_e[:, :, dy]ᵀ for conv output (ky, kx):
    [BT, RP], the conv rows' weights w0, w1, w2 of conv_row_weights."""
    wx = col_weights(tx_ptr, e, wr, kx, rows_x, NBP, TAPS, HALO)
    wxp = col_base(tx_ptr, e, wr, kx, rows_x, NBP, TAPS)
    for dy in tl.static_range(3):
        if dy == 0:
            wd = w0
        elif dy == 1:
            wd = w1
        else:
            wd = w2
        c = tl.dot(conv_row_taps(cells, row_weights(ty_ptr, e, hr, ky, dy, rows_y, NBP, TAPS,
                                                    HALO),
                                 wx, wxp, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ,
                                 NBP, HALO, HOLD, ZV), wd, c, input_precision=PREC)
    return c


@triton.jit
def tile_cells(z_ptr, perm_ptr, start, stop, H, W, r, rows_y, rows_x, stride_zn,
               BT: tl.constexpr, RZ: tl.constexpr, HALO: tl.constexpr, BORDER: tl.constexpr,
               HOLD: tl.constexpr, ZV: tl.constexpr):
    """The tile's tokens (tile_tokens) and, when HOLD, its z cells (else an empty tuple)."""
    tok, tmask, h, w, hr, wr = tile_tokens(perm_ptr, start, stop, H, W, rows_y, rows_x, BT,
                                           BORDER)
    if HOLD:
        cells = z_cells(z_ptr, tok, tmask, h, w, H, W, r, stride_zn, HALO, RZ, ZV)
    else:
        cells = ()
    return tok, tmask, h, w, hr, wr, cells


@triton.jit
def tile_setup(z_ptr, perm_ptr, e, start, stop, cw_ptr, cb_ptr, H, W, r, rows_y, rows_x,
               stride_zn, BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr,
               HALO: tl.constexpr, BORDER: tl.constexpr, HOLD: tl.constexpr,
               ZV: tl.constexpr):
    """What every stencil program of expert e starts from: the tokens (tile_tokens), the
    z cells when HOLD (else an empty tuple), conv_bias_e as [BT, RP] and W_e's three conv
    rows (conv_row_weights)."""
    tok, tmask, h, w, hr, wr, cells = tile_cells(z_ptr, perm_ptr, start, stop, H, W, r,
                                                 rows_y, rows_x, stride_zn, BT, RZ, HALO,
                                                 BORDER, HOLD, ZV)
    ci = tl.arange(0, RP)
    cb = tl.load(cb_ptr + e * r + ci, mask=ci < r, other=0.0).to(tl.float32)
    cb2 = tl.zeros([BT, RP], tl.float32) + cb[None, :]
    w0 = conv_row_weights(cw_ptr, e, r, 0, 0, RZ, RP, False)
    w1 = conv_row_weights(cw_ptr, e, r, 1, 0, RZ, RP, False)
    w2 = conv_row_weights(cw_ptr, e, r, 2, 0, RZ, RP, False)
    return tok, tmask, h, w, hr, wr, cells, cb2, w0, w1, w2


@triton.jit
def tile_u(z_ptr, perm_ptr, e, start, stop, ntaps_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr,
           cw_ptr, cb_ptr, H, W, r, rows_y, rows_x, stride_zn,
           BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
           HALO: tl.constexpr, TAPS: tl.constexpr, BORDER: tl.constexpr, PREC: tl.constexpr,
           HOLD: tl.constexpr, ZV: tl.constexpr):
    """u_t = z_t + E_e(z)_t for the sorted tokens [start, min(stop, start + BT)) of expert
    e: (token ids [BT], validity [BT], u fp32 [BT, RP] or [BT, RP / 2] (live_cols); columns
    past r are zero, rows past the range are not meaningful)."""
    tok, tmask, h, w, hr, wr, cells, cb, w0, w1, w2 = tile_setup(
        z_ptr, perm_ptr, e, start, stop, cw_ptr, cb_ptr, H, W, r, rows_y, rows_x, stride_zn,
        BT, RZ, RP, HALO, BORDER, HOLD, ZV)
    u = tl.zeros_like(live_cols(cb, BT, RZ, RP))
    nt = tl.load(ntaps_ptr + e)
    for k in range(0, nt * nt):
        ky = k // nt
        kx = k % nt
        c = conv_output(cells, cb, w0, w1, w2, ty_ptr, tx_ptr, e, hr, wr, ky, kx, rows_y,
                        rows_x, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, NBP,
                        HALO, TAPS, HOLD, ZV, PREC)
        om = down_weight(oy_ptr, ox_ptr, e, hr, wr, ky, kx, rows_y, rows_x, TAPS)
        u += om[:, None] * gelu(live_cols(c, BT, RZ, RP),
                                z_ptr.dtype.element_ty.primitive_bitwidth == 16)
    ci = tl.arange(0, u.shape[1])
    u += tl.load(z_ptr + tok[:, None] * stride_zn + ci[None, :],
                 mask=tmask[:, None] & (ci[None, :] < r), other=0.0).to(tl.float32)
    return tok, tmask, u


@triton.jit
def dz_update(dzc, g, wt0, wt1, wt2, wy0, wy1, wy2, wx, BT: tl.constexpr, RC: tl.constexpr,
              HALO: tl.constexpr, AH: tl.constexpr, PREC: tl.constexpr):
    """The gather's transpose for one conv output: dzc (AH rows of the neighbourhood's
    cells of dL/dz, channels of one chunk) + sum_dy Ty[.., a] Tx[.., b] (g W_e[:, :, dy])_dx,
    each conv row's dL/dU one tl.dot with its weights wt_dy ([4·RC, RP], split_taps' order),
    then the column pass's transpose, then the row pass's (wy_dy: the AH rows' weights)."""
    NB: tl.constexpr = 2 * HALO + 1
    for dy in tl.static_range(3):
        if dy == 0:
            wt = wt0
            wy = wy0
        elif dy == 1:
            wt = wt1
            wy = wy1
        else:
            wt = wt2
            wy = wy2
        d0, d1, d2 = split_taps(tl.dot(g, tl.trans(wt), input_precision=PREC), BT, RC)
        dv = ()
        for b in tl.static_range(NB):
            dv = dv + (wx[b][:, None] * d0 + wx[NB + b][:, None] * d1
                       + wx[2 * NB + b][:, None] * d2,)
        new = ()
        for j in tl.static_range(AH):
            for b in tl.static_range(NB):
                new = new + (dzc[j * NB + b] + wy[j][:, None] * dv[b],)
        dzc = new
    return dzc


@triton.jit
def row_weights_from(ty_ptr, e, hr, ky, dy: tl.constexpr, rows_y, a0, NBP: tl.constexpr,
                     TAPS: tl.constexpr, AH: tl.constexpr):
    """(Ty[h, ky, dy, a0 + j] for j < AH): row_weights for the neighbourhood's rows
    a0 .. a0 + AH - 1 (zero past the padded rows)."""
    base = ty_ptr + (((e * rows_y + hr) * TAPS + ky) * 3 + dy) * NBP + a0
    wy = ()
    for j in tl.static_range(AH):
        wy = wy + (tl.load(base + j, mask=a0 + j < NBP, other=0.0),)
    return wy


@triton.jit
def zero_cells(BT: tl.constexpr, RC: tl.constexpr, COUNT: tl.constexpr):
    """COUNT cells of zeros, [BT, RC] each."""
    cells = ()
    for i in tl.static_range(COUNT):
        cells = cells + (tl.zeros([BT, RC], tl.float32),)
    return cells


@triton.jit
def store_dz(dz_ptr, dzc, tok, tmask, h, w, H, W, r, c0, a0, RC: tl.constexpr,
             HALO: tl.constexpr, AH: tl.constexpr, ATOMIC: tl.constexpr):
    """A tile's dL/dz of its tokens' neighbourhoods, channels c0 + [0, RC) of rows
    a0 .. a0 + AH - 1 (dzc): added into dz (N, r) with ATOMIC (neighbour rows inside the
    map), else stored in each token's own slots (N, NB, NB, r)."""
    NB: tl.constexpr = 2 * HALO + 1
    ch = c0 + tl.arange(0, RC)
    cm = (ch < r)[None, :]
    for j in tl.static_range(AH):
        a = a0 + j
        for b in tl.static_range(NB):
            if ATOMIC:
                hh = h + (a - HALO)
                ww = w + (b - HALO)
                ok = tmask & (a < NB) & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < W)
                row = tok + ((a - HALO) * W + (b - HALO))
                tl.atomic_add(dz_ptr + row[:, None] * r + ch[None, :], dzc[j * NB + b],
                              mask=ok[:, None] & cm, sem="relaxed")
            else:
                tl.store(dz_ptr + (tok * (NB * NB) + (a * NB + b))[:, None] * r + ch[None, :],
                         dzc[j * NB + b], mask=(tmask & (a < NB))[:, None] & cm)


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
        PREC: tl.constexpr, HOLD: tl.constexpr, ZV: tl.constexpr):
    """u_t = z_t + E_{e_t}(z)_t."""
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    if e >= n_exp:
        return
    tok, tmask, u = tile_u(z_ptr, perm_ptr, e, start, stop, ntaps_ptr, ty_ptr, oy_ptr, tx_ptr,
                           ox_ptr, cw_ptr, cb_ptr, H, W, r, rows_y, rows_x, stride_zn, BT, RZ,
                           RP, NBP, HALO, TAPS, BORDER, PREC, HOLD, ZV)
    ci = tl.arange(0, u.shape[1])
    tl.store(u_ptr + tok[:, None] * r + ci[None, :], u,
             mask=tmask[:, None] & (ci[None, :] < r))


@triton.jit
def grad_phase(cells, cb, w0, w1, w2, du, g_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, e, nt, hr,
               wr, rows_y, rows_x, z_ptr, tok, tmask, h, w, H, W, r, stride_zn,
               BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
               HALO: tl.constexpr, TAPS: tl.constexpr, HOLD: tl.constexpr, ZV: tl.constexpr,
               PREC: tl.constexpr):
    """Each conv output recomputed (as tile_u does) and g_k = omega_k · du ⊙ GELU'(c_k)
    written to the tile's rows of g; returns sum_k g_k, [BT, RP] or [BT, RP / 2] (live_cols,
    as du is)."""
    ci = tl.arange(0, du.shape[1])
    cmask = tmask[:, None] & (ci[None, :] < r)
    db = tl.zeros_like(du)
    for k in range(0, nt * nt):
        ky = k // nt
        kx = k % nt
        c = conv_output(cells, cb, w0, w1, w2, ty_ptr, tx_ptr, e, hr, wr, ky, kx, rows_y,
                        rows_x, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, NBP,
                        HALO, TAPS, HOLD, ZV, PREC)
        om = down_weight(oy_ptr, ox_ptr, e, hr, wr, ky, kx, rows_y, rows_x, TAPS)
        g = om[:, None] * du * gelu_grad(live_cols(c, BT, RZ, RP),
                                         z_ptr.dtype.element_ty.primitive_bitwidth == 16)
        tl.store(g_ptr + (tok[:, None] * (TAPS * TAPS) + k) * r + ci[None, :], g, mask=cmask)
        db += g
    return db


@triton.jit
def store_db(db_ptr, db, slot, r, RP: tl.constexpr, ATOMIC: tl.constexpr):
    """dL/dconv_bias_e: the tile's sum over its tokens of db ([BT, RP] or [BT, RP / 2])
    added into slot ``slot`` (the expert) with ATOMIC, else stored there (the program's
    partial)."""
    ci = tl.arange(0, db.shape[1])
    dbs = tl.sum(db, axis=0)
    if ATOMIC:
        tl.atomic_add(db_ptr + slot * r + ci, dbs, mask=ci < r, sem="relaxed")
    else:
        tl.store(db_ptr + slot * r + ci, dbs, mask=ci < r)


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
        PREC: tl.constexpr, ATOMIC: tl.constexpr, HOLD: tl.constexpr,
        ZV: tl.constexpr):
    """Backward, part 1 (grad_phase): g_k = dL/dc_k for each conv output;
    dL/dconv_bias_e = sum over the expert's tokens and conv outputs of g_k (summed over
    the tile's tokens once, at the end)."""
    pid = tl.program_id(0).to(tl.int64)
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    if e >= n_exp:  # past the last tile; the reduction reads only the tiles' slots
        return
    tok, tmask, h, w, hr, wr, cells, cb, w0, w1, w2 = tile_setup(
        z_ptr, perm_ptr, e, start, stop, cw_ptr, cb_ptr, H, W, r, rows_y, rows_x, stride_zn,
        BT, RZ, RP, HALO, BORDER, HOLD, ZV)
    ci = live_range(RZ, RP)
    du = tl.load(du_ptr + tok[:, None] * r + ci[None, :],
                 mask=tmask[:, None] & (ci[None, :] < r), other=0.0)
    db = grad_phase(cells, cb, w0, w1, w2, du, g_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, e,
                    tl.load(ntaps_ptr + e), hr, wr, rows_y, rows_x, z_ptr, tok, tmask, h, w,
                    H, W, r, stride_zn, BT, RZ, RP, NBP, HALO, TAPS, HOLD, ZV, PREC)
    store_db(db_ptr, db, e if ATOMIC else pid, r, RP, ATOMIC)


@triton.jit
def store_dw(dw_ptr, dw0, dw1, dw2, slot, r, RZ: tl.constexpr, RP: tl.constexpr,
             ATOMIC: tl.constexpr):
    """dL/dW_e's three conv rows ([4·RZ, RP] each, conv_row_offsets) added into slot
    ``slot`` (the expert) with ATOMIC, else stored there (the program's partial)."""
    base = dw_ptr + slot * (r * r * 9)
    o0, m0 = conv_row_offsets(r, 0, 0, RZ, RP, False)
    o1, m1 = conv_row_offsets(r, 1, 0, RZ, RP, False)
    o2, m2 = conv_row_offsets(r, 2, 0, RZ, RP, False)
    if ATOMIC:
        tl.atomic_add(base + o0, dw0, mask=m0, sem="relaxed")
        tl.atomic_add(base + o1, dw1, mask=m1, sem="relaxed")
        tl.atomic_add(base + o2, dw2, mask=m2, sem="relaxed")
    else:
        tl.store(base + o0, dw0, mask=m0)
        tl.store(base + o1, dw1, mask=m1)
        tl.store(base + o2, dw2, mask=m2)


@triton.jit
def dw_phase(cells, g_ptr, ty_ptr, tx_ptr, e, nt, hr, wr, rows_y, rows_x, z_ptr, tok, tmask,
             h, w, H, W, r, stride_zn, BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr,
             NBP: tl.constexpr, HALO: tl.constexpr, TAPS: tl.constexpr, HOLD: tl.constexpr,
             ZV: tl.constexpr, PREC: tl.constexpr):
    """dL/dW_e[:, :, dy, dx] of the tile = sum_{t, k} g_k ⊗ U_k(dy, dx), the taps rebuilt
    from the z cells (held or loaded, as in the forward) and g read from the tile's rows:
    the three conv rows, [4·RZ, RP] each (conv_row_offsets)."""
    dw0 = tl.zeros([4 * RZ, RP], tl.float32)
    dw1 = tl.zeros([4 * RZ, RP], tl.float32)
    dw2 = tl.zeros([4 * RZ, RP], tl.float32)
    for k in range(0, nt * nt):
        ky = k // nt
        kx = k % nt
        g = load_g(g_ptr, tok, tmask, k, r, BT, RZ, RP, TAPS)
        wx = col_weights(tx_ptr, e, wr, kx, rows_x, NBP, TAPS, HALO)
        wxp = col_base(tx_ptr, e, wr, kx, rows_x, NBP, TAPS)
        up = conv_row_taps(cells, row_weights(ty_ptr, e, hr, ky, 0, rows_y, NBP, TAPS, HALO),
                           wx, wxp, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, NBP,
                           HALO, HOLD, ZV)
        dw0 = tl.dot(tl.trans(up), g, dw0, input_precision=PREC)
        up = conv_row_taps(cells, row_weights(ty_ptr, e, hr, ky, 1, rows_y, NBP, TAPS, HALO),
                           wx, wxp, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, NBP,
                           HALO, HOLD, ZV)
        dw1 = tl.dot(tl.trans(up), g, dw1, input_precision=PREC)
        up = conv_row_taps(cells, row_weights(ty_ptr, e, hr, ky, 2, rows_y, NBP, TAPS, HALO),
                           wx, wxp, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, NBP,
                           HALO, HOLD, ZV)
        dw2 = tl.dot(tl.trans(up), g, dw2, input_precision=PREC)
    return dw0, dw1, dw2


@triton.jit
def dz_phase(g_ptr, cw_ptr, dz_ptr, ty_ptr, tx_ptr, e, nt, hr, wr, rows_y, rows_x, tok,
             tmask, h, w, H, W, r, BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr,
             NBP: tl.constexpr, HALO: tl.constexpr, TAPS: tl.constexpr, PREC: tl.constexpr,
             ATOMIC: tl.constexpr, RC: tl.constexpr, AH: tl.constexpr):
    """dL/dz of the tile's neighbourhoods from the tile's rows of g, RC channels and AH
    rows of the neighbourhood at a time (AH·NB cells of [BT, RC] in registers; store_dz):
        dL/dU = g_k W_e[:, :, dy, dx]
        dL/dz[h+a-HALO, w+b-HALO] += Ty[.., a] Tx[.., b] dL/dU   (the gather's transpose)"""
    for c0 in range(0, r, RC):
        wt0 = conv_row_weights(cw_ptr, e, r, 0, c0, RC, RP, True)
        wt1 = conv_row_weights(cw_ptr, e, r, 1, c0, RC, RP, True)
        wt2 = conv_row_weights(cw_ptr, e, r, 2, c0, RC, RP, True)
        for a0 in range(0, 2 * HALO + 1, AH):
            dzc = zero_cells(BT, RC, AH * (2 * HALO + 1))
            for k in range(0, nt * nt):
                ky = k // nt
                kx = k % nt
                g = load_g(g_ptr, tok, tmask, k, r, BT, RZ, RP, TAPS)
                dzc = dz_update(dzc, g, wt0, wt1, wt2,
                                row_weights_from(ty_ptr, e, hr, ky, 0, rows_y, a0, NBP, TAPS,
                                                 AH),
                                row_weights_from(ty_ptr, e, hr, ky, 1, rows_y, a0, NBP, TAPS,
                                                 AH),
                                row_weights_from(ty_ptr, e, hr, ky, 2, rows_y, a0, NBP, TAPS,
                                                 AH),
                                col_weights(tx_ptr, e, wr, kx, rows_x, NBP, TAPS, HALO),
                                BT, RC, HALO, AH, PREC)
            store_dz(dz_ptr, dzc, tok, tmask, h, w, H, W, r, c0, a0, RC, HALO, AH, ATOMIC)


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
        PREC: tl.constexpr, ATOMIC: tl.constexpr, RC: tl.constexpr, AH: tl.constexpr,
        HOLD: tl.constexpr, ZV: tl.constexpr):
    """Backward, part 2, with U = U_k(dy, dx) recomputed, in two phases so that the z
    cells and their gradient are never in registers together: dL/dW_e (dw_phase), then
    dL/dz (dz_phase; launch.Tiling.rc and .ah). Cost of the split: a tile reads its g
    (BT·TAPS²·r·4 bytes) 1 + ceil(r / RC)·ceil(NB / AH) times, re-reads that stay in
    L1/L2 (DRAM sees g once)."""
    pid = tl.program_id(0).to(tl.int64)
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    if e >= n_exp:
        return
    tok, tmask, h, w, hr, wr, cells = tile_cells(z_ptr, perm_ptr, start, stop, H, W, r,
                                                 rows_y, rows_x, stride_zn, BT, RZ, HALO,
                                                 BORDER, HOLD, ZV)
    nt = tl.load(ntaps_ptr + e)
    dw0, dw1, dw2 = dw_phase(cells, g_ptr, ty_ptr, tx_ptr, e, nt, hr, wr, rows_y, rows_x,
                             z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, RP, NBP,
                             HALO, TAPS, HOLD, ZV, PREC)
    store_dw(dw_ptr, dw0, dw1, dw2, e if ATOMIC else pid, r, RZ, RP, ATOMIC)
    dz_phase(g_ptr, cw_ptr, dz_ptr, ty_ptr, tx_ptr, e, nt, hr, wr, rows_y, rows_x, tok, tmask,
             h, w, H, W, r, BT, RZ, RP, NBP, HALO, TAPS, PREC, ATOMIC, RC, AH)


@triton.jit
def grad_dw_phase(cells, cb, w0, w1, w2, du, g_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, e, nt,
                  hr, wr, rows_y, rows_x, z_ptr, tok, tmask, h, w, H, W, r, stride_zn,
                  BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
                  HALO: tl.constexpr, TAPS: tl.constexpr, HOLD: tl.constexpr,
                  ZV: tl.constexpr, PREC: tl.constexpr):
    """grad_phase and dw_phase with each conv output's three rows of taps built once, for
    c_k and for dL/dW_e: (sum_k g_k as du's shape, dw0, dw1, dw2)."""
    ci = tl.arange(0, du.shape[1])
    cmask = tmask[:, None] & (ci[None, :] < r)
    db = tl.zeros_like(du)
    dw0 = tl.zeros([4 * RZ, RP], tl.float32)
    dw1 = tl.zeros([4 * RZ, RP], tl.float32)
    dw2 = tl.zeros([4 * RZ, RP], tl.float32)
    for k in range(0, nt * nt):
        ky = k // nt
        kx = k % nt
        wx = col_weights(tx_ptr, e, wr, kx, rows_x, NBP, TAPS, HALO)
        wxp = col_base(tx_ptr, e, wr, kx, rows_x, NBP, TAPS)
        up0 = conv_row_taps(cells, row_weights(ty_ptr, e, hr, ky, 0, rows_y, NBP, TAPS, HALO),
                            wx, wxp, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, NBP,
                            HALO, HOLD, ZV)
        up1 = conv_row_taps(cells, row_weights(ty_ptr, e, hr, ky, 1, rows_y, NBP, TAPS, HALO),
                            wx, wxp, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, NBP,
                            HALO, HOLD, ZV)
        up2 = conv_row_taps(cells, row_weights(ty_ptr, e, hr, ky, 2, rows_y, NBP, TAPS, HALO),
                            wx, wxp, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, NBP,
                            HALO, HOLD, ZV)
        c = tl.dot(up0, w0, cb, input_precision=PREC)
        c = tl.dot(up1, w1, c, input_precision=PREC)
        c = tl.dot(up2, w2, c, input_precision=PREC)
        om = down_weight(oy_ptr, ox_ptr, e, hr, wr, ky, kx, rows_y, rows_x, TAPS)
        g = om[:, None] * du * gelu_grad(live_cols(c, BT, RZ, RP),
                                         z_ptr.dtype.element_ty.primitive_bitwidth == 16)
        tl.store(g_ptr + (tok[:, None] * (TAPS * TAPS) + k) * r + ci[None, :], g, mask=cmask)
        db += g
        gp = pad_cols(g, BT, RZ, RP)
        dw0 = tl.dot(tl.trans(up0), gp, dw0, input_precision=PREC)
        dw1 = tl.dot(tl.trans(up1), gp, dw1, input_precision=PREC)
        dw2 = tl.dot(tl.trans(up2), gp, dw2, input_precision=PREC)
    return db, dw0, dw1, dw2


@triton.jit
def stencil_bwd_kernel(
        z_ptr, perm_ptr, bounds_ptr, ntaps_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, cw_ptr,
        cb_ptr,       # as in stencil_fwd_kernel
        du_ptr,       # (N, r) float32, dL/du
        g_ptr,        # (N, TAPS², r) float32 workspace: g_k of the program's own tokens
        db_ptr,       # float32: (n_exp, r) with ATOMIC, else (programs, r) partial sums
        dw_ptr,       # float32: (n_exp, r, r, 3, 3) with ATOMIC, else (programs, r, r, 3, 3)
        dz_ptr,       # ATOMIC: (N, r) float32 holding dL/du, += the stencil's dL/dz;
                      # else (N, NB, NB, r) float32: each token's dL/dz of its neighbours
        H, W, r, n_exp, rows_y, rows_x, stride_zn,
        BT: tl.constexpr, RZ: tl.constexpr, RP: tl.constexpr, NBP: tl.constexpr,
        HALO: tl.constexpr, TAPS: tl.constexpr, NEXP_P: tl.constexpr, BORDER: tl.constexpr,
        PREC: tl.constexpr, ATOMIC: tl.constexpr, RC: tl.constexpr, AH: tl.constexpr,
        HOLD: tl.constexpr, ZV: tl.constexpr, TAPS_ONCE: tl.constexpr):
    """The stencil's backward in one launch: the split pair's phases in one program per
    tile, the z cells and the tile's setup loaded once. First g_k, dL/dconv_bias and
    dL/dW_e (grad_dw_phase, each conv output's taps built once, with TAPS_ONCE; else
    grad_phase then dw_phase, which rebuilds them, in fewer registers), g written to the
    tile's own rows; then, after a barrier (the block's threads read each other's g), dL/dz
    from them (dz_phase). g's rows are the program's own, written and read back while in
    L1/L2."""
    pid = tl.program_id(0).to(tl.int64)
    e, start, stop = expert_tile(bounds_ptr, ntaps_ptr, n_exp, BT, NEXP_P)
    if e >= n_exp:  # past the last tile; the reductions read only the tiles' slots
        return
    tok, tmask, h, w, hr, wr, cells, cb, w0, w1, w2 = tile_setup(
        z_ptr, perm_ptr, e, start, stop, cw_ptr, cb_ptr, H, W, r, rows_y, rows_x, stride_zn,
        BT, RZ, RP, HALO, BORDER, HOLD, ZV)
    ci = live_range(RZ, RP)
    du = tl.load(du_ptr + tok[:, None] * r + ci[None, :],
                 mask=tmask[:, None] & (ci[None, :] < r), other=0.0)
    nt = tl.load(ntaps_ptr + e)
    slot = e if ATOMIC else pid
    if TAPS_ONCE:
        db, dw0, dw1, dw2 = grad_dw_phase(
            cells, cb, w0, w1, w2, du, g_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, e, nt, hr, wr,
            rows_y, rows_x, z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, RP, NBP,
            HALO, TAPS, HOLD, ZV, PREC)
        store_db(db_ptr, db, slot, r, RP, ATOMIC)
    else:
        db = grad_phase(cells, cb, w0, w1, w2, du, g_ptr, ty_ptr, oy_ptr, tx_ptr, ox_ptr, e,
                        nt, hr, wr, rows_y, rows_x, z_ptr, tok, tmask, h, w, H, W, r,
                        stride_zn, BT, RZ, RP, NBP, HALO, TAPS, HOLD, ZV, PREC)
        store_db(db_ptr, db, slot, r, RP, ATOMIC)
        tl.debug_barrier()  # dw_phase's threads read g that others wrote
        dw0, dw1, dw2 = dw_phase(cells, g_ptr, ty_ptr, tx_ptr, e, nt, hr, wr, rows_y, rows_x,
                                 z_ptr, tok, tmask, h, w, H, W, r, stride_zn, BT, RZ, RP, NBP,
                                 HALO, TAPS, HOLD, ZV, PREC)
    store_dw(dw_ptr, dw0, dw1, dw2, slot, r, RZ, RP, ATOMIC)
    tl.debug_barrier()
    dz_phase(g_ptr, cw_ptr, dz_ptr, ty_ptr, tx_ptr, e, nt, hr, wr, rows_y, rows_x, tok, tmask,
             h, w, H, W, r, BT, RZ, RP, NBP, HALO, TAPS, PREC, ATOMIC, RC, AH)
