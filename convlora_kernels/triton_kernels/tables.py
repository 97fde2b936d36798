"""Per-axis stencil tables: the resampling rules of docs/design.md as small lookup tables.

Along one axis (rows, say) of length n, a token at index h with an expert of scale s
needs, for E_s(z) = Down_s(GELU(Conv3x3(Up_s(z)))):

    down taps     the high-resolution rows P_k that Down_s reads for output h, with
                  weights omega[h, k] (one tap for odd s, two for even s with
                  bilinear, up to four for even s with bicubic; border clamping folded
                  into the weights by interpolate itself);
    conv taps     rows P_k + d - 1 of the upsampled map for d = 0, 1, 2 (zero outside
                  [0, s*n - 1]: the 3x3 conv pads with zeros);
    up weights    each upsampled row is a combination of z rows h + a - HALO.

So T[h, k, d, a] = Up_s[P_k + d - 1, h + a - HALO] and omega[h, k] = Down_s[h, P_k].
The 2-D stencil is separable: the upsampled value at conv tap (dy, dx) of conv output
(ky, kx) is sum_{a,b} Ty[h, ky, dy, a] Tx[w, kx, dx, b] z[h + a - HALO, w + b - HALO].

The matrices Up_s and Down_s are taken from F.interpolate applied to identity matrices
in float64, so the tables follow PyTorch's rules (align_corners=False, bilinear clamp
of negative sources, bicubic A = -0.75 with clamped taps) by construction; for s = 1
both are the identity, as in the reference, which calls no interpolation then.

Rows far from both borders all have the same table row, so a table holds at most
2 * BORDER + 1 rows: row index min(h, BORDER) near the top, BORDER in the interior,
and h - (n - rows) near the bottom (see row_of).
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# Rows within BORDER of an edge may see clamping or zero padding; BORDER exceeds the
# largest halo (3) so the middle row of a 2 * BORDER + 1 table is an interior row.
BORDER = 4


def next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _resample(n: int, s: int, interpolation: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(Up_s (s*n, n), Down_s (n, s*n)) along one axis, float64, from F.interpolate."""
    if s == 1:
        eye = torch.eye(n, dtype=torch.float64)
        return eye, eye
    eye = torch.eye(n, dtype=torch.float64).reshape(1, n, n, 1)
    up = F.interpolate(eye, scale_factor=(s, 1), mode=interpolation, align_corners=False)
    big = torch.eye(s * n, dtype=torch.float64).reshape(1, s * n, s * n, 1)
    down = F.interpolate(big, size=(n, 1), mode=interpolation, align_corners=False)
    return up[0, :, :, 0].t().contiguous(), down[0, :, :, 0].t().contiguous()


@functools.lru_cache(maxsize=None)
def _axis_rows(n: int, s: int, interpolation: str):
    """For each h < n: [(P_k, omega_k, [(d, {z index: weight})])] over the down taps."""
    up, down = _resample(n, s, interpolation)
    rows = []
    for h in range(n):
        taps = []
        for p in torch.nonzero(down[h]).flatten().tolist():
            conv = []
            for d in range(3):
                q = p + d - 1
                coef = {} if not 0 <= q < s * n else {
                    j: float(up[q, j]) for j in torch.nonzero(up[q]).flatten().tolist()}
                conv.append(coef)
            taps.append((p, float(down[h, p]), conv))
        rows.append(taps)
    return rows


def table_rows(n: int) -> int:
    """How many table rows an axis of length n needs."""
    return min(n, 2 * BORDER + 1)


def row_of(h: int, n: int) -> int:
    """The table row of index h on an axis of length n (the kernels compute the same)."""
    rows = table_rows(n)
    if h < BORDER:
        return h
    if h >= n - BORDER:
        return h - (n - rows)
    return BORDER


@functools.lru_cache(maxsize=None)
def halo(scales: Tuple[int, ...], interpolation: str) -> int:
    """Largest |z index - h| with a nonzero weight in any token's stencil."""
    reach = 0
    n = table_rows(10 ** 6)
    for s in set(scales):
        for h, taps in enumerate(_axis_rows(n, s, interpolation)):
            for _, _, conv in taps:
                for coef in conv:
                    reach = max([reach] + [abs(j - h) for j in coef])
    return reach


@functools.lru_cache(maxsize=None)
def down_taps(scales: Tuple[int, ...], interpolation: str) -> Tuple[int, ...]:
    """Per expert: the number of down taps per axis (1, 2 or 4)."""
    n = table_rows(10 ** 6)
    return tuple(max(len(t) for t in _axis_rows(n, s, interpolation)) for s in scales)


def axis_tables(n: int, scales: Sequence[int], interpolation: str, halo_: int, taps_max: int,
                nb_pad: int, rows: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """T (n_exp, rows, taps_max, 3, nb_pad) and omega (n_exp, rows, taps_max), float64.

    rows defaults to table_rows(n); rows = n gives the uncompressed table (row h for
    index h). Entries past an expert's taps, offsets past 2 * halo_ and z indices outside
    the axis are zero. Raises if a weight falls outside the halo (a broken invariant).
    """
    rows = table_rows(n) if rows is None else rows
    t = torch.zeros(len(scales), rows, taps_max, 3, nb_pad, dtype=torch.float64)
    om = torch.zeros(len(scales), rows, taps_max, dtype=torch.float64)
    for e, s in enumerate(scales):
        for h, taps in enumerate(_axis_rows(rows, s, interpolation)):
            for k, (_, w, conv) in enumerate(taps):
                om[e, h, k] = w
                for d, coef in enumerate(conv):
                    for j, c in coef.items():
                        a = j - h + halo_
                        if not 0 <= a <= 2 * halo_:
                            raise AssertionError(f"stencil weight at offset {j - h} outside "
                                                 f"the halo {halo_} (s={s}, {interpolation})")
                        t[e, h, k, d, a] += c
    return t, om


# Never evicted: a CUDA graph that captured a launch reading these tensors keeps their
# addresses, so they must outlive every graph. The entries are the distinct (map size,
# scales, interpolation, device) a process uses (SAM: two map sizes), a few KB each.
@functools.lru_cache(maxsize=None)
def stencil_tables(height: int, width: int, scales: Tuple[int, ...], interpolation: str,
                   device: torch.device):
    """Everything the stencil kernels need about resampling, as float32/int32 device tensors.

    Returns (ty, oy, tx, ox, ntaps, meta): ntaps (2·n_exp,) holds each expert's down taps
    per axis, then the experts by decreasing taps; meta = dict(halo, nb_pad, taps_max,
    rows_y, rows_x).
    """
    h_ = halo(scales, interpolation)
    nb_pad = next_pow2(2 * h_ + 1)
    ntaps = down_taps(scales, interpolation)
    taps_max = max(ntaps)
    ty, oy = axis_tables(height, scales, interpolation, h_, taps_max, nb_pad)
    tx, ox = axis_tables(width, scales, interpolation, h_, taps_max, nb_pad)
    f32 = dict(dtype=torch.float32, device=device)
    meta = dict(halo=h_, nb_pad=nb_pad, taps_max=taps_max, rows_y=table_rows(height),
                rows_x=table_rows(width))
    # the experts heaviest first (most down taps, the most conv outputs per token): the
    # stencil kernels' tile order (stencil.tile_ranges); stable, so ties keep index order
    heaviest = sorted(range(len(scales)), key=lambda e: -ntaps[e])
    return (ty.to(**f32), oy.to(**f32), tx.to(**f32), ox.to(**f32),
            torch.tensor(list(ntaps) + heaviest, dtype=torch.int32, device=device), meta)
