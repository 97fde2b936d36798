// CUDA kernels of the stencil ops. One thread per token runs the shared
// __host__ __device__ math of convlora_math.h; nothing is ever written for the
// upsampled maps. The backward is deterministic by construction (no atomics):
//   1. per token: g (the conv-output gradients) and the token's contributions to dz
//      of its (2·halo+1)² neighbourhood, each into the token's own slots;
//   2. per token: dz = du + the contributions that reach it, summed in a fixed order;
//   3. weight gradients: block (split, expert, entry chunk) sums its tokens' terms in
//      token order into a partial; 4. partials summed in split order.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "stencil.h"

namespace convlora {

namespace {

constexpr int kThreads = 128;
constexpr int kEntriesPerThread = 4;

int64_t blocks_for(int64_t work, int threads) {
  const int64_t max_blocks = 65535LL * 16;
  return std::max<int64_t>(1, std::min<int64_t>((work + threads - 1) / threads, max_blocks));
}

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

}  // namespace

at::Tensor stencil_fwd_cuda(const at::Tensor& z, const at::Tensor& expert_index,
                            const at::Tensor& conv_weight, const at::Tensor& conv_bias,
                            at::IntArrayRef scales, int64_t interpolation, int64_t height,
                            int64_t width) {
  check_stencil_args(z, expert_index, conv_weight, conv_bias, scales, interpolation, height,
                     width);
  TORCH_CHECK(z.is_cuda(), "stencil_fwd_cuda: expected CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const auto zc = z.contiguous();
  const auto idx = expert_index.contiguous();
  const auto cw = conv_weight.contiguous();
  const auto cb = conv_bias.contiguous();
  auto u = at::empty_like(zc);
  const int64_t N = zc.size(0), r = zc.size(1);
  if (N == 0) return u;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "stencil_fwd_cuda", [&] {
    const auto P = make_params<scalar_t>(zc, cw, cb, scales, interpolation, height, width);
    dispatch_rank(r, [&]<int R>() {
      stencil_fwd_kernel<R, scalar_t><<<blocks_for(N, kThreads), kThreads, 0, stream>>>(
          P, idx.const_data_ptr<int>(), u.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return u;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stencil_bwd_cuda(
    const at::Tensor& du, const at::Tensor& z, const at::Tensor& expert_index,
    const at::Tensor& conv_weight, const at::Tensor& conv_bias, at::IntArrayRef scales,
    int64_t interpolation, int64_t height, int64_t width) {
  check_stencil_args(z, expert_index, conv_weight, conv_bias, scales, interpolation, height,
                     width);
  TORCH_CHECK(z.is_cuda(), "stencil_bwd_cuda: expected CUDA tensors, got ", z.device());
  TORCH_CHECK(du.sizes() == z.sizes() && du.scalar_type() == z.scalar_type() &&
                  du.device() == z.device(),
              "stencil_bwd: du must match z (", z.scalar_type(), " ", z.sizes(), "), got ",
              du.scalar_type(), " ", du.sizes());
  const c10::cuda::CUDAGuard guard(z.device());
  const auto zc = z.contiguous();
  const auto duc = du.contiguous();
  const auto idx = expert_index.contiguous();
  const auto cw = conv_weight.contiguous();
  const auto cb = conv_bias.contiguous();
  const int64_t N = zc.size(0), r = zc.size(1), n = cw.size(0);
  const auto acc_type = zc.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_opts = zc.options().dtype(acc_type);
  auto dz = at::empty_like(zc);
  const int64_t ne = dw_entries(r);
  auto dw = at::empty({n, ne}, acc_opts);
  if (N == 0) {
    dw.zero_();
    auto [w, b] = split_dw(dw, n, r);
    return {dz, w, b};
  }
  const int mode = static_cast<int>(interpolation);
  const int slots = stencil_side(mode) * stencil_side(mode);
  const int max_outputs = max_conv_outputs(mode);
  auto g_buf = at::empty({N, max_outputs, r}, acc_opts);
  auto contrib = at::empty({N, slots, r}, acc_opts);
  // ~512 tokens per split keeps the partials small and every SM busy at SAM's sizes.
  const int64_t splits = std::min<int64_t>(1024, (N + 511) / 512);
  const int64_t split_len = (N + splits - 1) / splits;
  const int64_t chunks = (ne + kThreads * kEntriesPerThread - 1) / (kThreads * kEntriesPerThread);
  auto partial = at::empty({splits, n, ne}, acc_opts);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, zc.scalar_type(), "stencil_bwd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto P = make_params<scalar_t>(zc, cw, cb, scales, interpolation, height, width);
    const int* ix = idx.const_data_ptr<int>();
    dispatch_rank(r, [&]<int R>() {
      stencil_bwd_token_kernel<R, scalar_t, acc_t><<<blocks_for(N, kThreads), kThreads, 0, stream>>>(
          P, ix, duc.const_data_ptr<scalar_t>(), g_buf.mutable_data_ptr<acc_t>(), max_outputs,
          contrib.mutable_data_ptr<acc_t>(), slots);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    gather_dz_kernel<scalar_t, acc_t><<<blocks_for(N * r, kThreads), kThreads, 0, stream>>>(
        contrib.const_data_ptr<acc_t>(), duc.const_data_ptr<scalar_t>(),
        dz.mutable_data_ptr<scalar_t>(), N, P.H, P.W, P.r, P.mode);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(n),
                    static_cast<unsigned>(chunks));
    dw_partial_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        P, ix, g_buf.const_data_ptr<acc_t>(), max_outputs, split_len,
        partial.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    dw_reduce_kernel<acc_t><<<blocks_for(n * ne, kThreads), kThreads, 0, stream>>>(
        partial.const_data_ptr<acc_t>(), dw.mutable_data_ptr<acc_t>(), splits, n * ne);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  auto [w, b] = split_dw(dw, n, r);
  return {dz, w, b};
}

TORCH_LIBRARY_IMPL(convlora, CUDA, m) {
  m.impl("stencil_fwd", &stencil_fwd_cuda);
  m.impl("stencil_bwd", &stencil_bwd_cuda);
}

}  // namespace convlora
