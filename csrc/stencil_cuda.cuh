// CUDA kernels of the stencil ops and their launchers, instantiated once per dtype
// (stencil_cuda_{f32,f16,bf16}.cu) so the build compiles them in parallel.
//
// One thread per token runs the shared __host__ __device__ math of convlora_math.h;
// nothing is ever written for the upsampled maps. The backward is deterministic by
// construction (no atomics):
//   1. per token: g (the conv-output gradients) and the token's contributions to dz
//      of its (2·halo+1)² neighbourhood, each into the token's own slots;
//   2. per token: dz = du + the contributions that reach it, summed in a fixed order;
//   3. weight gradients: block (split, expert, entry chunk) sums its tokens' terms in
//      token order into a partial; 4. partials summed in split order.
#pragma once

#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "convlora_math.h"
#include "stencil_cuda_launch.h"

namespace convlora {
namespace cuda_kernels {


template <int R, typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    stencil_fwd_kernel(const StencilParams<scalar_t> P, const int* __restrict__ idx,
                       scalar_t* __restrict__ u) {
  using acc_t = at::opmath_type<scalar_t>;
  acc_t e_out[R];
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < P.tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int e = idx[t];
    scalar_t* ut = u + t * P.r;
    const scalar_t* zt = P.z + t * P.r;
    if (e < 0 || e >= P.n) {  // never read out of range; make the token visible
      for (int c = 0; c < P.r; ++c) ut[c] = static_cast<scalar_t>(acc_t(NAN));
      continue;
    }
    token_forward<R>(P, t, e, e_out);
    for (int c = 0; c < R; ++c)
      if (c < P.r) ut[c] = static_cast<scalar_t>(static_cast<acc_t>(zt[c]) + e_out[c]);
  }
}

template <int R, typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    stencil_bwd_token_kernel(const StencilParams<scalar_t> P, const int* __restrict__ idx,
                             const scalar_t* __restrict__ du, acc_t* __restrict__ g_buf,
                             int max_outputs, acc_t* __restrict__ contrib, int slots) {
  acc_t du_t[R];
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; t < P.tokens;
       t += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t* ct = contrib + t * slots * P.r;
    for (int i = 0; i < slots * P.r; ++i) ct[i] = acc_t(0);
    const int e = idx[t];
    if (e < 0 || e >= P.n) {  // poison the token's own dz, touch nothing else
      const int side = stencil_side(P.mode), center = (side / 2) * side + side / 2;
      for (int c = 0; c < P.r; ++c) ct[center * P.r + c] = acc_t(NAN);
      continue;
    }
    for (int c = 0; c < R; ++c) du_t[c] = c < P.r ? static_cast<acc_t>(du[t * P.r + c]) : acc_t(0);
    token_backward<R, false>(P, t, e, du_t, g_buf + t * max_outputs * P.r, ct,
                             static_cast<acc_t*>(nullptr), static_cast<acc_t*>(nullptr));
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    gather_dz_kernel(const acc_t* __restrict__ contrib, const scalar_t* __restrict__ du,
                     scalar_t* __restrict__ dz, int64_t tokens, int H, int W, int r, int mode) {
  const int64_t total = tokens * r;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / r;
    const int c = static_cast<int>(i - t * r);
    dz[i] = static_cast<scalar_t>(static_cast<acc_t>(du[i]) + gather_dz(contrib, t, c, H, W, r, mode));
  }
}

// grid (splits, experts, entry chunks): each thread owns kEntriesPerThread entries of
// expert blockIdx.y's gradient and sums, in token order, the terms of the tokens of its
// split routed to that expert.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    dw_partial_kernel(const StencilParams<scalar_t> P, const int* __restrict__ idx,
                      const acc_t* __restrict__ g_buf, int max_outputs, int64_t split_len,
                      acc_t* __restrict__ partial) {
  const int64_t split = blockIdx.x;
  const int e = blockIdx.y;
  const int ne = P.r * P.r * 9 + P.r;
  const int base = blockIdx.z * kThreads * kEntriesPerThread + threadIdx.x;
  acc_t acc[kEntriesPerThread];
  for (int k = 0; k < kEntriesPerThread; ++k) acc[k] = acc_t(0);
  const int64_t t0 = split * split_len;
  const int64_t t1 = t0 + split_len < P.tokens ? t0 + split_len : P.tokens;
  for (int64_t t = t0; t < t1; ++t) {
    if (idx[t] != e) continue;  // uniform across the block
    const acc_t* g = g_buf + t * max_outputs * P.r;
    for (int k = 0; k < kEntriesPerThread; ++k) {
      const int entry = base + k * kThreads;
      if (entry < ne) acc[k] += token_dw_entry(P, t, e, g, entry);
    }
  }
  for (int k = 0; k < kEntriesPerThread; ++k) {
    const int entry = base + k * kThreads;
    if (entry < ne) partial[(split * P.n + e) * ne + entry] = acc[k];
  }
}

template <typename acc_t>
__global__ void dw_reduce_kernel(const acc_t* __restrict__ partial, acc_t* __restrict__ dw,
                                 int64_t splits, int64_t total) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t acc = acc_t(0);
    for (int64_t s = 0; s < splits; ++s) acc += partial[s * total + i];
    dw[i] = acc;
  }
}


}  // namespace cuda_kernels

template <typename scalar_t>
void launch_stencil_fwd(const StencilParams<scalar_t>& P, const int* idx, scalar_t* u,
                        cudaStream_t stream) {
  using namespace cuda_kernels;
  const auto launch = [&]<int R>() {
    stencil_fwd_kernel<R, scalar_t><<<blocks_for(P.tokens, kThreads), kThreads, 0, stream>>>(
        P, idx, u);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_rank(P.r, launch);
}

template <typename scalar_t>
void launch_stencil_bwd(const StencilParams<scalar_t>& P, const int* idx, const scalar_t* du,
                        scalar_t* dz, const BwdScratch<float>& s, cudaStream_t stream) {
  using namespace cuda_kernels;
  using acc_t = float;
  const auto launch = [&]<int R>() {
    stencil_bwd_token_kernel<R, scalar_t, acc_t><<<blocks_for(P.tokens, kThreads), kThreads, 0,
                                                   stream>>>(P, idx, du, s.g_buf, s.max_outputs,
                                                             s.contrib, s.slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  dispatch_rank(P.r, launch);
  gather_dz_kernel<scalar_t, acc_t><<<blocks_for(P.tokens * P.r, kThreads), kThreads, 0, stream>>>(
      s.contrib, du, dz, P.tokens, P.H, P.W, P.r, P.mode);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(s.splits), static_cast<unsigned>(P.n),
                  static_cast<unsigned>(dw_chunks(P.r)));
  dw_partial_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
      P, idx, s.g_buf, s.max_outputs, s.split_len, s.partial);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t total = static_cast<int64_t>(P.n) * (P.r * P.r * 9 + P.r);
  dw_reduce_kernel<acc_t><<<blocks_for(total, kThreads), kThreads, 0, stream>>>(
      s.partial, s.dw, s.splits, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace convlora
