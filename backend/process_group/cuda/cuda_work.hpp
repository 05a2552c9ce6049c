// The Work of a CUDA op run on torch_ep's transport, with ProcessGroupNCCL's stream semantics:
// wait() makes the caller's current stream wait for the op (no CPU block, unless the group
// asked for blocking waits); get_future() is a CUDA-aware future of the outputs.
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
struct AllToAllSpans;

// The comm stream starts after everything the caller queued so far (the inputs are ready).
void start_after(const c10::cuda::CUDAStream& caller, const c10::cuda::CUDAStream& comm);
// Queued on `comm` once an all_to_all's data has landed: staging copied back into non-contiguous
// outputs; and the caching allocator must not hand the buffers or outputs to the caller's stream
// before `comm` is done with them, even if the caller drops the tensors right away.
void finish_on(const c10::cuda::CUDAStream& comm, const AllToAllSpans& spans, const std::vector<at::Tensor>& outputs);

class EPCudaWork : public c10d::Work {
 public:
  ~EPCudaWork() override;
  // `more_errors`, where given, reports failures of another transport the op used ("" if none):
  // the NVSHMEM hop across nodes. A failure raises through `faults`, the group's fault log
  // (ProcessGroupEP::raise_failure).
  EPCudaWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs, c10::cuda::CUDAStream comm_stream,
             std::shared_ptr<CudaTransport> transport, std::shared_ptr<FaultLog> faults, bool blocking_wait,
             std::chrono::milliseconds timeout, std::function<std::string()> more_errors = {});

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
  c10::DeviceIndex device_;
  c10::cuda::CUDAStream comm_stream_;
  bool captured_ = false;       // queued inside a CUDA graph capture
  cudaEvent_t done_ = nullptr;  // recorded on the comm stream after the op; from a pool
  std::shared_ptr<CudaTransport> transport_;
  std::shared_ptr<FaultLog> faults_;
  std::function<std::string()> more_errors_;
  bool blocking_wait_;
  std::chrono::milliseconds timeout_;
  std::mutex future_mutex_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;  // made by getFuture()
};

}  // namespace ep
