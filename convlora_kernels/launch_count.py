"""Kernel launches of one ConvLoRALinear training step on a GPU, counted without one.

    python -m convlora_kernels.launch_count [--design docs/design.md]

The step (the forward, then the backward from dL/dy and dL/daux) runs the layer's code for
a GPU backend on tensors of the "meta" device (shapes and dtypes, no data; the backends
take every branch they take on CUDA, the router's too: gating.GPU_DEVICE_TYPES) under a
dispatch mode
that counts what would launch a kernel on the GPU:
  - an ATen operator with a tensor of at least one element among its inputs or outputs,
    except views and allocations (NO_LAUNCH);
  - a Triton kernel, its launch recorded instead of run;
  - the C++ stencil ops, by the kernels their CUDA implementation launches
    (CPP_LAUNCHES, read from csrc/stencil_cuda.cuh);
and it lists the host synchronisations (aten._local_scalar_dense: .item(), a tensor's
truth value), which break CUDA graph capture. The layer's own custom ops (convlora_layer::*)
are not counted themselves: their Python implementation runs under the same mode, so what
they launch is. What autograd adds between them (accumulating gradients into .grad) is
counted too: each gradient's first assignment launches nothing, as after zero_grad(), which
sets them to None.

--design FILE writes the table into FILE between DESIGN_BEGIN and DESIGN_END.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
from typing import Counter, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import _design_tables

DESIGN_BEGIN = "<!-- launch_count --design: begin -->"
DESIGN_END = "<!-- launch_count --design: end -->"
SHAPE = dict(batch=2, height=16, width=16, c_in=64, c_out=192, r=8, experts=8)
GPU = "meta"  # stands for the CUDA device

NO_LAUNCH = {"aten.empty", "aten.empty_strided", "aten.empty_like", "aten.new_empty",
             "aten.new_empty_strided", "aten.detach", "aten.alias", "aten.lift_fresh",
             "aten.set_", "aten.resize_", "aten._local_scalar_dense", "aten.sym_size",
             "aten.sym_stride", "aten.sym_numel", "aten.is_same_size"}


def _given_prep(args, at: int) -> bool:
    return len(args) > at and args[at] is not None


def _cells_launch(z, idx, mma, prep, scales, code, height, width) -> int:
    """The composed-weight programs' own prep launch: 1 when they run (mma, per token,
    r <= 8, bilinear, not float64) on a caller's prep buffer made without mma (the ops'
    own prep, and stencil_prep's with mma, write the composed weights in their launch)."""
    cells = (mma and idx.shape[0] == z.shape[0] and z.shape[1] <= 8 and code == 0
             and z.dtype in (torch.bfloat16, torch.float16, torch.float32))
    if not cells or prep is None:
        return 0
    plain = torch.ops.convlora.stencil_prep_bytes(z.shape[1], len(scales), code, height, width,
                                                  list(scales), False, False)
    return 1 if prep.numel() == plain else 0


def _stencil_fwd_launches(args) -> int:
    # run_call / run_map_call: prep_kernel (reading the weights in their dtype; with mma
    # the composed weights too) unless the caller passed stencil_prep's output, then the
    # tile (or map, or composed-weight) kernel
    z, idx, mma = args[0], args[1], len(args) > 11 and bool(args[11])
    prep = args[10] if _given_prep(args, 10) else None
    return ((1 if prep is not None else 2)
            + _cells_launch(z, idx, mma, prep, args[4], args[5], args[6], args[7]))


def _stencil_bwd_launches(args) -> int:
    # prep unless given, the tile kernel then reduce_dw_kernel (the map programs, one
    # expert per map: expert_index shorter than z, fold_reduce_kernel: the fold and the
    # reduce in one launch)
    z, idx, mma = args[1], args[3], len(args) > 12 and bool(args[12])
    prep = args[11] if _given_prep(args, 11) else None
    return (2 + (0 if prep is not None else 1)
            + _cells_launch(z, idx, mma, prep, args[6], args[7], args[8], args[9]))


CPP_LAUNCHES = {"convlora.stencil_prep": lambda args: 1,
                "convlora.stencil_fwd": _stencil_fwd_launches,
                "convlora.stencil_bwd": _stencil_bwd_launches}


def _expanded():
    """The custom ops whose Python implementation runs under the counting mode."""
    from . import gating, layer

    ops = (layer._forward_op, layer._backward_op, layer._routed_forward_op,
           layer._routed_backward_op, gating._route_op, gating._route_backward_op)
    return {str(op._opoverload.overloadpacket): op._init_fn for op in ops}


def _on_gpu(tree) -> bool:
    return any(isinstance(t, torch.Tensor) and t.device.type == GPU and t.numel() > 0
               for t in torch.utils._pytree.tree_leaves(tree))


class LaunchCounter(TorchDispatchMode):
    """Counts launches by name (module doc); ``syncs`` lists the host synchronisations."""

    def __init__(self):
        super().__init__()
        self.launches: Counter[str] = collections.Counter()
        self.syncs: List[str] = []
        self._expanded = _expanded()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        impl = self._expanded.get(name)
        if impl is not None:
            with self:
                return impl(*args, **kwargs)
        out = func(*args, **kwargs)
        if name == "aten._local_scalar_dense" and _on_gpu(args):
            self.syncs.append(name)
        elif name in CPP_LAUNCHES:
            self.launches[name] += CPP_LAUNCHES[name](args)
        elif not func.is_view and name not in NO_LAUNCH and _on_gpu((args, kwargs, out)):
            self.launches[name] += 1
        return out


@contextlib.contextmanager
def _triton_launches_counted(counter: LaunchCounter):
    """Within: every Triton launch is counted on ``counter`` instead of running (compiled
    for the GPU or under TRITON_INTERPRET=1 alike)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction
    except ImportError:
        yield
        return
    from . import _switches

    classes = (JITFunction, InterpretedFunction)
    runs = [cls.run for cls in classes]

    def record(self, *args, grid, warmup=False, **kwargs):
        name = getattr(self, "__name__", None) or self.fn.__name__
        counter.launches[f"triton.{name}"] += 1

    for cls in classes:
        cls.run = record
    try:
        with _switches.forced({"CONVLORA_TRITON_AUTOTUNE": "0"}):
            yield
    finally:
        for cls, run in zip(classes, runs):
            cls.run = run


def training_step(backend: str, gating: str = "token", dtype: torch.dtype = torch.bfloat16,
                  shape: Dict[str, int] = SHAPE) -> LaunchCounter:
    """The launches of ConvLoRALinear's training step (forward, backward from dL/dy and
    the aux loss) on ``backend``, the second of two (one-time work done); gating "none":
    the functional op alone (conv_lora_linear with a given expert index, no router)."""
    from . import gating as gating_module
    from .modules import ConvLoRALinear

    b, h, w = shape["batch"], shape["height"], shape["width"]
    m = ConvLoRALinear(shape["c_in"], shape["c_out"], r=shape["r"],
                       num_experts=shape["experts"],
                       gating="token" if gating == "none" else gating, backend=backend,
                       device=GPU, dtype=dtype).train()
    x = torch.randn(b, h, w, shape["c_in"], device=GPU, dtype=dtype, requires_grad=True)
    dy = torch.randn(b * h * w, shape["c_out"], device=GPU, dtype=dtype)
    d_aux = torch.ones((), device=GPU)
    m.expert_index_for_counting = torch.zeros((b, h, w), dtype=torch.int64, device=GPU)
    gpu_types = gating_module.GPU_DEVICE_TYPES
    gating_module.GPU_DEVICE_TYPES = gpu_types + (GPU,)
    try:
        counter = None
        for _ in range(2):
            for t in list(m.parameters()) + [x]:
                t.grad = None
            counter = LaunchCounter()
            with _triton_launches_counted(counter), counter:
                _step(backend, gating, m, x, dy, d_aux, shape["experts"])
        return counter
    finally:
        gating_module.GPU_DEVICE_TYPES = gpu_types


def _step(backend, gating, m, x, dy, d_aux, experts):
    """ConvLoRALinear.forward on a fused backend (ops.routed_conv_lora_linear: the checks,
    the router's noise draw, the layer's op pair), then the backward."""
    from . import layer
    from ._validate import as_map, check_inputs

    b, h, w = x.shape[:3]
    if gating == "none":
        idx = m.expert_index_for_counting
        p = check_inputs(x, m.weight, m.bias, m.lora_A, m.lora_B, m.conv_weight, m.conv_bias,
                         idx, m.scaling, m.scales, m.interpolation, None,
                         check_index_values=False)
        y = layer.conv_lora_linear(backend, p, x, m.weight, m.bias, m.lora_A, m.lora_B,
                                   m.conv_weight, m.conv_bias, idx, m.scaling, None)
        y.backward(dy)
        return
    p = check_inputs(x, m.weight, m.bias, m.lora_A, m.lora_B, m.conv_weight, m.conv_bias,
                     None, m.scaling, m.scales, m.interpolation, (h, w))
    units = b if gating == "map" else b * h * w
    noise = torch.randn((units, experts), dtype=torch.float32, device=GPU)
    y, _, aux, _ = layer.routed_conv_lora_linear(
        backend, p, as_map(x, p), m.weight, m.bias, m.lora_A, m.lora_B, m.conv_weight,
        m.conv_bias, m.router.w_gate, m.router.w_noise, noise, m.router.noise_epsilon,
        m.router.loss_coef, gating, m.scaling)
    torch.autograd.backward([y, aux], [dy, d_aux])


# The plans the table counts: the default (the measured winner, else the byte model's
# choice) and the two-source GEMMs for y and dx (plan.MEASURED_ONLY: a GPU measurement
# selects them), whose step the fewest launches make.
PLANS = {"default": {}, "two_source": {"CONVLORA_LAYER_FORWARD": "two_source",
                                       "CONVLORA_LAYER_DX": "two_source"}}


def table(backends=("cuda", "triton")) -> Tuple[List[str], Dict[Tuple[str, str, str], int]]:
    """Markdown rows and {(backend, gating, plan): launches} of the training step: every
    backend and router under the default plan, and token routing under the others."""
    from . import _switches

    rows = ["| backend | router | plan | launches | synchronisations | by kind |",
            "| --- | --- | --- | --- | --- | --- |"]
    totals = {}
    for plan_name, forced in PLANS.items():
        for backend in backends:
            for gating in ("token", "map", "none") if plan_name == "default" else ("token",):
                with _switches.forced(forced):
                    c = training_step(backend, gating)
                total = sum(c.launches.values())
                totals[(backend, gating, plan_name)] = total
                kinds = ", ".join(f"{k.split('.', 1)[1]} {v}" if v > 1 else k.split('.', 1)[1]
                                  for k, v in sorted(c.launches.items()))
                rows.append(f"| {backend} | {gating} | {plan_name} | {total} | {len(c.syncs)} "
                            f"| {kinds} |")
    return rows, totals


def write_design(path: str, rows: List[str]) -> None:
    s = SHAPE
    head = (f"ConvLoRALinear {s['c_in']} -> {s['c_out']}, r = {s['r']}, {s['experts']} "
            f"experts, ({s['batch']}, {s['height']}, {s['width']}) maps, bf16, "
            f"torch {torch.__version__}, commit {_design_tables.commit_of(path)} "
            f"(regenerate: `python -m convlora_kernels.launch_count --design docs/design.md`):")
    _design_tables.write_section(path, DESIGN_BEGIN, DESIGN_END, head, rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--design", metavar="FILE", default=None,
                   help="write the table into FILE (see above)")
    args = p.parse_args(argv)
    rows, _ = table()
    print("\n".join(rows))
    if args.design:
        write_design(args.design, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
