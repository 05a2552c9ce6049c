// The Work of a CUDA op run on torch_ep's transport, with ProcessGroupNCCL's stream semantics:
// wait() makes the caller's current stream wait for the op (no CPU block, unless the group
// asked for blocking waits); get_future() is a CUDA-aware future of the outputs. An op the caller
// asked for without async_op runs on the caller's current stream, where that wait is free.
#pragma once

#include <cuda_runtime.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

#include <functional>
#include <memory>
#include <mutex>
#include <string>

namespace ep {

class CudaTransport;
class FaultLog;
class StreamMark;
struct AllToAllSpans;

// Where an all_to_all runs. Without async_op on the caller's current stream, as ProcessGroupNCCL
// does: the stream alone orders it after the caller's work and the caller's later work after it
// (no fork, no event). With async_op on `comm`, which first waits for everything the caller
// queued so far (the inputs are ready).
c10::cuda::CUDAStream op_stream(const c10::cuda::CUDAStream& caller, const c10::cuda::CUDAStream& comm,
                                bool async_op);
// Queued on `stream` once an all_to_all's data has landed: staging copied back into non-contiguous
// outputs. With async_op (`stream` is the comm stream) the caching allocator must not hand the
// buffers or outputs to the caller's stream before `stream` is done with them, even if the caller
// drops the tensors right away; without, every tensor is used on the stream that made it.
// Returns the op's end for its Work: `kernels_end` (the transport's mark) where nothing was copied
// back, else a mark recorded now (also inside a graph capture, where the transport marks nothing).
std::shared_ptr<StreamMark> finish_on(const c10::cuda::CUDAStream& stream, const AllToAllSpans& spans,
                                      const std::vector<at::Tensor>& outputs, bool async_op,
                                      std::shared_ptr<StreamMark> kernels_end);

class EPCudaWork : public c10d::Work {
 public:
  // The op ran on `stream` (the caller's, or the comm stream) and ended at `done` (finish_on).
  // `more_errors`, where given, reports failures of another transport the op used ("" if none):
  // the NVSHMEM hop across nodes. A failure raises through `faults`, the group's fault log
  // (ProcessGroupEP::raise_failure).
  EPCudaWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs, c10::cuda::CUDAStream stream,
             std::shared_ptr<StreamMark> done, std::shared_ptr<CudaTransport> transport,
             std::shared_ptr<FaultLog> faults, bool blocking_wait, std::chrono::milliseconds timeout,
             std::function<std::string()> more_errors = {});

  bool isCompleted() override;
  bool isSuccess() const override;
  std::exception_ptr exception() const override;
  bool wait(std::chrono::milliseconds timeout) override;
  void synchronize() override;
  std::vector<at::Tensor> result() override { return outputs_; }
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override;

 private:
  void raise_if_failed() const;
  std::vector<at::Tensor> outputs_;
  c10::cuda::CUDAStream stream_;       // where the op ran
  std::shared_ptr<StreamMark> done_;   // its end on stream_
  std::shared_ptr<CudaTransport> transport_;
  std::shared_ptr<FaultLog> faults_;
  std::function<std::string()> more_errors_;
  bool blocking_wait_;
  std::chrono::milliseconds timeout_;
  std::mutex future_mutex_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;  // made by getFuture()
};

}  // namespace ep
