// Launchers of the few-SM variant of the MoE dispatch and combine kernels (MoeCopy::kUnroll,
// moe_unroll.cu), for moe.cu's launchers. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include "backend/kernels/moe.cuh"

namespace ep::kernels {

// vec: the widest access (16, 8, 4, 2 or 1 bytes) that the row size and every row's address allow.
cudaError_t launch_dispatch_unroll(const DispatchParams& params, int vec, cudaStream_t stream);
cudaError_t launch_combine_unroll(const CombineParams& params, cudaStream_t stream);

}  // namespace ep::kernels
