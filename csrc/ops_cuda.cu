// CUDA kernels of the convlora library.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include <c10/util/BFloat16.h>
#include <tuple>

#include "convlora_math.h"

namespace convlora {

template <typename scalar_t>
__global__ void gelu_probe_kernel(const scalar_t* __restrict__ in, scalar_t* __restrict__ out,
                                  int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = gelu_erf(in[i]);
}

at::Tensor gelu_probe_cuda(const at::Tensor& x) {
  TORCH_CHECK(x.is_cuda(), "gelu_probe_cuda: expected a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
              "gelu_probe: expected float32 or float64, got ", x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto y = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return y;
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  AT_DISPATCH_FLOATING_TYPES(xc.scalar_type(), "gelu_probe_cuda", [&] {
    gelu_probe_kernel<scalar_t><<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        xc.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

template <bool SIXTEEN_BIT>
__global__ void gelu_slope_probe_kernel(const float* __restrict__ in, float* __restrict__ out,
                                        float* __restrict__ slope, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n)
    out[i] = SIXTEEN_BIT ? gelu_and_grad<at::BFloat16>(in[i], slope[i])
                         : gelu_and_grad<float>(in[i], slope[i]);
}

std::tuple<at::Tensor, at::Tensor> gelu_slope_probe_cuda(const at::Tensor& x, bool sixteen_bit) {
  TORCH_CHECK(x.is_cuda(), "gelu_slope_probe_cuda: expected a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat, "gelu_slope_probe: expected float32, got ",
              x.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto y = at::empty_like(xc), slope = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return {y, slope};
  const int threads = 256;
  const int64_t blocks = (n + threads - 1) / threads;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const float* in = xc.const_data_ptr<float>();
  if (sixteen_bit) {
    gelu_slope_probe_kernel<true><<<blocks, threads, 0, stream>>>(
        in, y.mutable_data_ptr<float>(), slope.mutable_data_ptr<float>(), n);
  } else {
    gelu_slope_probe_kernel<false><<<blocks, threads, 0, stream>>>(
        in, y.mutable_data_ptr<float>(), slope.mutable_data_ptr<float>(), n);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y, slope};
}

TORCH_LIBRARY_IMPL(convlora, CUDA, m) {
  m.impl("gelu_probe", &gelu_probe_cuda);
  m.impl("gelu_slope_probe", &gelu_slope_probe_cuda);
}

}  // namespace convlora
