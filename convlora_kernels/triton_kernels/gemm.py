"""The two-source GEMM: C = A1 B1 + alpha · A2 B2 (+ bias), one accumulator, C written once.

The layer's two big GEMMs each carry a rank-r term that would otherwise be a pass of its
own over the big tensor:
    forward   y  = x W0ᵀ + s · u Bᵀ + b      A1 = x (N, C_in),  B1 = W0ᵀ, A2 = u (N, r), B2 = Bᵀ
    backward  dx = dy W0 + dz A              A1 = dy (N, C_out), B1 = W0,  A2 = dz (N, r), B2 = A
A program owns a BM x BN tile of C and one fp32 accumulator: its first K loop runs over
A2 B2 (K2 = r, padded to the MMA's K of 16 and to a power of two, RK), the accumulator is
scaled by alpha, then the K loop over A1 B1 (K1 = C_in or C_out) in steps of BK adds onto
it, then the bias; C is stored once in its dtype. (The rank-r term first: a second
[BM, BN] accumulator for it would double the registers.) Against the vendor GEMM followed (or preceded) by
the rank-r GEMM, that saves a write and a read of C (y: N·C_out, dx: N·C_in elements).

The B operands are read through their strides, so W0ᵀ, Bᵀ, W0 and A are views of the
parameters, never copies. Programs are ordered in groups of GROUP_M row tiles, so the
column tiles of B1 a group reads stay in L2 (the grouping of Triton's matmul tutorial).
"""

import triton
import triton.language as tl


@triton.jit
def two_source_gemm_kernel(
        a1_ptr, b1_ptr,   # A1 (M, K1), B1 (K1, N), by strides
        a2_ptr, b2_ptr,   # A2 (M, K2), B2 (K2, N), by strides
        bias_ptr,         # (N,), read when HAS_BIAS
        c_ptr,            # (M, N) output, row stride stride_cm, unit column stride
        M, N, K1, K2, alpha,
        stride_a1m, stride_a1k, stride_b1k, stride_b1n,
        stride_a2m, stride_a2k, stride_b2k, stride_b2n, stride_cm,
        HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        RK: tl.constexpr, GROUP_M: tl.constexpr, PREC: tl.constexpr):
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % rows_in_group
    pid_n = (pid % group) // rows_in_group
    rm = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    rn = (pid_n * BN + tl.arange(0, BN)).to(tl.int64)
    mmask = rm < M
    nmask = rn < N

    acc = tl.zeros([BM, BN], tl.float32)
    rr = tl.arange(0, RK)
    for k0 in range(0, K2, RK):
        k = k0 + rr
        kmask = k < K2
        a = tl.load(a2_ptr + rm[:, None] * stride_a2m + k[None, :] * stride_a2k,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b2_ptr + k[:, None] * stride_b2k + rn[None, :] * stride_b2n,
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    acc = acc * alpha
    rk = tl.arange(0, BK)
    for k0 in range(0, K1, BK):
        k = k0 + rk
        kmask = k < K1
        a = tl.load(a1_ptr + rm[:, None] * stride_a1m + k[None, :] * stride_a1k,
                    mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(b1_ptr + k[:, None] * stride_b1k + rn[None, :] * stride_b1n,
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], acc.to(c_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])
