// Host-side interface of the CUDA stencil kernels (no CUDA syntax, so host code can
// include it). Definitions in stencil_cuda.cuh, one instantiation per dtype.
#pragma once

#include <ATen/ATen.h>

#include "stencil.h"

namespace convlora {

// per_map: expert_index holds one expert per map (map_programs, stencil.h).
// Runs the forward (o.prep: stencil_prep's output, or undefined; dw == nullptr: out = u, the pre-activations into preact unless it is
// empty) or the backward (out = dz, preact read, *dw = the (n, r·r·9 + r) float32 weight
// gradients) of one call on the current stream.
// The prep pass alone (stencil_prep): its buffer, written on the current stream.
template <typename scalar_t>
at::Tensor stencil_cuda_prep(const Operands& o, at::IntArrayRef scales, int64_t interpolation,
                             int64_t height, int64_t width);

template <typename scalar_t>
void stencil_cuda_call(const Operands& o, bool per_map, at::IntArrayRef scales,
                       int64_t interpolation, int64_t height, int64_t width, at::Tensor& out,
                       const at::Tensor& preact, at::Tensor* dw);

}  // namespace convlora
