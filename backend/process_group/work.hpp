// The Work of an op that torch_ep runs itself (delegated ops return their inner backend's Work).
// Host ops complete from the worker thread; wait() blocks like Gloo's, get_future() gives the
// output tensors.
#pragma once

#include <ATen/core/ivalue.h>
#include <torch/csrc/distributed/c10d/Work.hpp>

namespace ep {

class EPWork : public c10d::Work {
 public:
  EPWork(int rank, c10d::OpType type, const char* profiling_title, std::vector<at::Tensor> outputs);
  // Marks the work done, with an error or without; wakes wait() and completes the future.
  void complete(std::exception_ptr error = nullptr);
  c10::intrusive_ptr<c10::ivalue::Future> getFuture() override { return future_; }
  std::vector<at::Tensor> result() override { return outputs_; }

 private:
  std::vector<at::Tensor> outputs_;
  c10::intrusive_ptr<c10::ivalue::Future> future_;
};

// Turns a transport error into the torch.distributed error users catch (DistBackendError).
std::exception_ptr as_dist_error(std::exception_ptr error);

}  // namespace ep
