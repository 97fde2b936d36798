"""The whole Conv-LoRA layer as one custom-op pair, planned as a whole (convlora_kernels.plan)
and shared by the fused backends (convlora_kernels.backends: "cpu" and "cuda" run the
C++/CUDA stencil of convlora_kernels._C, "triton" the Triton stencil of
convlora_kernels.triton_kernels).

For N tokens (sizes in _validate.Problem), z = x Aᵀ, u = z + E_e(z) (the stencil):

Forward, one candidate of plan.FORWARD_CANDIDATES:
    "post_add"    y = x W0ᵀ + b (GEMM), then y += s·u Bᵀ (rank-r GEMM, beta = 1): the
                  rank-r GEMM is a read-modify-write of y of its own (memory-bound).
    "bias_first"  C = b + s·u Bᵀ (rank-r GEMM writes C), then C += x W0ᵀ (the base GEMM
                  with beta = 1): C is read in the base GEMM's epilogue, under its compute.
    "one_kernel"  one Triton kernel (triton_kernels/layer_forward.py): per tile of tokens
                  of one expert, the stencil, x W0ᵀ and the epilogue s·u Bᵀ + b; y is
                  written once and C never exists (backend "triton" only).
    "two_source"  the stencil, then y = x W0ᵀ + s·u Bᵀ + b as one Triton GEMM whose K loop
                  runs over u Bᵀ and then x W0ᵀ into one accumulator
                  (triton_kernels/gemm.py): y written once, C never exists (cuda, triton).
Backward, dL/du and dL/dB by one candidate of plan.DY_CANDIDATES:
    "two_gemms"   du = s·dy B and dBᵀ = s·uᵀ dy: two GEMMs, dy read twice.
    "one_pass"    dy read once: the Triton dy-pass kernel (cuda, triton), or row blocks of
                  dy through both BLAS GEMMs while they are in cache (cpu).
then always dz, dconv_weight, dconv_bias by the stencil's backward, dA = dzᵀ x, and dx by
one candidate of plan.DX_CANDIDATES:
    "accumulate"  dx = dz A, then dx += dy W0: the base GEMM with beta = 1 (no sum of two
                  dx tensors; dz A is a pass over dx of its own, memory-bound)
    "two_source"  dx = dy W0 + dz A as one Triton GEMM (gemm.py): dx written once (cuda,
                  triton).

ConvLoRALinear runs the same layer with its router inside (``routed_conv_lora_linear``, the
custom-op pair convlora_layer::routed_forward / routed_backward): z = x Aᵀ, the router on z,
then the layer as above; in the backward the router's dL/dz (its load term) joins the
stencil's dz before dx = dz A + dy W0 and dA = dzᵀ x are formed, so x's gradient is one
GEMM with no second (N, C_in) tensor to add.

Which candidate runs: convlora_kernels.plan.choose. What each backend supplies (its
stencil, its dy pass, the shapes it saves): convlora_kernels.backends.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import backends
from ._validate import Problem
from .gating import load_term_backward, route_with_aux_loss, router_features
from .plan import choose


# --- the layer's passes ------------------------------------------------------------------

def _b_t(lora_B: Tensor) -> Tensor:
    """Bᵀ as the GEMMs take it: on CPU a contiguous (r, C_out) copy, the layout on which
    BLAS runs dy·B about 2x faster (benchmarks/fused_design.md, CPU); on GPUs a view."""
    return lora_B.t().contiguous() if lora_B.device.type == "cpu" else lora_B.t()


def _early_prep(x2, lora_A, conv_weight, conv_bias, scales, interpolation, height, width,
                backend, forward_plan):
    """The backend's prep pass started before z = x Aᵀ (backends: early_prep), or None."""
    if forward_plan == "one_kernel":
        return None
    return backends.module(backend).early_prep(
        x2, lora_A.shape[0], conv_weight.contiguous(), conv_bias.contiguous(), list(scales),
        interpolation, height, width)


def _forward_impl(x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index, z,
                  scaling, scales, interpolation, height, width, backend, forward_plan, save,
                  early=None):
    """early: the routed op's _early_prep, started before its z; else the layer starts one
    here when it forms z itself."""
    if z is None:
        early = _early_prep(x2, lora_A, conv_weight, conv_bias, scales, interpolation, height,
                            width, backend, forward_plan)
    z2 = F.linear(x2, lora_A) if z is None else z
    if z2.stride(-1) != 1:
        z2 = z2.contiguous()
    impl = backends.module(backend)
    if forward_plan == "one_kernel":
        y, u, s0, s1 = impl.layer_forward(x2, weight, bias, lora_B, z2, expert_index,
                                          conv_weight, conv_bias, scaling, list(scales),
                                          interpolation, height, width, save)
        return y, z2, u, s0, s1
    u, s0, s1 = impl.stencil_forward(z2, expert_index, conv_weight.contiguous(),
                                     conv_bias.contiguous(), list(scales), interpolation,
                                     height, width, save, early)
    uq = u if u.dtype == x2.dtype else u.to(x2.dtype)  # rounded as the reference rounds u
    bt = _b_t(lora_B)
    if forward_plan == "two_source":  # u rounded to x's dtype inside, as uq is here
        y = impl.two_source_gemm(x2, weight.t(), u, lora_B.t(), scaling, bias)
        return y, z2, u, s0, s1
    if forward_plan == "bias_first":
        if bias is not None:
            y = torch.addmm(bias, uq, bt, alpha=scaling)
        else:
            y = torch.addmm(uq.new_zeros(()).expand(uq.shape[0], bt.shape[1]), uq, bt, beta=0,
                            alpha=scaling)
        y.addmm_(x2, weight.t())
    else:
        y = F.linear(x2, weight, bias)
        y.addmm_(uq, bt, alpha=scaling)
    return y, z2, u, s0, s1


def _dy_products(dy2, lora_B, u, scaling, need_b, need_bias, backend, dy_plan):
    """(dL/du (N, r), dL/dB or None, dL/dbias or None) by the dy candidate."""
    if dy_plan == "one_pass":
        return backends.module(backend).dy_pass(dy2, lora_B, u, scaling, need_b, need_bias)
    uq = u if u.dtype == dy2.dtype else u.to(dy2.dtype)
    bt = _b_t(lora_B)
    d_bias = dy2.sum(0) if need_bias else None
    zero = dy2.new_zeros(())
    du = torch.addmm(zero.expand(dy2.shape[0], bt.shape[0]), dy2, bt.t(), beta=0,
                     alpha=scaling)
    d_b = None
    if need_b:  # as uᵀ dy, (r, C_out): the layout BLAS runs fastest (fused_design.md, CPU)
        d_b = torch.addmm(zero.expand(bt.shape), uq.t(), dy2, beta=0, alpha=scaling).t()
    return du, d_b, d_bias


def _backward_impl(dy2, x2, weight, lora_A, lora_B, conv_weight, conv_bias, expert_index, z2,
                   u, s0, s1, has_z, scaling, scales, interpolation, height, width, backend,
                   dy_plan, dx_plan, needs, add_router_dz=None):
    """add_router_dz(dz): adds the router's dL/dz into the stencil's dz in place, before dz
    reaches dx and dA (the routed op: z is then the op's own, has_z False)."""
    need_x, need_w, need_bias, need_a, need_b, need_cw, need_cb, need_z = needs
    need_dz = need_z if has_z else (need_a or need_x)
    if dy2.stride(-1) != 1:
        dy2 = dy2.contiguous()
    need_du = need_dz or need_cw or need_cb
    du = d_b = d_bias = None
    if need_du or need_b or need_bias:
        du, d_b, d_bias = _dy_products(dy2, lora_B, u, scaling, need_b, need_bias, backend,
                                       dy_plan)
    dz = d_cw = d_cb = None
    if need_du:
        dz, d_cw, d_cb = backends.module(backend).stencil_backward(
            du, z2, s0, s1, expert_index, conv_weight.contiguous(), conv_bias.contiguous(),
            list(scales), interpolation, height, width)
        if add_router_dz is not None and dz is not None:
            add_router_dz(dz)
    dx = d_w = d_a = None
    if need_x:
        if not has_z and dx_plan == "two_source":  # dy W0 and dz A in one GEMM
            dx = backends.module(backend).two_source_gemm(dy2, weight, dz, lora_A, 1.0)
        elif not has_z:  # dx = dz A + dy W0: the base GEMM accumulates onto dz A
            dx = torch.mm(dz, lora_A).addmm_(dy2, weight)
        else:
            dx = torch.mm(dy2, weight)
    if need_w:
        d_w = torch.mm(dy2.t(), x2)
    if need_a and not has_z:
        d_a = torch.mm(dz.t(), x2)
    return [dx, d_w, d_bias, d_a, d_b, d_cw if need_cw else None, d_cb if need_cb else None,
            dz if (has_z and need_z) else None]


# --- the custom ops ----------------------------------------------------------------------

def _forward_fn(x2: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                lora_B: Tensor, conv_weight: Tensor, conv_bias: Tensor, expert_index: Tensor,
                z: Optional[Tensor], scaling: float, scales: List[int], interpolation: str,
                height: int, width: int, backend: str, forward_plan: str, save: bool
                ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x2 (N, C_in) -> (y (N, C_out), z (N, r) or (0,) when z is given, u, saved0, saved1);
    the last four are kept for the backward."""
    y, z2, u, s0, s1 = _forward_impl(x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias,
                                     expert_index, z, scaling, scales, interpolation, height,
                                     width, backend, forward_plan, save)
    return y, (z2 if z is None else x2.new_empty(0)), u, s0, s1


_forward_op = torch.library.custom_op("convlora_layer::forward", _forward_fn, mutates_args=())


@_forward_op.register_fake
def _(x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index, z, scaling,
      scales, interpolation, height, width, backend, forward_plan, save):
    n_tok, rank = x2.shape[0], lora_A.shape[0]
    saved = backends.module(backend).saved_shapes(n_tok, rank, scales, interpolation, height,
                                                  width, x2.dtype, save, forward_plan)
    return (x2.new_empty((n_tok, weight.shape[0])),
            x2.new_empty((n_tok, rank) if z is None else (0,)),
            *(x2.new_empty(s, dtype=d) for s, d in saved))


def _backward_fn(dy2: Tensor, x2: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                 conv_weight: Tensor, conv_bias: Tensor, expert_index: Tensor, z2: Tensor,
                 u: Tensor, saved0: Tensor, saved1: Tensor, has_z: bool, scaling: float,
                 scales: List[int], interpolation: str, height: int, width: int,
                 backend: str, dy_plan: str, dx_plan: str, needs: List[bool]) -> List[Tensor]:
    """Gradients of (x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, z); a (0,)
    tensor where needs is False."""
    grads = _backward_impl(dy2, x2, weight, lora_A, lora_B, conv_weight, conv_bias,
                           expert_index, z2, u, saved0, saved1, has_z, scaling, scales,
                           interpolation, height, width, backend, dy_plan, dx_plan, needs)
    return _own_outputs(x2, grads)


_backward_op = torch.library.custom_op("convlora_layer::backward", _backward_fn,
                                       mutates_args=())


def _own_outputs(x2: Tensor, grads) -> List[Tensor]:
    """The gradients as a custom op may return them: contiguous, none a view of another
    (with one expert the C++ stencil's dconv_weight and dconv_bias are views of one
    buffer), (0,) for None."""
    return [x2.new_empty(0) if g is None else
            g.clone(memory_format=torch.contiguous_format) if g._base is not None else
            g.contiguous() for g in grads]


@_backward_op.register_fake
def _(dy2, x2, weight, lora_A, lora_B, conv_weight, conv_bias, expert_index, z2, u, saved0,
      saved1, has_z, scaling, scales, interpolation, height, width, backend, dy_plan, dx_plan,
      needs):
    shapes = [x2.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape,
              conv_weight.shape, conv_bias.shape, (x2.shape[0], lora_A.shape[0])]
    return [x2.new_empty(s if need else (0,)) for s, need in zip(shapes, needs)]


def _setup_context(ctx, inputs, output):
    (x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, expert_index, z, scaling,
     scales, interpolation, height, width, backend, forward_plan, save) = inputs
    _, z2, u, s0, s1 = output
    ctx.has_z = z is not None
    ctx.has_bias = bias is not None
    ctx.meta = (scaling, scales, interpolation, height, width, backend)
    ctx.save_for_backward(x2, weight, lora_A, lora_B, conv_weight, conv_bias, expert_index,
                          z if z is not None else z2, u, s0, s1)
    ctx.mark_non_differentiable(z2, u, s0, s1)
    ctx.set_materialize_grads(False)  # no zero fills for the outputs kept for backward


def _backward(ctx, dy2, *_unused):
    if dy2 is None:
        return (None,) * 17
    saved = ctx.saved_tensors
    n = ctx.needs_input_grad
    needs = [n[0], n[1], ctx.has_bias and n[2], n[3] and not ctx.has_z, n[4], n[5], n[6],
             ctx.has_z and n[8]]
    scaling, scales, interpolation, height, width, backend = ctx.meta
    _, dy_plan, dx_plan = choose(backend, dy2.device.type)
    op = _backward_fn if getattr(ctx, "eager", False) else torch.ops.convlora_layer.backward
    grads = op(dy2, *saved, ctx.has_z, scaling, scales, interpolation, height, width, backend,
               dy_plan, dx_plan, needs)
    dx, dw, dbias, da, db, dcw, dcb, dz = [g if need else None for g, need in zip(grads, needs)]
    return (dx, dw, dbias, da, db, dcw, dcb, None, dz) + (None,) * 8


_forward_op.register_autograd(_backward, setup_context=_setup_context)


# --- the layer with its router inside (ConvLoRALinear on a fused backend) ----------------
# The router's features come from z = x Aᵀ, and its load term sends a gradient back into z.
# With the router outside the op, z's gradient reaches x through an autograd node of its
# own: dx = dz A written to a fresh (N, C_in) tensor, then added to the op's dy W0 (two
# passes over dx, and on CPU the page faults of two fresh tensors). Inside, the router's
# dL/dz joins the stencil's dz before dx = dz A + dy W0 is formed by one GEMM with beta = 1,
# and dA = dzᵀ x is one GEMM too.

def _routed_forward_fn(x2: Tensor, weight: Tensor, bias: Optional[Tensor], lora_A: Tensor,
                       lora_B: Tensor, conv_weight: Tensor, conv_bias: Tensor, w_gate: Tensor,
                       w_noise: Tensor, noise: Optional[Tensor], noise_epsilon: float,
                       loss_coef: float, gating: str, scaling: float, scales: List[int],
                       interpolation: str, height: int, width: int, backend: str,
                       forward_plan: str, save: bool
                       ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                  Tensor]:
    """x2 (N, C_in) -> (y, z, u, saved0, saved1, the stencil's expert index, load, aux
    loss): z = x Aᵀ, the router on z (convlora_layer::route's routing), its load-balancing
    loss loss_coef · (cv²(importance) + cv²(load)) (float32; on CUDA from the routing's own
    launch), then the layer."""
    early = _early_prep(x2, lora_A, conv_weight, conv_bias, scales, interpolation, height,
                        width, backend, forward_plan)
    z2 = F.linear(x2, lora_A)
    expert, load, aux = route_with_aux_loss(router_features(z2, gating, height, width),
                                            w_gate, w_noise, noise, noise_epsilon, loss_coef)
    idx = backends.module(backend).routed_index(expert, gating, height, width)
    y, z2, u, s0, s1 = _forward_impl(x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias,
                                     idx, z2, scaling, scales, interpolation, height, width,
                                     backend, forward_plan, save, early)
    return y, z2, u, s0, s1, idx, load, aux


_routed_forward_op = torch.library.custom_op("convlora_layer::routed_forward",
                                             _routed_forward_fn, mutates_args=())


@_routed_forward_op.register_fake
def _(x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, w_gate, w_noise, noise,
      noise_epsilon, loss_coef, gating, scaling, scales, interpolation, height, width, backend,
      forward_plan, save):
    n_tok, rank, n_exp = x2.shape[0], lora_A.shape[0], conv_weight.shape[0]
    impl = backends.module(backend)
    saved = impl.saved_shapes(n_tok, rank, scales, interpolation, height, width, x2.dtype,
                              save, forward_plan)
    n_idx = impl.routed_index_length(n_tok, gating, height, width)
    f32 = torch.float32
    return (x2.new_empty((n_tok, weight.shape[0])), x2.new_empty((n_tok, rank)),
            *(x2.new_empty(s, dtype=d) for s, d in saved),
            x2.new_empty((n_idx,), dtype=torch.int32),
            x2.new_empty((n_exp,), dtype=f32), x2.new_empty((), dtype=f32))


def _routed_backward_fn(dy2: Optional[Tensor], d_aux: Optional[Tensor],
                        d_load: Optional[Tensor], x2: Tensor,
                        weight: Tensor, lora_A: Tensor, lora_B: Tensor, conv_weight: Tensor,
                        conv_bias: Tensor, w_gate: Tensor, w_noise: Tensor,
                        noise: Optional[Tensor], idx: Tensor, z2: Tensor, u: Tensor,
                        saved0: Tensor, saved1: Tensor, load: Tensor, noise_epsilon: float,
                        loss_coef: float, gating: str, scaling: float, scales: List[int],
                        interpolation: str, height: int, width: int, backend: str,
                        dy_plan: str, dx_plan: str, needs: List[bool]) -> List[Tensor]:
    """Gradients of (x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, w_gate,
    w_noise); a (0,) tensor where needs is False. dy2, d_aux or d_load is None when that
    output was not differentiated (the load is, when an aux loss over several processes is
    formed from it: gating.global_aux_loss); the router has gradients only when it drew
    noise (training)."""
    need_wg, need_wn = needs[7], needs[8]
    layer_needs = list(needs[:7]) + [False]
    if dy2 is None:  # only the aux loss was differentiated
        dy2 = x2.new_zeros((x2.shape[0], weight.shape[0]))
    router: List[Optional[Tensor]] = [None, None]  # dL/dw_gate, dL/dw_noise
    routed = (d_aux is not None or d_load is not None) and noise is not None

    def router_backward(dz: Optional[Tensor]) -> None:
        """The router's gradients; its dL/dz added into the stencil's dz when there is one
        (token routing: inside the router's backward kernel on CUDA, no pass of its own)."""
        feats = router_features(z2, gating, height, width)
        into = dz if dz is not None and gating == "token" and dz.is_contiguous() else None
        d_f, router[0], router[1] = load_term_backward(load, d_aux, loss_coef, feats, w_gate,
                                                       w_noise, noise, noise_epsilon,
                                                       accumulate=into, d_load=d_load)
        if dz is None or into is not None:
            return
        if gating == "token":
            dz.add_(d_f.to(dz.dtype))
        else:  # the mean's gradient: d_f / (H·W) on every token of the map
            hw = height * width
            dz.view(-1, hw, dz.shape[1]).add_((d_f / hw).to(dz.dtype).unsqueeze(1))

    grads = _backward_impl(dy2, x2, weight, lora_A, lora_B, conv_weight, conv_bias, idx, z2,
                           u, saved0, saved1, False, scaling, scales, interpolation, height,
                           width, backend, dy_plan, dx_plan, layer_needs,
                           router_backward if routed else None)[:7]
    if routed and router[0] is None:  # no dz was formed: the router's own gradients only
        router_backward(None)
    grads += [router[0] if need_wg else None, router[1] if need_wn else None]
    return _own_outputs(x2, grads)


_routed_backward_op = torch.library.custom_op("convlora_layer::routed_backward",
                                              _routed_backward_fn, mutates_args=())


@_routed_backward_op.register_fake
def _(dy2, d_aux, d_load, x2, weight, lora_A, lora_B, conv_weight, conv_bias, w_gate, w_noise,
      noise, idx, z2, u, saved0, saved1, load, noise_epsilon, loss_coef, gating, scaling, scales,
      interpolation, height, width, backend, dy_plan, dx_plan, needs):
    shapes = [x2.shape, weight.shape, weight.shape[:1], lora_A.shape, lora_B.shape,
              conv_weight.shape, conv_bias.shape, w_gate.shape, w_noise.shape]
    dtypes = [x2.dtype] * 7 + [w_gate.dtype, w_noise.dtype]
    return [x2.new_empty(s if need else (0,), dtype=d)
            for s, need, d in zip(shapes, needs, dtypes)]


def _routed_setup_context(ctx, inputs, output):
    (x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, w_gate, w_noise, noise,
     noise_epsilon, loss_coef, gating, scaling, scales, interpolation, height, width, backend,
     forward_plan, save) = inputs
    _, z2, u, s0, s1, idx, load, _aux = output
    ctx.has_bias = bias is not None
    ctx.has_noise = noise is not None
    ctx.meta = (noise_epsilon, loss_coef, gating, scaling, scales, interpolation, height,
                width, backend)
    ctx.save_for_backward(x2, weight, lora_A, lora_B, conv_weight, conv_bias, w_gate, w_noise,
                          noise if noise is not None else x2.new_empty(0), idx, z2, u, s0, s1,
                          load)
    ctx.mark_non_differentiable(z2, u, s0, s1, idx)
    ctx.set_materialize_grads(False)  # no zero tensors for the outputs kept for backward


def _routed_backward(ctx, dy2, _dz, _du, _d0, _d1, _didx, d_load, d_aux):
    (x2, weight, lora_A, lora_B, conv_weight, conv_bias, w_gate, w_noise, noise, idx, z2, u,
     s0, s1, load) = ctx.saved_tensors
    n = ctx.needs_input_grad
    # the router's weights learn only through the aux loss's load term: no gradient (None)
    # without noise (the load is then a count) or when neither the aux loss nor the load
    # was differentiated
    if not ctx.has_noise:
        d_aux = d_load = None
    router = d_aux is not None or d_load is not None
    needs = [n[0], n[1], ctx.has_bias and n[2], n[3], n[4], n[5], n[6], router and n[7],
             router and n[8]]
    (noise_epsilon, loss_coef, gating, scaling, scales, interpolation, height, width,
     backend) = ctx.meta
    if dy2 is None and not router:
        return (None,) * 21
    _, dy_plan, dx_plan = choose(backend, x2.device.type)
    op = _routed_backward_fn if getattr(ctx, "eager", False) else \
        torch.ops.convlora_layer.routed_backward
    grads = op(
        dy2, d_aux, d_load, x2, weight, lora_A, lora_B, conv_weight, conv_bias, w_gate, w_noise,
        noise if ctx.has_noise else None, idx, z2, u, s0, s1, load, noise_epsilon, loss_coef,
        gating, scaling, scales, interpolation, height, width, backend, dy_plan, dx_plan,
        needs)
    dx, dw, dbias, da, db, dcw, dcb, dwg, dwn = [g if need else None
                                                for g, need in zip(grads, needs)]
    return (dx, dw, dbias, da, db, dcw, dcb, dwg, dwn) + (None,) * 12


_routed_forward_op.register_autograd(_routed_backward, setup_context=_routed_setup_context)


# --- eager mode: the same functions as autograd.Functions --------------------------------
# A Python custom op costs host time on every call (its arguments matched to the schema,
# its outputs checked for aliases, its autograd wrapper): at SAM's shapes on an H100 the
# layer's fwd+bwd spent several times its kernel time on the host
# (benchmarks/results/h100). In eager mode on real tensors the pair runs as a plain
# autograd.Function over the very functions the custom ops wrap, with the same setup and
# backward; torch.compile, export, fake or meta tensors, dispatch modes and functorch
# transforms get the custom ops, whose fake implementations and schemas they need.

def _eager(x: Tensor) -> bool:
    """Whether the layer on x takes the autograd.Function path (see above)."""
    return not (torch.compiler.is_compiling() or x.device.type == "meta" or is_fake(x)
                or _get_current_dispatch_mode() is not None
                or torch._C._are_functorch_transforms_active())


def _as_function(name: str, fn, setup_context, backward):
    # forward(ctx, ...) with the setup inside: a separate setup_context would make every
    # apply bind its arguments to forward's signature (inspect.signature, per call)
    def forward(ctx, *args):
        out = fn(*args)
        setup_context(ctx, args, out)
        ctx.eager = True  # the backward calls the raw function too
        return out

    return type(name, (torch.autograd.Function,),
                dict(forward=staticmethod(forward), backward=staticmethod(backward),
                     __doc__=f"{fn.__name__} in eager mode (see _eager)."))


_EagerForward = _as_function("_EagerForward", _forward_fn, _setup_context, _backward)
_EagerRoutedForward = _as_function("_EagerRoutedForward", _routed_forward_fn,
                                   _routed_setup_context, _routed_backward)


def conv_lora_linear(backend: str, p: Problem, x4: Tensor, weight: Tensor,
                     bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                     conv_weight: Tensor, conv_bias: Tensor, expert_index: Tensor,
                     scaling: float, z: Optional[Tensor]) -> Tensor:
    """y (N, C_out) of the layer for x4 (B, H, W, C_in) on a fused backend; the arguments
    were checked (_validate.check_inputs) and p is their Problem."""
    x2 = x4.reshape(-1, p.in_features)  # a view whenever x's layout allows
    z2 = None if z is None else z.reshape(-1, p.rank)
    idx = backends.module(backend).stencil_index(expert_index)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x4, weight, bias, lora_A, lora_B, conv_weight, conv_bias, z))
    forward_plan = choose(backend, x4.device.type)[0]
    op = _EagerForward.apply if _eager(x2) else torch.ops.convlora_layer.forward
    return op(x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, idx, z2, float(scaling),
              list(p.scales), p.interpolation, p.height, p.width, backend, forward_plan,
              save)[0]


def routed_conv_lora_linear(backend: str, p: Problem, x4: Tensor, weight: Tensor,
                            bias: Optional[Tensor], lora_A: Tensor, lora_B: Tensor,
                            conv_weight: Tensor, conv_bias: Tensor, w_gate: Tensor,
                            w_noise: Tensor, noise: Optional[Tensor], noise_epsilon: float,
                            loss_coef: float, gating: str, scaling: float
                            ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y (N, C_out), expert index (B, H, W) int32, aux loss () float32, load (n,) float32,
    differentiable: gating.global_aux_loss) of the router on z = x Aᵀ followed by the layer, both inside one custom-op pair on a fused backend
    (ConvLoRALinear's path); the arguments were checked (_validate.check_inputs) and p is
    their Problem."""
    x2 = x4.reshape(-1, p.in_features)
    save = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad
        for t in (x4, weight, bias, lora_A, lora_B, conv_weight, conv_bias, w_gate, w_noise))
    forward_plan = choose(backend, x4.device.type)[0]
    op = _EagerRoutedForward.apply if _eager(x2) else torch.ops.convlora_layer.routed_forward
    out = op(
        x2, weight, bias, lora_A, lora_B, conv_weight, conv_bias, w_gate, w_noise, noise,
        float(noise_epsilon), float(loss_coef), gating, float(scaling), list(p.scales),
        p.interpolation, p.height, p.width, backend, forward_plan, save)
    idx, bhw = out[5], (p.batch, p.height, p.width)
    idx = idx.view(bhw) if idx.numel() == p.batch * p.height * p.width else \
        idx.view(p.batch, 1, 1).expand(bhw)
    return out[0], idx, out[7], out[6]
