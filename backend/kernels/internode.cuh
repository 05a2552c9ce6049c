// Launchers of the internode path's kernels. Torch-free: raw pointers, one POD struct.
//
// The internode transport moves data with NVSHMEM's stream-ordered host API (puts with a
// signal); the one thing it needs a kernel for is waiting on signals with a deadline, so that a
// peer that never comes cannot hang the stream (nvshmemx_signal_wait_until_on_stream waits
// forever). One launch waits on every signal of a round at once.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ep::kernels {

constexpr int kMaxWaitSignals = 128;  // signals one launch waits on; more take several launches

struct WaitSignalsParams {
  int count;
  const uint64_t* signal[kMaxWaitSignals];  // this rank's signal words (symmetric memory)
  uint64_t at_least[kMaxWaitSignals];       // wait until *signal >= at_least
  int peer[kMaxWaitSignals];                // who sets it, for the error
  uint64_t timeout_ns;
  int* error;  // host-mapped: 1 + the peer a wait timed out on (first one wins)
};
cudaError_t launch_wait_signals(const WaitSignalsParams& params, cudaStream_t stream);

}  // namespace ep::kernels
