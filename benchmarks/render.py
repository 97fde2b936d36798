"""Render a benchmark report (the JSON of benchmarks/run.py) as tables and a plot, offline.

    python benchmarks/render.py benchmarks/results/gpu/bench.json   # writes bench.md, bench.png

The columns are described in benchmarks/benchlib/render.py and benchmarks/README.md.
"""

from benchlib import render

if __name__ == "__main__":
    render.main()
