// Per-token arithmetic of Conv-LoRA, shared by the CPU and CUDA backends.
//
// Everything here is a __host__ __device__ function of plain scalars and
// pointers, so the CPU backend (compiled by the host compiler) executes the very
// math the GPU runs. Accumulation is in float (double for double inputs).
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define CONVLORA_HD __host__ __device__ __forceinline__
#else
#define CONVLORA_HD inline
#endif

namespace convlora {

// Precision-matched libm calls: erff/expf for float, erf/exp for double, the same
// names on host and device.
CONVLORA_HD float erf_t(float x) { return erff(x); }
CONVLORA_HD double erf_t(double x) { return ::erf(x); }
CONVLORA_HD float exp_t(float x) { return expf(x); }
CONVLORA_HD double exp_t(double x) { return ::exp(x); }

// Exact GELU, x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2)), as nn.GELU() computes it.
template <typename T>
CONVLORA_HD T gelu_erf(T x) {
  const T inv_sqrt2 = T(0.70710678118654752440);
  return T(0.5) * x * (T(1) + erf_t(x * inv_sqrt2));
}

// d/dx GELU(x) = Phi(x) + x phi(x).
template <typename T>
CONVLORA_HD T gelu_erf_grad(T x) {
  const T inv_sqrt2 = T(0.70710678118654752440);
  const T inv_sqrt_2pi = T(0.39894228040143267794);
  return T(0.5) * (T(1) + erf_t(x * inv_sqrt2)) + x * inv_sqrt_2pi * exp_t(T(-0.5) * x * x);
}

}  // namespace convlora
