"""Tokens grouped by expert, as the stencil kernels take them: a stable counting sort in
two launches (in place of torch.sort, searchsorted and their casts, about seven).

Bins: expert indices below 0 first, then experts 0 .. n-1, then indices >= n (an
unchecked out-of-range index sorts outside every expert's range, where the stencil
kernels never look). Per block of BLOCK tokens:
    expert_counts_kernel   counts[block, bin]
    expert_order_kernel    each token's sorted position = start of its bin over all blocks
                           + its bin's count in earlier blocks + its rank in its block;
                           perm[position] = token; block 0 also writes bounds
Stable (a token's position follows its index within its bin) and deterministic.
"""

import triton
import triton.language as tl


@triton.jit
def _bins(idx_ptr, blk, N, n_exp, BLOCK: tl.constexpr, NBINS: tl.constexpr):
    """Token ids [BLOCK], their validity and their bins as a one-hot [BLOCK, NBINS] int32."""
    tok = blk.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = tok < N
    e = tl.load(idx_ptr + tok, mask=valid, other=0).to(tl.int64)
    b = tl.where(e < 0, 0, tl.where(e >= n_exp, n_exp + 1, e + 1))
    onehot = (b[:, None] == tl.arange(0, NBINS)[None, :]) & valid[:, None]
    return tok, valid, onehot.to(tl.int32)


@triton.jit
def expert_counts_kernel(
        idx_ptr,      # (N,) expert index, any integer dtype
        counts_ptr,   # (blocks, NBINS) int32 output
        N, n_exp,
        BLOCK: tl.constexpr, NBINS: tl.constexpr):
    """counts[block, bin]: how many of the block's tokens fall in each bin."""
    blk = tl.program_id(0)
    _, _, onehot = _bins(idx_ptr, blk, N, n_exp, BLOCK, NBINS)
    tl.store(counts_ptr + blk * NBINS + tl.arange(0, NBINS), tl.sum(onehot, axis=0))


@triton.jit
def expert_order_kernel(
        idx_ptr,      # (N,) expert index
        counts_ptr,   # (blocks, NBINS) int32, from expert_counts_kernel
        perm_ptr,     # (N,) int64 output: token ids in sorted order
        bounds_ptr,   # (n_exp + 1,) int32 output: first sorted position of each expert
        N, n_exp, blocks,
        BLOCK: tl.constexpr, NBINS: tl.constexpr, CB: tl.constexpr):
    """perm[start_bin + earlier blocks' count + rank in block] = token (module doc)."""
    blk = tl.program_id(0)
    bins = tl.arange(0, NBINS)
    total = tl.zeros([NBINS], tl.int32)
    before = tl.zeros([NBINS], tl.int32)
    for c0 in range(0, blocks, CB):  # every block's counts, CB blocks at a time
        rows = c0 + tl.arange(0, CB)
        cnt = tl.load(counts_ptr + rows[:, None] * NBINS + bins[None, :],
                      mask=(rows < blocks)[:, None], other=0)
        total += tl.sum(cnt, axis=0)
        before += tl.sum(tl.where((rows < blk)[:, None], cnt, 0), axis=0)
    start = tl.cumsum(total, axis=0) - total  # first sorted position of each bin
    if blk == 0:  # bounds[e] = start of expert e's bin (bin e + 1), e = 0 .. n_exp
        tl.store(bounds_ptr + bins - 1, start, mask=(bins >= 1) & (bins <= n_exp + 1))
    tok, valid, onehot = _bins(idx_ptr, blk, N, n_exp, BLOCK, NBINS)
    rank = tl.cumsum(onehot, axis=0) - onehot  # earlier tokens of the same bin in the block
    pos = tl.sum(onehot * (rank + (start + before)[None, :]), axis=1)
    tl.store(perm_ptr + pos, tok, mask=valid)


@triton.jit
def nan_out_of_range_kernel(
        perm_ptr,     # (N,) int64 token ids sorted by expert
        bounds_ptr,   # (n + 1,) int32 where each expert's tokens start
        out_ptr,      # (N, r) rows to set to NaN, contiguous
        N, n_exp, r,
        BLOCK: tl.constexpr, RP: tl.constexpr):
    """out[t] = NaN for every token t whose expert index was out of range: the sort put
    it before bounds[0] or from bounds[n] on (one launch, no host synchronisation)."""
    pos = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.load(bounds_ptr)
    hi = tl.load(bounds_ptr + n_exp)
    bad = (pos < N) & ((pos < lo) | (pos >= hi))
    tok = tl.load(perm_ptr + pos, mask=bad, other=0)
    ci = tl.arange(0, RP)
    nan = tl.full([BLOCK, RP], float("nan"), out_ptr.dtype.element_ty)
    tl.store(out_ptr + tok[:, None] * r + ci[None, :], nan, mask=bad[:, None] & (ci[None, :] < r))
