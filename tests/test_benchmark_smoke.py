"""The README's main job runs end to end (one tiny pass) and writes a complete report."""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import run as bench  # noqa: E402


def test_microbenchmark_smoke(tmp_path, capsys):
    out = tmp_path / "report.json"
    bench.main(["--only", "4x14x14", "--repeats", "1", "--warmup", "0", "--rotate", "1",
                "--out", str(out)])
    text = capsys.readouterr().out
    assert "x frozen linear" in text and "conv-lora[reference]" in text
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] == torch.__version__
    providers = {r["provider"] for r in report["results"]}
    assert {"conv-lora[reference]", "plain-lora", "frozen-linear"} <= providers
    assert all("error" not in r for r in report["results"]), report["results"]
    assert {r["mode"] for r in report["results"]} == {"fwd", "fwd+bwd"}
