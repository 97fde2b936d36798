// The CUDA stencil kernels for float inputs (one file per dtype: parallel builds).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "stencil_cuda.cuh"

namespace convlora {
template void launch_stencil_fwd<float>(const StencilParams<float>&, const int*, float*, cudaStream_t);
template void launch_stencil_bwd<float>(const StencilParams<float>&, const int*, const float*, float*,
                                     const BwdScratch<float>&, cudaStream_t);
}  // namespace convlora
