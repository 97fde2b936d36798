"""pytest-benchmark suite: every provider on every shape of a preset, forward and
forward+backward. Not part of the test run (testpaths = tests); run it with

    python -m pytest benchmarks/ --benchmark-only [--bench-device cuda] [--benchmark-json F]

Each case is one benchmark group per shape and mode, so pytest-benchmark's table compares
the providers of that group; extra_info carries the floor and the ratio to it.
"""

from __future__ import annotations

import itertools

import torch

from benchlib import floors, measure


def test_provider(benchmark, case, bench_settings, bench_providers, rates, inputs_for):
    shape, mode, name = case
    s = bench_settings
    provider = bench_providers[name]
    inputs = inputs_for(shape)
    backward = mode == "fwd+bwd"
    measure.prepare(inputs, backward)
    dy = measure.cotangent(inputs[0]) if backward else None
    cycle = itertools.cycle(inputs)
    cuda = inputs[0]["x"].device.type == "cuda"

    def call(inp):
        out = measure.step(provider.fn, inp, backward, dy)
        if cuda:
            torch.cuda.synchronize()
        return out

    benchmark.group = f"{shape.name} {mode}"
    count = floors.counts(shape.as_dict(), mode, provider.problem, inputs[0]["x"].dtype.itemsize,
                          inputs[0]["expert_index"].element_size())
    floor = floors.floor(count, rates)
    benchmark.extra_info.update(shape=shape.as_dict(), mode=mode, provider=name,
                                problem=provider.problem, dtype=s.dtype,
                                floor_ms=floor["ms"], bound=floor["bound"],
                                bytes=count["bytes"], flops=count["flops"])
    out = benchmark.pedantic(call, setup=lambda: ((next(cycle),), {}), rounds=s.repeats,
                             warmup_rounds=s.warmup, iterations=1)
    assert out is not None
    stats = getattr(benchmark, "stats", None)
    if stats is not None:  # None under --benchmark-disable
        median_ms = stats.stats.median * 1e3
        benchmark.extra_info["x_floor"] = median_ms / floor["ms"]
