"""Triton kernels of convlora-kernels (installed as convlora_kernels.triton_kernels so it
never shadows the unrelated top-level ``triton_kernels`` distributions).

    launch.py         buffers, tile sizes, autotuning and the order of the kernels
                      (convlora_kernels.backends.triton hands them to the layer)
    stencil.py        the Conv-LoRA stencil, forward and backward (tokens sorted by expert)
    layer_forward.py  the layer's forward as one kernel (the "one_kernel" candidate)
    sort.py           the tokens sorted by expert (a counting sort)
    router.py         the router's logits, top-1 and aux-loss statistics
    dense.py          up-projection, the pass over dy, deterministic reductions
    tables.py         the resampling rules as per-axis lookup tables
    compile_check.py  builds every kernel for sm_80/sm_90 without a GPU
"""

from .._versions import patch_triton_interpreter

patch_triton_interpreter()
