"""The stencil kernels alone next to the whole layer, in one interleaved run.

    python benchmarks/stencil_time.py                  # CPU, fp32, the CPU target shapes
    python benchmarks/stencil_time.py --device cuda    # bf16, SAM's ViT-B shapes, CUDA events

Per shape: torch.ops.convlora.stencil_fwd and stencil_bwd called directly (the tap-table
prep and, for the backward, the weight-gradient reduce included; for the first shape in
bicubic too, and its composed-weight forward, CONVLORA_STENCIL_MMA), then the
layer's forward+backward on the fused backend next to plain eager LoRA, the eager
Conv-LoRA reference and the frozen linear. On a GPU the stencil rows are
in microseconds with the card named; everything else is a ratio. For the first shape the
stencil ops are also timed under each shared-memory budget (CONVLORA_STENCIL_SMEM_KB: what
the kernels stage in shared memory against how many blocks fit an SM), the choice a GPU
run should settle, and the layer under the switches LAYER_SWITCHES names (the prep
pass on a second stream, the composed-weight stencil, both). On a GPU the Triton stencil
is timed alone too: its backward both split and merged (CONVLORA_TRITON_BACKWARD), and every kernel with its z cells held in registers
and loaded by each conv row (CONVLORA_TRITON_Z_CELLS), choices for a GPU run to settle.
The last line, "RESULT: ...", is what benchmarks/gpu_check.sh records for the target
shape.
"""

from __future__ import annotations

import argparse
import sys

import torch

from convlora_kernels import _switches
from convlora_kernels.backends.extension import INTERPOLATION_CODES

from benchlib import common, measure

SHAPES = {
    # name: (batch, H, W, C, r, gating, interpolation)
    "cuda": [("global-4x64x64-C768-r8", 4, 64, 64, 768, 8, "token", "bilinear"),
             ("window-100x14x14-C768-r8", 100, 14, 14, 768, 8, "token", "bilinear"),
             ("global-4x64x64-C768-r3-compat", 4, 64, 64, 768, 3, "map", "bicubic")],
    "cpu": [("cpu-1x32x32-C768-r8", 1, 32, 32, 768, 8, "token", "bilinear"),
            ("cpu-1x64x64-C768-r8", 1, 64, 64, 768, 8, "token", "bilinear"),
            ("cpu-25x14x14-C768-r3-compat", 25, 14, 14, 768, 3, "map", "bicubic")],
}


def shapes(kind: str):
    """(name, common.Shape, interpolation) of SHAPES[kind] ("cuda" or "cpu")."""
    for name, b, h, w, c, r, gating, interp in SHAPES[kind]:
        yield name, common.Shape(name, b, h, w, c, r, gating=gating, interpolation=interp), \
            interp


def _stencil_fns(inp, interpolation, per_token=False, suffix="", smem_kb=0, mma=False):
    """The stencil ops as the layer calls them (for map routing: the map programs), or with
    per_token the per-token programs whatever the routing; smem_kb: a tile block's
    shared-memory budget (0: the default); mma: the composed-weight programs (tf32 MMA; the
    ops' mma argument, CONVLORA_STENCIL_MMA)."""
    from convlora_kernels.backends.extension import stencil_index

    z = torch.nn.functional.linear(inp["x"], inp["lora_A"]).reshape(-1, inp["lora_A"].shape[0])
    b, h, w = inp["expert_index"].shape
    idx = inp["expert_index"].reshape(-1).to(torch.int32) if per_token \
        else stencil_index(inp["expert_index"])
    args = dict(idx=idx,
                cw=inp["conv_weight"].detach(), cb=inp["conv_bias"].detach(),
                scales=list(range(1, inp["conv_weight"].shape[0] + 1)),
                mode=INTERPOLATION_CODES[interpolation], h=h, w=w)
    z = z.detach().contiguous()

    def fwd(_):  # as in training: the pre-activations are saved for the backward
        return torch.ops.convlora.stencil_fwd(z, args["idx"], args["cw"], args["cb"],
                                              args["scales"], args["mode"], h, w, True,
                                              smem_kb, None, mma)

    du = torch.randn_like(z)
    _, pre = torch.ops.convlora.stencil_fwd(z, args["idx"], args["cw"], args["cb"],
                                            args["scales"], args["mode"], h, w, True, smem_kb)

    def bwd(_):
        return torch.ops.convlora.stencil_bwd(du, z, pre, args["idx"], args["cw"], args["cb"],
                                              args["scales"], args["mode"], h, w, smem_kb,
                                              None, mma)

    return {"stencil-fwd" + suffix: fwd, "stencil-bwd" + suffix: bwd}


def _triton_stencil_fns(inp, interpolation, defaults=False):
    """The Triton stencil alone (launch.stencil_forward and stencil_backward under each of
    launch.Z_CELLS and launch.BACKWARDS, the choices a GPU run should settle; with defaults,
    once each under the layer's default switches); {} where it cannot run."""
    if not inp["x"].is_cuda:
        return {}
    try:
        from convlora_kernels.triton_kernels import launch
    except ImportError:
        return {}
    z = torch.nn.functional.linear(inp["x"], inp["lora_A"]).reshape(-1, inp["lora_A"].shape[0])
    z = z.detach().contiguous()
    b, h, w = inp["expert_index"].shape
    cw, cb = inp["conv_weight"].detach(), inp["conv_bias"].detach()
    scales = list(range(1, cw.shape[0] + 1))
    idx = inp["expert_index"].reshape(-1)
    du = torch.randn(z.shape, device=z.device)
    _, perm, bounds = launch.stencil_forward(z, idx, cw, cb, scales, interpolation, h, w)

    def under(env, fn):
        def run(_):
            with _switches.forced(env):
                return fn()
        return run

    def fwd():
        return launch.stencil_forward(z, idx, cw, cb, scales, interpolation, h, w)

    def bwd():
        return launch.stencil_backward(du, z, perm, bounds, cw, cb, scales, interpolation,
                                       h, w)

    if defaults:
        return {"triton-stencil-fwd": lambda _: fwd(), "triton-stencil-bwd": lambda _: bwd()}
    fns = {f"triton-stencil-fwd[{cells}]": under({launch.Z_CELLS_ENV: cells}, fwd)
           for cells in launch.Z_CELLS}
    for cells in launch.Z_CELLS:
        for backward in launch.BACKWARDS:
            fns[f"triton-stencil-bwd[{backward}, {cells}]"] = under(
                {launch.BACKWARD_ENV: backward, launch.Z_CELLS_ENV: cells}, bwd)
    return fns


SMEM_BUDGETS_KB = (48, 80, 96)  # the backward at r = 8: all global, weights staged, all staged


def _budget_fns(inp, interpolation):
    """The stencil ops under each shared-memory budget (the ops' smem_kb, which the layer
    takes from CONVLORA_STENCIL_SMEM_KB): what is staged in shared memory against
    occupancy."""
    return {f"{name} @ {kb} KB": fn for kb in SMEM_BUDGETS_KB
            for name, fn in _stencil_fns(inp, interpolation, smem_kb=kb).items()}


def _grid_text(r, n, interpolation, kb):
    out = []
    for backward in (False, True):
        p = torch.ops.convlora.stencil_grid(r, n, INTERPOLATION_CODES[interpolation], backward,
                                            kb)
        out.append(f"{'bwd' if backward else 'fwd'} {p[0] // 1024} KB"
                   f"{' w' if p[1] else ''}{' dw' if p[2] else ''}")
    return ", ".join(out)


def _layer(backend, interpolation, switches=None):
    """The layer's call on an input; switches: internal switches forced around it."""
    from convlora_kernels import conv_lora_linear

    def run(inp):
        with _switches.forced(switches or {}):
            return conv_lora_linear(*common._conv_lora_args(inp), backend=backend,
                                    interpolation=interpolation, check_expert_index=False)
    return run


# The layer under the switches only a GPU run can settle, on the target shape: the prep pass
# on a second stream beside the down-projection (CONVLORA_PREP_STREAM), with the multiply-add
# stencil and with the composed-weight one (CONVLORA_STENCIL_MMA).
LAYER_SWITCHES = {
    " prep-stream": {"CONVLORA_PREP_STREAM": "1"},
    " mma": {"CONVLORA_STENCIL_MMA": "1"},
    " mma prep-stream": {"CONVLORA_STENCIL_MMA": "1", "CONVLORA_PREP_STREAM": "1"},
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=None, help="default: 50 on CUDA, 7 on CPU")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    repeats = args.repeats or (50 if gpu else 7)
    warm = 5 if gpu else 1
    backend = "cuda" if gpu else "cpu"
    card = torch.cuda.get_device_name(device) if gpu else "CPU"
    print(f"{card}, {dtype}, torch {torch.__version__}")
    result = None
    for name, shape, interp in shapes("cuda" if gpu else "cpu"):
        gating = shape.gating
        layer_fns = {f"conv-lora[{backend}]": _layer(backend, interp),
                     common.PLAIN_LORA: common.plain_lora,
                     common.REFERENCE: _layer("reference", interp),
                     common.LINEAR: common.frozen_linear}
        if result is None:  # (on the CPU the same calls: the switches' paths run there too)
            layer_fns.update({f"conv-lora[{backend}]{k}": _layer(backend, interp, v)
                              for k, v in LAYER_SWITCHES.items()})
        inputs = [common.make_inputs(shape, device, dtype, seed=s) for s in range(2)]
        sfns = _stencil_fns(inputs[0], interp)
        if gating == "map":  # the map programs next to the per-token ones (a GPU's choice)
            sfns.update(_stencil_fns(inputs[0], interp, per_token=True, suffix=" per-token"))
        if result is None and interp == "bilinear":
            # the target's per-token programs in bicubic too, the costliest the cost model
            # counts (benchmarks/cost_model.py, "global token r8 bicubic")
            sfns.update(_stencil_fns(inputs[0], "bicubic", suffix=" bicubic"))
            # and its composed-weight forward (CONVLORA_STENCIL_MMA=1)
            sfns.update(_stencil_fns(inputs[0], interp, suffix=" mma", mma=True))
        st = measure.time_group(sfns, inputs, False, {k: warm for k in sfns}, repeats)
        lin_fwd = measure.time_group({common.LINEAR: common.frozen_linear}, inputs, False,
                                     {common.LINEAR: warm}, repeats)[common.LINEAR]
        layer = measure.time_group(layer_fns, inputs, True, {k: warm for k in layer_fns},
                                   repeats)
        med = {k: v.get("median_ms") for k, v in layer.items()}
        print(f"\n{name} ({gating} routing, {interp})")
        for k in sfns:
            ms = st[k].get("median_ms")
            if ms is None:
                print(f"  {k:24s} error: {st[k]['error']}")
            elif gpu:
                print(f"  {k:24s} {ms * 1e3:9.1f} us")
            else:
                print(f"  {k:24s} {ms / lin_fwd['median_ms']:9.3f} x the frozen linear's forward")
        tfns = _triton_stencil_fns(inputs[0], interp)
        if tfns:  # warm-up runs autotune (triton.autotune times its candidates once)
            tt = measure.time_group(tfns, inputs, False, {k: warm for k in tfns}, repeats)
            for k in tfns:
                ms = tt[k].get("median_ms")
                print(f"  {k:24s} " + (f"error: {tt[k]['error']}" if ms is None
                                       else f"{ms * 1e3:9.1f} us"))
        fused = med[f"conv-lora[{backend}]"]
        for k, ms in med.items():
            if ms is None:
                print(f"  {k:31s} fwd+bwd error: {layer[k]['error']}")
                continue
            print(f"  {k:31s} fwd+bwd {ms / med[common.PLAIN_LORA]:6.3f} x plain LoRA  "
                  f"{ms / med[common.LINEAR]:6.3f} x frozen linear"
                  + (f"  ({med[common.REFERENCE] / ms:5.1f} x faster than the reference)"
                     if k != common.REFERENCE else ""))
        if result is None:  # the target shape: the shared-memory budgets side by side
            fns = _budget_fns(inputs[0], interp)
            bt = measure.time_group(fns, inputs, False, {k: warm for k in fns}, repeats)
            print("  shared-memory budget (CONVLORA_STENCIL_SMEM_KB; w: weights staged, "
                  "dw: weight-gradient sums staged):")
            for kb in SMEM_BUDGETS_KB:
                ms = [bt[f"{k} @ {kb} KB"].get("median_ms") for k in ("stencil-fwd",
                                                                      "stencil-bwd")]
                shown = [f"{m * 1e3:.1f} us" if gpu else f"{m / lin_fwd['median_ms']:.3f}x"
                         for m in ms if m is not None]
                print(f"    {kb:3d} KB ({_grid_text(shape.rank, 8, interp, kb)}): fwd, bwd "
                      f"{' / '.join(shown)}")
        if result is None and fused is not None and st["stencil-fwd"].get("median_ms"):
            if gpu:
                result = (f"{name}: stencil fwd {st['stencil-fwd']['median_ms'] * 1e3:.1f} us, "
                          f"bwd {st['stencil-bwd']['median_ms'] * 1e3:.1f} us; ")
            else:
                result = f"{name}: "
            result += (f"layer fwd+bwd {fused / med[common.PLAIN_LORA]:.2f}x plain LoRA, "
                       f"{med[common.REFERENCE] / fused:.1f}x faster than the eager reference")
    print(f"\nRESULT: {result or 'no fused timing'}")
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
