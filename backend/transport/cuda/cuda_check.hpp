// CUDA error checks that say which call failed, where, and on which rank.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <cstdint>
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

// A pinned word holding 1, the source of set_device_flag's copy. Made at the first call, which
// the transports make at their set-up: a page-locked allocation may serialise the streams, which
// must not happen while kernels spin in an abort.
inline const uint32_t* pinned_one() noexcept {
  static uint32_t* one = [] {
    uint32_t* p = nullptr;
    if (cudaHostAlloc(reinterpret_cast<void**>(&p), sizeof(uint32_t), cudaHostAllocDefault) != cudaSuccess) {
      cudaGetLastError();
      return static_cast<uint32_t*>(nullptr);
    }
    *p = 1;
    return p;
  }();
  return one;
}

// Sets the device word `word` (on `device`) to 1 while this process's kernels may spin on it, as
// an abort does: a copy on a stream of its own (non-blocking: it waits for no other stream), by
// the copy engines, since a memset kernel could find every SM taken by the spinning kernels; in
// relaxed capture mode, so that another thread's graph capture is not invalidated. Best effort:
// an abort must not throw, nor leave an error for the next launch's check to find.
inline void set_device_flag(int device, uint32_t* word) noexcept {
  int before = -1;
  if (cudaGetDevice(&before) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return;
  }
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  cudaThreadExchangeStreamCaptureMode(&mode);
  cudaStream_t stream = nullptr;
  const uint32_t* one = pinned_one();
  if (one && cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess) {
    if (cudaMemcpyAsync(word, one, sizeof(*one), cudaMemcpyHostToDevice, stream) == cudaSuccess)
      cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
  cudaThreadExchangeStreamCaptureMode(&mode);
  cudaGetLastError();
  cudaSetDevice(before);
}

}  // namespace ep
