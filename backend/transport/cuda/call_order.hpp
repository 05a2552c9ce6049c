// The end of a call on its stream (StreamMark), and the order of the calls that share one
// transport's flags and slots (CallOrder), whatever stream each is queued on.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/event_pool.hpp"

namespace ep {

// An event recorded on `stream` now, from the pool and back to it with the last holder: the
// transport's watchdog, the call's Work, the CallOrder that orders the next call after it.
class StreamMark {
 public:
  StreamMark(int device, cudaStream_t stream) : device_(device), stream_(stream), event_(event_pool().take(device)) {
    const cudaError_t err = cudaEventRecord(event_, stream);
    if (err != cudaSuccess) event_pool().give(device, event_);
    EP_CUDA_CHECK(err);
  }
  ~StreamMark() { event_pool().give(device_, event_); }
  StreamMark(const StreamMark&) = delete;
  StreamMark& operator=(const StreamMark&) = delete;

  cudaEvent_t event() const { return event_; }
  cudaStream_t stream() const { return stream_; }

 private:
  int device_;
  cudaStream_t stream_;
  cudaEvent_t event_;
};

// Calls that share a transport's flags and slots run one after another on the device: every rank
// writes its records in call order, and two calls of one rank never share a slot at once. A call
// on the stream of the one before needs nothing (the stream orders them); one on another stream
// waits for the mark of the one before. Inside a graph capture neither: an event recorded outside
// cannot be waited on there, and replays follow the graph's stream. Calls of one group come from
// one thread at a time, as c10d's collectives do.
class CallOrder {
 public:
  void begin(cudaStream_t stream) {
    if (!last_ || last_->stream() == stream || stream_capturing(stream)) return;
    EP_CUDA_CHECK(cudaStreamWaitEvent(stream, last_->event(), 0));
  }
  // `mark`: the end of the call on its stream (null inside a capture: the watchdog marks nothing).
  void end(std::shared_ptr<StreamMark> mark) {
    if (mark) last_ = std::move(mark);
  }
  // Blocks until the last call has ended (shutdown: before the peers' mappings go).
  void wait_for_last() const {
    if (last_) cudaEventSynchronize(last_->event());
  }

 private:
  std::shared_ptr<StreamMark> last_;
};

}  // namespace ep
