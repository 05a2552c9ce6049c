#include "backend/transport/nvshmem/low_latency_buffer.hpp"

#include <algorithm>
#include <cstdlib>
#include <unordered_map>
#include <vector>

#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/kernel_preload.hpp"
#include "backend/transport/nvshmem/nvshmem_runtime.hpp"

namespace ep {

using kernels::ll::LowLatencyLayout;

LowLatencyBuffer::LowLatencyBuffer(int rank, int size, int device, std::chrono::milliseconds timeout, int num_sms)
    : rank_(rank), size_(size), device_(device), timeout_(timeout) {
  nvshmem::whatif_copy_puts();  // a bad TORCH_EP_WHATIF_COPY_PUTS raises at set-up, not in a call
  if (size > kernels::ll::kMaxRanks)
    throw CommError("torch_ep: low-latency ops support groups of up to " + std::to_string(kernels::ll::kMaxRanks) +
                    " ranks, this one has " + std::to_string(size));
  preload_kernels(device);  // before any kernel of ours can spin (kernel_preload.hpp)
  int sms = num_sms;
  if (sms <= 0) EP_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  num_blocks_ = sms;
  EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&words_host_), kWords * sizeof(int), cudaHostAllocMapped));
  words_host_[kFailure] = words_host_[kPending] = 0;
  EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&words_device_), words_host_, 0));
  EP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&gave_up_), sizeof(uint32_t)));
  EP_CUDA_CHECK(cudaMemset(gave_up_, 0, sizeof(uint32_t)));
  EP_CUDA_CHECK(cudaDeviceSynchronize());  // zero before any kernel, whatever stream it runs on
  pinned_one();  // abort()'s source, made now (set_device_flag)
  const char* trace = std::getenv("TORCH_EP_LL_TRACE");
  if (trace && std::string(trace) == "1") {
    EP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&trace_), kernels::ll::kTraceWords * sizeof(uint64_t)));
    EP_CUDA_CHECK(cudaMemset(trace_, 0, kernels::ll::kTraceWords * sizeof(uint64_t)));
  }
}

LowLatencyBuffer::~LowLatencyBuffer() {
  if (words_host_) cudaFreeHost(words_host_);
  if (gave_up_) cudaFree(gave_up_);
  if (trace_) cudaFree(trace_);
}

std::vector<uint64_t> LowLatencyBuffer::trace() const {
  std::vector<uint64_t> words;
  if (!trace_) return words;
  words.resize(size_t(kernels::ll::kTraceWords));
  EP_CUDA_CHECK(cudaSetDevice(device_));
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  EP_CUDA_CHECK(cudaMemcpy(words.data(), trace_, words.size() * sizeof(uint64_t), cudaMemcpyDeviceToHost));
  return words;
}

bool LowLatencyBuffer::fits(const LowLatencyLayout& n) const {
  return base_ && n.num_ranks == layout_.num_ranks && n.num_local_experts <= layout_.num_local_experts &&
         n.max_tokens <= layout_.max_tokens && n.max_hidden <= layout_.max_hidden && n.remote <= layout_.remote;
}

std::vector<int> LowLatencyBuffer::remote_ranks() const {
  std::vector<int> remote;
  for (size_t r = 0; r < peers_.size(); ++r)
    if (!peers_[r]) remote.push_back(int(r));
  return remote;
}

bool LowLatencyBuffer::reserve(const LowLatencyLayout& need, const std::vector<int>& remote_ranks) {
  if (fits(need)) return false;
  LowLatencyLayout grown = need;
  grown.num_ranks = size_;
  if (base_) {
    grown.num_local_experts = std::max(grown.num_local_experts, layout_.num_local_experts);
    grown.max_tokens = std::max(grown.max_tokens, layout_.max_tokens);
    grown.max_hidden = std::max(grown.max_hidden, layout_.max_hidden);
    grown.remote = std::max(grown.remote, layout_.remote);
  }
  EP_CUDA_CHECK(cudaSetDevice(device_));
  EP_CUDA_CHECK(cudaDeviceSynchronize());  // no kernel of ours still uses the old buffer
  if (base_) nvshmem::free_symmetric(base_);
  base_ = nullptr;
  peers_.clear();
  char* base = static_cast<char*>(nvshmem::malloc_symmetric(size_t(grown.total_bytes())));
  std::string unmapped;
  std::vector<char*> peers(size_t(size_), nullptr);
  bool remote_by_p2p = true;
  for (int pe = 0; pe < size_; ++pe) {
    const bool forced = pe != rank_ && std::find(remote_ranks.begin(), remote_ranks.end(), pe) != remote_ranks.end();
    char* mapped = static_cast<char*>(nvshmem::peer_ptr(base, pe));
    if (!forced) peers[pe] = mapped;
    if (!mapped) remote_by_p2p = false;  // a NIC reaches it
    if (!peers[pe] && !forced) unmapped += (unmapped.empty() ? "" : ", ") + std::to_string(pe);
  }
  if (!peers[rank_]) throw CommError("torch_ep: nvshmem_ptr cannot map this rank's own low-latency buffer");
  // Remote regions are sized for groups that span nodes only (the same on every rank, as the
  // symmetric allocation must be): a peer that cannot be mapped on one node is a setup error.
  if (!unmapped.empty() && !grown.remote)
    throw CommError("torch_ep: low-latency ops reach the ranks of their own node by NVLink/P2P (nvshmem_ptr), but "
                    "rank " + std::to_string(rank_) + " cannot map the buffers of ranks " + unmapped +
                    ", which the group's topology puts on its node (NVLink P2P off, or ranks sharing a GPU without "
                    "MPS?)");
  // Flags and counters zero; every credit complete (nothing to protect yet). gave_up stays as it
  // is: once set, the failure word is set too, and every call raises before it launches.
  EP_CUDA_CHECK(cudaMemset(base, 0, size_t(grown.total_bytes())));
  const std::vector<uint64_t> given(size_t(size_), kernels::ll::kCompleteWord);
  for (int half = 0; half < 2; ++half) {
    char* h = base + half * grown.half_bytes();
    EP_CUDA_CHECK(cudaMemcpy(h + grown.dispatch_credits(), given.data(), given.size() * 8, cudaMemcpyHostToDevice));
    EP_CUDA_CHECK(cudaMemcpy(h + grown.combine_credits(), given.data(), given.size() * 8, cudaMemcpyHostToDevice));
  }
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  base_ = base;
  peers_ = std::move(peers);
  remote_by_p2p_ = remote_by_p2p;
  layout_ = grown;
  calls_[0] = calls_[1] = 0;
  return true;
}

void LowLatencyBuffer::abort() noexcept {
  // The failure word names the abort unless a timeout got there first (or stores over it: either
  // is fatal, and the word is never cleared); gave_up ends the kernels' waits at once.
  int none = 0;
  const int aborted = kernels::ll::kAborted * 65536 + rank_ + 1;
  __atomic_compare_exchange_n(&words_host_[kFailure], &none, aborted, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  set_device_flag(device_, gave_up_);
}

bool LowLatencyBuffer::failed() const { return __atomic_load_n(&words_host_[kFailure], __ATOMIC_ACQUIRE) != 0; }

std::string LowLatencyBuffer::describe(int code) const {
  const int kind = kernels::ll::error_kind(code), peer = kernels::ll::error_peer(code);
  const std::string timeout = std::to_string(double(timeout_.count()) / 1000.0) + " s";
  switch (kind) {
    case kernels::ll::kDispatchSendTimeout:
      return "a low_latency_dispatch send waited past the timeout (" + timeout + ") for rank " + std::to_string(peer) +
             " to finish receiving the dispatch before last on the same buffer half (more than two dispatches in "
             "flight, or a rank stopped calling)";
    case kernels::ll::kDispatchRecvTimeout:
      return "a low_latency_dispatch receive waited past the timeout (" + timeout + ") for rank " +
             std::to_string(peer) + " to send";
    case kernels::ll::kCombineSendTimeout:
      return "a low_latency_combine send waited past the timeout (" + timeout + ") for rank " + std::to_string(peer) +
             " to finish receiving the combine before last on the same buffer half";
    case kernels::ll::kCombineRecvTimeout:
      return "a low_latency_combine receive waited past the timeout (" + timeout + ") for rank " +
             std::to_string(peer) + " to send";
    case kernels::ll::kDispatchOverflow:
      return "a low_latency_dispatch sent more than max_tokens_per_rank rows to one expert of rank " +
             std::to_string(peer) + " (a token naming one expert in several slots?); the extra rows were dropped";
    case kernels::ll::kBadExpert:
      return "a low_latency_dispatch got a topk_idx entry outside [-1, num_experts) on rank " + std::to_string(peer) +
             "; such slots were not routed";
    case kernels::ll::kAborted:
      return "the process group was aborted (abort()) and its low-latency kernels stopped waiting";
    default:
      return "a low-latency kernel reported error code " + std::to_string(code);
  }
}

void LowLatencyBuffer::check(const char* op) {
  // Every call passes here: two loads, and the message only once there is something to raise.
  auto prefix = [&] { return std::string("torch_ep: ") + op + ": rank " + std::to_string(rank_) + ": "; };
  // A failure stays in its word: this call and every later one raise it, from any thread.
  if (const int failure = __atomic_load_n(&words_host_[kFailure], __ATOMIC_ACQUIRE); failure != 0)
    throw CommError(prefix() + describe(failure) +
                    "; the group's low-latency buffers are out of step since, so every later call raises");
  const int pending = __atomic_load_n(&words_host_[kPending], __ATOMIC_ACQUIRE);
  if (pending == 0) return;
  // Cleared only if it still holds this code (a kernel may have stored another since: the next
  // check raises that one); raised once, and the group goes on.
  int seen = pending;
  __atomic_compare_exchange_n(&words_host_[kPending], &seen, 0, false, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
  throw CommError(prefix() + describe(pending) + " (reported by an earlier call's kernel)");
}

kernels::ll::GroupArgs LowLatencyBuffer::args(int half) const {
  kernels::ll::GroupArgs g{};
  g.rank = rank_;
  g.num_ranks = size_;
  g.half = base_ + half * layout_.half_bytes();
  for (size_t r = 0; r < peers_.size(); ++r) g.peers[r] = peers_[r] ? peers_[r] + half * layout_.half_bytes() : nullptr;
  g.layout = layout_;
  g.num_blocks = num_blocks_;
  g.timeout_ns = uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout_).count());
  g.error = words_device_ + kFailure;
  g.pending = words_device_ + kPending;
  g.gave_up = gave_up_;
  g.trace = trace_;
  g.whatif_copy_puts = nvshmem::whatif_copy_puts();
  return g;
}

namespace {
std::mutex registry_mutex;
std::unordered_map<std::string, std::unique_ptr<LowLatencyBuffer>>& registry() {
  static auto* r = new std::unordered_map<std::string, std::unique_ptr<LowLatencyBuffer>>();  // never destroyed
  return *r;
}
}  // namespace

LowLatencyBuffer* find_low_latency_buffer(const std::string& group_name) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = registry().find(group_name);
  return it == registry().end() ? nullptr : it->second.get();
}

void abort_low_latency_buffer(const std::string& group_name) noexcept {
  if (LowLatencyBuffer* buffer = find_low_latency_buffer(group_name)) buffer->abort();
}

bool reserve_low_latency_buffer(const std::string& group_name, int rank, int size, int device,
                                std::chrono::milliseconds timeout, int num_sms, const LowLatencyLayout& need,
                                const std::vector<int>& remote_ranks) {
  LowLatencyBuffer* buffer;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto& slot = registry()[group_name];
    if (!slot) slot = std::make_unique<LowLatencyBuffer>(rank, size, device, timeout, num_sms);
    buffer = slot.get();
  }
  if (buffer->rank() != rank || buffer->size() != size || buffer->device() != device)
    throw CommError("torch_ep: group '" + group_name + "' already has low-latency buffers for rank " +
                    std::to_string(buffer->rank()) + " of " + std::to_string(buffer->size()) + " on cuda:" +
                    std::to_string(buffer->device()));
  return buffer->reserve(need, remote_ranks);
}

}  // namespace ep
