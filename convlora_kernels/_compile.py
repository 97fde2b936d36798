"""Helpers for torch.compile that the layer and the public op share (a leaf module: it
imports nothing of the package)."""

from __future__ import annotations


def constant_under_compile(fn):
    """What torch.compiler.assume_constant_result marks, without importing torch._dynamo
    (and triton with it) when the package is imported: torch.compile then calls ``fn``
    once while tracing and keeps its answer as a constant. The attribute is torch's private
    marker; tests/test_backends.py checks that assume_constant_result still sets it."""
    fn._dynamo_marked_constant = True
    return fn
