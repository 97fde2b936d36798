"""A tiny Conv-LoRA problem, forward and backward on the GPU, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/sanitize_case.py --backends cuda
    python benchmarks/sanitize_case.py --backends triton --no-probe

Runs the extension's probe op on CUDA tensors (unless --no-probe), then, for each
backend asked for that can run here, forward + backward of a tiny problem (token and
map routing, bilinear and bicubic; float32 and bfloat16), checked against the reference by the accuracy rule
of docs/design.md (accuracy rule): the backend's error against the float64 reference is at most 2x the
reference's own error in the same dtype, plus a small floor. The references run on
the CPU, so only the backend's kernels run under the sanitizer.

Prints one line starting with "RESULT:". Exit status: 0 every check passed, 1 a check
failed, 4 nothing to check (no backend asked for can run, and no probe).
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F

from convlora_kernels import conv_lora_linear, conv_lora_linear_ref
from convlora_kernels._testing import gelu_probe
from convlora_kernels.ops import backend_unavailable_reason

from benchlib import common

# Every scale 1..8 (odd and even), borders on both axes, two maps.
SHAPES = [common.Shape("sanitize-token", 2, 5, 6, 16, 3),
          common.Shape("sanitize-map", 2, 5, 6, 16, 3, gating="map"),
          common.Shape("sanitize-map-bicubic", 2, 9, 10, 16, 3, gating="map",
                       interpolation="bicubic")]
GRADS = ("x", "bias", "lora_A", "lora_B", "conv_weight", "conv_bias")
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-3}


def _run(fn, inp: Dict[str, torch.Tensor], dtype, device, dy) -> List[torch.Tensor]:
    """Output and gradients of ``fn`` with the inputs cast to dtype and moved to device."""
    def move(v):
        if v.is_floating_point():
            return v.detach().to(device=device, dtype=dtype)
        if v.dim() == 3 and v.stride(1) == 0 and v.stride(2) == 0:
            return v[:, :1, :1].to(device).expand(v.shape)  # per map: the map kernels
        return v.to(device)

    t = {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in inp.items()}
    for k in GRADS:
        t[k].requires_grad_(True)
    y = fn(t["x"], t["weight"], t["bias"], t["lora_A"], t["lora_B"], t["conv_weight"],
           t["conv_bias"], t["expert_index"], t["scaling"], interpolation=t["interpolation"])
    grads = torch.autograd.grad(y, [t[k] for k in GRADS], dy.to(device=device, dtype=dtype))
    return [v.detach().double().cpu() for v in (y, *grads)]


def check_backend(backend: str, shape: common.Shape, dtype: torch.dtype,
                  device: str = "cuda") -> List[str]:
    """The failures of one backend on one shape and dtype (empty when it passes)."""
    inp = common.make_inputs(shape, "cpu", torch.float64, seed=1)
    g = torch.Generator().manual_seed(2)
    dy = torch.randn(shape.batch, shape.height, shape.width, shape.out_features, generator=g,
                     dtype=torch.float64)
    truth = _run(conv_lora_linear_ref, inp, torch.float64, "cpu", dy)
    ref = _run(conv_lora_linear_ref, inp, dtype, "cpu", dy)

    def fused(*args, **kwargs):
        return conv_lora_linear(*args, backend=backend, **kwargs)

    got = _run(fused, inp, dtype, device, dy)
    failures = []
    for name, t, r, k in zip(("y",) + tuple(f"d{n}" for n in GRADS), truth, ref, got):
        if not torch.isfinite(k).all():
            failures.append(f"{name}: non-finite values")
            continue
        err_ref = (r - t).abs().max().item()
        err = (k - t).abs().max().item()
        bound = 2 * err_ref + FLOOR[dtype] * max(1.0, t.abs().max().item())
        if err > bound:
            failures.append(f"{name}: error {err:.3e} > bound {bound:.3e} "
                            f"(reference's own error {err_ref:.3e})")
    return failures


def check_probe() -> List[str]:
    x = torch.linspace(-6, 6, 4099, device="cuda")  # not a multiple of any block size
    y = gelu_probe(x)
    torch.cuda.synchronize()
    err = (y - F.gelu(x)).abs().max().item()
    return [] if err <= 1e-6 else [f"gelu_probe: max error {err:.3e}"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--backends", default="cuda", help="comma-separated: cuda, triton")
    p.add_argument("--no-probe", action="store_true", help="skip the extension's probe op")
    p.add_argument("--require", action="store_true",
                   help="a backend asked for that cannot run is a failure, not a skip")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        print("RESULT: FAIL no CUDA device")
        return 1
    checked, failures, notes = [], [], []
    if not args.no_probe:
        failures += check_probe()
        checked.append("probe")
    for backend in [b for b in args.backends.split(",") if b]:
        why = backend_unavailable_reason(backend, torch.device("cuda"))
        if why is not None:
            (failures if args.require else notes).append(f"{backend} not available: {why}")
            continue
        for shape in SHAPES:
            for dtype in (torch.float32, torch.bfloat16):
                case = f"{backend}/{shape.gating}/{str(dtype).replace('torch.', '')}"
                fails = check_backend(backend, shape, dtype)
                failures += [f"{case} {f}" for f in fails]
                checked.append(case)
                print(f"{case}: {'ok' if not fails else 'FAILED'}", flush=True)
    for line in failures:
        print(f"failure: {line}")
    for line in notes:
        print(f"note: {line}")
    tail = "; ".join(notes)
    if failures:
        print(f"RESULT: FAIL {len(failures)} check(s) failed of {len(checked)} run")
        return 1
    if not checked:
        print(f"RESULT: SKIP nothing to check ({tail})")
        return 4
    print(f"RESULT: PASS {', '.join(checked)}" + (f" ({tail})" if tail else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
