"""The noisy top-1 router and its aux loss against hand computations."""

import math

import pytest
import torch

from convlora_kernels import NoisyTopOneRouter
from convlora_kernels.gating import cv_squared


def _router(granularity, w_gate, w_noise=None):
    r, n = len(w_gate), len(w_gate[0])
    router = NoisyTopOneRouter(r, n, granularity)
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


@pytest.mark.parametrize("granularity", ["token", "map"])
def test_noisy_training_aux_by_hand(granularity):
    torch.manual_seed(0)
    w_gate = torch.randn(2, 3).tolist()
    w_noise = torch.randn(2, 3).tolist()
    router = _router(granularity, w_gate, w_noise).train()
    z = torch.randn(2, 3, 2, 2)
    torch.manual_seed(123)
    idx, aux = router(z)

    feats = z.reshape(-1, 2).tolist() if granularity == "token" else z.mean((1, 2)).tolist()
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
    got_idx = idx.reshape(-1).tolist() if granularity == "token" else idx[:, 0, 0].tolist()
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


def test_bad_granularity():
    with pytest.raises(ValueError, match="gating: expected one of"):
        NoisyTopOneRouter(3, 8, "pixel")
