"""The version shims of convlora_kernels._versions, on whichever torch and Triton run here
(the suite runs on torch 2.14 / Triton 3.8 and on torch 2.11 / Triton 3.6:
.ci/torch_floor.sh)."""

import pytest
import torch

from convlora_kernels import _versions


@pytest.mark.parametrize("device_type", ["cpu", "cuda", "xpu", "mps", "hpu", "meta"])
def test_autocast_available_agrees_with_torch(device_type):
    assert _versions.autocast_available(device_type) == torch.amp.is_autocast_available(device_type)


def test_autocast_available_compiles_without_graph_break():
    """The reason for the shim: torch 2.11's Dynamo breaks the graph on
    torch.amp.is_autocast_available; fullgraph=True turns a break into an error."""

    def f(x):
        if _versions.autocast_available("cpu") and torch.is_autocast_enabled("cpu"):
            return x * 2
        return x + 1

    x = torch.randn(4)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), x + 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(compiled(x), x * 2)


def test_version_tuple():
    assert _versions._version_tuple("2.11.0+cu130") == (2, 11, 0)
    assert _versions._version_tuple("2.14.1") == (2, 14, 1)
    assert _versions._version_tuple("3.6.0") == (3, 6, 0)
    assert _versions._version_tuple("2.15.0a0+git1234") == (2, 15, 0)


@pytest.mark.triton
def test_interpreter_takes_a_runtime_loop_bound():
    """A loop over a scalar kernel argument, as the counting sort's: under Triton 3.6's
    interpreter with NumPy >= 2.5 it failed ("only 0-dimensional arrays can be converted to
    Python scalars") until patch_triton_interpreter; compiled, it is ordinary Triton."""
    import triton
    import triton.language as tl

    import convlora_kernels.triton_kernels  # noqa: F401  (applies the patch)

    @triton.jit
    def strided_sum(x_ptr,   # (n,) float32
                    out_ptr,  # (BLOCK,) float32: out[i] = sum of x[i::BLOCK]
                    n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            acc += tl.load(x_ptr + start + offs, mask=start + offs < n, other=0.0)
        tl.store(out_ptr + offs, acc)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(37, generator=g).to(device)
    out = torch.full((8,), float("nan"), device=device)
    strided_sum[(1,)](x, out, x.numel(), BLOCK=8)
    expected = torch.nn.functional.pad(x, (0, 3)).reshape(-1, 8).sum(0)
    torch.testing.assert_close(out, expected)
