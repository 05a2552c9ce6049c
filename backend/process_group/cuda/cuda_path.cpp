// ProcessGroupEP's CUDA half: the comm stream, the lazily created CudaTransport, and the glue
// that gives its ops ProcessGroupNCCL's stream semantics.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <mutex>

#include "backend/common/phases.hpp"
#include "backend/kernels/all_to_all.cuh"  // kMaxRanksPerNode
#include "backend/kernels/moe_records.cuh"  // MoeRecordsLayout
#include "backend/ops/all_to_all_v.hpp"
#include "backend/ops/cuda/moe_push.hpp"  // raise_device_report
#include "backend/process_group/cuda/cuda_work.hpp"
#include "backend/process_group/cuda/segment_frees.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/process_group/work.hpp"
#include "backend/transport/cuda/comm_pool.hpp"
#include "backend/transport/cuda/cuda_transport.hpp"

namespace ep {

void ProcessGroupEP::refuse_calls_when_failed(CudaTransport& transport) {
  // The gate, not the group: the listener runs on the transport's watchdog thread. The peers
  // hear of it too: one waiting on this rank over the host channel then names the real cause,
  // and one waiting on it elsewhere finds it in the fault log.
  transport.on_failure([gate = gate_, faults = faults_](const std::string& why) {
    gate->close_and_tell_peers("its CUDA transport failed: " + why);
    faults->record(why, /*wait=*/false);
  });
}

void ProcessGroupEP::check_errors() {
  check_usable("check_errors");
  std::shared_ptr<CudaTransport> moe, a2a;
  std::shared_ptr<AllToAllVState> a2av;
  {
    std::lock_guard<std::mutex> lock(cuda_mutex_);
    moe = moe_transport_;
    a2a = cuda_transport_;
    a2av = a2av_state_;
  }
  // A kernel's bounded wait that gave up (a peer that never came) raises here once the caller
  // has synchronised, not at the watchdog's next poll.
  try {
    for (CudaTransport* t : {moe.get(), a2a.get(), a2av ? &transport_of(*a2av) : nullptr})
      if (t) t->check_healthy("check_errors");
  } catch (const CommError& e) {
    raise_failure(e.what());
  }
  check_internode_errors();
  if (moe) {
    const std::string overflow = moe->take_dispatch_overflow();
    TORCH_CHECK_VALUE(overflow.empty(), overflow);
    moe::raise_device_report(*moe, getRank(), -1, "check_errors");
  }
  if (a2av) check_all_to_all_v_reports(*a2av, getRank(), "all_to_all_v");
}

void ProcessGroupEP::abort_cuda(const std::string& why) {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  if (cuda_transport_) cuda_transport_->abort(why);
  if (moe_transport_) moe_transport_->abort(why);
  if (a2av_state_) abort_all_to_all_v(*a2av_state_, why);
}

std::shared_ptr<CudaTransport> ProcessGroupEP::cuda_transport(const at::Device& device, const char* op_name) {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  if (cuda_path_ == CudaPath::kUndecided) try {
    // CUDA IPC needs every rank on this host; otherwise the inner backend (NCCL) carries it.
    if (ranks_share_host()) {
      CudaTransportConfig cc;
      cc.device = device.index();
      cc.buffer_bytes = config_.cuda_buffer_bytes;
      cc.kernel_bytes = config_.all_to_all_kernel_bytes;
      cc.num_sms = config_.num_sms;
      cc.timeout = config_.timeout;
      cuda_transport_ = std::make_shared<CudaTransport>(rendezvous_, cc, "ep/cuda/transport");
      refuse_calls_when_failed(*cuda_transport_);
      report_segment_frees(*cuda_transport_);
      comm_stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device.index());
      cuda_path_ = CudaPath::kOurs;
    } else {
      cuda_path_ = CudaPath::kDelegated;
    }
  } catch (const std::exception& e) {
    C10_THROW_ERROR(DistBackendError, std::string(op_name) + ": setting up this group's CUDA transport failed: " +
                                          e.what());
  }
  if (cuda_transport_)
    TORCH_CHECK_VALUE(cuda_transport_->device() == device.index(), "this 'ep' group runs on cuda:",
                      cuda_transport_->device(), " (its first CUDA op), but got a tensor on ", device,
                      "; use one device per rank and group");
  return cuda_transport_;
}

bool ProcessGroupEP::ranks_share_host_for(const char* op_name, const char* purpose) {
  try {
    return ranks_share_host();
  } catch (const std::exception& e) {
    C10_THROW_ERROR(DistBackendError, std::string(op_name) + ": timed out setting up this group's CUDA transport for " +
                                          purpose + ": " + e.what());
  }
}

std::shared_ptr<CudaTransport> ProcessGroupEP::moe_transport(const at::Device& device, const char* op_name) {
  check_usable(op_name);
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  if (!moe_transport_) {
    const bool one_host = ranks_share_host_for(op_name, "dispatch/combine");
    // Ranks on other hosts cannot map each other's memory; the internode path is another issue.
    TORCH_CHECK(one_host, op_name, ": CUDA dispatch/combine need every rank of the group on one host");
    agree_on_moe_push(op_name);
    std::shared_ptr<CudaTransport> transport;
    try {
      CudaTransportConfig cc;
      cc.device = device.index();
      cc.buffer_bytes = 0;  // flags only: the MoE kernels read peers' tensors, not a staging block
      cc.num_sms = config_.num_sms;
      cc.timeout = config_.timeout;
      cc.control_slot_bytes = 16 << 10;  // a dispatch record in one chunk
      if (config_.moe_push && config_.moe_device_records) {
        cc.records_bytes = kernels::MoeRecordsLayout::kBytes;
        cc.records_flag_bytes = kernels::MoeRecordsLayout::kFlagsBytes;
      }
      transport = std::make_shared<CudaTransport>(rendezvous_, cc, "ep/cuda/moe");
      refuse_calls_when_failed(*transport);
      report_segment_frees(*transport);
    } catch (const std::exception& e) {
      C10_THROW_ERROR(DistBackendError, std::string(op_name) + ": setting up this group's CUDA transport for "
                                            "dispatch/combine failed: " + e.what());
    }
    // A pushing group's pool comes with the transport, on every rank alike (collective), so
    // that no later call sets it up on some ranks only.
    if (config_.moe_push) moe_pool_ = make_moe_pool(device.index(), op_name);
    moe_transport_ = std::move(transport);
  }
  TORCH_CHECK_VALUE(moe_transport_->device() == device.index(), op_name, ": this 'ep' group runs dispatch/combine on cuda:",
                    moe_transport_->device(), " (its first call), but got a tensor on ", device,
                    "; use one device per rank and group");
  return moe_transport_;
}

void ProcessGroupEP::agree_on_moe_push(const char* op_name) {
  std::vector<std::vector<uint8_t>> all;
  try {
    all = rendezvous_.all_gather("ep/cuda/moe/push", {uint8_t(config_.moe_push ? 1 : 0),
                                                      uint8_t(config_.moe_device_records ? 1 : 0)});
  } catch (const std::exception& e) {
    C10_THROW_ERROR(DistBackendError, std::string(op_name) + ": setting up this group's CUDA transport for "
                                          "dispatch/combine failed: " + e.what());
  }
  for (int r = 0; r < int(all.size()); ++r) {
    TORCH_CHECK_VALUE(all[r].at(0) == all[0].at(0), op_name, ": the ranks disagree on whether dispatch pushes "
                      "(Options.moe_push, TORCH_EP_MOE_PUSH): rank 0 has ", int(all[0].at(0)), ", rank ", r,
                      " has ", int(all[r].at(0)), "; set it alike on every rank of the group");
    TORCH_CHECK_VALUE(all[r].at(1) == all[0].at(1), op_name, ": the ranks disagree on whether dispatch exchanges "
                      "its records through the device (Options.moe_device_records, TORCH_EP_MOE_DEVICE_RECORDS): "
                      "rank 0 has ", int(all[0].at(1)), ", rank ", r, " has ", int(all[r].at(1)),
                      "; set it alike on every rank of the group");
  }
}

std::shared_ptr<AllToAllVState> ProcessGroupEP::all_to_all_v_state(const at::Device& device, const char* op_name,
                                                                   bool create) {
  check_usable(op_name);
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  if (!a2av_decided_ && create) {
    const bool one_host = ranks_share_host_for(op_name, "all_to_all_v");
    // Every rank decides alike: the kernels map every peer's block through CUDA IPC.
    if (one_host && getSize() <= kernels::kMaxRanksPerNode) try {
      a2av_state_ = create_all_to_all_v_state(rendezvous_, config_, device.index(), "ep/cuda/a2av");
      refuse_calls_when_failed(transport_of(*a2av_state_));
    } catch (const std::exception& e) {
      C10_THROW_ERROR(DistBackendError, std::string(op_name) + ": setting up this group's CUDA transport for "
                                            "all_to_all_v failed: " + e.what());
    }
    a2av_decided_ = true;
  }
  if (a2av_state_ && create)
    TORCH_CHECK_VALUE(device_of(*a2av_state_) == device.index(), op_name, ": this 'ep' group runs all_to_all_v on "
                      "cuda:", device_of(*a2av_state_), " (its first call), but got a tensor on ", device,
                      "; use one device per rank and group");
  return a2av_state_;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::device_all_to_all_single(const at::Tensor& output, AllToAllSpans spans,
                                                                        const std::vector<size_t>& send_bytes,
                                                                        const std::vector<size_t>& recv_bytes,
                                                                        bool async_op) {
  const char* op = "all_to_all_single";
  Phases phase;  // the host's share of a call, for tools/a2a_profile.py
  phase.next("ep::all_to_all_single/state");
  std::shared_ptr<AllToAllVState> state = all_to_all_v_state(output.device(), op);
  if (!state) return {};
  const c10::DeviceIndex device = output.device().index();
  c10::cuda::CUDAGuard guard(device);
  const auto caller = c10::cuda::getCurrentCUDAStream(device);
  auto stream = caller;  // where the call runs: the caller's stream, or (async_op) the comm stream
  if (async_op) {
    {
      std::lock_guard<std::mutex> lock(cuda_mutex_);
      if (!comm_stream_) comm_stream_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device);
    }
    phase.next("ep::all_to_all_single/fork");
    stream = op_stream(caller, c10::cuda::CUDAStream(c10::cuda::CUDAStream::UNCHECKED, *comm_stream_), /*async_op=*/true);
  }
  // spans.buffers: the contiguous input, and the output or its contiguous staging (single_spans).
  const char* in = static_cast<const char*>(spans.buffers[0].data_ptr());
  char* out = static_cast<char*>(spans.buffers[1].data_ptr());
  // A group with a comm pool: where this rank's output lies in its arena, for the plan to choose
  // one copy when every receiver's does (an empty output takes either path).
  std::shared_ptr<CommPool> pool = comm_pool();
  std::vector<char*> arenas;
  CommPoolCall pool_call{};
  if (pool) {
    for (int r = 0; r < getSize(); ++r) arenas.push_back(pool->arena(r));
    size_t out_bytes = 0;
    for (size_t b : recv_bytes) out_bytes += b;
    pool_call.arenas = arenas.data();
    pool_call.output_offset = pool->output_offset(out, out_bytes);
  }
  AllToAllSingleCall call{};
  // Raised once the buffers are tied to the op's stream: an earlier call's problem (this call is
  // queued) or a failed transport (nothing was).
  std::exception_ptr pending;
  std::string failed;
  phase.next("ep::all_to_all_single/params");  // then launch and track (all_to_all_single_cuda)
  try {
    call = all_to_all_single_cuda(*state, getRank(), in, out, send_bytes, recv_bytes, stream.stream(),
                                  pool ? &pool_call : nullptr, phase);
  } catch (const CommError& e) {  // timeouts included
    failed = e.what();
  } catch (...) {
    pending = std::current_exception();
  }
  phase.next("ep::all_to_all_single/finish");
  std::vector<at::Tensor> outputs{output};
  std::shared_ptr<StreamMark> done = finish_on(stream, spans, outputs, async_op, std::move(call.end));
  if (!failed.empty()) raise_failure(failed);
  if (pending) std::rethrow_exception(pending);
  phase.next("ep::all_to_all_single/work");
  // A disagreement the device found in this very call raises at the Work's wait, once. The Work
  // may be asked from several threads (isSuccess, wait, exception): the message is kept under a lock.
  struct Seen {
    std::mutex mutex;
    std::string message;
  };
  auto seen = std::make_shared<Seen>();
  auto more_errors = [state, call_id = call.call_id, rank = getRank(), seen]() {
    std::lock_guard<std::mutex> lock(seen->mutex);
    if (seen->message.empty()) seen->message = take_all_to_all_single_report(*state, call_id, rank);
    return seen->message;
  };
  return c10::make_intrusive<EPCudaWork>(getRank(), c10d::OpType::ALLTOALL_BASE, std::move(outputs), stream,
                                         std::move(done), shared_transport_of(*state), faults_,
                                         config_.blocking_wait, config_.timeout, more_errors);
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::cuda_all_to_all(std::vector<at::Tensor> outputs, AllToAllSpans spans,
                                                               c10d::OpType type, const char* op_name, bool async_op) {
  std::shared_ptr<CudaTransport> transport = cuda_transport_;
  const c10::DeviceIndex device = c10::DeviceIndex(transport->device());
  c10::cuda::CUDAGuard guard(device);
  const auto stream = op_stream(c10::cuda::getCurrentCUDAStream(device),
                                c10::cuda::CUDAStream(c10::cuda::CUDAStream::UNCHECKED, *comm_stream_), async_op);
  std::shared_ptr<StreamMark> end;
  try {
    end = transport->all_to_all(spans.sends, spans.recvs, stream.stream(), op_name);
  } catch (const std::exception& e) {
    raise_failure(e.what());
  }
  std::shared_ptr<StreamMark> done = finish_on(stream, spans, outputs, async_op, std::move(end));
  return c10::make_intrusive<EPCudaWork>(getRank(), type, std::move(outputs), stream, std::move(done), transport,
                                         faults_, config_.blocking_wait, config_.timeout);
}

}  // namespace ep
