// The CUDA stencil kernels for c10::BFloat16 inputs (one file per dtype: parallel builds).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "stencil_cuda.cuh"

namespace convlora {
template void launch_stencil_fwd<c10::BFloat16>(const StencilParams<c10::BFloat16>&, const int*, c10::BFloat16*, cudaStream_t);
template void launch_stencil_bwd<c10::BFloat16>(const StencilParams<c10::BFloat16>&, const int*, const c10::BFloat16*, c10::BFloat16*,
                                     const BwdScratch<float>&, cudaStream_t);
}  // namespace convlora
