// Host-side interface of the CUDA stencil kernels (no CUDA syntax, so host code
// can include it). Definitions in stencil_cuda.cuh, one instantiation per dtype.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "convlora_math.h"

namespace convlora {

constexpr int kThreads = 128;
constexpr int kEntriesPerThread = 4;

inline int64_t blocks_for(int64_t work, int threads) {
  const int64_t max_blocks = 65535LL * 16;
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, max_blocks));
}

// Blocks per expert needed to cover the r·r·9 + r weight-gradient entries.
inline int64_t dw_chunks(int64_t r) {
  return (r * r * 9 + r + kThreads * kEntriesPerThread - 1) / (kThreads * kEntriesPerThread);
}

// Scratch of the backward, allocated by the caller (see stencil_cuda_host.cu).
template <typename acc_t>
struct BwdScratch {
  acc_t* g_buf;     // (N, max_outputs, r) conv-output gradients
  int max_outputs;
  acc_t* contrib;   // (N, slots, r) neighbour contributions to dz
  int slots;
  int64_t splits, split_len;
  acc_t* partial;   // (splits, n, r·r·9 + r)
  acc_t* dw;        // (n, r·r·9 + r) result
};

// Defined in stencil_cuda.cuh for half, bfloat16 and float (accumulating in float).
template <typename scalar_t>
void launch_stencil_fwd(const StencilParams<scalar_t>& P, const int* idx, scalar_t* u,
                        cudaStream_t stream);
template <typename scalar_t>
void launch_stencil_bwd(const StencilParams<scalar_t>& P, const int* idx, const scalar_t* du,
                        scalar_t* dz, const BwdScratch<float>& scratch, cudaStream_t stream);

}  // namespace convlora
