"""The reference Conv-LoRA against an independent float64 composition, gradcheck, shapes,
strides, dtypes."""

import pytest
import torch

from convlora_kernels import conv_lora_linear, conv_lora_linear_ref
from convlora_kernels.reference import expert_map

from helpers import (assert_close, check_accuracy_rule, conv_lora_math, expert_math, make_case,
                     resample_matrix)

MODES = ["bilinear", "bicubic"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n_in,s", [(1, 2), (3, 2), (5, 3), (4, 4), (7, 5), (2, 8)])
def test_resample_matrices_match_interpolate(mode, n_in, s):
    """The rules of docs/design.md (Resampling), written as matrices, are PyTorch's interpolation."""
    torch.manual_seed(0)
    t = torch.randn(1, 1, n_in, 1, dtype=torch.float64)
    up = torch.nn.functional.interpolate(t, scale_factor=(s, 1), mode=mode, align_corners=False)
    assert_close(up[0, 0, :, 0], resample_matrix(n_in, s * n_in, mode) @ t[0, 0, :, 0],
                 1e-13, 1e-13, "up")
    big = torch.randn(1, 1, s * n_in, 1, dtype=torch.float64)
    down = torch.nn.functional.interpolate(big, size=(n_in, 1), mode=mode, align_corners=False)
    assert_close(down[0, 0, :, 0], resample_matrix(s * n_in, n_in, mode) @ big[0, 0, :, 0],
                 1e-13, 1e-13, "down")


def test_odd_scale_down_hits_grid_and_even_scale_is_halfway():
    for s in (3, 5, 7):
        m = resample_matrix(s * 4, 4, "bilinear")
        assert ((m == 0) | (m == 1)).all() and (m.sum(1) == 1).all()
        assert m[1, s + (s - 1) // 2] == 1
    for s in (2, 4, 8):
        m = resample_matrix(s * 4, 4, "bilinear")
        assert ((m == 0) | (m == 0.5)).all() and (m.sum(1) == 1).all()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_expert_map_matches_matrix_math(mode, s):
    torch.manual_seed(s)
    z = torch.randn(2, 3, 5, 4, dtype=torch.float64)
    w = torch.randn(3, 3, 3, 3, dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    assert_close(expert_map(z, w, b, s, mode), expert_math(z, w, b, s, mode), 1e-12, 1e-12,
                 f"E_{s}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gating", ["token", "map"])
@pytest.mark.parametrize("hw", [(1, 1), (1, 7), (6, 1), (13, 17), (14, 14)])
def test_reference_matches_composition(mode, gating, hw):
    c = make_case(batch=2, height=hw[0], width=hw[1], interpolation=mode, gating=gating,
                  scales=(1, 2, 3, 4, 5, 6, 7, 8), seed=hw[0] * 31 + hw[1])
    y = conv_lora_linear_ref(*c.args(), **c.kwargs())
    assert_close(y, conv_lora_math(c), 1e-12, 1e-12, "y")


@pytest.mark.parametrize("mode", MODES)
def test_reference_matches_composition_64x64(mode):
    c = make_case(batch=1, height=64, width=64, c_in=8, c_out=6, rank=3, interpolation=mode,
                  scales=(1, 2, 3, 4, 5, 6, 7, 8), seed=3)
    assert_close(conv_lora_linear_ref(*c.args(), **c.kwargs()), conv_lora_math(c), 1e-12, 1e-12,
                 "y")


def test_default_scales_are_one_to_n():
    c = make_case(scales=(1, 2, 3), seed=4)
    a = conv_lora_linear_ref(*c.args(), scales=None, interpolation=c.interpolation)
    assert torch.equal(a, conv_lora_linear_ref(*c.args(), **c.kwargs()))


def test_nonconsecutive_scales_and_large_scale():
    c = make_case(height=3, width=4, scales=(16, 1, 6), interpolation="bicubic", seed=5)
    assert_close(conv_lora_linear_ref(*c.args(), **c.kwargs()), conv_lora_math(c), 1e-12, 1e-12,
                 "y")


def test_no_bias_and_rank_one():
    c = make_case(rank=1, bias=False, seed=6)
    assert_close(conv_lora_linear_ref(*c.args(), **c.kwargs()), conv_lora_math(c), 1e-12, 1e-12,
                 "y")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("gating", ["token", "map"])
def test_gradcheck_every_input(mode, gating):
    c = make_case(batch=2, height=3, width=4, c_in=5, c_out=4, rank=2, scales=(1, 2, 3),
                  interpolation=mode, gating=gating, seed=7).to(torch.float64, True)
    c.weight.requires_grad_(True)
    names = ["x", "weight", "bias", "lora_A", "lora_B", "conv_weight", "conv_bias"]

    def f(*tensors):
        kw = dict(zip(names, tensors))
        return conv_lora_linear_ref(kw["x"], kw["weight"], kw["bias"], kw["lora_A"],
                                    kw["lora_B"], kw["conv_weight"], kw["conv_bias"],
                                    c.expert_index, c.scaling, **c.kwargs())

    assert torch.autograd.gradcheck(f, tuple(getattr(c, n) for n in names), eps=1e-6,
                                    atol=1e-7, rtol=1e-6)


def test_gradients_match_composition():
    """Backward of the reference against autograd through the matrix composition."""
    c = make_case(height=5, width=7, interpolation="bicubic", seed=8).to(torch.float64, True)
    names = ["x", "bias", "lora_A", "lora_B", "conv_weight", "conv_bias"]
    dy = torch.randn(2, 5, 7, 12, dtype=torch.float64)
    ga = torch.autograd.grad(conv_lora_linear_ref(*c.args(), **c.kwargs()),
                             [getattr(c, n) for n in names], dy)

    def math_with_grad(case):  # conv_lora_math detaches; redo it differentiably
        x, z = case.x, case.x @ case.lora_A.t()
        u = z
        for i, s in enumerate(case.scales):
            e = expert_math(z.permute(0, 3, 1, 2), case.conv_weight[i], case.conv_bias[i], s,
                            case.interpolation).permute(0, 2, 3, 1)
            u = u + torch.where((case.expert_index == i)[..., None], e, torch.zeros_like(e))
        return x @ case.weight.t() + case.bias + case.scaling * (u @ case.lora_B.t())

    gb = torch.autograd.grad(math_with_grad(c), [getattr(c, n) for n in names], dy)
    for n, a, b in zip(names, ga, gb):
        assert_close(a, b, 1e-11, 1e-11, f"d{n}")


def test_unused_expert_gets_zero_gradient():
    c = make_case(scales=(1, 2, 3), seed=9).to(torch.float64, True)
    c.expert_index = torch.zeros_like(c.expert_index)  # only expert 0
    y = conv_lora_linear_ref(*c.args(), **c.kwargs())
    y.square().sum().backward()
    assert c.conv_weight.grad is not None
    assert c.conv_weight.grad[0].abs().sum() > 0
    assert (c.conv_weight.grad[1:] == 0).all() and (c.conv_bias.grad[1:] == 0).all()


def test_bl_input_and_hw():
    c = make_case(height=4, width=6, seed=10)
    y4 = conv_lora_linear_ref(*c.args(), **c.kwargs())
    x3 = c.x.reshape(2, 24, -1)
    y3 = conv_lora_linear_ref(x3, *c.args()[1:], **c.kwargs(), hw=(4, 6))
    assert y3.shape == (2, 24, 12)
    assert torch.equal(y3.reshape(y4.shape), y4)
    sq = make_case(height=5, width=5, seed=11)
    y_sq = conv_lora_linear_ref(sq.x.reshape(2, 25, -1), *sq.args()[1:], **sq.kwargs())
    assert torch.equal(y_sq.reshape(2, 5, 5, 12), conv_lora_linear_ref(*sq.args(), **sq.kwargs()))


def test_strided_x_and_index():
    c = make_case(height=6, width=5, c_in=8, seed=12)
    big = torch.randn(2, 12, 5, 16, dtype=torch.float64)
    big[:, ::2, :, 3:11] = c.x
    xs = big[:, ::2, :, 3:11]
    assert not xs.is_contiguous()
    big_idx = torch.zeros(2, 6, 10, dtype=torch.long)
    big_idx[:, :, ::2] = c.expert_index
    idx_s = big_idx[:, :, ::2]
    args = (xs,) + c.args()[1:7] + (idx_s, c.scaling)
    assert_close(conv_lora_linear_ref(*args, **c.kwargs()), conv_lora_math(c), 1e-12, 1e-12, "y")


def test_empty_batch_forward_and_backward():
    c = make_case(batch=0, seed=13).to(torch.float64, True)
    y = conv_lora_linear_ref(*c.args(), **c.kwargs())
    assert y.shape == (0, 5, 6, 12)
    y.sum().backward()
    assert c.conv_weight.grad is not None and (c.conv_weight.grad == 0).all()
    assert c.lora_A.grad is not None and (c.lora_A.grad == 0).all()


@pytest.mark.parametrize("dtype,floor", [(torch.float32, 1e-6), (torch.bfloat16, 1e-3),
                                         (torch.float16, 1e-4)])
@pytest.mark.parametrize("mode", MODES)
def test_public_op_accuracy_rule(dtype, floor, mode):
    c = make_case(height=7, width=5, interpolation=mode, seed=14)
    check_accuracy_rule(lambda *a, **k: conv_lora_linear(*a, **k, backend="reference"), c,
                        dtype, floor)


def test_accuracy_rule_can_fail():
    """The harness rejects a function that is slightly wrong in one gradient only."""
    c = make_case(height=4, width=4, seed=15)

    class Nudge(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            return g * 1.01

    def wrong(x, weight, bias, lora_A, *rest, **kw):
        return conv_lora_linear_ref(x, weight, bias, Nudge.apply(lora_A), *rest, **kw)

    with pytest.raises(AssertionError, match="dlora_A"):
        check_accuracy_rule(wrong, c, torch.float32, 1e-6)


def test_precomputed_z_is_used_and_carries_lora_A_gradient():
    c = make_case(seed=16).to(torch.float64, True)
    y = conv_lora_linear_ref(*c.args(), **c.kwargs())
    dy = torch.randn_like(y)
    ga = torch.autograd.grad(y, [c.x, c.lora_A], dy)
    z = c.x @ c.lora_A.t()
    yz = conv_lora_linear_ref(*c.args(), **c.kwargs(), z=z)
    assert_close(yz, y, 1e-14, 1e-14, "y")
    gz = torch.autograd.grad(yz, [c.x, c.lora_A], dy)
    for n, a, b in zip(["dx", "dlora_A"], gz, ga):
        assert_close(a, b, 1e-12, 1e-12, n)
    # z is taken as given: a different z changes the output
    assert not torch.allclose(conv_lora_linear_ref(*c.args(), **c.kwargs(), z=z * 2), y)
