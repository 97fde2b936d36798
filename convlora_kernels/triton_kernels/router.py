"""The noisy top-1 router as Triton kernels (convlora_kernels.gating has the math and the
reference). Forward: per block of routing units, the logits, the noise, the top-1 expert as
int32 and per-block sums of the aux loss's statistics (importance and load), which the
program that finishes last adds in block order, with the aux loss from them: one launch.
Backward (of the load term, the only one with a gradient): per block of units, the logits
again, the top two, dL/dclean and dL/draw, then dL/dfeatures for each unit and per-block
partial sums of dL/dw_gate and dL/dw_noise, added in block order by the program that
finishes last: one launch where the composite takes about 35.

Bytes per call, U units of r features and n experts: the features once (U·r), the noise
once (U·n fp32, in training), the experts out (U·4) and (U/BU)·2·n partial sums (BU from
block_units), written and read once more by the last program. At SAM's target (U = 16384
tokens, r = 8, n = 8, bf16): 256 KB + 512 KB + 64 KB + 2 × 16 KB.

The last program: each program stores its partials, then takes a ticket from a counter
(device.ticket_counter: one int32 per device and stream, zero between launches); the
program whose ticket is the last one reads every program's partials (bypassing L1: they
were written on other SMs) in a fixed order, writes the sums and sets the counter back to
zero. The order of the sums does not depend on which program finishes last, so the
result is the same run to run."""

import torch
import triton
import triton.language as tl

from .device import on_tensors_device, ticket_counter
from .tables import next_pow2


# Rows of per-program partials the last program adds at a time (a fixed tl.sum tree).
ROUTE_SUM_ROWS = 128
# Values per load when the last program of the router's backward adds the (RP, NP) partials.
ROUTE_SUM_VALUES = 4096


def block_units(rp: int, np_: int) -> int:
    """Routing units per program: the (BU, RP, NP) products of the logits stay near 4K
    values (32 per thread at 4 warps), so no rank or expert count spills."""
    bu = 64
    while bu > 1 and bu * rp * np_ > 4096:
        bu //= 2
    return bu


@triton.jit
def last_program(counter_ptr, programs):
    """True in the program of a launch of ``programs`` programs that takes the last ticket
    from the counter (module doc); every other program's stores before its ticket are
    visible to it. The barrier orders this program's own stores, by all its threads, before
    its ticket."""
    tl.debug_barrier()
    return tl.atomic_add(counter_ptr, 1, sem="acq_rel") == programs - 1


@triton.jit
def sum_partials(ptr, programs, L: tl.constexpr, BP: tl.constexpr):
    """(L,) float32: the sum over the (programs, L) float32 partials at ptr, BP rows at a
    time in row order (each a fixed tl.sum tree), read past L1."""
    cols = tl.arange(0, L)
    rows = tl.arange(0, BP)
    acc = tl.zeros([L], tl.float32)
    for p0 in range(0, programs, BP):
        at = (p0 + rows)[:, None] * L + cols[None, :]
        live = (p0 + rows < programs)[:, None]  # broadcast over the columns
        acc += tl.sum(tl.load(ptr + at, mask=live, other=0.0, cache_modifier=".cg"), axis=0)
    return acc


@triton.jit
def _cv_squared(v, em, n):
    """var / (mean² + 1e-10) of the values v where em, the variance unbiased
    (gating.cv_squared)."""
    m = tl.sum(tl.where(em, v, 0.0), axis=0) / n
    d = tl.where(em, v - m, 0.0)
    return (tl.sum(d * d, axis=0) / (n - 1)) / (m * m + 1e-10)


@triton.jit
def route_kernel(
        f_ptr,        # (U, r) features, row stride stride_f
        wg_ptr,       # (r, n) w_gate, contiguous
        wn_ptr,       # (r, n) w_noise, contiguous
        noise_ptr,    # (U, n) float32 standard normal draws (NOISY)
        expert_ptr,   # (U,) int32 output: the top-1 expert
        imp_ptr,      # (programs, NP) float32 output: units per expert, this block's
        load_ptr,     # (programs, NP) float32 output: P(top-1 under fresh noise) (NOISY)
        counter_ptr,  # (1,) int32, zero: device.ticket_counter
        imp_sum_ptr,  # (n,) float32 output: importance
        load_sum_ptr,  # (n,) float32 output: load (= importance without noise)
        aux_ptr,      # () float32 output: loss_coef · (cv²(importance) + cv²(load)) (AUX)
        U, r, n, noise_epsilon, stride_f, programs, loss_coef,
        BU: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr, NOISY: tl.constexpr,
        AUX: tl.constexpr, BP: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BU + tl.arange(0, BU)
    rm = rows < U
    ci = tl.arange(0, RP)
    ei = tl.arange(0, NP)
    em = ei < n
    wmask = (ci[:, None] < r) & em[None, :]
    f = tl.load(f_ptr + rows[:, None] * stride_f + ci[None, :],
                mask=rm[:, None] & (ci[None, :] < r), other=0.0).to(tl.float32)
    wg = tl.load(wg_ptr + ci[:, None] * n + ei[None, :], mask=wmask, other=0.0).to(tl.float32)
    clean = tl.sum(f[:, :, None] * wg[None, :, :], axis=1)  # (BU, NP)
    if NOISY:
        wn = tl.load(wn_ptr + ci[:, None] * n + ei[None, :], mask=wmask,
                     other=0.0).to(tl.float32)
        raw = tl.sum(f[:, :, None] * wn[None, :, :], axis=1)
        # softplus as torch computes it (beta 1, linear above 20), in a stable form
        soft = tl.maximum(raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(raw)))
        std = tl.where(raw > 20.0, raw, soft) + noise_epsilon
        noise = tl.load(noise_ptr + rows[:, None] * n + ei[None, :],
                        mask=rm[:, None] & em[None, :], other=0.0)
        logits = clean + noise * std
    else:
        logits = clean
    logits = tl.where(em[None, :], logits, float("-inf"))
    top = tl.max(logits, axis=1)
    # the lowest index among equal maxima, as topk picks on ties (zero router weights)
    win = tl.min(tl.where(logits == top[:, None], ei[None, :], NP), axis=1)
    tl.store(expert_ptr + rows, win.to(tl.int32), mask=rm)
    is_win = (ei[None, :] == win[:, None]) & rm[:, None]
    tl.store(imp_ptr + pid * NP + ei, tl.sum(is_win.to(tl.float32), axis=0))
    if NOISY:
        second = tl.max(tl.where(ei[None, :] == win[:, None], float("-inf"), logits), axis=1)
        # expert j is top-1 under fresh noise when it beats the best other noisy logit
        thr = tl.where(ei[None, :] == win[:, None], second[:, None], top[:, None])
        a = (clean - thr) / std
        p = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        p = tl.where(rm[:, None] & em[None, :], p, 0.0)
        tl.store(load_ptr + pid * NP + ei, tl.sum(p, axis=0))
    if last_program(counter_ptr, programs):
        imp = sum_partials(imp_ptr, programs, NP, BP)
        load = sum_partials(load_ptr, programs, NP, BP) if NOISY else imp
        tl.store(imp_sum_ptr + ei, imp, mask=em)
        tl.store(load_sum_ptr + ei, load, mask=em)
        if AUX:
            tl.store(aux_ptr, (_cv_squared(imp, em, n) + _cv_squared(load, em, n)) * loss_coef)
        tl.store(counter_ptr, 0)


def _blocks(features, w_gate):
    """(features with unit column stride, U, r, n, RP, NP, BU, programs) of a router
    launch."""
    units, rank = features.shape
    n = w_gate.shape[1]
    if features.stride(-1) != 1:
        features = features.contiguous()
    rp, np_ = max(2, next_pow2(rank)), max(2, next_pow2(n))
    bu = block_units(rp, np_)
    return features, units, rank, n, rp, np_, bu, max(1, triton.cdiv(units, bu))


@on_tensors_device
def route(features, w_gate, w_noise, noise, noise_epsilon, loss_coef=None):
    """(expert (U,) int32, importance (n,) float32, load (n,) float32) in one launch; noise
    (U, n) float32 in noisy training, None otherwise (load is then the importance). With
    loss_coef (n > 1), a fourth output: the aux loss loss_coef · (cv²(importance) +
    cv²(load)) () float32, from the same launch."""
    features, units, rank, n, rp, np_, bu, programs = _blocks(features, w_gate)
    dev = features.device
    expert = torch.empty(units, dtype=torch.int32, device=dev)
    imp = torch.empty((programs, np_), dtype=torch.float32, device=dev)
    noisy = noise is not None
    load = torch.empty((programs, np_), dtype=torch.float32, device=dev) if noisy else imp
    # Two tensors, not two rows of one: a custom op's outputs may not alias each other.
    imp_sum = torch.empty(n, dtype=torch.float32, device=dev)
    load_sum = torch.empty(n, dtype=torch.float32, device=dev)
    with_aux = loss_coef is not None
    aux = torch.empty((), dtype=torch.float32, device=dev) if with_aux else imp_sum
    route_kernel[(programs,)](
        features, w_gate.contiguous(), w_noise.contiguous(),
        noise.contiguous() if noisy else imp, expert, imp, load, ticket_counter(dev), imp_sum,
        load_sum, aux, units, rank, n, float(noise_epsilon), features.stride(0), programs,
        float(loss_coef) if with_aux else 0.0, BU=bu, RP=rp, NP=np_, NOISY=noisy,
        AUX=with_aux, BP=ROUTE_SUM_ROWS, num_warps=4)
    return (expert, imp_sum, load_sum, aux) if with_aux else (expert, imp_sum, load_sum)


@triton.jit
def route_backward_kernel(
        f_ptr,        # (U, r) features, row stride stride_f
        wg_ptr,       # (r, n) w_gate, contiguous
        wn_ptr,       # (r, n) w_noise, contiguous
        noise_ptr,    # (U, n) float32, the forward's draws
        dload_ptr,    # (n,) float32 dL/dload; with FROM_AUX the load itself
        daux_ptr,     # () float32 dL/daux (FROM_AUX)
        df_ptr,       # (U, r) output dL/dfeatures, contiguous; with ACCUM added to it
        dwg_ptr,      # (programs, RP, NP) float32: this block's dL/dw_gate
        dwn_ptr,      # (programs, RP, NP) float32: this block's dL/dw_noise
        counter_ptr,  # (1,) int32, zero: device.ticket_counter
        dwg_out,      # (r, n) output: dL/dw_gate, the blocks' sums (w_gate's dtype)
        dwn_out,      # (r, n) output: dL/dw_noise (w_noise's dtype)
        U, r, n, noise_epsilon, loss_coef, stride_f, programs,
        BU: tl.constexpr, RP: tl.constexpr, NP: tl.constexpr, FROM_AUX: tl.constexpr,
        ACCUM: tl.constexpr, BP: tl.constexpr):
    """The composite route_backward (gating.py) per block of units: load_j = Σ_t Φ(a_tj),
    a_tj = (clean_tj - thr_tj) / std_tj, thr the best other noisy logit, which depends on
    clean and std again through the top two. FROM_AUX: dL/dload is that of the aux loss
    loss_coef · cv²(load) (gating.cv_squared_backward), computed here from the load.
    ACCUM: dL/dfeatures is added to what df_ptr holds (the stencil's dz, for token routing)
    in float32 and rounded once, instead of written. The program that finishes last adds the
    blocks' dL/dw_gate and dL/dw_noise in block order (module doc)."""
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BU + tl.arange(0, BU)
    rm = rows < U
    ci = tl.arange(0, RP)
    ei = tl.arange(0, NP)
    em = ei < n
    live = rm[:, None] & em[None, :]
    wmask = (ci[:, None] < r) & em[None, :]
    f = tl.load(f_ptr + rows[:, None] * stride_f + ci[None, :],
                mask=rm[:, None] & (ci[None, :] < r), other=0.0).to(tl.float32)
    wg = tl.load(wg_ptr + ci[:, None] * n + ei[None, :], mask=wmask, other=0.0).to(tl.float32)
    wn = tl.load(wn_ptr + ci[:, None] * n + ei[None, :], mask=wmask, other=0.0).to(tl.float32)
    clean = tl.sum(f[:, :, None] * wg[None, :, :], axis=1)  # (BU, NP)
    raw = tl.sum(f[:, :, None] * wn[None, :, :], axis=1)
    soft = tl.maximum(raw, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(raw)))
    std = tl.where(raw > 20.0, raw, soft) + noise_epsilon
    noise = tl.load(noise_ptr + rows[:, None] * n + ei[None, :], mask=live, other=0.0)
    logits = tl.where(em[None, :], clean + noise * std, float("-inf"))
    top = tl.max(logits, axis=1)
    win = tl.min(tl.where(logits == top[:, None], ei[None, :], NP), axis=1)
    others = tl.where(ei[None, :] == win[:, None], float("-inf"), logits)
    second = tl.max(others, axis=1)
    runner = tl.min(tl.where(others == second[:, None], ei[None, :], NP), axis=1)
    is_in = logits > second[:, None]
    thr = tl.where(is_in, second[:, None], top[:, None])
    a = (clean - thr) / std
    d_load = tl.load(dload_ptr + ei, mask=em, other=0.0)
    if FROM_AUX:  # d_load holds the load; dcv²/dv_j = 2 (v_j - m) / ((n - 1) D) - var 2m / (n D²)
        m = tl.sum(d_load, axis=0) / n
        dev_ = tl.where(em, d_load - m, 0.0)
        var = tl.sum(dev_ * dev_, axis=0) / (n - 1)
        den = m * m + 1e-10
        coef = tl.load(daux_ptr) * loss_coef
        d_load = tl.where(em, (dev_ * (2.0 / (n - 1)) / den - var * (2.0 / n) * m / (den * den))
                          * coef, 0.0)
    g = d_load[None, :] * tl.exp(-0.5 * a * a) * 0.3989422804014327  # 1 / sqrt(2 pi)
    g = tl.where(live, g, 0.0)
    d_clean = g / std
    d_std = -g * a / std
    d_thr = -d_clean
    d_top0 = tl.sum(tl.where(is_in, 0.0, d_thr), axis=1)  # onto the winner's logit
    d_top1 = tl.sum(tl.where(is_in, d_thr, 0.0), axis=1)  # onto the runner-up's
    d_logits = tl.where(ei[None, :] == win[:, None], d_top0[:, None], 0.0) + \
        tl.where(ei[None, :] == runner[:, None], d_top1[:, None], 0.0)
    d_clean = tl.where(live, d_clean + d_logits, 0.0)
    d_std = d_std + d_logits * noise
    d_raw = tl.where(live, d_std * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw)), 0.0)
    df = tl.sum(d_clean[:, None, :] * wg[None, :, :], axis=2) + \
        tl.sum(d_raw[:, None, :] * wn[None, :, :], axis=2)  # (BU, RP)
    dmask = rm[:, None] & (ci[None, :] < r)
    if ACCUM:
        df += tl.load(df_ptr + rows[:, None] * r + ci[None, :], mask=dmask,
                      other=0.0).to(tl.float32)
    tl.store(df_ptr + rows[:, None] * r + ci[None, :], df.to(df_ptr.dtype.element_ty),
             mask=dmask)
    slot = pid * RP * NP + ci[:, None] * NP + ei[None, :]
    tl.store(dwg_ptr + slot, tl.sum(f[:, :, None] * d_clean[:, None, :], axis=0))
    tl.store(dwn_ptr + slot, tl.sum(f[:, :, None] * d_raw[:, None, :], axis=0))
    if last_program(counter_ptr, programs):
        k = tl.arange(0, RP * NP)
        at = (k // NP) * n + k % NP
        keep = (k // NP < r) & (k % NP < n)
        tl.store(dwg_out + at, sum_partials(dwg_ptr, programs, RP * NP, BP).to(
            dwg_out.dtype.element_ty), mask=keep)
        tl.store(dwn_out + at, sum_partials(dwn_ptr, programs, RP * NP, BP).to(
            dwn_out.dtype.element_ty), mask=keep)
        tl.store(counter_ptr, 0)


@on_tensors_device
def route_backward(d_load, features, w_gate, w_noise, noise, noise_epsilon, aux=None,
                   accumulate=None):
    """(dL/dfeatures, dL/dw_gate, dL/dw_noise) from dL/dload, as gating's composite
    route_backward computes them, in the dtypes of features, w_gate and w_noise. With aux =
    (load, dL/daux, loss_coef), d_load is None: dL/dload is the aux loss's, computed in
    the kernel (n > 1). With accumulate (a contiguous (U, r) tensor), dL/dfeatures is added
    into it in the kernel, and it is returned in its place."""
    features, units, rank, n, rp, np_, bu, programs = _blocks(features, w_gate)
    dev = features.device
    if accumulate is not None:
        if tuple(accumulate.shape) != (units, rank) or not accumulate.is_contiguous():
            raise ValueError(f"accumulate: expected a contiguous ({units}, {rank}) tensor, got "
                             f"{tuple(accumulate.shape)}")
        df = accumulate
    else:
        df = torch.empty((units, rank), dtype=features.dtype, device=dev)
    d_wg = torch.empty((rank, n), dtype=w_gate.dtype, device=dev)
    d_wn = torch.empty((rank, n), dtype=w_noise.dtype, device=dev)
    if units == 0:
        return df, d_wg.zero_(), d_wn.zero_()
    part = torch.empty((2, programs, rp, np_), dtype=torch.float32, device=dev)
    from_aux = aux is not None
    vec, d_aux, coef = aux if from_aux else (d_load, part, 0.0)
    route_backward_kernel[(programs,)](
        features, w_gate.contiguous(), w_noise.contiguous(), noise.contiguous(),
        vec.to(torch.float32).contiguous(), d_aux, df, part[0], part[1], ticket_counter(dev),
        d_wg, d_wn, units, rank, n, float(noise_epsilon), float(coef), features.stride(0),
        programs, BU=bu, RP=rp, NP=np_, FROM_AUX=from_aux, ACCUM=accumulate is not None,
        BP=max(1, ROUTE_SUM_VALUES // (rp * np_)), num_warps=4,
        # left to itself, ptxas capped it at 80 registers for occupancy in fp16 at r <= 4
        # and spilled 8 bytes (Triton 3.8); it needs at most 107 (r = 8)
        maxnreg=128)
    return df, d_wg, d_wn
