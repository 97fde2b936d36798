"""Triton kernels of convlora-kernels (installed as convlora_kernels.triton_kernels so it
never shadows the unrelated top-level ``triton_kernels`` distributions).

    op.py             the "triton" backend: checks, torch.library ops, autograd
    launch.py         buffers, tile sizes, autotuning and the order of the kernels
    stencil.py        the Conv-LoRA stencil, forward and backward (tokens sorted by expert)
    dense.py          up-projection, the pass over dy, deterministic reductions
    tables.py         the resampling rules as per-axis lookup tables
    compile_check.py  builds every kernel for sm_80/sm_90 without a GPU
"""

from .._versions import patch_triton_interpreter

patch_triton_interpreter()
