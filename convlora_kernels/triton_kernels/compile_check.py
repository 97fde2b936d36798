"""Compile the Triton kernels of this backend for a GPU without a GPU.

    python -m convlora_kernels.triton_kernels.compile_check [--arch 90] [--quick]

Triton lowers kernels to PTX and cubin with the ptxas it ships, so a machine without a
GPU can check what the interpreter cannot: that every kernel builds for the target
(layouts, tl.dot shapes, atomics) in every dtype, and with how many registers and spill
bytes. --quick builds the bfloat16 bilinear variant of each kernel with the first
autotuning candidate; the default builds bf16/fp16/fp32, both modes, both reduction
paths and every autotuning candidate. SMEM is the shared memory Triton allocates at
launch (its pipelines' buffers), SHARED the cubin's static part. TRITON_INTERPRET must be
unset.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from . import dense, launch, router

DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _pointer_types(dtype: str):
    """Triton signature types by argument name: inputs in the layer's dtype, the rest fp32."""
    native = {"z_ptr", "cw_ptr", "cb_ptr", "lb_ptr", "y_ptr", "dy_ptr", "dz_ptr", "f_ptr",
              "wg_ptr", "wn_ptr", "x_ptr", "w_ptr", "bias_ptr"}

    def types(name: str) -> str:
        if name == "perm_ptr":
            return "*i64"
        if name in ("bounds_ptr", "ntaps_ptr", "expert_ptr"):
            return "*i32"
        if name.endswith("_ptr"):
            return "*" + (dtype if name in native else "fp32")
        return "fp32" if name in ("scaling", "noise_epsilon") else "i32"
    return types


def variants(quick: bool):
    """(name, autotuned kernel or jit function, constexprs, dtype) to build."""
    dtypes = [torch.bfloat16] if quick else list(DTYPES)
    modes = [("bilinear", (1, 2, 3, 4))] if quick else [("bilinear", (1, 2, 3, 4)),
                                                        ("bicubic", tuple(range(1, 9)))]
    for dtype in dtypes:
        for mode, scales in modes:
            plan = launch.Plan(64, 64, 8, len(scales), scales, mode, dtype, torch.device("cpu"))
            common = plan.common()
            yield "stencil_fwd", launch._fwd[0], common, dtype
            yield "layer_forward", launch._layer_fwd[0], dict(
                common, BT=launch.LAYER_FWD_BT, HAS_BIAS=True, SAVE_U=True), dtype
            for atomic in ([True] if quick else [True, False]):
                yield "stencil_grad", launch._grad[0], dict(common, ATOMIC=atomic), dtype
            for atomic in (True, False):
                yield ("stencil_scatter", launch._scatter[0], dict(common, ATOMIC=atomic),
                       dtype)
        for atomic in (True, False):
            yield "dy_pass", launch._dy_pass[0], dict(BT=launch.DY_BT, RP=16, NEED_DB=True,
                                                   NEED_DBIAS=True, ATOMIC=atomic,
                                                   PREC=plan.prec), dtype
        for noisy in (True, False):
            for rp, np_ in ([(8, 8)] if quick else [(8, 8), (64, 16)]):
                yield "route", router.route_kernel, dict(
                    BU=router.block_units(rp, np_), RP=rp, NP=np_, NOISY=noisy), dtype
        yield "gather_dz", dense.gather_dz_kernel, dict(BT=launch.GATHER_BT, RP=16,
                                                        HALO=1), dtype
    yield "expert_sum", dense.expert_sum_kernel, dict(BT=32, NEXP_P=8, BLOCK=256), \
        torch.float32


def _usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia",
                        "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                             text=True).stdout
    fields = [w for line in out.splitlines() if "REG:" in line for w in line.split()]
    return " ".join(w for w in fields if w.startswith(("REG:", "STACK:", "SHARED:")))


def build(kernel, constexprs, dtype, arch: int, quick: bool):
    """Compile one kernel for every autotuning candidate (the first with quick)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    autotuned = isinstance(kernel, triton.runtime.Autotuner)
    configs = kernel.configs if autotuned else [triton.Config({}, num_warps=4)]
    fn = kernel.fn if autotuned else kernel
    types = _pointer_types(DTYPES[dtype])
    for cfg in configs[:1] if quick else configs:
        consts = dict(constexprs, **cfg.kwargs)
        sig = {n: "constexpr" if n in consts else types(n) for n in fn.arg_names}
        missing = [p.name for p in fn.params if p.is_constexpr and p.name not in consts]
        if missing:
            raise ValueError(f"{fn.__name__}: no value for constexpr {missing}")
        t = time.time()
        out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts),
                             target=GPUTarget("cuda", arch, 32),
                             options=dict(num_warps=cfg.num_warps))
        # SHARED is the cubin's static shared memory; SMEM what Triton allocates at launch
        yield cfg, time.time() - t, f'{_usage(out.asm["cubin"])} SMEM:{out.metadata.shared}'



def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if launch.INTERPRETED:
        print("TRITON_INTERPRET=1 is set: unset it to compile for the GPU", file=sys.stderr)
        return 2
    for name, kernel, consts, dtype in variants(args.quick):
        flags = " ".join(f"{k}={consts[k]}" for k in ("NBP", "ATOMIC") if k in consts)
        for cfg, secs, usage in build(kernel, consts, dtype, args.arch, args.quick):
            print(f"sm_{args.arch} {name:16s} {DTYPES[dtype]:5s} {flags:18s} "
                  f"warps={cfg.num_warps} {cfg.kwargs} {usage} ({secs:.1f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
