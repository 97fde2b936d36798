"""Every bad input gets a clear error naming the argument, what was expected and what came."""

import pytest
import torch

from convlora_kernels import conv_lora_linear

from helpers import make_case

NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "conv_weight", "conv_bias", "expert_index",
         "scaling")


def _call(**changes):
    c = make_case(batch=2, height=4, width=5, c_in=8, c_out=12, rank=3, scales=(1, 2, 3),
                  dtype=torch.float32, seed=0)
    args = dict(zip(NAMES, c.args()))
    kwargs = dict(c.kwargs(), backend="reference")
    for k, v in changes.items():
        (args if k in args else kwargs)[k] = v(args) if callable(v) else v
    return conv_lora_linear(*[args[n] for n in NAMES], **kwargs)


BAD = [
    # rank and size
    (dict(x=lambda a: a["x"][0, 0]), ValueError, r"x: expected \(B, H, W, C_in\) or \(B, L, C_in\)"),
    (dict(x=lambda a: a["x"].reshape(2, 20, 8)), ValueError, "L = 20 is not a perfect square"),
    (dict(x=lambda a: a["x"].reshape(2, 20, 8), hw=(5, 5)), ValueError, "gives H\\*W = 25"),
    (dict(hw=(5, 4)), ValueError, "hw: x is a \\(B, H, W, C\\) map of H, W = 4, 5"),
    (dict(hw=4), TypeError, "hw: expected a pair of integers"),
    (dict(x=lambda a: a["x"][:, :0]), ValueError, "H, W >= 1"),
    (dict(weight=lambda a: a["weight"][:, :7]), ValueError, r"weight: expected shape \(C_out, C_in\)"),
    (dict(bias=lambda a: a["bias"][:5]), ValueError, r"bias: expected shape \(C_out,\) = \(12,\), got \(5,\)"),
    (dict(lora_A=lambda a: a["lora_A"][:, :4]), ValueError, r"lora_A: expected shape \(r, C_in\)"),
    (dict(lora_B=lambda a: a["lora_B"][:, :2]), ValueError, r"lora_B: expected shape \(C_out, r\) = \(12, 3\)"),
    (dict(conv_weight=lambda a: a["conv_weight"][:, :, :2]), ValueError, r"conv_weight: expected shape \(n, r, r, 3, 3\)"),
    (dict(conv_weight=lambda a: a["conv_weight"][..., :2]), ValueError, "conv_weight: expected shape"),
    (dict(conv_weight=lambda a: a["conv_weight"][0]), ValueError, "conv_weight: expected shape"),
    (dict(conv_weight=lambda a: a["conv_weight"].repeat(6, 1, 1, 1, 1)), ValueError, "at most 16 experts"),
    (dict(conv_bias=lambda a: a["conv_bias"][:2]), ValueError, r"conv_bias: expected shape \(n, r\) = \(3, 3\)"),
    (dict(expert_index=lambda a: a["expert_index"][:, :3]), ValueError, r"expert_index: expected shape \(B, H, W\) = \(2, 4, 5\)"),
    # dtypes and devices
    (dict(x=lambda a: a["x"].long()), TypeError, "x: expected a float16, bfloat16, float32 or float64 tensor, got torch.int64"),
    (dict(weight=lambda a: a["weight"].double()), TypeError, "weight: expected dtype torch.float32 \\(the dtype of x\\), got torch.float64"),
    (dict(conv_bias=lambda a: a["conv_bias"].half()), TypeError, "conv_bias: expected dtype torch.float32"),
    (dict(lora_B=lambda a: a["lora_B"].to("meta")), ValueError, "lora_B: expected a tensor on cpu \\(the device of x\\), got one on meta"),
    (dict(expert_index=lambda a: a["expert_index"].float()), TypeError, "expert_index: expected an integer tensor, got torch.float32"),
    (dict(expert_index=lambda a: a["expert_index"].to("meta")), ValueError, "expert_index: expected a tensor on cpu"),
    (dict(lora_A=[[1.0]]), TypeError, "lora_A: expected a torch.Tensor, got list"),
    (dict(x="x"), TypeError, "x: expected a torch.Tensor, got str"),
    # expert index values
    (dict(expert_index=lambda a: a["expert_index"] + 3), ValueError, r"expert_index: expected values in \[0, 2\] \(3 experts\), found"),
    (dict(expert_index=lambda a: a["expert_index"] - 1), ValueError, "found -1"),
    # scales
    (dict(scales=(1, 2)), ValueError, "scales: expected one scale per expert \\(3"),
    (dict(scales=(1, 0, 3)), ValueError, r"scales\[1\]: expected a positive integer between 1 and 16, got 0"),
    (dict(scales=(1, -2, 3)), ValueError, r"scales\[1\]: expected a positive integer .* got -2"),
    (dict(scales=(1, 2.5, 3)), TypeError, r"scales\[1\]: expected a positive integer, got float 2.5"),
    (dict(scales=(1, 2.0, 3)), TypeError, r"scales\[1\]: expected a positive integer, got float 2.0"),
    (dict(scales=(True, 2, 3)), TypeError, r"scales\[0\]: expected a positive integer, got bool"),
    (dict(scales=(1, "2", 3)), TypeError, r"scales\[1\]: expected a positive integer, got str"),
    (dict(scales=(1, 17, 3)), ValueError, r"scales\[1\]: .* got 17"),
    (dict(scales=3), TypeError, "scales: expected a sequence of 3 positive integers"),
    # a precomputed z
    (dict(z=lambda a: torch.zeros(2, 4, 5, 2)), ValueError, r"z: expected x Aᵀ, shape x.shape\[:-1\] \+ \(r,\) = \(2, 4, 5, 3\), got \(2, 4, 5, 2\)"),
    (dict(z=lambda a: torch.zeros(2, 4, 5, 3, dtype=torch.float64)), TypeError, "z: expected dtype torch.float32"),
    # scalars and names
    (dict(scaling=torch.tensor(2.0)), TypeError, "scaling: expected a Python float"),
    (dict(scaling=float("nan")), ValueError, "scaling: expected a finite number"),
    (dict(interpolation="nearest"), ValueError, "interpolation: expected one of \\('bilinear', 'bicubic'\\), got 'nearest'"),
    (dict(backend="tpu"), ValueError, "backend: expected one of"),
]


@pytest.mark.parametrize("changes,exc,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_input_is_named(changes, exc, match):
    with pytest.raises(exc, match=match):
        _call(**changes)


def test_good_input_passes():
    assert _call().shape == (2, 4, 5, 12)
    assert _call(bias=None, expert_index=lambda a: a["expert_index"].int()).shape == (2, 4, 5, 12)
    assert _call(scales=torch.tensor([3, 1, 2])).shape == (2, 4, 5, 12)
