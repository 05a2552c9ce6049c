// Launchers of the bulk-copy variant of the MoE dispatch and combine kernels (MoeCopy::kBulk,
// moe_bulk.cu), for moe.cu's launchers. Torch-free.
#pragma once

#include <cuda_runtime.h>

#include "backend/kernels/moe.cuh"

namespace ep::kernels {

// Both return cudaErrorNotSupported, launching nothing, where bulk copies cannot move the rows
// (a GPU before sm_90; rows not a multiple of 16 bytes or not 16-byte aligned): the caller then
// runs the warp kernels.
cudaError_t launch_dispatch_bulk(const DispatchParams& params, cudaStream_t stream);
cudaError_t launch_combine_bulk(const CombineParams& params, cudaStream_t stream);

}  // namespace ep::kernels
