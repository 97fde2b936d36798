"""The CUDA stencil kernels' hardware counters beside what the cost model counts.

    python benchmarks/smem_counters.py                 # on a GPU with Nsight Compute (ncu)

benchmarks/cost_model.py counts each block program's shared-memory wavefronts on the CPU
(the checked build) two ways: a 128-bit access's words taken warp-wide, and taken by
quarter warps (smem_trace.h); and it estimates warp instructions from the SASS. This runs
the same block programs on the same problems (each case's `counted` map, its bf16
operands, one forward and one backward) on the GPU under ncu, reads the shared-memory
wavefronts (loads and stores) and the warp instructions each tile or map kernel
executed, and prints them beside the model's three numbers, so a GPU run says which
count holds and how far the instruction estimate is off. The prep, fold and reduce
kernels are left out (the model counts them by bytes).

Then, on the shapes benchmarks/stencil_time.py times (SAM's, one forward and one backward
each), ncu's warp-state, scheduler and occupancy sections of the same kernels: why their
warps wait (barrier, shared or global memory, issue), and how many are eligible per
scheduler. The first H100 run measured them at a fifth of the issue rate the model assumes
(docs/design.md): these say where the rest goes.

Exit status 4 (gpu_check.sh: SKIP) without a GPU, without ncu, or where ncu cannot read the
counters; the last line, "RESULT: ...", is the target case's comparison.
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
import shlex
import shutil
import subprocess
import sys
from typing import Dict, List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cost_model as cm  # noqa: E402

METRICS = ("l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum",
           "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum",
           "smsp__inst_executed.sum")
KERNELS = "regex:stencil_(tile|map|cells)_kernel"


def run_cases(cases: List[cm.Case]) -> None:
    """One forward and one backward of each case's counted problem: the launches ncu
    profiles, in this order."""
    from convlora_kernels import _ext

    mod, why = _ext.load()
    if mod is None:
        raise RuntimeError(why)
    for case in cases:
        z, du, idx, cw, cb = (t.cuda() for t in cm._problem(case))
        _, h, w = case.counted
        m = cm.INTERP[case.mode]
        _, pre = torch.ops.convlora.stencil_fwd(z, idx, cw, cb, case.scales, m, h, w, True, 0,
                                                None, case.mma)
        torch.ops.convlora.stencil_bwd(du, z, pre, idx, cw, cb, case.scales, m, h, w, 0, None,
                                       case.mma)
    torch.cuda.synchronize()


def run_shapes() -> None:
    """One forward and one backward of the stencil ops at each of stencil_time.py's GPU
    shapes (what the stall sections profile), as that script calls them."""
    import stencil_time
    from benchlib import common

    for i, (_, shape, interp) in enumerate(stencil_time.shapes("cuda")):
        inp = common.make_inputs(shape, torch.device("cuda"), torch.bfloat16, seed=0)
        fns = stencil_time._stencil_fns(inp, interp)
        if i == 0:  # the target's composed-weight forward too
            fns.update(stencil_time._stencil_fns(inp, interp, suffix=" mma", mma=True))
        for fn in fns.values():
            fn(inp)
    torch.cuda.synchronize()


STALL_SECTIONS = ("WarpStateStats", "SchedulerStats", "Occupancy", "LaunchStats")


def stalls(ncu: str) -> None:
    """ncu's STALL_SECTIONS of the tile and map kernels at SAM's shapes, printed as ncu
    prints them (the details page)."""
    cmd = [ncu, "--clock-control", "none", "--target-processes", "all", "--kernel-name",
           KERNELS]
    for section in STALL_SECTIONS:
        cmd += ["--section", section]
    cmd += [sys.executable, os.path.abspath(__file__), "--run-shapes"]
    print("\n$ " + shlex.join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True)
    print(r.stdout[-60000:] + (f"\n(ncu exit {r.returncode}) " + r.stderr[-3000:]
                               if r.returncode else ""), flush=True)


def parse_ncu_csv(text: str) -> List[Dict[str, float]]:
    """ncu --csv --page raw output -> one dict per profiled launch, in launch order: the
    kernel's name and each metric of METRICS (numbers with their thousands separators
    removed). Lines before the header (ncu's own, the program's) are skipped."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith('"ID"')), None)
    if start is None:
        return []
    rows = list(csv.reader(lines[start:]))
    header = rows[0]
    out = []
    for row in rows[1:]:
        if len(row) != len(header) or not row[0].strip().isdigit():
            continue  # the units row, or a line the program printed
        rec = dict(zip(header, row))
        launch: Dict[str, float] = {"kernel": rec.get("Kernel Name", "")}
        for m in METRICS:
            launch[m] = float(rec[m].replace(",", "")) if rec.get(m) else float("nan")
        out.append(launch)
    return out


def model_counts(cases: List[cm.Case]) -> List[dict]:
    """Per case and pass, what the model counts for the counted problem as a whole (all its
    blocks): wavefronts warp-wide and by quarter warps, and warp instructions (None
    without the CUDA build's SASS)."""
    ops = cm.build_checked()
    out = []
    for case in cases:
        counted = cm.count_shared(ops, case)
        rows = [r for r in cm.kernel_rows(case, counted) if r["phases"]]
        for row, direction in zip(rows, ("fwd", "bwd")):
            call = counted[direction]
            ph = call["phases"].values()
            ipb = row["instructions_per_block"]
            out.append(dict(case=case.name, direction=direction, kernel=row["kernel"],
                            wavefronts=sum(p["wavefronts"] for p in ph),
                            quarter=sum(p["quarter_wavefronts"] for p in ph),
                            instructions=None if ipb is None else ipb * call["blocks"]))
    return out


def compare(model: List[dict], measured: List[Dict[str, float]]) -> List[str]:
    """The table: model rows and ncu launches matched in launch order."""
    ld, st, inst = METRICS
    out = ["| case | pass | kernel | ncu shared wavefronts (ld + st) | model, warp-wide | "
           "model, by quarter warps | ncu warp instructions | model instructions |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m, g in zip(model, measured):
        if m["kernel"] not in g["kernel"]:
            raise RuntimeError(f"launch order: expected {m['kernel']} for {m['case']} "
                               f"{m['direction']}, ncu profiled {g['kernel']}")
        shared = g[ld] + g[st]
        mi = "n/a" if m["instructions"] is None else f"{m['instructions']:,.0f}"
        out.append(f"| {m['case']} | {m['direction']} | {m['kernel']} | {shared:,.0f} | "
                   f"{m['wavefronts']:,.0f} ({m['wavefronts'] / max(shared, 1):.2f}x) | "
                   f"{m['quarter']:,.0f} ({m['quarter'] / max(shared, 1):.2f}x) | "
                   f"{g[inst]:,.0f} | {mi} |")
    if len(measured) != len(model):
        out.append(f"(ncu profiled {len(measured)} launches, the model has {len(model)} rows)")
    return out


def find_ncu() -> Optional[str]:
    """NCU, else $CUDA_HOME/bin, /usr/local/cuda/bin, PATH, /opt/nvidia/nsight-compute."""
    cands = [os.environ.get("NCU"),
             os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "ncu"),
             "/usr/local/cuda/bin/ncu", shutil.which("ncu")]
    cands += sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu"), reverse=True)
    for c in cands:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="store_true",
                    help="only launch the kernels (what ncu profiles)")
    ap.add_argument("--run-shapes", action="store_true",
                    help="only launch the stencil ops at SAM's shapes (the stall sections)")
    ap.add_argument("--no-stalls", action="store_true",
                    help="skip the stall sections")
    ap.add_argument("--cases", default=f"{cm.CASES[0].name},{cm.CASES[1].name},"
                                       "authors map r3 bicubic",
                    help="comma-separated cost-model cases (default: %(default)s)")
    args = ap.parse_args(argv)
    by_name = {c.name: c for c in cm.CASES}
    names = [n.strip() for n in args.cases.split(",") if n.strip()]
    bad = [n for n in names if n not in by_name]
    if bad:
        ap.error(f"--cases: no case {bad[0]!r}; cases: {list(by_name)}")
    cases = [by_name[n] for n in names]
    if args.run:
        run_cases(cases)
        return 0
    if args.run_shapes:
        run_shapes()
        return 0
    if not torch.cuda.is_available():
        print("RESULT: SKIP no GPU: nothing to count")
        return 4
    ncu = find_ncu()
    if ncu is None:
        print("RESULT: SKIP Nsight Compute (ncu) not found (set NCU)")
        return 4
    cmd = [ncu, "--clock-control", "none", "--csv", "--page", "raw", "--target-processes",
           "all", "--kernel-name", KERNELS, "--metrics", ",".join(METRICS),
           sys.executable, os.path.abspath(__file__), "--run", "--cases", ",".join(names)]
    print("$ " + shlex.join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    # ncu's table as it came, first: the model below takes a while, and a reader (or a
    # corrected parser) needs no second GPU run to read it again.
    print("ncu --csv --page raw:\n" + "\n".join(
        line for line in r.stdout.splitlines() if line.startswith('"')), flush=True)
    measured = parse_ncu_csv(r.stdout)
    if r.returncode != 0 or not measured:
        print(r.stdout[-3000:] + r.stderr[-3000:])
        print(f"RESULT: SKIP ncu read no counters (exit {r.returncode})")
        return 4
    if not args.no_stalls:
        stalls(ncu)
    model = model_counts(cases)
    print("\n".join(compare(model, measured)))
    t = model[0]
    g = measured[0]
    shared = g[METRICS[0]] + g[METRICS[1]]
    print(f"\nRESULT: {t['case']} fwd shared wavefronts: ncu {shared:,.0f}, model warp-wide "
          f"{t['wavefronts']:,.0f}, by quarter warps {t['quarter']:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
