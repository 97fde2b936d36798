// The CUDA stencil kernels for float32 inputs (one file per dtype: parallel builds).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "stencil_cuda.cuh"

namespace convlora {
template at::Tensor stencil_cuda_prep<float>(const Operands&, at::IntArrayRef, int64_t, int64_t,
                                              int64_t);
template void stencil_cuda_call<float>(const Operands&, bool, at::IntArrayRef, int64_t, int64_t, int64_t,
                                      at::Tensor&, const at::Tensor&, at::Tensor*);
}  // namespace convlora
