// The end of a call on its stream (StreamMark), and the order of the calls that share one
// transport's flags and slots (CallOrder), whatever stream each is queued on.
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <mutex>

#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/event_pool.hpp"

namespace ep {

// An event recorded on `stream` now, from the pool and back to it with the last holder: the
// transport's watchdog, the call's Work, the CallOrder that orders the next call after it.
// `captured`: recorded inside a graph capture (a node of the graph: it cannot be queried or waited
// on from outside), as its maker knows.
class StreamMark {
 public:
  StreamMark(int device, cudaStream_t stream, bool captured = false)
      : device_(device), stream_(stream), event_(event_pool().take(device)), captured_(captured) {
    const cudaError_t err = cudaEventRecord(event_, stream);
    if (err != cudaSuccess) event_pool().give(device, event_);
    EP_CUDA_CHECK(err);
  }
  ~StreamMark() { event_pool().give(device_, event_); }
  StreamMark(const StreamMark&) = delete;
  StreamMark& operator=(const StreamMark&) = delete;

  cudaEvent_t event() const { return event_; }
  cudaStream_t stream() const { return stream_; }
  bool captured() const { return captured_; }

 private:
  int device_;
  cudaStream_t stream_;
  cudaEvent_t event_;
  bool captured_;
};

// `waiter` runs what is queued on it from now on only after what `waited` has queued so far: a
// fork to a second stream, or its join back (an event from the pool, recorded and waited for).
inline void queue_after(int device, cudaStream_t waiter, cudaStream_t waited) {
  const StreamMark mark(device, waited);
  EP_CUDA_CHECK(cudaStreamWaitEvent(waiter, mark.event(), 0));
}

// Calls that share a transport's flags and slots run one after another on the device: every rank
// writes its records in call order, and two calls of one rank never share a slot at once. A call
// on the stream of the one before needs nothing (the stream orders them); one on another stream
// waits for the mark of the one before. Inside a graph capture the same holds among the calls of
// that capture, through an event recorded in it (a capture's events order its streams' nodes);
// an eager mark cannot be waited on there, and replays follow the graph's stream. Streams are told
// apart by handle: a stream destroyed while its last call runs, and another created at the same
// address, would not be ordered (torch's pooled streams are never destroyed).
class CallOrder {
 public:
  CallOrder() = default;
  CallOrder(const CallOrder&) = delete;
  CallOrder& operator=(const CallOrder&) = delete;
  ~CallOrder() {
    if (capture_event_) cudaEventDestroy(capture_event_);
  }

  void begin(cudaStream_t stream) {
    std::lock_guard<std::mutex> lock(mutex_);
    // Made at the first call, which is usually eager (transports are set up outside captures).
    if (!capture_event_) EP_CUDA_CHECK(cudaEventCreateWithFlags(&capture_event_, cudaEventDisableTiming));
    // The common case asks the driver nothing: no capture has queued a call, and this call
    // follows the last one on its stream (or is the first).
    if (!capture_stream_ && (!last_ || last_->stream() == stream)) return;
    unsigned long long capture = 0;
    if (capture_of(stream, &capture)) {
      if (capture_stream_ && capture_id_ == capture && capture_stream_ != stream)
        EP_CUDA_CHECK(cudaStreamWaitEvent(stream, capture_event_, 0));
      return;
    }
    if (!last_ || last_->stream() == stream) return;
    EP_CUDA_CHECK(cudaStreamWaitEvent(stream, last_->event(), 0));
  }
  // `mark`: the end of the call on `stream` (null inside a capture: the watchdog marks nothing).
  void end(cudaStream_t stream, std::shared_ptr<StreamMark> mark) {
    std::lock_guard<std::mutex> lock(mutex_);
    if (mark) {
      last_ = std::move(mark);
      return;
    }
    unsigned long long capture = 0;
    if (!capture_of(stream, &capture)) return;
    EP_CUDA_CHECK(cudaEventRecord(capture_event_, stream));
    capture_id_ = capture;
    capture_stream_ = stream;
  }

 private:
  static bool capture_of(cudaStream_t stream, unsigned long long* id) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    EP_CUDA_CHECK(cudaStreamGetCaptureInfo(stream, &status, id));
    return status != cudaStreamCaptureStatusNone;
  }

  std::mutex mutex_;  // calls may come from several threads
  std::shared_ptr<StreamMark> last_;
  // The last call queued inside a capture: its capture, stream and the event recorded after it.
  cudaEvent_t capture_event_ = nullptr;
  unsigned long long capture_id_ = 0;
  cudaStream_t capture_stream_ = nullptr;
};

}  // namespace ep
