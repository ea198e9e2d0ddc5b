// Private to lib/nn: the shared CUDA context of the process (see device_ops.hpp). Include only
// under MEDSEG_HAVE_CUDA.
#pragma once
#ifdef MEDSEG_HAVE_CUDA
#include "kernels/cuda/device.hpp"

namespace medseg::nn {
// The context created by use_cuda_device(); CudaError when there is none (a device tensor reached a
// layer before a device was chosen).
cuda::CudaContext& cuda_context();
}  // namespace medseg::nn
#endif
