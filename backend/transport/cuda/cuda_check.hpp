// CUDA error checks that say which call failed, where, and on which rank.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <string>

#include "backend/common/errors.hpp"

#define EP_CUDA_CHECK(call)                                                                               \
  do {                                                                                                    \
    cudaError_t ep_err_ = (call);                                                                         \
    if (ep_err_ != cudaSuccess)                                                                           \
      throw ::ep::CommError(std::string("torch_ep: ") + #call + " failed: " + cudaGetErrorString(ep_err_) + \
                            " (" + __FILE__ + ":" + std::to_string(__LINE__) + ")");                     \
  } while (0)

#define EP_CU_CHECK(call)                                                                                  \
  do {                                                                                                     \
    CUresult ep_res_ = (call);                                                                             \
    if (ep_res_ != CUDA_SUCCESS) {                                                                         \
      const char* ep_msg_ = nullptr;                                                                       \
      cuGetErrorString(ep_res_, &ep_msg_);                                                                 \
      throw ::ep::CommError(std::string("torch_ep: ") + #call + " failed: " + (ep_msg_ ? ep_msg_ : "?") + \
                            " (" + __FILE__ + ":" + std::to_string(__LINE__) + ")");                      \
    }                                                                                                      \
  } while (0)

namespace ep {

// Whether `stream` is being captured into a CUDA graph (where host waits and events recorded
// outside the capture cannot be used).
inline bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  EP_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;
}

}  // namespace ep
