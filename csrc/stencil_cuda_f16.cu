// The CUDA stencil kernels for c10::Half inputs (one file per dtype: parallel builds).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "stencil_cuda.cuh"

namespace convlora {
template void launch_stencil_fwd<c10::Half>(const StencilParams<c10::Half>&, const int*, c10::Half*, cudaStream_t);
template void launch_stencil_bwd<c10::Half>(const StencilParams<c10::Half>&, const int*, const c10::Half*, c10::Half*,
                                     const BwdScratch<float>&, cudaStream_t);
}  // namespace convlora
