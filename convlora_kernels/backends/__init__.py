"""The fused backends as the layer (convlora_kernels.layer) takes them.

    extension.py  "cpu" and "cuda": the stencil ops of the compiled extension _C
    triton.py     "triton": the Triton stencil, the one-kernel forward and the dy pass

The layer's GEMMs, its custom-op pair and its plan are shared; what differs between
backends is the stencil between the GEMMs and a few passes only some of them have. Each
backend module supplies:

    unavailable_reason(backend, device) -> None, or why it cannot run on ``device``
    unsupported(rank, dtype, device)    -> None, or the error a call of that rank and dtype
                                           gets (the argument named, the way out)
    candidate_unavailable(candidate, backend)
                                        -> None when it runs that candidate of the layer's
                                           plan (convlora_kernels.plan), else why not
    stencil_index(expert_index (B, H, W))      the index its stencil takes
    routed_index(expert, gating, H, W)         the same for the router's output (one expert
                                               per map or per token)
    routed_index_length(n_tok, gating, H, W)   its length (for the fake kernels)
    early_prep(x2, rank, cw, cb, scales, interpolation, H, W)
                                        -> None, or a pass the stencil's forward will use,
                                           started before z = x2 Aᵀ exists (the "cuda"
                                           prep on a second stream: CONVLORA_PREP_STREAM)
    stencil_forward(z2, idx, cw, cb, scales, interpolation, H, W, save, early=None)
                                        -> (u (N, r), saved0, saved1); early: early_prep's
    stencil_backward(du, z2, saved0, saved1, idx, cw, cb, scales, interpolation, H, W)
                                        -> (dz in z's dtype, dconv_weight, dconv_bias in
                                            conv_weight's dtype)
    saved_shapes(n_tok, rank, scales, interpolation, H, W, dtype, save, forward_candidate)
                                        -> [(shape, dtype)] of (u, saved0, saved1)
    dy_pass(dy2, lora_B, u, scaling, need_b, need_bias)
                                        -> (dL/du, dL/dB or None, dL/dbias or None), the
                                           "one_pass" dy candidate: dy read once
    two_source_gemm(a1, b1, a2, b2, alpha, bias)
                                        -> a1 b1 + alpha · a2 b2 (+ bias) in one GEMM, the
                                           "two_source" forward and dx candidates
                                           (raises where candidate_unavailable refuses it)
and the "triton" module also ``layer_forward`` (the "one_kernel" forward candidate).

Importing a backend module never fails: what it lacks (the extension, triton) its
``unavailable_reason`` says.
"""

from __future__ import annotations

import importlib

# A module that does not exist means the backend is not part of this version.
MODULES = {
    "cpu": "convlora_kernels.backends.extension",
    "cuda": "convlora_kernels.backends.extension",
    "triton": "convlora_kernels.backends.triton",
}

_loaded = {}


def module(name: str):
    """The module of fused backend ``name`` (imported at the first call)."""
    mod = _loaded.get(name)
    if mod is None:
        mod = _loaded[name] = importlib.import_module(MODULES[name])
    return mod
