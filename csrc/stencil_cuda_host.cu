// Host side of the CUDA stencil ops: checks, scratch allocation on the current
// stream's allocator, dtype dispatch to the per-dtype kernels, registration.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "stencil.h"
#include "stencil_cuda_launch.h"

namespace convlora {

namespace {

// Runs f.template operator()<T>() for the CUDA dtypes (float64 is CPU-only).
template <typename F>
void dispatch_cuda_dtype(at::ScalarType t, const char* op, F&& f) {
  switch (t) {
    case at::kFloat: f.template operator()<float>(); break;
    case at::kHalf: f.template operator()<c10::Half>(); break;
    case at::kBFloat16: f.template operator()<c10::BFloat16>(); break;
    default:
      TORCH_CHECK(false, op, ": CUDA supports float32, float16 and bfloat16 inputs, got ", t,
                  " (float64 runs on the CPU backend and the reference)");
  }
}

}  // namespace

at::Tensor stencil_fwd_cuda(const at::Tensor& z, const at::Tensor& expert_index,
                            const at::Tensor& conv_weight, const at::Tensor& conv_bias,
                            at::IntArrayRef scales, int64_t interpolation, int64_t height,
                            int64_t width) {
  TORCH_CHECK(z.is_cuda(), "stencil_fwd_cuda: expected CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const auto o = checked_operands(z, expert_index, conv_weight, conv_bias, scales,
                                  interpolation, height, width);
  const auto &zc = o.z, &idx = o.expert_index, &cw = o.conv_weight, &cb = o.conv_bias;
  auto u = at::empty_like(zc);
  if (zc.size(0) == 0) return u;
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda_dtype(zc.scalar_type(), "stencil_fwd", [&]<typename T>() {
    const auto P = make_params<T>(zc, cw, cb, scales, interpolation, height, width);
    launch_stencil_fwd<T>(P, idx.const_data_ptr<int>(), u.mutable_data_ptr<T>(), stream);
  });
  return u;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stencil_bwd_cuda(
    const at::Tensor& du, const at::Tensor& z, const at::Tensor& expert_index,
    const at::Tensor& conv_weight, const at::Tensor& conv_bias, at::IntArrayRef scales,
    int64_t interpolation, int64_t height, int64_t width) {
  TORCH_CHECK(z.is_cuda(), "stencil_bwd_cuda: expected CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  const auto o = checked_operands(z, expert_index, conv_weight, conv_bias, scales,
                                  interpolation, height, width, &du);
  const auto &zc = o.z, &duc = o.du, &idx = o.expert_index, &cw = o.conv_weight,
             &cb = o.conv_bias;
  const int64_t N = zc.size(0), r = zc.size(1), n = cw.size(0);
  const auto acc_opts = zc.options().dtype(at::kFloat);
  auto dz = at::empty_like(zc);
  const int64_t ne = dw_entries(r);
  auto dw = at::empty({n, ne}, acc_opts);
  if (N == 0) {
    dw.zero_();
    auto [w, b] = split_dw(dw, n, r);
    return {dz, w, b};
  }
  const int mode = static_cast<int>(interpolation);
  BwdScratch<float> s;
  s.max_outputs = max_conv_outputs(mode);
  s.slots = stencil_side(mode) * stencil_side(mode);
  s.splits = dw_splits(N);
  s.split_len = (N + s.splits - 1) / s.splits;
  auto g_buf = at::empty({N, s.max_outputs, r}, acc_opts);
  auto contrib = at::empty({N, s.slots, r}, acc_opts);
  auto partial = at::empty({s.splits, n, ne}, acc_opts);
  s.g_buf = g_buf.mutable_data_ptr<float>();
  s.contrib = contrib.mutable_data_ptr<float>();
  s.partial = partial.mutable_data_ptr<float>();
  s.dw = dw.mutable_data_ptr<float>();
  const auto stream = at::cuda::getCurrentCUDAStream();
  dispatch_cuda_dtype(zc.scalar_type(), "stencil_bwd", [&]<typename T>() {
    const auto P = make_params<T>(zc, cw, cb, scales, interpolation, height, width);
    launch_stencil_bwd<T>(P, idx.const_data_ptr<int>(), duc.const_data_ptr<T>(),
                          dz.mutable_data_ptr<T>(), s, stream);
  });
  auto [w, b] = split_dw(dw, n, r);
  return {dz, w, b};
}

TORCH_LIBRARY_IMPL(convlora, CUDA, m) {
  m.impl("stencil_fwd", &stencil_fwd_cuda);
  m.impl("stencil_bwd", &stencil_bwd_cuda);
}

}  // namespace convlora
