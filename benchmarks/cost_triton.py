"""What the Triton stencil kernels cost, counted on the CPU from their SASS.

    python benchmarks/cost_triton.py                        # the table
    python benchmarks/cost_triton.py --loops                # and each kernel's loops
    python benchmarks/cost_triton.py --design docs/design.md   # rewrite the table there
    python benchmarks/cost_triton.py --json cost.json

No GPU is needed (TRITON_INTERPRET must be unset). Each stencil kernel the layer launches
at the case's dtype, interpolation and rank is compiled for sm_90 as the JIT compiles it
(triton_kernels/compile_check.py: the same launches, specialisation and first autotuning
candidate) and read back with cuobjdump -sass. Its loops are the backward branches of the
SASS (Triton unrolls tl.static_range itself and LLVM unrolls loops of constant count, so
what is left are the loops over an expert's conv outputs and channel chunks); each kernel
names its loops' trip counts, in the order their code starts, as functions of the
expert's down taps per axis (TRIPS below; a kernel whose SASS has another loop structure
is refused, not guessed). A program's warp instructions are then

    straight-line code + sum over loops of (loop body, nested loops excluded) x trips

per warp, times its warps; every SASS instruction counts as one issue slot, predicated
or not. A case's programs are its experts' tiles (ceil(tokens of the expert / BT) each,
token routing spreads the tokens evenly over the experts). The estimate is the larger of

    issue   warp instructions / (SMs x 4 per clock x clock)
    dram    bytes / DRAM bandwidth (z and u, the sort's permutation, g when written)

(the assumptions of benchmarks/cost_model.py's H100). It leaves out latency (the loops'
global loads of the z neighbourhood and tables hit L1 or L2) and the tail of the last
wave: an estimate from counting, not a measurement; gpu_check.sh prints it beside the
measured times so the model can be corrected. The "H100-fitted" column applies the rates
the cuda stencil kernels ran at on the first H100 run (cost_model.py's fitted_chain_clocks
per instruction of a warp's path, a wave of resident programs at a time, or
fitted_issue_per_clock of the SM's instructions): what the count would mean if the
Triton programs, two or three of four warps an SM at these registers, ran as latency-bound
as those did. No Triton kernel has been timed alone yet: kernel_profile.py's Triton rows
will tell.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from cost_model import H100  # noqa: E402

DESIGN_BEGIN = "<!-- cost_triton --design: begin -->"
DESIGN_END = "<!-- cost_triton --design: end -->"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    mode: str                   # interpolation
    shape: Tuple[int, int, int]  # (B, H, W)
    rank: int
    dtype: str = "bf16"
    experts: int = 8

    @property
    def scales(self) -> List[int]:
        return list(range(1, self.experts + 1))


CASES = [
    # ViT-B global attention at 1024 x 1024, token routing: the target shape
    Case("global token r8", "bilinear", (4, 64, 64), 8),
    Case("global token r16", "bilinear", (4, 64, 64), 16),
    Case("global token r8 bicubic", "bicubic", (4, 64, 64), 8),
    # ViT-B windowed attention: 25 windows of 14 x 14 per image
    Case("windows token r8", "bilinear", (100, 14, 14), 8),
    # the authors' setting (map routing, bicubic, r = 3) on the windows: the triton backend
    # runs the token programs, a map's tokens in its expert's tiles (as even as here when
    # 100 maps draw from 8 experts)
    Case("authors r3 bicubic", "bicubic", (100, 14, 14), 3),
]

# Budgets of the estimate (bf16, H100), microseconds: the stencil forward, and its
# backward (grad + scatter, all launches).
BUDGETS_US = {"global token r8": (12.0, 30.0)}
# Estimates above BUDGETS_US today ("case/pass" for the plain count, "case/pass fitted"
# for the H100-fitted one: us not to exceed), held by tests/test_triton.py: lower a value
# when a kernel improves, drop it once under budget.
OVER_BUDGET_US: Dict[str, float] = {
    "global token r8/bwd fitted": 32.6,  # Triton 3.8: 32.2, 3.6: 32.5
}

# The stencil kernels each pass launches: the forward, the split backward
# (launch.BACKWARD_ENV=split) and the merged one (the default: the first H100 run timed
# it 8-31 % faster).
PASSES = {"fwd": ("stencil_fwd",), "bwd": ("stencil_grad", "stencil_scatter"),
          "bwd merged": ("stencil_bwd",)}


def _columns(t, hold: Optional[bool] = None) -> List[int]:
    """The column loops of the three conv rows inside a conv output's loop where the z cells
    are loaded (stencil.conv_row_taps), none where they are held (``hold``, else the
    tiling's choice for the backward)."""
    return [] if (t.hold if hold is None else hold) else [2 * t.halo + 1] * 3


def _split_hold(t) -> bool:
    """The split backward's cells with atomic sums (the case launches taken here)."""
    from convlora_kernels.triton_kernels import launch

    return launch.backward_plan(t, True)[1]


# kernel -> (expert's taps per axis, launch.Tiling) -> the trip count of each SASS loop,
# in the order the loops' code starts (an enclosing loop before the loops inside it), each
# per run of its enclosing loop.
TRIPS: Dict[str, Callable] = {
    "stencil_fwd": lambda nt, t: [nt * nt] + _columns(t, t.hold_fwd),
    "stencil_grad": lambda nt, t: [nt * nt] + _columns(t, _split_hold(t)),
    # dL/dW: a loop over the conv outputs; dL/dz: the channel chunks, each a loop over the
    # neighbourhood's row passes, each a loop over the conv outputs
    "stencil_scatter": lambda nt, t: [nt * nt] + _columns(t, _split_hold(t))
    + _dz_loops(nt, t),
    # g, dL/dconv_bias and dL/dW: one loop over the conv outputs with the taps built once
    # (launch.merged_taps_once), else the grad's loop then the dL/dW one; then the
    # scatter's dL/dz loops
    "stencil_bwd": lambda nt, t: ([nt * nt] + _columns(t)) * (1 if t.taps_once else 2)
    + _dz_loops(nt, t),
}


def _dz_loops(nt: int, t) -> List[int]:
    """dL/dz (stencil.dz_phase): the channel chunks, each a loop over the neighbourhood's
    row passes, each a loop over the conv outputs."""
    return [math.ceil(t.rank / t.rc)] + _row_passes(t) + [nt * nt]


def _row_passes(t) -> List[int]:
    """The scatter's passes over the neighbourhood's rows, a loop when there are several
    (its bounds are constants: one pass compiles to no loop)."""
    n = math.ceil((2 * t.halo + 1) / t.ah)
    return [n] if n > 1 else []


# --- SASS -----------------------------------------------------------------------------

_INSTR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);")
_BRANCH = re.compile(r"\bBRA\b[^;]*?(0x[0-9a-f]+)")


def parse_sass(text: str) -> List[Tuple[int, str]]:
    """(address, instruction) of every instruction of the one kernel in ``text``."""
    return [(int(m.group(1), 16), m.group(2).strip())
            for m in map(_INSTR.match, text.splitlines()) if m]


def _detour(instrs: Sequence[Tuple[int, str]], i: int, target: int) -> bool:
    """Whether the unconditional branch instrs[i] back to ``target`` ends a detour, not a
    loop: a block placed out of line (after an unconditional branch or EXIT) that a branch
    from before ``target`` enters, and that returns to ``target`` (ptxas puts a shuffle's
    fallback for a warp not converged there: WARPSYNC.COLLECTIVE). A loop's blocks are
    entered at its start."""
    if instrs[i][1].startswith("@"):
        return False
    j = i - 1
    while j >= 0 and instrs[j][0] > target and not _ends_block(instrs[j][1]):
        j -= 1
    if j < 0 or instrs[j][0] <= target:
        return False
    block = (instrs[j][0], instrs[i][0])  # the out-of-line block: (after its start, its end]
    return any(addr < target and (m := _BRANCH.search(text))
               and block[0] < int(m.group(1), 16) <= block[1] for addr, text in instrs)


def _ends_block(text: str) -> bool:
    """An unconditional BRA or EXIT: what follows is reached only by a branch."""
    return not text.startswith("@") and (text.startswith("BRA") or text.startswith("EXIT"))


def loops(instrs: Sequence[Tuple[int, str]]) -> List[Tuple[int, int]]:
    """[start, end] (addresses) of each loop: a branch back to an earlier address, its
    target the start. A branch to itself (the trap after EXIT) is no loop, nor a detour's
    return (_detour: counted as straight-line code, an overcount of the path that skips it)."""
    out = []
    for i, (addr, text) in enumerate(instrs):
        m = _BRANCH.search(text)
        if m and int(m.group(1), 16) < addr and not _detour(instrs, i, int(m.group(1), 16)):
            out.append((int(m.group(1), 16), addr))
    out.sort(key=lambda se: (se[0], -se[1]))
    for (s0, e0), (s1, e1) in zip(out, out[1:]):
        if s1 <= e0 < e1:  # overlapping, not nested: not a loop nest this model reads
            raise ValueError(f"loops {s0:#x}-{e0:#x} and {s1:#x}-{e1:#x} overlap")
    return out


def warp_instructions(instrs, spans, trips: Sequence[int]) -> Tuple[float, List[dict]]:
    """One warp's dynamic instruction count with loop i run trips[i] times per run of
    its enclosing loop; and per loop its exclusive body and total."""
    if len(spans) != len(trips):
        raise ValueError(f"the SASS has {len(spans)} loops, the kernel names {len(trips)} "
                         f"trip counts: its loop structure changed; update TRIPS")
    mult = [1.0] * len(instrs)
    for (s, e), n in zip(spans, trips):
        for i, (addr, _) in enumerate(instrs):
            if s <= addr <= e:
                mult[i] *= n
    detail = []
    for j, ((s, e), n) in enumerate(zip(spans, trips)):
        inner = [sp for sp in spans[j + 1:] if s <= sp[0] and sp[1] <= e]
        body = sum(1 for a, _ in instrs if s <= a <= e
                   and not any(i0 <= a <= i1 for i0, i1 in inner))
        detail.append(dict(start=s, end=e, trips=n, body=body))
    return float(sum(mult)), detail


# --- compiling the kernels as the layer launches them -----------------------------------

def _cuobjdump() -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    return tool if os.path.exists(tool) else "cuobjdump"


def compiled_kernels(case: Case, arch: int = 90) -> Dict[str, dict]:
    """kernel name -> {sass (instructions), warps, regs, stack, constexprs} for the
    stencil kernels of PASSES at the case's dtype, interpolation and rank (the
    deterministic and atomic reductions compile alike but for the final sums; the atomic
    one, the default, is taken)."""
    from convlora_kernels.triton_kernels import compile_check as cc

    wanted = {k for ks in PASSES.values() for k in ks}
    out = {}
    for name, fn, args, kw, _ in cc.variants(
            cc.layer_launches(cc.DTYPES[case.dtype], case.mode, case.rank), first=True):
        if name not in wanted or name in out or kw.get("ATOMIC") is False:
            continue
        built = cc.compile_launch(fn, args, kw, arch)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(built.asm["cubin"])
            f.flush()
            sass = subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True,
                                  text=True, check=True).stdout
        usage = dict(w.split(":") for w in cc._usage(built.asm["cubin"]).split())
        out[name] = dict(sass=parse_sass(sass), warps=kw.get("num_warps", 4),
                         regs=int(usage.get("REG", -1)), stack=int(usage.get("STACK", -1)),
                         shared=int(built.metadata.shared),
                         constexprs={k: v for k, v in kw.items() if k.isupper()})
    missing = wanted - set(out)
    if missing:
        raise RuntimeError(f"the layer launched none of {sorted(missing)}")
    return out


# --- the estimate -------------------------------------------------------------------------

def _tiling(case: Case):
    from convlora_kernels.triton_kernels import launch

    b, h, w = case.shape
    return launch.Tiling(h, w, case.rank, case.experts, case.scales, case.mode,
                         {"bf16": torch.bfloat16, "fp16": torch.float16,
                          "fp32": torch.float32}[case.dtype], torch.device("cpu"))


def _bytes(case: Case, kernel: str, t) -> float:
    """DRAM bytes of one launch at the case's shape."""
    b, h, w = case.shape
    n = b * h * w
    e = {"bf16": 2, "fp16": 2, "fp32": 4}[case.dtype]
    r = case.rank
    perm = n * 8
    if kernel == "stencil_fwd":       # z read, u (fp32) written
        return perm + n * r * e + n * r * 4
    if kernel == "stencil_grad":      # z, du read; g written
        return perm + n * r * (e + 4) + n * t.taps ** 2 * r * 4
    if kernel == "stencil_scatter":   # z, g read; dz (fp32, atomics on a copy of du) r/w
        return perm + n * r * e + n * t.taps ** 2 * r * 4 + 2 * n * r * 4
    if kernel == "stencil_bwd":       # z, du read; g written (read back from L2); dz r/w
        return perm + n * r * (e + 4) + n * t.taps ** 2 * r * 4 + 2 * n * r * 4
    raise ValueError(kernel)


def rows(cases=CASES, dev=H100, arch: int = 90) -> List[dict]:
    out = []
    for case in cases:
        t = _tiling(case)
        built = compiled_kernels(case, arch)
        b, h, w = case.shape
        n = b * h * w
        per_expert = [n // case.experts + (1 if i < n % case.experts else 0)
                      for i in range(case.experts)]
        ntaps = t.ntaps[:case.experts].tolist()
        for direction, kernels in PASSES.items():
            for kernel in kernels:
                k = built[kernel]
                spans = loops(k["sass"])
                total, programs, detail = 0.0, 0, None
                for count, nt in zip(per_expert, ntaps):
                    tiles = math.ceil(count / t.bt)
                    try:
                        per_warp, d = warp_instructions(k["sass"], spans,
                                                        TRIPS[kernel](nt, t))
                    except ValueError as err:
                        raise ValueError(f"{kernel} ({case.name}): {err}") from None
                    total += tiles * k["warps"] * per_warp
                    programs += tiles
                    if detail is None or nt == max(ntaps):
                        detail = d
                clock = dev["clock_ghz"] * 1e3  # clocks per microsecond
                issue_us = total / (dev["sms"] * dev["issue_per_clock"] * clock)
                dram_us = _bytes(case, kernel, t) / dev["dram_bytes_per_s"] * 1e6
                # H100-fitted, at the rates the cuda kernels ran on the first H100 run
                # (cost_model.py): every warp of a program runs its code, so a program's
                # critical path is a warp's instructions (the programs' mean), at
                # fitted_chain_clocks each, a wave of resident programs at a time; or the
                # SM's instructions at fitted_issue_per_clock
                threads = 32 * k["warps"]
                resident = max(1, min(dev["max_blocks_per_sm"],
                                      dev["threads_per_sm"] // threads,
                                      dev["registers_per_sm"] // (max(1, k["regs"]) * threads),
                                      dev["shared_bytes_per_sm"]
                                      // (k["shared"] + dev["block_reserved_bytes"])))
                per_sm = math.ceil(programs / dev["sms"])
                chain_us = (math.ceil(per_sm / resident) * total / (programs * k["warps"])
                            * dev["fitted_chain_clocks"] / clock)
                fitted_issue_us = total / programs * per_sm / (dev["fitted_issue_per_clock"]
                                                               * clock)
                out.append(dict(case=case.name, direction=direction, kernel=kernel,
                                programs=programs, warps=k["warps"], bt=t.bt,
                                regs=k["regs"], stack=k["stack"],
                                static_instructions=len(k["sass"]), loops=detail,
                                warp_instructions=total,
                                per_token=total / n,
                                times_us=dict(issue=issue_us, dram=dram_us),
                                est_us=max(issue_us, dram_us), resident=resident,
                                fitted_chain_us=chain_us, fitted_issue_us=fitted_issue_us,
                                calibrated_us=max(chain_us, fitted_issue_us, dram_us),
                                bound="issue" if issue_us >= dram_us else "dram"))
    return out


def totals(rs: List[dict], field: str = "est_us") -> Dict[Tuple[str, str], float]:
    out: Dict[Tuple[str, str], float] = {}
    for r in rs:
        out[(r["case"], r["direction"])] = out.get((r["case"], r["direction"]), 0.0) \
            + r[field]
    return out


# the totals BUDGETS_US holds: the plain count, and the H100-fitted one
_HELD = (("est_us", ""), ("calibrated_us", " fitted"))


def over_limits(rs: List[dict]) -> List[str]:
    bad = []
    for field, suffix in _HELD:
        for (case, direction), us in totals(rs, field).items():
            budget = BUDGETS_US.get(case)
            key = f"{case}/{direction}{suffix}"
            limit = OVER_BUDGET_US.get(key, None if budget is None
                                       else budget[0 if direction == "fwd" else 1])
            if limit is not None and us > limit + 1e-9:
                bad.append(f"{key}: est. {us:.2f} us, above {limit}")
    return bad


def present_limits(rs: List[dict]) -> str:
    lines = ["OVER_BUDGET_US: Dict[str, float] = {"]
    for field, suffix in _HELD:
        for (case, direction), us in totals(rs, field).items():
            budget = BUDGETS_US.get(case)
            if budget and us > budget[0 if direction == "fwd" else 1]:
                lines.append(f'    "{case}/{direction}{suffix}": {math.ceil(us * 10) / 10},')
    return "\n".join(lines + ["}"])


def assumptions(dev=H100) -> str:
    return (f"{dev['card']}: {dev['sms']} SMs at {dev['clock_ghz']} GHz, "
            f"{dev['issue_per_clock']} warp instructions per clock per SM, DRAM "
            f"{dev['dram_bytes_per_s'] / 1e12:.2f} TB/s; the sm_90 SASS of each kernel as the "
            f"layer launches it; estimates, not measurements")


def table(rs: List[dict]) -> List[str]:
    out = ["| case | pass | kernel | programs x warps (BT) | registers | warp instructions "
           "/ token | est. us (issue / dram) | bound | programs an SM | H100-fitted us "
           "(chain / issue) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rs:
        t = r["times_us"]
        out.append(f"| {r['case']} | {r['direction']} | {r['kernel']} | {r['programs']} x "
                   f"{r['warps']} ({r['bt']}) | {r['regs']} | {r['per_token']:,.0f} | "
                   f"**{r['est_us']:.1f}** ({t['issue']:.1f} / {t['dram']:.1f}) | "
                   f"{r['bound']} | {r['resident']} | **{r['calibrated_us']:.1f}** "
                   f"({r['fitted_chain_us']:.1f} / {r['fitted_issue_us']:.1f}) |")
    return out


def totals_table(rs: List[dict]) -> List[str]:
    out = ["| case | pass | est. us (kernels) | budget | H100-fitted us |",
           "| --- | --- | --- | --- | --- |"]
    fitted = totals(rs, "calibrated_us")
    for (case, direction), us in totals(rs).items():
        budget = BUDGETS_US.get(case)
        b = "" if budget is None else f"{budget[0 if direction == 'fwd' else 1]:.0f}"
        out.append(f"| {case} | {direction} | {us:.1f} | {b} | "
                   f"{fitted[(case, direction)]:.1f} |")
    return out


def loop_table(rs: List[dict]) -> List[str]:
    """Each kernel's loops at its experts' largest taps."""
    out = ["| case | kernel | loop (SASS addresses) | trips | body (instructions) |",
           "| --- | --- | --- | --- | --- |"]
    for r in rs:
        for d in r["loops"]:
            out.append(f"| {r['case']} | {r['kernel']} | {d['start']:#x}-{d['end']:#x} | "
                       f"{d['trips']} | {d['body']} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--loops", action="store_true", help="also each kernel's loops")
    ap.add_argument("--design", help="rewrite the Triton cost section of this markdown file")
    ap.add_argument("--json", help="write every number here")
    ap.add_argument("--limits", action="store_true",
                    help="print OVER_BUDGET_US as the code stands")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("TRITON_INTERPRET=1 is set: unset it to compile for the GPU", file=sys.stderr)
        return 2
    rs = rows()
    print(assumptions())
    print()
    print("\n".join(table(rs)))
    print()
    print("\n".join(totals_table(rs)))
    if args.loops:
        print()
        print("\n".join(loop_table(rs)))
    t, f = totals(rs), totals(rs, "calibrated_us")
    c = CASES[0].name
    print(f"\nRESULT: modeled {c} triton stencil fwd {t[(c, 'fwd')]:.1f} us, bwd "
          f"{t[(c, 'bwd')]:.1f} us (merged {t[(c, 'bwd merged')]:.1f} us); H100-fitted fwd "
          f"{f[(c, 'fwd')]:.1f}, bwd {f[(c, 'bwd')]:.1f} (merged {f[(c, 'bwd merged')]:.1f}) "
          f"(est. {H100['card']})")
    if args.limits:
        print()
        print(present_limits(rs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(assumptions=H100, rows=rs), f, indent=1)
    if args.design:
        import triton

        from convlora_kernels._design_tables import commit_of, write_section

        head = (f"{assumptions()}; Triton {triton.__version__}, commit "
                f"{commit_of(args.design)} (regenerate: `python benchmarks/cost_triton.py "
                f"--design docs/design.md`):")
        write_section(args.design, DESIGN_BEGIN, DESIGN_END, head,
                      table(rs) + [""] + totals_table(rs) + [""] + loop_table(rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
