#include "backend/process_group/cuda/cuda_work.hpp"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/Exception.h>

#include <thread>

#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/call_order.hpp"
#include "backend/transport/cuda/cuda_transport.hpp"
#include "backend/transport/cuda/event_pool.hpp"

namespace ep {

c10::cuda::CUDAStream op_stream(const c10::cuda::CUDAStream& caller, const c10::cuda::CUDAStream& comm,
                                bool async_op) {
  if (!async_op) return caller;
  // The wait takes the event's state when it is queued, so one event serves every call.
  c10::cuda::CUDAGuard guard(caller.device_index());
  static thread_local std::unordered_map<int, cudaEvent_t> forks;
  cudaEvent_t& fork = forks[caller.device_index()];
  if (!fork) fork = event_pool().take(caller.device_index());
  C10_CUDA_CHECK(cudaEventRecord(fork, caller.stream()));
  C10_CUDA_CHECK(cudaStreamWaitEvent(comm.stream(), fork, 0));
  return comm;
}

std::shared_ptr<StreamMark> finish_on(const c10::cuda::CUDAStream& stream, const AllToAllSpans& spans,
                                      const std::vector<at::Tensor>& outputs, bool async_op,
                                      std::shared_ptr<StreamMark> kernels_end) {
  if (!spans.copy_back.empty()) {
    c10::cuda::CUDAStreamGuard on_stream(stream);
    for (const auto& [output, staging] : spans.copy_back) output.copy_(staging);
  }
  if (async_op) {
    for (const auto& t : spans.buffers) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
    for (const auto& t : outputs) c10::cuda::CUDACachingAllocator::recordStream(t.storage().data_ptr(), stream);
  }
  if (kernels_end && spans.copy_back.empty()) return kernels_end;
  // No mark from the transport: the call was queued inside a capture (its watchdog marks nothing).
  c10::cuda::CUDAGuard guard(stream.device_index());
  return std::make_shared<StreamMark>(stream.device_index(), stream.stream(), /*captured=*/!kernels_end);
}

EPCudaWork::EPCudaWork(int rank, c10d::OpType type, std::vector<at::Tensor> outputs, c10::cuda::CUDAStream stream,
                       std::shared_ptr<StreamMark> done, std::shared_ptr<CudaTransport> transport,
                       std::shared_ptr<FaultLog> faults, bool blocking_wait, std::chrono::milliseconds timeout,
                       std::function<std::string()> more_errors)
    : c10d::Work(rank, type), outputs_(std::move(outputs)), stream_(stream), done_(std::move(done)),
      transport_(std::move(transport)), faults_(std::move(faults)), more_errors_(std::move(more_errors)),
      blocking_wait_(blocking_wait), timeout_(timeout) {}

// Made when first asked for: most callers only wait(), and a CUDA-aware future costs the host
// microseconds per call (its type, and an event recorded per output storage).
c10::intrusive_ptr<c10::ivalue::Future> EPCudaWork::getFuture() {
  std::lock_guard<std::mutex> lock(future_mutex_);
  if (future_) return future_;
  c10::cuda::CUDAGuard device(stream_.device_index());
  if (!done_->captured()) {
    // Completed on the op's stream (at its tail now, which holds this op's end): fut.wait()
    // makes the waiter's stream wait for it.
    c10::cuda::CUDAStreamGuard guard(stream_);
    future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()),
                                                       std::vector<c10::Device>{stream_.device()});
  } else {
    future_ = c10::make_intrusive<c10::ivalue::Future>(c10::ListType::create(c10::TensorType::get()));
  }
  future_->markCompleted(c10::IValue(outputs_));
  return future_;
}

void EPCudaWork::raise_if_failed() const {
  try {
    transport_->check_healthy("wait");  // a kernel's timeout counts once the kernel has ended
  } catch (const CommError&) {
  }
  auto raise = [this](const std::string& error) {
    C10_THROW_ERROR(DistBackendError, faults_ ? faults_->report(error) : error);
  };
  const std::string error = transport_->error();
  if (!error.empty()) raise(error);
  if (!more_errors_) return;
  const std::string more = more_errors_();
  // A call's own problem (the ranks' split sizes disagree): the group stays usable, so it is not
  // recorded as this rank's stop.
  if (!more.empty()) C10_THROW_ERROR(DistBackendError, "torch_ep: " + more);
}

bool EPCudaWork::isCompleted() {
  const cudaError_t state = cudaEventQuery(done_->event());
  if (state == cudaErrorNotReady) return false;
  C10_CUDA_CHECK(state);
  return true;
}

bool EPCudaWork::isSuccess() const { return transport_->error().empty() && (!more_errors_ || more_errors_().empty()); }

std::exception_ptr EPCudaWork::exception() const {
  try {
    raise_if_failed();
  } catch (...) {
    return std::current_exception();
  }
  return nullptr;
}

bool EPCudaWork::wait(std::chrono::milliseconds timeout) {
  raise_if_failed();
  // A Work queued inside a capture has no completion to poll (its end is a node of the graph).
  if (blocking_wait_ && !done_->captured()) {
    // Poll rather than cudaEventSynchronize: the transport's watchdog may release a stuck op,
    // and the error it records should surface here, within the timeout.
    const auto limit = timeout == kNoTimeout ? timeout_ : timeout;
    const auto start = std::chrono::steady_clock::now();
    while (!isCompleted()) {
      raise_if_failed();
      if (std::chrono::steady_clock::now() - start > limit + std::chrono::seconds(1))
        C10_THROW_ERROR(DistBackendError, "torch_ep: Work.wait() timed out on rank " + std::to_string(rank_));
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
    raise_if_failed();
  }
  synchronize();
  return true;
}

void EPCudaWork::synchronize() {
  const cudaStream_t current = c10::cuda::getCurrentCUDAStream(stream_.device_index()).stream();
  if (current == stream_.stream()) return;  // the op ran there: the stream orders what follows
  C10_CUDA_CHECK(cudaStreamWaitEvent(current, done_->event(), 0));
}

}  // namespace ep
