"""The noisy top-1 router and its aux loss against hand computations."""

import math

import pytest
import torch

from convlora_kernels import NoisyTopOneRouter
from convlora_kernels.gating import cv_squared, cv_squared_backward


def _router(gating, w_gate, w_noise=None):
    r, n = len(w_gate), len(w_gate[0])
    router = NoisyTopOneRouter(r, n, gating)
    with torch.no_grad():
        router.w_gate.copy_(torch.tensor(w_gate))
        if w_noise is not None:
            router.w_noise.copy_(torch.tensor(w_noise))
    return router


W_GATE = [[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]]
# token features -> logits (f·w_gate) -> expert:
# (2,0)->(2,0,-2)->0  (0,3)->(0,3,0)->1  (-2,0)->(-2,0,2)->2
# (1,0)->(1,0,-1)->0  (.5,-1)->(.5,-1,-.5)->0  (-1,-1)->(-1,-1,1)->2
TOKENS = [[2.0, 0.0], [0.0, 3.0], [-2.0, 0.0], [1.0, 0.0], [0.5, -1.0], [-1.0, -1.0]]


def test_token_routing_eval_by_hand():
    router = _router("token", W_GATE).eval()
    z = torch.tensor(TOKENS).view(1, 2, 3, 2)
    idx, aux = router(z)
    assert idx.tolist() == [[[0, 1, 2], [0, 0, 2]]]
    # counts (3, 1, 2): mean 2, unbiased var 1, cv² = 1/4 for importance and for load
    assert aux.item() == pytest.approx(0.01 * (0.25 + 0.25), rel=1e-6)


def test_map_routing_eval_by_hand():
    router = _router("map", W_GATE).eval()
    # three 2x2 maps whose means are (1,0), (0,2), (-1,0.5) -> experts 0, 1, 2
    means = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.5]])
    noise = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [0.5, 0.5], [-0.5, -0.5]]).view(2, 2, 2)
    z = means.view(3, 1, 1, 2) + noise.view(1, 2, 2, 2)  # the noise averages to 0 per map
    idx, aux = router(z)
    assert idx.shape == (3, 2, 2)
    assert (idx == torch.tensor([0, 1, 2]).view(3, 1, 1)).all()
    assert aux.item() == 0.0  # one map per expert: importance and load are uniform


def test_single_expert_aux_is_zero():
    router = NoisyTopOneRouter(3, 1).train()
    idx, aux = router(torch.randn(2, 4, 4, 3))
    assert (idx == 0).all() and aux.item() == 0.0
    assert cv_squared(torch.tensor([5.0])).item() == 0.0


def _phi(t):
    return 0.5 * (1 + math.erf(t / math.sqrt(2)))


@pytest.mark.parametrize("gating", ["token", "map"])
def test_noisy_training_aux_by_hand(gating):
    torch.manual_seed(0)
    w_gate = torch.randn(2, 3).tolist()
    w_noise = torch.randn(2, 3).tolist()
    router = _router(gating, w_gate, w_noise).train()
    z = torch.randn(2, 3, 2, 2)
    torch.manual_seed(123)
    idx, aux = router(z)

    feats = z.reshape(-1, 2).tolist() if gating == "token" else z.mean((1, 2)).tolist()
    torch.manual_seed(123)
    noise = torch.randn(len(feats), 3).tolist()
    counts, load = [0.0] * 3, [0.0] * 3
    chosen = []
    for f, eps in zip(feats, noise):
        clean = [sum(f[k] * w_gate[k][j] for k in range(2)) for j in range(3)]
        std = [math.log1p(math.exp(sum(f[k] * w_noise[k][j] for k in range(2)))) + 1e-2
               for j in range(3)]
        noisy = [c + e * s for c, e, s in zip(clean, eps, std)]
        best = max(range(3), key=lambda j: noisy[j])
        chosen.append(best)
        counts[best] += 1
        second = max(noisy[j] for j in range(3) if j != best)
        for j in range(3):
            # P(j wins under fresh noise, the others held): beat the best other logit
            threshold = second if j == best else noisy[best]
            load[j] += _phi((clean[j] - threshold) / std[j])

    def cv2(v):
        m = sum(v) / len(v)
        var = sum((a - m) ** 2 for a in v) / (len(v) - 1)
        return var / (m * m + 1e-10)

    expected = 0.01 * (cv2(counts) + cv2(load))
    got_idx = idx.reshape(-1).tolist() if gating == "token" else idx[:, 0, 0].tolist()
    assert got_idx == chosen
    assert aux.item() == pytest.approx(expected, rel=1e-5)


def test_aux_loss_trains_router_and_reaches_z():
    torch.manual_seed(1)
    router = NoisyTopOneRouter(3, 4).train()
    with torch.no_grad():
        router.w_gate.normal_()
        router.w_noise.normal_()
    z = torch.randn(2, 5, 5, 3, requires_grad=True)
    _, aux = router(z)
    aux.backward()
    for t in (router.w_gate, router.w_noise, z):
        assert t.grad is not None and t.grad.abs().sum() > 0


def test_zero_router_routes_every_token_alike():
    router = NoisyTopOneRouter(3, 8).eval()
    idx, _ = router(torch.randn(2, 4, 4, 3))
    assert (idx == idx.reshape(-1)[0]).all()


def test_bad_gating():
    with pytest.raises(ValueError, match="gating: expected one of"):
        NoisyTopOneRouter(3, 8, "pixel")


# --- the fused router against the reference ------------------------------------------------

def _fused_vs_reference(features, w_gate, w_noise, training, seed):
    """Experts, aux and every gradient of aux from noisy_top1_fused and noisy_top1, each
    called with the global generator at ``seed`` (so both draw the same noise)."""
    from convlora_kernels.gating import noisy_top1, noisy_top1_fused

    out = []
    for fn in (noisy_top1_fused, noisy_top1):
        leaves = [t.detach().clone().requires_grad_(True) for t in (features, w_gate, w_noise)]
        torch.manual_seed(seed)
        expert, aux = fn(*leaves, training)
        grads = torch.autograd.grad(aux, leaves, allow_unused=True) if aux.requires_grad \
            else (None,) * 3
        out.append((expert, aux, grads))
    return out


@pytest.mark.parametrize("units,n,training,dtype", [
    (300, 8, True, torch.float64), (300, 8, True, torch.float32), (37, 2, True, torch.float32),
    (64, 16, True, torch.float32), (300, 8, False, torch.float32), (5, 1, True, torch.float32),
    (200, 8, True, torch.bfloat16)])
def test_fused_router_matches_reference(units, n, training, dtype):
    g = torch.Generator().manual_seed(units * 31 + n)
    features = torch.randn(units, 8, generator=g).to(dtype)
    w_gate = torch.randn(8, n, generator=g).to(dtype)
    w_noise = (0.3 * torch.randn(8, n, generator=g)).to(dtype)
    (e, aux, grads), (e_ref, aux_ref, grads_ref) = _fused_vs_reference(
        features, w_gate, w_noise, training, seed=units)
    assert e.dtype == torch.int32 and torch.equal(e.long(), e_ref)
    # both compute in float32 whatever the features' dtype: fp32 rounding, relative to the
    # largest value (gradients of the aux loss are ~1e-5, so no absolute floor of 1)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-5
    assert abs(aux.item() - aux_ref.item()) <= 2e-6 * abs(aux_ref.item()) + 1e-12
    for name, a, b in zip(("features", "w_gate", "w_noise"), grads, grads_ref):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
            continue
        assert a.dtype == b.dtype, name
        a, b = a.double(), b.double()
        bound = tol * b.abs().max().item()
        assert (a - b).abs().max().item() <= bound, f"d{name}: {(a - b).abs().max().item()}"
        assert torch.count_nonzero(b) > 0 or not training or n == 1


def test_fused_router_ties_pick_the_lowest_expert():
    """Zero router weights (the initialisation), eval: every logit ties; topk's choice."""
    from convlora_kernels.gating import noisy_top1, noisy_top1_fused

    f = torch.randn(10, 4)
    w = torch.zeros(4, 5)
    assert torch.equal(noisy_top1_fused(f, w, w, False)[0].long(), noisy_top1(f, w, w, False)[0])


@pytest.mark.triton
@pytest.mark.parametrize("units,n,noisy", [(150, 8, True), (150, 8, False), (3, 3, True),
                                           (70, 16, True), (1000, 16, True), (0, 4, True)])
def test_triton_route_kernel_matches_composite(units, n, noisy):
    """The Triton routing kernels (under the interpreter without a GPU) against the ATen
    implementation: same experts, importance and load; the last program adds the
    programs' partials two rows at a time here, so that several tiles are summed, and the
    aux loss from the same launch is that of cv_squared on them."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from convlora_kernels.gating import _route_composite
    from convlora_kernels.triton_kernels import router

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(units + n)
    f = torch.randn(units, 8, generator=g).to(dev)
    wg = torch.randn(8, n, generator=g).to(dev)
    wn = (0.3 * torch.randn(8, n, generator=g)).to(dev)
    noise = torch.randn(units, n, generator=g).to(dev) if noisy else None
    rows, router.ROUTE_SUM_ROWS = router.ROUTE_SUM_ROWS, 2
    try:
        got = router.route(f, wg, wn, noise, 1e-2)
        with_aux = router.route(f, wg, wn, noise, 1e-2, loss_coef=0.03)
    finally:
        router.ROUTE_SUM_ROWS = rows
    want = _route_composite(f, wg, wn, noise, 1e-2)
    for a, b in zip(with_aux[:3], got):
        assert torch.equal(a, b)  # the same launch, the same sums
    # no output shares memory with another: convlora_layer::route returns them, and torch
    # refuses a custom op whose outputs alias (2.11 checks on every call)
    for outs in (got, with_aux):
        ptrs = [t.untyped_storage().data_ptr() for t in outs if t.numel() > 0]
        assert len(set(ptrs)) == len(ptrs), "outputs share storage"
    aux = with_aux[3]
    want_aux = 0.03 * (cv_squared(want[1]) + cv_squared(want[2]))
    assert aux.shape == () and aux.dtype == torch.float32 and torch.isfinite(aux)
    assert abs(aux.item() - want_aux.item()) <= 1e-5 * max(1.0, abs(want_aux.item()))
    assert torch.equal(got[0], want[0])
    assert torch.equal(got[1], want[1])  # importance: counts, exact
    for name, a, b in zip(("importance", "load"), got[1:], want[1:]):
        assert a.shape == (n,), name
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), name
    if not noisy:
        assert torch.equal(got[2], got[1])


@pytest.mark.triton
@pytest.mark.parametrize("units,rank,n", [(150, 8, 8), (3, 3, 3), (70, 20, 16), (65, 1, 2)])
def test_triton_route_backward_kernel_matches_composite(units, rank, n):
    """The Triton kernel of the router's backward (under the interpreter without a GPU)
    against the ATen composite it replaces on CUDA: dL/dfeatures, dL/dw_gate and
    dL/dw_noise, units not a multiple of the block, every rank and expert count padded."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from convlora_kernels.gating import _route_backward_composite
    from convlora_kernels.triton_kernels import router

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(units * 7 + n)
    f = torch.randn(units, rank, generator=g).to(dev)
    wg = torch.randn(rank, n, generator=g).to(dev)
    wn = (0.3 * torch.randn(rank, n, generator=g)).to(dev)
    noise = torch.randn(units, n, generator=g).to(dev)
    d_load = torch.randn(n, generator=g).to(dev)
    got = router.route_backward(d_load, f, wg, wn, noise, 1e-2)
    want = _route_backward_composite(d_load, f, wg, wn, noise, 1e-2)
    for name, a, b in zip(("dfeatures", "dw_gate", "dw_noise"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert torch.isfinite(a).all(), name
        assert b.abs().max() > 0, name
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), name


@pytest.mark.triton
@pytest.mark.parametrize("units,rank,n", [(150, 8, 8), (3, 3, 3), (65, 1, 2)])
def test_triton_aux_loss_load_term_matches_composite(units, rank, n):
    """The aux loss's load term's backward with dL/dload computed inside the backward
    kernel (aux=...) against cv_squared_backward and the composite route_backward."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from convlora_kernels.gating import _route_backward_composite
    from convlora_kernels.triton_kernels import router

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(units * 11 + n)
    load = (torch.rand(n, generator=g) * units).to(dev)
    f = torch.randn(units, rank, generator=g).to(dev)
    wg = torch.randn(rank, n, generator=g).to(dev)
    wn = (0.3 * torch.randn(rank, n, generator=g)).to(dev)
    noise = torch.randn(units, n, generator=g).to(dev)
    d_aux = torch.tensor(1.7, device=dev)
    got = router.route_backward(None, f, wg, wn, noise, 1e-2, aux=(load, d_aux, 0.01))
    d_load = cv_squared_backward(load, d_aux * 0.01)
    want = _route_backward_composite(d_load, f, wg, wn, noise, 1e-2)
    for name, a, b in zip(("dfeatures", "dw_gate", "dw_noise"), got, want):
        assert b.abs().max() > 0, name  # relative to the gradient's own size
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item(), name
    # accumulate: dL/dfeatures added into a given tensor (the stencil's dz) in the kernel
    dz = torch.randn(units, rank, generator=g).to(dev)
    before = dz.clone()
    acc = router.route_backward(None, f, wg, wn, noise, 1e-2, aux=(load, d_aux, 0.01),
                                accumulate=dz)
    assert acc[0] is dz
    assert (dz - (before + want[0])).abs().max().item() <= 1e-4 * want[0].abs().max().item()
    for a, b in zip(acc[1:], got[1:]):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="accumulate: expected a contiguous"):
        router.route_backward(None, f, wg, wn, noise, 1e-2, aux=(load, d_aux, 0.01),
                              accumulate=dz.t())


@pytest.mark.triton
def test_triton_route_kernel_ties_pick_the_lowest_expert():
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs a GPU or TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from convlora_kernels.triton_kernels import router

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    w = torch.zeros(4, 5, device=dev)
    expert, importance, _ = router.route(torch.randn(20, 4, device=dev), w, w, None, 1e-2)
    assert torch.equal(expert, torch.zeros(20, dtype=torch.int32, device=dev))
    assert importance.tolist() == [20.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_cv_squared_backward_by_hand(n):
    """The routed op differentiates the load term by hand (gating.cv_squared_backward):
    equal to autograd through cv_squared, in float32 where cv_squared computes."""
    v = (torch.rand(n, generator=torch.Generator().manual_seed(n)) * 7).requires_grad_(True)
    grad = torch.tensor(0.37)
    if n == 1:  # cv² is the constant 0
        expected = torch.zeros(1)
    else:
        (expected,) = torch.autograd.grad(cv_squared(v) * grad, v)
    got = cv_squared_backward(v.detach(), grad)
    assert got.dtype == torch.float32 and got.shape == v.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    if n > 1:
        assert got.abs().max() > 0



@pytest.mark.triton
@pytest.mark.parametrize("gating", ["token", "map"])
def test_routed_layer_with_the_triton_router_matches_its_composite(monkeypatch, gating):
    """ConvLoRALinear's routed op with the Triton router (what CUDA runs: the routing and
    aux loss in one launch, the load term's backward adding dL/dz into the stencil's dz)
    against the same op with the ATen router: the same experts, output, aux loss and
    every gradient. Under the interpreter, CPU tensors take the Triton router here."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton router on CPU tensors: needs TRITON_INTERPRET=1")
    pytest.importorskip("triton")
    from convlora_kernels import ConvLoRALinear, gating as gating_module

    torch.manual_seed(0)
    m = ConvLoRALinear(16, 24, r=4, num_experts=4, gating=gating, backend="cpu").train()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(0.5 * torch.randn_like(p))
    x = torch.randn(3, 6, 5, 16)

    def step():
        torch.manual_seed(1)  # the same noise draws
        for p in m.parameters():
            p.grad = None
        xx = x.clone().requires_grad_()
        y = m(xx)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().add(7.0 * m.aux_loss).backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
        return y.detach(), m.aux_loss.detach(), m.expert_index.clone(), xx.grad, grads

    want = step()
    monkeypatch.setattr(gating_module, "GPU_DEVICE_TYPES", ("cuda", "cpu"))
    got = step()
    assert torch.equal(got[2], want[2])
    assert torch.allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
    assert abs(got[1].item() - want[1].item()) <= 1e-5 * max(1.0, abs(want[1].item()))
    assert torch.allclose(got[3], want[3], rtol=1e-4, atol=1e-5)
    assert set(got[4]) == set(want[4]) and {"router.w_gate", "router.w_noise"} <= set(want[4])
    for name, g in want[4].items():
        assert g.abs().max() > 0, name
        assert torch.allclose(got[4][name], g, rtol=1e-4, atol=1e-5 * g.abs().max()), name


# --- routing_scope: per-sample noise, the aux loss over processes ------------------------

def _routed_layer(gating, backend, seed=0):
    from convlora_kernels import ConvLoRALinear

    torch.manual_seed(seed)
    m = ConvLoRALinear(8, 12, r=3, num_experts=4, gating=gating, backend=backend,
                       dtype=torch.float64).train()
    with torch.no_grad():  # a router that is not all zeros, so the noise decides little
        for p in (m.lora_B, m.router.w_gate, m.router.w_noise):
            p.normal_()
    return m


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("gating", ["token", "map"])
def test_per_sample_noise_does_not_depend_on_the_batch(backend, gating):
    """A sample routes and computes alike alone or in a batch, wherever it stands in it:
    its noise comes from (seed, its key, the router), not from the global generator."""
    from convlora_kernels.gating import PerSampleNoise, routing_scope

    if backend == "cpu":
        pytest.importorskip("convlora_kernels._C", reason="the cpu backend is not built")
    m = _routed_layer(gating, backend)
    noise = PerSampleNoise(m, seed=5)
    x = torch.randn(3, 4, 5, 8, dtype=torch.float64)
    keys = [11, 3, 40]
    with routing_scope(noise=noise.keys(keys)):
        y = m(x)
        idx = m.expert_index.clone()
    for i in (2, 0, 1):
        torch.randn(7)  # the global generator moves: nothing may depend on it
        with routing_scope(noise=noise.keys([keys[i]])):
            yi = m(x[i:i + 1])
        assert torch.equal(m.expert_index[0], idx[i]), i
        torch.testing.assert_close(yi[0], y[i], rtol=1e-12, atol=1e-12)
    # reversed batch: reversed outputs
    with routing_scope(noise=noise.keys(keys[::-1])):
        yr = m(x.flip(0))
    torch.testing.assert_close(yr.flip(0), y, rtol=1e-12, atol=1e-12)
    # another seed or key: other noise, other experts somewhere (60 tokens / 3 maps x 4)
    with routing_scope(noise=PerSampleNoise(m, seed=6).keys(keys)):
        m(x)
    other = m.expert_index.clone()
    with routing_scope(noise=noise.keys([12, 3, 40])):
        m(x)
    assert not torch.equal(other, idx) or gating == "map"
    assert not torch.equal(m.expert_index, idx) or gating == "map"
    with pytest.raises(ValueError, match="batch of 3 .* does not split over 2 keys"):
        with routing_scope(noise=noise.keys([1, 2])):
            m(x)


@pytest.fixture
def world_of_one(tmp_path):
    """torch.distributed with one gloo process: collectives are identities, so an aux loss
    over the group must equal the process's own, through the other backward path."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("gating", ["token", "map"])
def test_aux_loss_over_a_group_differentiates_the_load(world_of_one, backend, gating):
    """Inside routing_scope(group=...) the aux loss is formed outside the layer's op from
    its load (the op's backward takes dL/dload); with one process it is the op's own aux
    loss, and every gradient, the router's included, is the same."""
    from convlora_kernels.gating import PerSampleNoise, routing_scope

    if backend == "cpu":
        pytest.importorskip("convlora_kernels._C", reason="the cpu backend is not built")
    x0 = torch.randn(3, 4, 5, 8, dtype=torch.float64)
    dy = torch.randn(3, 4, 5, 12, dtype=torch.float64)
    results = []
    for group in (None, world_of_one):
        m = _routed_layer(gating, backend)
        x = x0.clone().requires_grad_()
        with routing_scope(noise=PerSampleNoise(m, 1).keys([0, 1, 2]), group=group):
            y = m(x)
        ((y * dy).sum() + 10 * m.aux_loss).backward()
        grads = {"x": x.grad, **{n: p.grad for n, p in m.named_parameters()
                                 if p.requires_grad}}
        results.append((m.aux_loss.detach(), grads))
    (aux0, g0), (aux1, g1) = results
    assert aux0.item() > 0
    torch.testing.assert_close(aux1, aux0, rtol=1e-6, atol=0)
    assert g0.keys() == g1.keys() and {"router.w_gate", "router.w_noise"} <= g0.keys()
    for k in g0:
        assert g0[k].abs().max() > 0, k
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-6, atol=1e-9, msg=k)


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("gating", ["token", "map"])
def test_aux_loss_of_a_batch_made_in_passes(backend, gating):
    """routing_scope(collect=...) measures a batch's routing statistics pass by pass;
    routing_scope(stats=...) then gives each pass a 1/passes share of the whole batch's aux
    loss whose gradients, summed over the passes, are the whole batch's."""
    from convlora_kernels.gating import PerSampleNoise, routing_scope

    if backend == "cpu":
        pytest.importorskip("convlora_kernels._C", reason="the cpu backend is not built")
    x = torch.randn(4, 4, 5, 8, dtype=torch.float64)
    m = _routed_layer(gating, backend)
    noise = PerSampleNoise(m, 2)
    with routing_scope(noise=noise.keys([0, 1, 2, 3])):
        m(x)
    whole = m.aux_loss
    whole.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    m.zero_grad()
    passes = [[0, 1], [2, 3]]
    collect = {}
    with torch.no_grad(), routing_scope(collect=collect, noise=None):
        for keys in passes:
            with routing_scope(noise=noise.keys(keys), collect=collect):
                m(x[keys])
    assert list(collect) == [id(m.router)]
    total = 0.0
    for keys in passes:
        with routing_scope(noise=noise.keys(keys), stats=collect, passes=2):
            m(x[keys])
        m.aux_loss.backward()
        total += m.aux_loss.item()
    # the routing statistics are float32 whatever the layer's dtype
    assert total == pytest.approx(whole.item(), rel=1e-6)
    got = {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys()
    for k in ("router.w_gate", "router.w_noise", "lora_A"):
        assert want[k].abs().max() > 0, k
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5,
                                   atol=1e-6 * want[k].abs().max().item(), msg=k)
