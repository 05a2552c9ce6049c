#include "backend/process_group/process_group_ep.hpp"

#include <numeric>

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/utils/pybind.h>

#include "backend/common/errors.hpp"
#include "backend/process_group/work.hpp"
#include "backend/transport/topology.hpp"

namespace ep {

ProcessGroupEP::ProcessGroupEP(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size, Config config,
                               c10::intrusive_ptr<c10d::Backend> cpu_backend,
                               c10::intrusive_ptr<c10d::Backend> cuda_backend)
    : c10d::Backend(rank, size),
      config_(config),
      store_(store),
      rendezvous_(store, rank, size, config.timeout),
      cpu_backend_(std::move(cpu_backend)),
      cuda_backend_(std::move(cuda_backend)) {
  TORCH_CHECK(cpu_backend_, "ProcessGroupEP needs an inner CPU backend");
  faults_ = std::make_shared<FaultLog>(store, FaultLog::instance_prefix(*store, rank), rank, size);
  try {  // collective, like the group's creation: every rank learns every rank's node
    topology_ = detect_topology(rendezvous_, config.ranks_per_node, config.launch_local_world_size, host_identity(),
                                "ep/topology");
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK_VALUE(false, e.what());
  }
}

ProcessGroupEP::~ProcessGroupEP() {
  // The last reference may be a Python object dropped with the GIL held, and the inner Gloo
  // backend's destructor joins a thread that needs the GIL to free a Work's tensors: release it.
  std::optional<pybind11::gil_scoped_release> no_gil;
  if (Py_IsInitialized() && PyGILState_Check()) no_gil.emplace();
  shutdown();
}

std::string ProcessGroupEP::host_path() const {
  std::lock_guard<std::mutex> lock(host_mutex_);
  switch (host_path_) {
    case HostPath::kShm: return "shm";
    case HostPath::kGloo: return "gloo";
    default: return "";
  }
}

bool ProcessGroupEP::ranks_share_host() {
  std::lock_guard<std::mutex> lock(identity_mutex_);
  if (one_host_ < 0) {
    // Every rank must choose the same path, so each decides from everyone's identity.
    auto ids = rendezvous_.all_gather("ep/host/identity", to_bytes(host_identity()));
    one_host_ = 1;
    for (const auto& id : ids) one_host_ = one_host_ && id == ids[0];
  }
  return one_host_ == 1;
}

HostTransport* ProcessGroupEP::host_transport(const char* op_name) {
  std::lock_guard<std::mutex> lock(host_mutex_);
  if (host_path_ == HostPath::kUndecided) try {
    if (config_.host_transport && ranks_share_host()) {
      HostTransportConfig hc;
      hc.slot_bytes = config_.host_slot_bytes;
      hc.num_slots = config_.host_num_slots;
      hc.one_copy = config_.host_one_copy;
      hc.timeout = config_.timeout;
      host_transport_ = std::make_unique<HostTransport>(rendezvous_, hc, "ep/host/transport");
      host_path_ = HostPath::kShm;
      // Cleared in shutdown() before the transport goes.
      gate_->set_peer_notice([t = host_transport_.get()](const std::string& why) { t->abort(why); });
    } else {
      host_path_ = HostPath::kGloo;
    }
  } catch (const std::exception& e) {
    throw TimeoutError(std::string(op_name) + ": setting up this group's shared-memory transport failed: " + e.what());
  }
  return host_transport_.get();
}

bool ProcessGroupEP::host_one_copy() const {
  std::lock_guard<std::mutex> lock(host_mutex_);
  return host_transport_ && host_transport_->one_copy();
}

std::string ProcessGroupEP::cuda_path() const {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  if (a2av_state_) return "cuda";  // all_to_all_single / all_to_all_v on the device protocol
  switch (cuda_path_) {
    case CudaPath::kOurs: return "cuda";
    case CudaPath::kDelegated: return "delegated";
    default: return "";
  }
}

std::string ProcessGroupEP::internode_path() const {
  if (!topology_.multi_node()) return "";
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  return internode_transport_ ? "nvshmem" : "host";
}

#ifndef TORCH_EP_WITH_CUDA
bool ProcessGroupEP::internode_built() { return false; }

std::shared_ptr<InternodeTransport> ProcessGroupEP::internode_transport(const at::Device&, const char* op_name) {
  TORCH_CHECK(false, op_name, ": torch_ep was built without CUDA support");
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::internode_all_to_all(std::vector<at::Tensor>, AllToAllSpans,
                                                                    c10d::OpType, const char* op_name, bool) {
  TORCH_CHECK(false, op_name, ": torch_ep was built without CUDA support");
}

std::shared_ptr<CudaTransport> ProcessGroupEP::cuda_transport(const at::Device&, const char*) {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  cuda_path_ = CudaPath::kDelegated;
  return nullptr;
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::cuda_all_to_all(std::vector<at::Tensor>, AllToAllSpans, c10d::OpType,
                                                               const char* op_name, bool) {
  TORCH_CHECK(false, op_name, ": torch_ep was built without CUDA support");
}

std::shared_ptr<CudaTransport> ProcessGroupEP::moe_transport(const at::Device&, const char* op_name) {
  TORCH_CHECK(false, op_name, ": torch_ep was built without CUDA support");
}

void ProcessGroupEP::abort_cuda(const std::string&) {}
void ProcessGroupEP::abort_nvshmem(const std::string&) {}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::device_all_to_all_single(const at::Tensor&, AllToAllSpans,
                                                                        const std::vector<size_t>&,
                                                                        const std::vector<size_t>&, bool) {
  return {};
}

void ProcessGroupEP::check_errors() { check_usable("check_errors"); }
void ProcessGroupEP::check_internode_errors() {}

pybind11::object ProcessGroupEP::comm_pool_allocator(int) { TORCH_CHECK(false, "torch_ep was built without CUDA"); }
std::vector<int64_t> ProcessGroupEP::comm_pool_stats() { return {}; }
std::shared_ptr<CommPool> ProcessGroupEP::comm_pool() const { return nullptr; }
std::vector<int64_t> ProcessGroupEP::moe_pool_stats() { return {}; }
int64_t ProcessGroupEP::moe_pool_offset(int64_t, int64_t) { return -1; }
int64_t ProcessGroupEP::moe_exchanges() { return 0; }
std::vector<int64_t> ProcessGroupEP::peer_mappings() { return {0, 0, 0, 0}; }
void ProcessGroupEP::close_comm_pool() {}

std::shared_ptr<AllToAllVState> ProcessGroupEP::all_to_all_v_state(const at::Device&, const char*, bool) {
  return nullptr;
}
#endif

void CallGate::close(const std::string& why, bool overrule) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_.load() && !overrule) return;  // the first error is the one worth reporting
  why_ = why;
  by_failure_.store(false, std::memory_order_release);
  closed_.store(true, std::memory_order_release);
}

void CallGate::close_and_tell_peers(const std::string& why) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (!closed_.load()) {
    why_ = why;
    by_failure_.store(true, std::memory_order_release);
    closed_.store(true, std::memory_order_release);
  }
  if (peer_notice_) peer_notice_(why);
}

void CallGate::set_peer_notice(std::function<void(const std::string&)> notice) {
  std::lock_guard<std::mutex> lock(mutex_);
  peer_notice_ = std::move(notice);
}

std::string CallGate::why() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return why_;
}

void ProcessGroupEP::check_usable(const char* op) const {
  if (gate_->open()) return;
  // A failed CUDA transport: its error may be the echo of another rank's (the host path's
  // transport carries causes itself).
  const std::string why = gate_->closed_by_failure() ? faults_->report(gate_->why()) : gate_->why();
  C10_THROW_ERROR(DistBackendError, std::string(op) + " on rank " + std::to_string(getRank()) +
                                        ": this 'ep' process group takes no more calls: " + why +
                                        ". Destroy it (dist.destroy_process_group) and create a new one.");
}

void ProcessGroupEP::raise_failure(const std::string& message) const {
  C10_THROW_ERROR(DistBackendError, faults_->report(message));
}

c10::intrusive_ptr<ProcessGroupEP> ProcessGroupEP::of_group(const std::string& group_name) {
  try {
    c10::intrusive_ptr<c10d::Backend> backend =
        c10d::resolve_process_group(group_name)->getBackend(c10::DeviceType::CPU);
    if (auto* ep = dynamic_cast<ProcessGroupEP*>(backend.get())) return c10::intrusive_ptr<ProcessGroupEP>::reclaim_copy(ep);
    return {};
  } catch (const std::exception&) {  // not registered, or no CPU backend
    return {};
  }
}

void ProcessGroupEP::stop_taking_calls(const std::string& why, bool overrule) { gate_->close(why, overrule); }

c10::intrusive_ptr<c10d::Backend> ProcessGroupEP::cpu_backend(const char* op) {
  check_usable(op);
  std::lock_guard<std::mutex> lock(state_mutex_);
  TORCH_CHECK(cpu_backend_, op, ": this 'ep' process group was shut down");  // raced with shutdown()
  return cpu_backend_;
}

c10::intrusive_ptr<c10d::Backend> ProcessGroupEP::inner_for(const at::Tensor& tensor, const char* op) {
  if (!tensor.is_cuda()) return cpu_backend(op);
  check_usable(op);
  std::lock_guard<std::mutex> lock(state_mutex_);
  TORCH_CHECK(cuda_backend_ || !cpu_backend_, op, ": got a CUDA tensor, but this 'ep' group was created without "
              "CUDA (torch.cuda.is_available() was False)");
  TORCH_CHECK(cuda_backend_, op, ": this 'ep' process group was shut down");
  return cuda_backend_;
}

c10::intrusive_ptr<c10d::Backend> ProcessGroupEP::inner_for(const std::vector<at::Tensor>& tensors, const char* op) {
  return tensors.empty() ? cpu_backend(op) : inner_for(tensors[0], op);
}

// ----------------------------------------------------------------------------- all_to_all

namespace {

at::Tensor contiguous_staging(const at::Tensor& output, AllToAllSpans& spans) {
  if (output.is_contiguous()) return output;
  at::Tensor staging = at::empty_like(output, at::MemoryFormat::Contiguous);
  spans.copy_back.emplace_back(output, staging);
  return staging;
}

// all_to_all_single: one tensor each way, cut into per-rank blocks by `layout`.
AllToAllSpans single_spans(const at::Tensor& output, const at::Tensor& input, const AllToAllLayout& layout) {
  AllToAllSpans spans;
  const at::Tensor in = input.contiguous();
  const at::Tensor out = contiguous_staging(output, spans);
  const auto* in_ptr = static_cast<const char*>(in.data_ptr());
  auto* out_ptr = static_cast<char*>(out.data_ptr());
  for (size_t r = 0; r < layout.send_bytes.size(); ++r) {
    spans.sends.push_back({in_ptr + layout.send_offsets[r], layout.send_bytes[r]});
    spans.recvs.push_back({out_ptr + layout.recv_offsets[r], layout.recv_bytes[r]});
  }
  spans.buffers = {in, out};
  return spans;
}

// all_to_all: a tensor per rank each way.
AllToAllSpans list_spans(const std::vector<at::Tensor>& outputs, const std::vector<at::Tensor>& inputs) {
  AllToAllSpans spans;
  for (size_t r = 0; r < inputs.size(); ++r) {
    const at::Tensor in = inputs[r].contiguous();
    const at::Tensor out = contiguous_staging(outputs[r], spans);
    spans.sends.push_back({in.data_ptr(), in.nbytes()});
    spans.recvs.push_back({out.data_ptr(), out.nbytes()});
    spans.buffers.push_back(in);
    spans.buffers.push_back(out);
  }
  return spans;
}

}  // namespace

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::host_all_to_all(
    std::vector<at::Tensor> outputs, AllToAllSpans spans, c10d::OpType type, const char* op_name,
    std::function<c10::intrusive_ptr<c10d::Work>()> delegate) {
  check_usable(op_name);
  auto work = c10::make_intrusive<EPWork>(getRank(), type, op_name, outputs);
  // The task holds the tensors until it has run: they stay alive however the caller drops them.
  host_worker_.enqueue([this, work, spans = std::move(spans), op_name, delegate = std::move(delegate)]() mutable {
    std::exception_ptr error;
    try {
      if (HostTransport* transport = host_transport(op_name)) {
        transport->all_to_all(spans.sends, spans.recvs, op_name);
        for (const auto& [output, staging] : spans.copy_back) output.copy_(staging);
      } else {
        delegate()->wait();
      }
    } catch (const CommError& e) {
      // Timeouts included: the transport no longer agrees with the peers on what comes next, so
      // nothing on this group is safe. Recorded for the ranks that wait on this one over CUDA
      // (the MoE ops exchange their records here); this path's own message stays as it is.
      stop_taking_calls(std::string("an earlier call failed: ") + e.what());
      faults_->record(e.what(), /*wait=*/false);
      error = as_dist_error(std::current_exception());
    } catch (...) {
      error = as_dist_error(std::current_exception());
    }
    // The tensors go before the caller can go on (and perhaps exit): freeing one may need the
    // GIL, and a thread that asks a finalizing interpreter for it is ended on the spot.
    spans = AllToAllSpans();
    delegate = nullptr;
    work->complete(error);
  });
  return work;
}

void ProcessGroupEP::host_exchange(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                                   const char* op_name) {
  AllToAllSpans spans;
  spans.sends = sends;
  spans.recvs = recvs;
  // Where the ranks span hosts, the same bytes go through Gloo as one uint8 all_to_all_single.
  auto delegate = [this, cpu = cpu_backend(op_name), sends, recvs]() {
    std::vector<int64_t> in_splits, out_splits;
    std::vector<at::Tensor> ins, outs;
    for (size_t p = 0; p < sends.size(); ++p) {
      in_splits.push_back(int64_t(sends[p].bytes));
      out_splits.push_back(int64_t(recvs[p].bytes));
      ins.push_back(at::from_blob(const_cast<void*>(sends[p].ptr), {int64_t(sends[p].bytes)}, at::kByte));
      outs.push_back(at::from_blob(recvs[p].ptr, {int64_t(recvs[p].bytes)}, at::kByte));
    }
    at::Tensor input = at::cat(ins), output = at::empty({std::accumulate(out_splits.begin(), out_splits.end(),
                                                                          int64_t(0))}, at::kByte);
    cpu->alltoall_base(output, input, out_splits, in_splits)->wait();
    int64_t at = 0;
    for (size_t p = 0; p < outs.size(); ++p) {
      outs[p].copy_(output.narrow(0, at, out_splits[p]));
      at += out_splits[p];
    }
    auto done = c10::make_intrusive<EPWork>(getRank(), c10d::OpType::ALLTOALL_BASE, "ep:delegated",
                                            std::vector<at::Tensor>{});
    done->complete();
    return c10::intrusive_ptr<c10d::Work>(done);
  };
  auto work = host_all_to_all({}, std::move(spans), c10d::OpType::ALLTOALL_BASE, op_name, delegate);
  // Peers may take a while; other Python threads go on meanwhile.
  std::optional<pybind11::gil_scoped_release> no_gil;
  if (Py_IsInitialized() && PyGILState_Check()) no_gil.emplace();
  work->wait();
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::alltoall_base(at::Tensor& output, at::Tensor& input,
                                                             std::vector<int64_t>& output_split_sizes,
                                                             std::vector<int64_t>& input_split_sizes,
                                                             const c10d::AllToAllOptions& opts) {
  check_usable("all_to_all_single");
  AllToAllLayout layout =
      check_all_to_all_single(output, input, output_split_sizes, input_split_sizes, getSize());
  // A group with a comm pool: the device protocol on every rank, whose plan picks one copy
  if (input.is_cuda() && comm_pool())
    if (auto work = device_all_to_all_single(output, single_spans(output, input, layout), layout.send_bytes,
                                             layout.recv_bytes, opts.asyncOp))
      return work;
  if (input.is_cuda() && topology_.multi_node() && internode_built())  // peers on other nodes: NVSHMEM
    return internode_all_to_all({output}, single_spans(output, input, layout), c10d::OpType::ALLTOALL_BASE,
                                "all_to_all_single", opts.asyncOp);
  if (input.is_cuda() && config_.all_to_all_device)
    if (auto work = device_all_to_all_single(output, single_spans(output, input, layout), layout.send_bytes,
                                             layout.recv_bytes, opts.asyncOp))
      return work;
  if (input.is_cuda() && cuda_transport(input.device(), "all_to_all_single"))
    // Staging happens on the caller's stream, before the comm stream forks (async_op).
    return cuda_all_to_all({output}, single_spans(output, input, layout), c10d::OpType::ALLTOALL_BASE,
                           "all_to_all_single", opts.asyncOp);
  if (!input.device().is_cpu())
    return inner_for(input, "all_to_all_single")->alltoall_base(output, input, output_split_sizes,
                                                                input_split_sizes, opts);
  return host_all_to_all({output}, single_spans(output, input, layout), c10d::OpType::ALLTOALL_BASE,
                         "all_to_all_single", [cpu = cpu_backend("all_to_all_single"), output, input,
                                               output_split_sizes, input_split_sizes]() mutable {
                           return cpu->alltoall_base(output, input, output_split_sizes, input_split_sizes);
                         });
}

c10::intrusive_ptr<c10d::Work> ProcessGroupEP::alltoall(std::vector<at::Tensor>& outputs,
                                                        std::vector<at::Tensor>& inputs,
                                                        const c10d::AllToAllOptions& opts) {
  check_usable("all_to_all");
  check_all_to_all(outputs, inputs, getSize());
  if (inputs[0].is_cuda() && topology_.multi_node() && internode_built())
    return internode_all_to_all(outputs, list_spans(outputs, inputs), c10d::OpType::ALLTOALL, "all_to_all",
                                opts.asyncOp);
  if (inputs[0].is_cuda() && cuda_transport(inputs[0].device(), "all_to_all"))
    return cuda_all_to_all(outputs, list_spans(outputs, inputs), c10d::OpType::ALLTOALL, "all_to_all", opts.asyncOp);
  if (!inputs[0].device().is_cpu()) return inner_for(inputs, "all_to_all")->alltoall(outputs, inputs, opts);
  return host_all_to_all(outputs, list_spans(outputs, inputs), c10d::OpType::ALLTOALL, "all_to_all",
                         [cpu = cpu_backend("all_to_all"), outputs, inputs]() mutable {
                           return cpu->alltoall(outputs, inputs);
                         });
}

// ----------------------------------------------------------------------------- abort, shutdown

void ProcessGroupEP::abort() {
  stop_taking_calls("it was aborted (abort())");
  {
    // A wait in progress on the worker thread fails now, and so do the peers' waits on this rank.
    std::lock_guard<std::mutex> lock(host_mutex_);
    if (host_transport_) host_transport_->abort("rank " + std::to_string(getRank()) + " aborted its process group");
  }
  abort_cuda("rank " + std::to_string(getRank()) + " aborted its process group");  // releases kernel waits
  abort_nvshmem("rank " + std::to_string(getRank()) + " aborted its process group");
  c10::intrusive_ptr<c10d::Backend> cpu, cuda;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    cpu = cpu_backend_;
    cuda = cuda_backend_;
  }
  if (cpu) cpu->abort();
  if (cuda && cuda != cpu) cuda->abort();
}

void ProcessGroupEP::shutdown() {
  // Threads are joined below; they may need the GIL to free Python tensors.
  std::optional<pybind11::gil_scoped_release> no_gil;
  if (Py_IsInitialized() && PyGILState_Check()) no_gil.emplace();
  stop_taking_calls("it was shut down (destroy_process_group or shutdown())", /*overrule=*/true);
  host_worker_.stop();
  {
    std::lock_guard<std::mutex> lock(host_mutex_);
    gate_->set_peer_notice(nullptr);
    host_transport_.reset();  // unmaps the segments; their names were unlinked at set-up
  }
  close_comm_pool();  // first: it waits for the calls in flight on a2av_state_'s device
  {
    std::lock_guard<std::mutex> lock(cuda_mutex_);
    cuda_transport_.reset();  // Works still alive keep it until they go
    moe_transport_.reset();
    a2av_state_.reset();
  }
  // The inner backends go now, not with the last reference to this group, which a user's module
  // may hold until the interpreter exits: Gloo's threads free finished Works' tensors, which
  // needs the GIL, and a thread asking a finalizing interpreter for it is ended inside a
  // destructor (std::terminate: "terminate called without an active exception").
  c10::intrusive_ptr<c10d::Backend> cpu, cuda;
  {
    std::lock_guard<std::mutex> lock(state_mutex_);
    cpu = std::move(cpu_backend_);
    cuda = std::move(cuda_backend_);
  }
  if (cpu) cpu->shutdown();
  if (cuda && cuda != cpu) cuda->shutdown();
}  // `cpu` and `cuda` held the last references: their destructors join their threads here

}  // namespace ep
