// Timing-free CUDA events, recycled per device: creating and destroying one costs microseconds
// per call on a host whose GPU is shared under MPS. One pool per process; never destroyed (the
// process may outlive the driver).
#pragma once

#include <cuda_runtime.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace ep {

class EventPool {
 public:
  cudaEvent_t take(int device) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& spare = spare_[device];
      if (!spare.empty()) {
        cudaEvent_t event = spare.back();
        spare.pop_back();
        return event;
      }
    }
    c10::cuda::CUDAGuard guard(c10::DeviceIndex(device));
    cudaEvent_t event;
    C10_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
    return event;
  }
  // Back to the pool: recording it again later is fine even while it is pending.
  void give(int device, cudaEvent_t event) {
    std::lock_guard<std::mutex> lock(mutex_);
    spare_[device].push_back(event);
  }

 private:
  std::mutex mutex_;
  std::unordered_map<int, std::vector<cudaEvent_t>> spare_;
};

inline EventPool& event_pool() {
  static EventPool* pool = new EventPool();
  return *pool;
}

}  // namespace ep
