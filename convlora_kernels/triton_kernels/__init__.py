"""Triton kernels of convlora-kernels (installed as convlora_kernels.triton_kernels so it
never shadows the unrelated top-level ``triton_kernels`` distributions)."""
