// Host side of the CUDA stencil ops: checks, dtype dispatch to the per-dtype kernels,
// registration.
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

at::Tensor stencil_prep_cuda(const at::Tensor& z, const at::Tensor& conv_weight,
                             const at::Tensor& conv_bias, at::IntArrayRef scales,
                             int64_t interpolation, int64_t height, int64_t width,
                             bool mma) {
  TORCH_CHECK(z.is_cuda(), "stencil_prep_cuda: expected CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  check_weight_args(z, conv_weight, conv_bias, scales, interpolation, height, width);
  Operands o{z, at::Tensor(), conv_weight.contiguous(), conv_bias.contiguous(),
             at::Tensor(), at::Tensor(), 0, at::Tensor()};
  o.mma = mma;  // the composed weights in the buffer whatever the device (stencil_prep_bytes)
  at::Tensor prep;
  dispatch_cuda_dtype(z.scalar_type(), "stencil_prep", [&]<typename T>() {
    prep = stencil_cuda_prep<T>(o, scales, interpolation, height, width);
  });
  return prep;
}

std::tuple<at::Tensor, at::Tensor> stencil_fwd_cuda(
    const at::Tensor& z, const at::Tensor& expert_index, const at::Tensor& conv_weight,
    const at::Tensor& conv_bias, at::IntArrayRef scales, int64_t interpolation, int64_t height,
    int64_t width, bool save_preact, int64_t smem_kb, const std::optional<at::Tensor>& prep,
    bool mma, bool raw_preact) {
  TORCH_CHECK(z.is_cuda(), "stencil_fwd_cuda: expected CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  auto o = checked_operands(z, expert_index, conv_weight, conv_bias, scales, interpolation,
                            height, width, smem_kb, nullptr, nullptr, prep);
  // mma.sync with tf32 operands: sm_80 and later (else the multiply-add programs)
  o.mma = mma && at::cuda::getCurrentDeviceProperties()->major >= 8;
  o.raw_preact = raw_preact;
  auto u = at::empty_like(o.z);
  auto pre = new_preact(o.z, interpolation, save_preact);
  if (o.z.size(0) == 0) return {u, pre};
  const bool per_map = map_programs(o, height, width);
  dispatch_cuda_dtype(o.z.scalar_type(), "stencil_fwd", [&]<typename T>() {
    stencil_cuda_call<T>(o, per_map, scales, interpolation, height, width, u, pre, nullptr);
  });
  return {u, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> stencil_bwd_cuda(
    const at::Tensor& du, const at::Tensor& z, const at::Tensor& preact,
    const at::Tensor& expert_index, const at::Tensor& conv_weight, const at::Tensor& conv_bias,
    at::IntArrayRef scales, int64_t interpolation, int64_t height, int64_t width,
    int64_t smem_kb, const std::optional<at::Tensor>& prep, bool mma) {
  TORCH_CHECK(z.is_cuda(), "stencil_bwd_cuda: expected CUDA tensors, got ", z.device());
  const c10::cuda::CUDAGuard guard(z.device());
  auto o = checked_operands(z, expert_index, conv_weight, conv_bias, scales, interpolation,
                            height, width, smem_kb, &du, &preact, prep);
  o.mma = mma && at::cuda::getCurrentDeviceProperties()->major >= 8;
  const int64_t N = o.z.size(0), r = o.z.size(1), n = o.conv_weight.size(0);
  auto dz = at::empty_like(o.z);
  auto dw = at::empty({n, dw_entries(r)}, o.z.options().dtype(at::kFloat));
  if (N == 0) {
    dw.zero_();
  } else {
    const bool per_map = map_programs(o, height, width);
    dispatch_cuda_dtype(o.z.scalar_type(), "stencil_bwd", [&]<typename T>() {
      stencil_cuda_call<T>(o, per_map, scales, interpolation, height, width, dz, o.preact, &dw);
    });
  }
  auto [w, b] = split_dw(dw, n, r);
  return {dz, w, b};
}

CONVLORA_LIBRARY_IMPL(CONVLORA_NS, CUDA, m) {
  m.impl("stencil_prep", &stencil_prep_cuda);
  m.impl("stencil_fwd", &stencil_fwd_cuda);
  m.impl("stencil_bwd", &stencil_bwd_cuda);
}

}  // namespace convlora
