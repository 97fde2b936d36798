"""Compile the Triton kernels of this backend for a GPU without a GPU.

    python -m convlora_kernels.triton_kernels.compile_check [--arch 90] [--quick]
        [--dtypes bf16,fp16,fp32] [--interpolations bilinear,bicubic] [--ranks 8,16] [--first]
        [--kernels stencil_scatter,...] [--z-cells held,loaded]
    python -m convlora_kernels.triton_kernels.compile_check --design docs/design.md

Triton lowers kernels to PTX and cubin with the ptxas it ships, so a machine without a
GPU can check what the interpreter cannot: that every kernel builds for the target
(layouts, tl.dot shapes, atomics) in every dtype, and with how many registers and spill
bytes.

What is compiled is what runs: the layer's own forward and backward (layer.py, every
forward and dy candidate, both stencil backwards, atomic and deterministic reductions) and
the router are called
on CPU tensors of a SAM-like shape (a (1, 32, 32) map, C_in = 64, C_out = 192: sizes
divisible by 16 as SAM's are), with every kernel launch recorded instead of run. Each
recorded launch is compiled as Triton's JIT would compile it at that launch: the same
argument dtypes and the same specialisation (16-divisible integers and 16-byte aligned
pointers marked as such). Autotuned kernels are compiled for each candidate (the first
alone with --first).

Per compiled variant: REG registers, STACK bytes of stack (spills), SHARED the cubin's
static shared memory and SMEM the shared memory Triton allocates at launch (its
pipelines' buffers). --quick: bf16, bilinear, r = 8, first candidates. --z-cells compiles
the stencil kernels with their z cells held in registers, loaded by each conv row, or both
(launch.Z_CELLS_ENV, a choice for a GPU to settle; the HOLD flag of each line), instead of
what the layer picks by their size. TRITON_INTERPRET must be unset.

--design FILE writes the table of what runs by default (bf16, sm_90, both interpolations,
r = 8 and 16, the first candidates) into FILE between DESIGN_BEGIN and DESIGN_END, with the
Triton release and the commit it came from: the figures the code's comments argue from
live there, and tests/test_triton.py fails when the kernels no longer compile to them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import subprocess
import sys
import tempfile
import time

import torch

from .. import _design_tables, _switches
from . import launch, sort

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCALES = {"bilinear": tuple(range(1, 9)), "bicubic": tuple(range(1, 9))}  # per interpolation
SHAPE = dict(batch=1, height=32, width=32, c_in=64, c_out=192)
DESIGN_BEGIN = "<!-- compile_check --design: begin -->"
DESIGN_END = "<!-- compile_check --design: end -->"
DESIGN_ARGS = dict(arch=90, dtypes="bf16", interpolations="bilinear,bicubic", ranks="8,16",
                   first=True, kernels="")


def _autotuners():
    """The JIT function of each autotuned kernel -> its full autotuners (every candidate;
    one kernel can have several, say one per dtype's tiles)."""
    out = {}
    for pair in (launch._layer_fwd, launch._layer_fwd_f32, launch._dy_pass, launch._dy_pass_f32,
                 launch._two_source, launch._two_source_f32):
        out.setdefault(pair[0].fn, []).append(pair[0])
    return out


def _tuner_of(tuners, kwargs):
    """The autotuner a launch recorded with its first candidate came from: the one whose
    first configuration the launch's arguments hold."""
    for tuner in tuners:
        if all(kwargs.get(k) == v for k, v in tuner.configs[0].kwargs.items()):
            return tuner
    return tuners[0]


@contextlib.contextmanager
def recorded_launches():
    """Within: every Triton launch is appended to the yielded list as (jit function, args,
    kwargs) instead of running (so CPU tensors may be passed); autotuning is off. The
    token sort's outputs are filled by torch, for the host code that indexes with them."""
    from triton.runtime.jit import JITFunction

    calls = []
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        calls.append((self, args, kwargs))
        if self is sort.expert_order_kernel:  # the host code after it indexes with perm
            idx, _, perm, bounds, _, n_exp = args[:6]
            keys, order = torch.sort(idx.to(torch.int32), stable=True)
            perm.copy_(order)
            bounds.copy_(torch.searchsorted(keys, torch.arange(n_exp + 1, dtype=torch.int32)))

    JITFunction.run = record
    try:
        with _switches.forced({launch.AUTOTUNE_ENV: "0"}):
            yield calls
    finally:
        JITFunction.run = run


def layer_launches(dtype: torch.dtype, interpolation: str, rank: int):
    """The launches of the layer (every candidate, both reduction paths, with and without
    a bias, u kept or not) and the router at SHAPE in ``dtype``, recorded on CPU
    tensors."""
    from .. import layer, plan
    from . import router

    b, h, w, c_in, c_out = (SHAPE[k] for k in ("batch", "height", "width", "c_in", "c_out"))
    scales = SCALES[interpolation]
    n_exp, n_tok = len(scales), b * h * w
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=g).to(dt)

    x2, weight, bias = rnd(n_tok, c_in), rnd(c_out, c_in), rnd(c_out)
    lora_a, lora_b = rnd(rank, c_in), rnd(c_out, rank)
    cw, cb = rnd(n_exp, rank, rank, 3, 3), rnd(n_exp, rank)
    idx = torch.randint(0, n_exp, (n_tok,), generator=g)
    dy = rnd(n_tok, c_out)
    geometry = (list(scales), interpolation, h, w)
    with recorded_launches() as calls:
        # every forward candidate with and without a bias, keeping u for a backward or not
        for forward_plan, with_bias, save in itertools.product(
                plan.FORWARD_CANDIDATES, (True, False), (True, False)):
            if plan.unavailable(forward_plan, "triton") is None:
                layer._forward_impl(x2, weight, bias if with_bias else None, lora_a, lora_b,
                                    cw, cb, idx, None, 1.0, *geometry, "triton",
                                    forward_plan, save)
        z2 = x2 @ lora_a.t()
        u, perm, bounds = launch.stencil_forward(z2, idx, cw, cb, *geometry)
        was = torch.are_deterministic_algorithms_enabled()
        try:
            for det, backward in itertools.product((False, True), launch.BACKWARDS):
                torch.use_deterministic_algorithms(det)
                with _switches.forced({launch.BACKWARD_ENV: backward}):
                    # the bias trained or frozen (LoRA's usual case: no dL/dbias)
                    for dy_plan, dx_plan, need_bias in itertools.product(
                            plan.DY_CANDIDATES, plan.DX_CANDIDATES, (True, False)):
                        needs = [True, True, need_bias, True, True, True, True, False]
                        layer._backward_impl(dy, x2, weight, lora_a, lora_b, cw, cb, idx, z2,
                                             u, perm, bounds, False, 1.0, *geometry, "triton",
                                             dy_plan, dx_plan, needs)
        finally:
            torch.use_deterministic_algorithms(was)
        f = rnd(n_tok, rank)
        wg, wn = rnd(rank, n_exp, dt=torch.float32), rnd(rank, n_exp, dt=torch.float32)
        for noise in (torch.randn(n_tok, n_exp, generator=g), None):
            router.route(f, wg, wn, noise, 1e-2)
            router.route(f, wg, wn, noise, 1e-2, loss_coef=1e-2)  # the aux loss too
        noise = torch.randn(n_tok, n_exp, generator=g)
        load = torch.rand(n_exp, generator=g)
        router.route_backward(torch.randn(n_exp, generator=g), f, wg, wn, noise, 1e-2)
        router.route_backward(None, f, wg, wn, noise, 1e-2,
                              aux=(load, torch.ones(()), 1e-2))
        router.route_backward(None, f, wg, wn, noise, 1e-2,  # dL/dz added into dz
                              aux=(load, torch.ones(()), 1e-2), accumulate=rnd(n_tok, rank))
    return calls


def compile_launch(fn, args, kwargs, arch: int):
    """Compile one recorded launch as the JIT would for a GPU of compute capability
    ``arch``: the same binder and specialisation, then triton.compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound,
                                                          specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                          options=options.__dict__)


def variants(launches, first: bool):
    """(kernel name, jit function, args, kwargs, config label) per distinct compile."""
    tuners = _autotuners()
    seen = set()
    for fn, args, kwargs in launches:
        tuner = _tuner_of(tuners[fn], kwargs) if fn in tuners else None
        configs = [None] if tuner is None else tuner.configs[:1] if first else tuner.configs
        for cfg in configs:
            kw = dict(kwargs)
            label = {}
            if cfg is not None:
                kw.update(cfg.all_kwargs())
                label = dict(cfg.kwargs)
            key = (fn.__name__, tuple(_arg_key(a) for a in args), repr(sorted(kw.items())))
            if key in seen:
                continue
            seen.add(key)
            yield fn.__name__.replace("_kernel", ""), fn, args, kw, label


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (str(a.dtype), a.data_ptr() % 16 == 0)
    if isinstance(a, int):
        return ("int", a % 16 == 0, a == 1)
    return (type(a).__name__,)


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


# The specialisations a variant's line names (besides dtype, mode, rank and warps).
FLAGS = ("NBP", "ATOMIC", "NOISY", "AUX", "FROM_AUX", "ACCUM", "HAS_BIAS", "SAVE_U", "NEED_DBIAS",
         "HOLD")


def _flags(kwargs) -> str:
    return " ".join(f"{k}={kwargs[k]}" for k in FLAGS if k in kwargs)


def z_cell_layouts(z_cells: str) -> list:
    """--z-cells' value as layouts to force ([None]: the layer's choice); ValueError names
    what it does not know."""
    cells = z_cells.split(",") if z_cells else [None]
    bad = [c for c in cells if c is not None and c not in launch.Z_CELLS]
    if bad:
        raise ValueError(f"--z-cells: expected some of {launch.Z_CELLS}, got {','.join(bad)}")
    return cells


def compiled(arch: int, dtypes: str, interpolations: str, ranks: str, first: bool,
             kernels: str, z_cells: str = ""):
    """One dict per compiled variant: kernel, dtype, mode, r, flags, warps, config, REG,
    STACK, SHARED (the cubin's static shared memory, bytes), SMEM (allocated at launch),
    seconds. z_cells: "" (the layer's choice) or some of launch.Z_CELLS, comma-separated."""
    cells = z_cell_layouts(z_cells)
    for dname, interp, rank, cell in itertools.product(
            dtypes.split(","), interpolations.split(","),
            (int(r) for r in ranks.split(",")), cells):
        with (contextlib.nullcontext() if cell is None
              else _switches.forced({launch.Z_CELLS_ENV: cell})):
            launches = layer_launches(DTYPES[dname], interp, rank)
        for name, fn, a, kw, label in variants(launches, first):
            if kernels and name not in kernels.split(","):
                continue
            t = time.time()
            out = compile_launch(fn, a, kw, arch)
            text = _usage(out.asm["cubin"])
            usage = dict(w.split(":") for w in text.split())
            yield dict(kernel=name, dtype=dname, mode=interp, r=rank, flags=_flags(kw),
                       warps=kw.get("num_warps", 4), config=label, usage=text,
                       REG=int(usage.get("REG", -1)), STACK=int(usage.get("STACK", -1)),
                       SHARED=int(usage.get("SHARED", -1)), SMEM=out.metadata.shared,
                       seconds=time.time() - t)


def line(arch: int, v: dict) -> str:
    """The printed line of one variant (tests/test_triton.py parses it)."""
    return (f"sm_{arch} {v['kernel']:16s} {v['dtype']:5s} {v['mode']:8s} r={v['r']:<3d} "
            f"{v['flags']:22s} warps={v['warps']} {v['config']} {v['usage']} SMEM:{v['SMEM']} "
            f"({v['seconds']:.1f}s)")


def design_rows(rows) -> list:
    """The markdown rows of --design's table."""
    out = ["| kernel | mode | r | flags | warps | registers | stack (B) | shared memory at launch (B) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for v in rows:
        out.append(f"| {v['kernel']} | {v['mode']} | {v['r']} | {v['flags'] or '-'} | "
                   f"{v['warps']} | {v['REG']} | {v['STACK']} | {v['SMEM']} |")
    return out


def write_design(path: str, rows) -> None:
    """Replaces the text between DESIGN_BEGIN and DESIGN_END in ``path`` with the table."""
    import triton

    a = DESIGN_ARGS
    head = (f"sm_{a['arch']}, {a['dtypes']}, scales 1..8, the first autotuning candidate, "
            f"Triton {triton.__version__}, commit {_design_tables.commit_of(path)} (regenerate: "
            f"`python -m convlora_kernels.triton_kernels.compile_check --design "
            f"docs/design.md`):")
    _design_tables.write_section(path, DESIGN_BEGIN, DESIGN_END, head, design_rows(rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 or 90")
    p.add_argument("--quick", action="store_true",
                   help="bf16, bilinear, r = 8, first candidates")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--interpolations", default="bilinear,bicubic")
    p.add_argument("--ranks", default="8,16,32,64")
    p.add_argument("--first", action="store_true", help="first autotuning candidate only")
    p.add_argument("--kernels", default="",
                   help="only these kernels, e.g. stencil_scatter,stencil_fwd (default: all)")
    p.add_argument("--z-cells", default="",
                   help="the stencil's z cells held, loaded or both (held,loaded), not the "
                        "layer's choice")
    p.add_argument("--design", metavar="FILE", default=None,
                   help="write the default kernels' table into FILE (see above)")
    args = p.parse_args(argv)
    if launch.INTERPRETED:
        print("TRITON_INTERPRET=1 is set: unset it to compile for the GPU", file=sys.stderr)
        return 2
    try:
        z_cell_layouts(args.z_cells)
    except ValueError as e:
        p.error(str(e))
    if args.quick:
        args.dtypes, args.interpolations, args.ranks, args.first = "bf16", "bilinear", "8", True
    settings = DESIGN_ARGS if args.design else dict(
        arch=args.arch, dtypes=args.dtypes, interpolations=args.interpolations,
        ranks=args.ranks, first=args.first, kernels=args.kernels, z_cells=args.z_cells)
    rows = []
    for v in compiled(**settings):
        print(line(settings["arch"], v), flush=True)
        rows.append(v)
    if args.design:
        write_design(args.design, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
