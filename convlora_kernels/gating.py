"""Noisy top-1 router (Shazeer et al. 2017) and its load-balancing loss (the paper's MoE
loss).

For a routing unit with features f (r values):

    clean = f · w_gate
    train: noisy = clean + randn · (softplus(f · w_noise) + noise_epsilon)
    eval:  noisy = clean
    e     = top-1 of noisy   (its softmax gate is exactly 1)
    aux   = loss_coef · (cv²(importance) + cv²(load))

importance = Σ_units gates, i.e. the number of units per expert; load = Σ_units
P(expert is the top-1 under fresh noise) in noisy training, else the same count;
cv²(v) = var(v) / (mean(v)² + 1e-10) with the unbiased variance, and 0 for a
single expert. Gates are not differentiable (a softmax over one logit is the
constant 1), so the router learns only through the load term.

``noisy_top1`` is the reference; ``noisy_top1_fused`` (what the router module runs) computes
the same experts for the same noise with one custom op for the logits, the top-1 and the
statistics (one Triton kernel on CUDA when triton is importable, a few ATen ops otherwise)
and a hand-written backward of the load term.

Routing units (``gating``, the paper's router granularity):
    "token": f = z_t, one expert per token.
    "map":   f = mean of z over the map, one expert per (B, H, W) map; this is the
             behaviour of the authors' autogluon code.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

GATINGS = ("token", "map")


def cv_squared(v: torch.Tensor) -> torch.Tensor:
    """Squared coefficient of variation, 0 for a one-element vector."""
    if v.numel() <= 1:
        return v.new_zeros(())
    v = v.float()
    return v.var() / (v.mean() ** 2 + 1e-10)


def cv_squared_backward(v: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """d(grad · cv²(v))/dv, by hand (the routed layer op's backward; float32, zero for one
    element): with m = mean(v), var the unbiased variance and D = m² + 1e-10,
    dcv²/dv_j = 2 (v_j - m) / ((n - 1) D) - var · 2 m / (n D²)."""
    n = v.numel()
    if n <= 1:
        return torch.zeros_like(v, dtype=torch.float32)
    v = v.float()
    m = v.mean()
    d = m * m + 1e-10
    g = (v - m).mul_(2.0 / (n - 1)).div_(d).sub_(v.var() * (2.0 / n) * m / (d * d))
    return g.mul_(grad.float())


def router_features(z2: torch.Tensor, gating: str, height: int,
                    width: int) -> torch.Tensor:
    """The routing units' features from z (N, r) of N = B·H·W tokens: each token's z
    ("token"), or the mean of z over each (H, W) map ("map")."""
    if gating == "token":
        return z2
    return z2.reshape(-1, height * width, z2.shape[1]).mean(1)


def _normal_cdf(t: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(t / math.sqrt(2.0)))


def noisy_top1(features: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor,
               training: bool, noise_epsilon: float = 1e-2,
               loss_coef: float = 1e-2) -> Tuple[torch.Tensor, torch.Tensor]:
    """Route U units with features (U, r) among n experts (w_gate, w_noise: (r, n)).

    Returns (expert index (U,) int64, aux loss () float32). Logits are computed in
    float32 whatever the feature dtype.
    """
    f = features.float()
    n = w_gate.shape[1]
    clean = f @ w_gate.float()
    noisy_training = training and n > 1
    if noisy_training:
        noise_std = F.softplus(f @ w_noise.float()) + noise_epsilon
        logits = clean + torch.randn_like(clean) * noise_std
    else:
        logits = clean
    # topk, not argmax: ties (all-zero router weights at initialisation) resolve
    # as in the authors' code.
    top_values, top_indices = logits.topk(min(2, n), dim=1)
    expert = top_indices[:, 0]
    gates = F.one_hot(expert, n).float()
    importance = gates.sum(0)
    if noisy_training:
        # P(expert j is the top-1 under fresh noise, the others' noisy logits held):
        # j must beat the best other logit. For the current winner that is the
        # runner-up (top_values[:, 1]); for every other expert it is the winner.
        is_in = logits > top_values[:, 1:2]
        threshold = torch.where(is_in, top_values[:, 1:2], top_values[:, 0:1])
        load = _normal_cdf((clean - threshold) / noise_std).sum(0)
    else:
        load = importance
    aux = loss_coef * (cv_squared(importance) + cv_squared(load))
    return expert, aux


def _route_composite(features: Tensor, w_gate: Tensor, w_noise: Tensor,
                     noise: Optional[Tensor], noise_epsilon: float):
    """(expert (U,) int32, importance (n,), load (n,) float32) with ATen ops."""
    f = features.float()
    n = w_gate.shape[1]
    clean = f @ w_gate.float()
    if noise is not None:
        std = F.softplus(f @ w_noise.float()) + noise_epsilon
        logits = clean + noise * std
    else:
        logits = clean
    top_values, top_indices = logits.topk(min(2, n), dim=1)
    expert = top_indices[:, 0]
    # exact integer counts, in any order: no one_hot (whose range check syncs on CUDA)
    importance = clean.new_zeros(n).scatter_add_(0, expert, clean.new_ones(expert.shape))
    if noise is None:
        return expert.to(torch.int32), importance, importance.clone()
    is_in = logits > top_values[:, 1:2]
    threshold = torch.where(is_in, top_values[:, 1:2], top_values[:, 0:1])
    load = _normal_cdf((clean - threshold) / std).sum(0)
    return expert.to(torch.int32), importance, load


@functools.lru_cache(maxsize=None)
def _triton_router():
    try:
        from .triton_kernels import router
    except ImportError:
        return None
    return router


# The device types whose tensors take the Triton router (launch_count adds "meta", on which
# it counts what CUDA would launch).
GPU_DEVICE_TYPES = ("cuda",)


def _on_gpu(t: Tensor) -> bool:
    return t.device.type in GPU_DEVICE_TYPES and _triton_router() is not None


def route_with_aux_loss(features: Tensor, w_gate: Tensor, w_noise: Tensor,
                        noise: Optional[Tensor], noise_epsilon: float, loss_coef: float
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    """(expert (U,) int32, load (n,) float32, aux loss () float32) of U routing units: the
    routing of convlora_layer::route and loss_coef · (cv²(importance) + cv²(load)), with no
    autograd (the routed layer op differentiates the load term by hand). On CUDA one Triton
    launch computes all three."""
    if w_gate.shape[1] > 1 and _on_gpu(features):
        expert, _, load, aux = _triton_router().route(features, w_gate, w_noise, noise,
                                                      noise_epsilon, loss_coef)
        return expert, load, aux
    expert, importance, load = _route_composite(features, w_gate, w_noise, noise,
                                                noise_epsilon)
    return expert, load, (cv_squared(importance) + cv_squared(load)).mul_(loss_coef)


def load_term_backward(load: Tensor, d_aux: Optional[Tensor], loss_coef: float,
                       features: Tensor, w_gate: Tensor, w_noise: Tensor, noise: Tensor,
                       noise_epsilon: float, accumulate: Optional[Tensor] = None,
                       d_load: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of (features, w_gate, w_noise) from dL/daux through the aux loss's load
    term: dL/dload = d_aux · loss_coef · dcv²(load)/dload (cv_squared_backward), plus
    ``d_load`` (a gradient of the load itself: global_aux_loss) when given, then
    route_backward. On CUDA both in one Triton kernel. With ``accumulate`` (a contiguous
    tensor of the features' shape), dL/dfeatures is added into it (on CUDA inside that
    kernel) and it is returned in its place."""
    if d_load is None and load.numel() > 1 and _on_gpu(features):
        return _triton_router().route_backward(None, features, w_gate, w_noise, noise,
                                               noise_epsilon,
                                               aux=(load, d_aux.float(), loss_coef),
                                               accumulate=accumulate)
    total = d_load.float() if d_load is not None else torch.zeros_like(load, dtype=torch.float32)
    if d_aux is not None:
        total = total + cv_squared_backward(load, d_aux * loss_coef)
    if _on_gpu(features):
        return _triton_router().route_backward(total, features, w_gate, w_noise, noise,
                                               noise_epsilon, accumulate=accumulate)
    d_f, d_wg, d_wn = torch.ops.convlora_layer.route_backward(total, features, w_gate,
                                                              w_noise, noise, noise_epsilon)
    if accumulate is None:
        return d_f, d_wg, d_wn
    return accumulate.add_(d_f.to(accumulate.dtype)), d_wg, d_wn


@torch.library.custom_op("convlora_layer::route", mutates_args=())
def _route_op(features: Tensor, w_gate: Tensor, w_noise: Tensor, noise: Optional[Tensor],
              noise_epsilon: float) -> Tuple[Tensor, Tensor, Tensor]:
    """(expert (U,) int32, importance (n,) float32, load (n,) float32) of U routing units."""
    if _on_gpu(features):
        return _triton_router().route(features, w_gate, w_noise, noise, noise_epsilon)
    return _route_composite(features, w_gate, w_noise, noise, noise_epsilon)


@_route_op.register_fake
def _(features, w_gate, w_noise, noise, noise_epsilon):
    n = w_gate.shape[1]
    f32 = torch.float32
    return (features.new_empty(features.shape[:1], dtype=torch.int32),
            features.new_empty((n,), dtype=f32), features.new_empty((n,), dtype=f32))


@torch.library.custom_op("convlora_layer::route_backward", mutates_args=())
def _route_backward_op(d_load: Tensor, features: Tensor, w_gate: Tensor, w_noise: Tensor,
                       noise: Tensor, noise_epsilon: float) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of (features, w_gate, w_noise) from dL/dload, by hand.

    With a_tj = (clean_tj - thr_tj) / std_tj and load_j = Σ_t Φ(a_tj): dL/da = dL/dload_j
    φ(a); a reaches clean and std directly, and through thr the noisy logit it copies
    (the winner's for the other experts, the runner-up's for the winner), which depends on
    clean and std again. On CUDA one Triton kernel (triton_kernels/router.py) computes
    what the composite below does."""
    if _on_gpu(features):
        return _triton_router().route_backward(d_load, features, w_gate, w_noise, noise,
                                               noise_epsilon)
    return _route_backward_composite(d_load, features, w_gate, w_noise, noise, noise_epsilon)


def _route_backward_composite(d_load: Tensor, features: Tensor, w_gate: Tensor,
                              w_noise: Tensor, noise: Tensor, noise_epsilon: float
                              ) -> Tuple[Tensor, Tensor, Tensor]:
    """route_backward in ATen operators (CPU, and CUDA without triton)."""
    f = features.float()
    wg, wn = w_gate.float(), w_noise.float()
    clean = f @ wg
    raw = f @ wn
    std = F.softplus(raw) + noise_epsilon
    logits = clean + noise * std
    top_values, top_indices = logits.topk(2, dim=1)
    is_in = logits > top_values[:, 1:2]
    threshold = torch.where(is_in, top_values[:, 1:2], top_values[:, 0:1])
    a = (clean - threshold) / std
    g = d_load.float()[None, :] * torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))
    d_clean = g / std
    d_std = -g * a / std
    d_thr = -d_clean
    # thr_tj is top_values[t, 1] where is_in, else top_values[t, 0]: scatter onto logits
    d_top = torch.stack([torch.where(is_in, 0.0, d_thr).sum(1),
                         torch.where(is_in, d_thr, 0.0).sum(1)], dim=1)
    d_logits = torch.zeros_like(logits).scatter_add_(1, top_indices, d_top)
    d_clean = d_clean + d_logits
    d_std = d_std + d_logits * noise
    d_raw = d_std * torch.where(raw > 20.0, torch.ones_like(raw), torch.sigmoid(raw))
    df = d_clean @ wg.t() + d_raw @ wn.t()
    return (df.to(features.dtype), (f.t() @ d_clean).to(w_gate.dtype),
            (f.t() @ d_raw).to(w_noise.dtype))


@_route_backward_op.register_fake
def _(d_load, features, w_gate, w_noise, noise, noise_epsilon):
    return torch.empty_like(features), torch.empty_like(w_gate), torch.empty_like(w_noise)


def _route_setup(ctx, inputs, output):
    features, w_gate, w_noise, noise, noise_epsilon = inputs
    ctx.noise_epsilon = noise_epsilon
    ctx.noisy = noise is not None
    ctx.save_for_backward(features, w_gate, w_noise, noise if noise is not None else
                          features.new_empty(0))
    ctx.mark_non_differentiable(output[0], output[1])


def _route_backward(ctx, _d_expert, _d_importance, d_load):
    if not ctx.noisy:  # load is then the importance: a count, no gradient
        return None, None, None, None, None
    features, w_gate, w_noise, noise = ctx.saved_tensors
    df, dwg, dwn = torch.ops.convlora_layer.route_backward(d_load, features, w_gate, w_noise,
                                                           noise, ctx.noise_epsilon)
    return df, dwg, dwn, None, None


_route_op.register_autograd(_route_backward, setup_context=_route_setup)


def noisy_top1_fused(features: torch.Tensor, w_gate: torch.Tensor, w_noise: torch.Tensor,
                     training: bool, noise_epsilon: float = 1e-2,
                     loss_coef: float = 1e-2, noise: Optional[torch.Tensor] = None,
                     router: Optional[nn.Module] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """noisy_top1 with one routing op: the same experts for the same noise (the same draws
    of the global generator, or ``noise`` (U, n) float32 when given), as int32, and the same
    aux loss and gradients. With ``router`` (the module routing), in training the aux loss
    is the current routing_scope's (scoped_aux_loss)."""
    n = w_gate.shape[1]
    if not (training and n > 1):
        noise = None
    elif noise is None:
        noise = torch.randn((features.shape[0], n), dtype=torch.float32,
                            device=features.device)
    expert, importance, load = torch.ops.convlora_layer.route(features, w_gate, w_noise,
                                                              noise, noise_epsilon)
    if training and router is not None:
        return expert, scoped_aux_loss(router, importance, load, loss_coef)
    return expert, loss_coef * (cv_squared(importance) + cv_squared(load))


# --- Routing in a training step: per-sample noise, statistics over processes ----------

class RoutingScope:
    """What routers do differently inside ``routing_scope``: draw their noise with
    ``noise(router, units, n, device, batch)`` instead of the global generator; sum the aux
    loss's statistics over the processes of ``group`` (torch.distributed); add them into
    ``collect``; or take them from ``stats`` (scoped_aux_loss)."""

    def __init__(self, noise: Optional[Callable] = None, group=None,
                 collect: Optional[Dict[int, Tensor]] = None,
                 stats: Optional[Dict[int, Tensor]] = None, world: int = 1, passes: int = 1):
        self.noise, self.group = noise, group
        self.collect, self.stats, self.world, self.passes = collect, stats, world, passes

    @property
    def forms_aux(self) -> bool:
        """Whether routers form their aux loss here other than alone (scoped_aux_loss)."""
        return self.group is not None or self.collect is not None or self.stats is not None


_SCOPES = [RoutingScope()]


def current_scope() -> RoutingScope:
    return _SCOPES[-1]


@contextlib.contextmanager
def routing_scope(noise: Optional[Callable] = None, group=None,
                  collect: Optional[Dict[int, Tensor]] = None,
                  stats: Optional[Dict[int, Tensor]] = None, world: int = 1, passes: int = 1,
                  scope: Optional[RoutingScope] = None):
    """Within the block, routers in training mode draw their noise from ``noise`` (a
    callable (router, units, n, device, batch) -> (units, n) float32, e.g. a
    PerSampleNoise; batch is the number of samples the units belong to), and form their
    aux loss as scoped_aux_loss says:

    group    (a torch.distributed process group, or torch.distributed.group.WORLD) from
             importance and load summed over the group's processes, so that every process
             gets the aux loss of the whole batch (global_aux_loss). Every process of the
             group must then run the same routed layers in the same order.
    collect  a dict that each router adds its [importance, load] (n + n float32) into,
             under id(router): a forward without autograd that measures a batch made in
             several passes, before them.
    stats    such a dict, the whole batch's (summed over passes, and over the ``world``
             processes when there are several): each of ``passes`` passes gets the part of
             the whole batch's aux loss whose gradient is the whole loss's for its units.

    ``scope``: an existing RoutingScope to enter again (activation checkpointing's
    recomputation)."""
    _SCOPES.append(scope if scope is not None else
                   RoutingScope(noise, group, collect, stats, world, passes))
    try:
        yield _SCOPES[-1]
    finally:
        _SCOPES.pop()


def scoped_aux_loss(router: nn.Module, importance: Tensor, load: Tensor, loss_coef: float,
                    own: Optional[Tensor] = None) -> Tensor:
    """A training forward's aux loss in the current routing_scope, from its units'
    importance and load (n,): ``own`` (or loss_coef · (cv²(importance) + cv²(load))) outside
    any scope; see routing_scope for collect, stats and group."""
    scope = current_scope()
    if scope.collect is not None:
        both = torch.cat([importance.detach().float(), load.detach().float()])
        key = id(router)
        scope.collect[key] = scope.collect[key] + both if key in scope.collect else both
    elif scope.stats is not None:
        return _aux_share(scope.stats[id(router)], load, loss_coef, scope.world, scope.passes)
    elif scope.group is not None:
        return global_aux_loss(importance, load, loss_coef)
    if own is not None:
        return own
    return loss_coef * (cv_squared(importance) + cv_squared(load))


def _aux_share(whole: Tensor, load: Tensor, loss_coef: float, world: int,
               passes: int) -> Tensor:
    """One pass's share of the aux loss of a batch whose statistics are ``whole``
    ([importance, load], summed over passes and processes): its value a 1/passes share of
    the whole loss, its gradient the whole loss's for this pass's units (dcv²/dload at the
    whole load, times load's own gradient), times world for DDP's average over processes."""
    n = whole.numel() // 2
    total_imp, total_load = whole[:n], whole[n:]
    value = loss_coef * (cv_squared(total_imp) + cv_squared(total_load))
    slope = cv_squared_backward(total_load, torch.tensor(loss_coef * world,
                                                         device=total_load.device))
    load = load.float()
    return value / passes + (slope * (load - load.detach())).sum()


def router_noise(router: nn.Module, units: int, n: int, device, batch: int) -> Tensor:
    """A training forward's noise of ``router``: (units, n) float32 standard normal draws,
    from the scope's noise source when routing_scope gave one, else the global generator."""
    source = current_scope().noise
    if source is None:
        return torch.randn((units, n), dtype=torch.float32, device=device)
    noise = source(router, units, n, device, batch)
    if tuple(noise.shape) != (units, n) or noise.dtype != torch.float32:
        raise ValueError(f"routing_scope: the noise source returned a {noise.dtype} tensor of "
                         f"shape {tuple(noise.shape)}, expected float32 ({units}, {n})")
    return noise


def global_aux_loss(importance: Tensor, load: Tensor, loss_coef: float) -> Tensor:
    """loss_coef · (cv²(importance) + cv²(load)) of the statistics summed over the current
    routing_scope's process group: the importance as a count, the load through an all-reduce
    whose backward sums the load's gradient over the processes too, so that after
    DistributedDataParallel averages the gradients each process's units get the gradient
    of the whole batch's aux loss."""
    import torch.distributed as dist

    group = current_scope().group
    importance = importance.detach().float().clone()
    dist.all_reduce(importance, group=group)
    load = SumOverProcesses.apply(load.float(), group)
    return loss_coef * (cv_squared(importance) + cv_squared(load))


class SumOverProcesses(torch.autograd.Function):
    """x summed over a process group (all_reduce), differentiable: the gradient of each
    process's x is the sum of the processes' gradients of the sum. A loss that every
    process computes alike from such sums gets, once DistributedDataParallel averages the
    gradients, the gradient of the whole batch's loss."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        import torch.distributed as dist

        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        import torch.distributed as dist

        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _mix64(*ints: int) -> int:
    """A 63-bit seed from non-negative ints (splitmix64 steps): it depends on the ints and
    their order only, not on Python's hash randomisation."""
    mask = (1 << 64) - 1
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h = (h ^ (int(v) & mask)) * 0xBF58476D1CE4E5B9 & mask
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & mask
        h ^= h >> 31
    return h >> 1


class PerSampleNoise:
    """Router noise that belongs to samples, not to a process: sample i's units draw from a
    generator seeded with (seed, key_i, the router's number in the model), so a sample gets
    the same noise whatever batch, process or micro-batch it lands in, and again when its
    forward is recomputed (activation checkpointing).

        noise = PerSampleNoise(model, seed)
        with routing_scope(noise=noise.keys(keys)):   # keys: one int per sample of the batch
            out = model(batch)

    A routed layer's units are the batch's samples in order (one per map, or H·W tokens per
    sample), so each sample's rows are consecutive; a layer whose batch is a multiple of
    the model's (SAM's windowed blocks: each image's windows, in order) splits it the same
    way, each sample's windows consecutive."""

    def __init__(self, model: nn.Module, seed: int = 0):
        self.seed = int(seed)
        self.index: Dict[int, int] = {
            id(m): k for k, m in enumerate(m for m in model.modules()
                                           if isinstance(m, NoisyTopOneRouter))}
        self.sample_keys: Optional[Tuple[int, ...]] = None

    def keys(self, keys: Sequence[int]) -> "PerSampleNoise":
        """This noise source (a copy) for a batch whose samples have ``keys`` (ints >= 0,
        e.g. (epoch, dataset index) mixed into one), in batch order."""
        bound = PerSampleNoise.__new__(PerSampleNoise)
        bound.seed, bound.index = self.seed, self.index
        bound.sample_keys = tuple(int(k) for k in keys)
        return bound

    def __call__(self, router: nn.Module, units: int, n: int, device, batch: int) -> Tensor:
        keys = self.sample_keys
        if keys is None or batch % len(keys) or units % len(keys):
            raise ValueError(f"PerSampleNoise: a layer's batch of {batch} ({units} routing "
                             f"units) does not split over "
                             f"{None if keys is None else len(keys)} keys; call .keys() with "
                             f"one key per sample of the model's batch")
        if id(router) not in self.index:
            raise ValueError("PerSampleNoise: this router is not in the model the noise "
                             "source was made for (PerSampleNoise(model, seed))")
        layer, per = self.index[id(router)], units // len(keys)
        device = torch.device(device)
        draws = []
        for key in keys:
            g = torch.Generator(device=device)
            g.manual_seed(_mix64(self.seed, key, layer))
            draws.append(torch.randn((per, n), generator=g, dtype=torch.float32,
                                     device=device))
        return torch.cat(draws) if len(draws) > 1 else draws[0]


class NoisyTopOneRouter(nn.Module):
    """Chooses one expert per token or per map from z = x Aᵀ.

    forward(z: (B, H, W, r)) -> (expert_index (B, H, W) int32, aux_loss scalar).
    """

    def __init__(self, rank: int, num_experts: int, gating: str = "token",
                 noise_epsilon: float = 1e-2, loss_coef: float = 1e-2,
                 device=None, dtype=None):
        super().__init__()
        if gating not in GATINGS:
            raise ValueError(f"gating: expected one of {GATINGS}, got {gating!r}")
        self.gating = gating
        self.noise_epsilon = noise_epsilon
        self.loss_coef = loss_coef
        kw = dict(device=device, dtype=dtype)
        self.w_gate = nn.Parameter(torch.zeros(rank, num_experts, **kw))
        self.w_noise = nn.Parameter(torch.zeros(rank, num_experts, **kw))

    def forward(self, z: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        if z.dim() != 4:
            raise ValueError(f"z: expected (B, H, W, r), got shape {tuple(z.shape)}")
        b, h, w, r = z.shape
        features = router_features(z.reshape(-1, r), self.gating, h, w)
        n = self.w_gate.shape[1]
        noise = router_noise(self, features.shape[0], n, features.device, b) \
            if self.training and n > 1 else None
        expert, aux = noisy_top1_fused(features, self.w_gate, self.w_noise, self.training,
                                       self.noise_epsilon, self.loss_coef, noise=noise,
                                       router=self)
        if self.gating == "token":
            return expert.view(b, h, w), aux
        return expert.view(b, 1, 1).expand(b, h, w), aux

    def extra_repr(self) -> str:
        return f"rank={self.w_gate.shape[0]}, num_experts={self.w_gate.shape[1]}, " \
               f"gating={self.gating!r}"
