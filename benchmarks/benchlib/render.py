"""Render a benchmark report (the JSON of benchmarks/run.py) as tables and a plot, offline.

    python benchmarks/render.py benchmarks/results/gpu/bench.json   # writes bench.md, bench.png

Columns, per shape and mode (fwd, or fwd+bwd):
    x floor          median time over the floor of its problem (1.0 = the physical limit)
    x frozen linear  median time over the frozen nn.Linear's (the floor of any adapter)
    speedup vs ref   the eager reference's median over this provider's
    vs authors'      the authors' layer's median over this provider's (when it was timed)
    saved MiB        activation memory a training forward keeps for backward, less its inputs
    median ms, floor ms, peak MiB   GPU reports only (CPU reports print ratios alone)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

def groups(report: dict) -> List[Tuple[Tuple[str, str], Dict[str, dict]]]:
    """[((shape name, mode), {provider: row})] in the order the rows were measured."""
    out: Dict[Tuple[str, str], Dict[str, dict]] = {}
    for row in report["results"]:
        out.setdefault((row["shape"]["name"], row["mode"]), {})[row["provider"]] = row
    return list(out.items())


def derived(report: dict, row: dict, group: Dict[str, dict]) -> Dict[str, Optional[float]]:
    """The ratios of one row; None where a term is missing. The report names its two
    baselines: report["baselines"] = {"reference": provider, "linear": provider}."""
    def med(r):
        return None if r is None else r.get("median_ms")

    base = report["baselines"]
    m = med(row)
    lin, ref = med(group.get(base["linear"])), med(group.get(base["reference"]))
    auth = med(group.get(base.get("authors")))
    fl = (row.get("floor") or {}).get("ms")
    return dict(x_floor=m / fl if m and fl else None,
                x_linear=m / lin if m and lin else None,
                speedup_ref=ref / m if m and ref else None,
                speedup_authors=auth / m if m and auth else None)


def is_gpu(report: dict) -> bool:
    return report["environment"].get("device", "").startswith("cuda")


def _f(v, fmt="{:.2f}", none="-"):
    return none if v is None else fmt.format(v)


def _has_authors(report: dict) -> bool:
    name = report["baselines"].get("authors")
    return any(r["provider"] == name for r in report["results"])


def _columns(gpu: bool, authors: bool = False):
    cols = [("x floor", lambda r, d: _f(d["x_floor"])),
            ("x frozen linear", lambda r, d: _f(d["x_linear"])),
            ("speedup vs ref", lambda r, d: _f(d["speedup_ref"]))]
    if authors:
        cols.append(("vs authors'", lambda r, d: _f(d["speedup_authors"])))
    cols.append(("saved MiB", lambda r, d: _f(r.get("saved_new_mb"), "{:.1f}")))
    if gpu:
        cols = [("median ms", lambda r, d: _f(r.get("median_ms"), "{:.4f}")),
                ("floor ms", lambda r, d: _f((r.get("floor") or {}).get("ms"), "{:.4f}"))] + \
            cols + [("peak MiB", lambda r, d: _f(r.get("peak_mb"), "{:.1f}"))]
    return cols


def _problem_line(report: dict) -> str:
    env = report["environment"]
    where = env.get("card") or f"CPU ({env.get('cpu', '?')}, {env.get('threads', '?')} threads)"
    parts = [where, report.get("args", {}).get("dtype", "?"), f"torch {env.get('torch')}"]
    for k in ("triton", "cuda", "driver"):
        if env.get(k):
            parts.append(f"{k} {env[k]}")
    parts.append(f"commit {env.get('commit') or '?'}{' (dirty)' if env.get('dirty') else ''}")
    return ", ".join(parts)


def text_table(report: dict) -> str:
    """The terminal table: one block per shape and mode."""
    gpu = is_gpu(report)
    cols = _columns(gpu, _has_authors(report))
    lines = [_problem_line(report)]
    rates = report.get("rates")
    if rates:
        lines.append(f"floors from {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s and "
                     f"{rates['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s measured here")
    for (shape, mode), group in groups(report):
        lines.append(f"\n{shape}  {mode}")
        lines.append(f"  {'provider':32s}" + "".join(f" {c:>15s}" for c, _ in cols))
        for name, row in group.items():
            if "error" in row or "skipped" in row:
                lines.append(f"  {name:32s} {row.get('error') or row.get('skipped')}")
                continue
            d = derived(report, row, group)
            lines.append(f"  {name:32s}" + "".join(f" {fn(row, d):>15s}" for _, fn in cols))
    return "\n".join(lines)


def markdown(report: dict) -> str:
    """One markdown table of every row, headed by the card (or CPU) and versions."""
    gpu = is_gpu(report)
    cols = _columns(gpu, _has_authors(report))
    env = report["environment"]
    out = [f"**{_problem_line(report)}**", ""]
    rates = report.get("rates")
    if rates:
        out += [f"Floors from {rates['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s and "
                f"{rates['matmul_flop_per_s'] / 1e12:.2f} TFLOP/s measured on this device "
                f"({rates['method']}).", ""]
    if not gpu:
        out += ["CPU: ratios only; the JSON keeps the raw medians.", ""]
    out.append("| shape | mode | provider | " + " | ".join(c for c, _ in cols) + " |")
    out.append("|" + " --- |" * (3 + len(cols)))
    for (shape, mode), group in groups(report):
        for name, row in group.items():
            if "error" in row or "skipped" in row:
                msg = (row.get("error") or row.get("skipped")).replace("|", "/")[:160]
                out.append(f"| {shape} | {mode} | {name} | {msg} |" + " |" * (len(cols) - 1))
                continue
            d = derived(report, row, group)
            out.append(f"| {shape} | {mode} | {name} | "
                       + " | ".join(fn(row, d) for _, fn in cols) + " |")
    if env.get("command"):
        out += ["", f"Command: `{env['command']}`"]
    return "\n".join(out) + "\n"


def plot(report: dict, path: str) -> Optional[str]:
    """PNG of each provider's speedup over the eager reference. Returns None when done,
    else why not (matplotlib missing, or nothing to plot)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError as e:
        return f"matplotlib is not installed ({e}); no plot"
    labels, series = [], {}
    for (shape, mode), group in groups(report):
        labels.append(f"{shape} {mode}")
        for name, row in group.items():
            if name != report["baselines"]["reference"]:
                d = derived(report, row, group)
                series.setdefault(name, {})[len(labels) - 1] = d["speedup_ref"]
    if not labels or not series:
        return "no rows to plot"
    height = 0.8 / len(series)
    rows = len(labels) * max(3, len(series))
    fig, ax = plt.subplots(figsize=(9, 1.8 + 0.22 * rows), layout="constrained")
    everything = []
    for k, (name, vals) in enumerate(series.items()):
        ys = [i + (k - (len(series) - 1) / 2) * height for i in vals if vals[i]]
        xs = [vals[i] for i in vals if vals[i]]
        everything += xs
        bars = ax.barh(ys, xs, height=height, label=name)
        ax.bar_label(bars, labels=[f"{x:.0f}x" if x >= 100 else f"{x:.3g}x" for x in xs],
                     fontsize=7, padding=2)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log")
    narrow = bool(everything) and max(everything + [1.0]) / min(everything + [1.0]) < 100
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(
        base=10, subs=(1.0, 2.0, 5.0) if narrow else (1.0,)))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.margins(x=0.15)
    ax.set_yticks(range(len(labels)))
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over the eager Conv-LoRA reference (higher is faster; log scale)")
    env = report["environment"]
    where = env.get("card") or f"CPU, {env.get('threads', '?')} threads"
    ax.set_title(f"Conv-LoRA layer: speedup over the eager reference\n{where}, "
                 f"{report.get('args', {}).get('dtype', '')}, torch {env.get('torch')}",
                 fontsize=10)
    fig.legend(fontsize=8, loc="outside lower center", ncol=min(3, len(series)), frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return None


def write_all(report: dict, json_path: str) -> List[str]:
    """Next to ``json_path``: the .md table and the .png plot. Returns notes to print."""
    stem = os.path.splitext(json_path)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown(report))
    notes = [f"wrote {stem}.md"]
    try:
        why = plot(report, stem + ".png")
    except Exception as e:  # an old or broken matplotlib costs the plot, not the report
        why = f"no plot: {type(e).__name__}: {e}"
    notes.append(why or f"wrote {stem}.png")
    return notes


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("report", help="a JSON report written by benchmarks/run.py")
    p.add_argument("--out-dir", default=None, help="write the .md and .png here instead")
    args = p.parse_args(argv)
    with open(args.report) as f:
        report = json.load(f)
    target = args.report
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        target = os.path.join(args.out_dir, os.path.basename(args.report))
    print(markdown(report))
    for note in write_all(report, target):
        print(note, file=sys.stderr)


if __name__ == "__main__":
    main()
