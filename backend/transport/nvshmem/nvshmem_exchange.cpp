#include "backend/transport/nvshmem/nvshmem_exchange.hpp"

#include <c10/util/Exception.h>
#include <nvshmem.h>
#include <nvshmemx.h>

#include <algorithm>

#include "backend/kernels/internode.cuh"
#include "backend/kernels/internode_exchange.cuh"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/nvshmem/nvshmem_runtime.hpp"

namespace ep {
namespace {

constexpr size_t kAlign = 4096;
size_t round_up(size_t x, size_t a) { return (x + a - 1) / a * a; }
uint64_t chunks_of(size_t bytes, size_t chunk) { return (bytes + chunk - 1) / chunk; }

}  // namespace

NvshmemExchange::NvshmemExchange(int rank, int size, const NvshmemExchangeConfig& config)
    : rank_(rank),
      size_(size),
      num_slots_(std::max(config.num_slots, 1)),
      chunk_bytes_(round_up(std::max<size_t>(config.chunk_bytes, kAlign), kAlign)),
      timeout_(config.timeout),
      device_driven_(config.device_driven),
      device_(config.device),
      chunks_sent_(size, 0),
      chunks_received_(size, 0) {
  nvshmem::whatif_copy_puts();  // a bad TORCH_EP_WHATIF_COPY_PUTS raises at set-up, not in a call
  EP_CUDA_CHECK(cudaSetDevice(config.device));
  const size_t data = 2 * size_t(size) * num_slots_ * chunk_bytes_;  // receive slots, then send slots
  const size_t signals = 2 * size_t(size) * num_slots_ * sizeof(uint64_t);
  base_ = static_cast<char*>(nvshmem::malloc_symmetric(data + signals));  // collective
  EP_CUDA_CHECK(cudaMemset(base_ + data, 0, signals));
  EP_CUDA_CHECK(cudaHostAlloc(reinterpret_cast<void**>(&error_host_), sizeof(int), cudaHostAllocMapped));
  *error_host_ = 0;
  EP_CUDA_CHECK(cudaHostGetDevicePointer(reinterpret_cast<void**>(&error_device_), error_host_, 0));
  EP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&gave_up_), sizeof(uint32_t)));
  EP_CUDA_CHECK(cudaMemset(gave_up_, 0, sizeof(uint32_t)));
  pinned_one();  // abort()'s source, made now (set_device_flag)
  EP_CUDA_CHECK(cudaDeviceSynchronize());
  nvshmem_barrier_all();  // no peer signals us before our signals are zero
}

NvshmemExchange::~NvshmemExchange() {
  // The symmetric buffer stays: nvshmem_free is collective and ranks leave at different times.
  if (error_host_) cudaFreeHost(error_host_);
  if (gave_up_) cudaFree(gave_up_);
}

char* NvshmemExchange::slot(char* base, int src, int index) const {
  return base + (size_t(src) * num_slots_ + index) * chunk_bytes_;
}
char* NvshmemExchange::send_slot(char* base, int dst, int index) const {
  return slot(base, size_ + dst, index);
}
uint64_t* NvshmemExchange::full_signal(char* base, int src, int index) const {
  return reinterpret_cast<uint64_t*>(base + 2 * size_t(size_) * num_slots_ * chunk_bytes_) + src * num_slots_ + index;
}
uint64_t* NvshmemExchange::credit_signal(char* base, int dst, int index) const {
  return full_signal(base, 0, 0) + size_t(size_) * num_slots_ + dst * num_slots_ + index;
}

std::string NvshmemExchange::error() {
  std::lock_guard<std::mutex> lock(error_mutex_);
  const int code = *static_cast<volatile int*>(error_host_);
  if (failed_.empty() && code != 0)
    failed_ = "rank " + std::to_string(rank_) + "'s internode (NVSHMEM) exchange" +
              (last_op_.empty() ? "" : " (in " + last_op_ + ")") + " waited past the timeout (" +
              std::to_string(timeout_.count()) + " ms) for rank " + std::to_string(code - 1) +
              " (it never came, or the ranks disagree on a message's size); its signals are out of step since, so "
              "this group takes no more internode calls";
  return failed_;
}

void NvshmemExchange::abort(const std::string& why) {
  {
    std::lock_guard<std::mutex> lock(error_mutex_);
    if (failed_.empty()) failed_ = why + "; this group takes no more internode calls";
  }
  if (gave_up_) set_device_flag(device_, gave_up_);
}

void NvshmemExchange::check(const char* op_name) {
  if (const std::string failed = error(); !failed.empty()) throw CommError(std::string(op_name) + ": " + failed);
}

void NvshmemExchange::all_to_all(const std::vector<int>& peers, const std::vector<SendBuffer>& sends,
                                 const std::vector<RecvBuffer>& recvs, cudaStream_t stream, const char* op_name) {
  check(op_name);
  // The chunk numbers (chunks_sent_, chunks_received_) are host counters baked into what is
  // queued: a graph would replay them unchanged. The callers refuse a capture before they queue
  // anything; this keeps the class's own rule.
  TORCH_CHECK_VALUE(!stream_capturing(stream), op_name, ": inside a CUDA graph capture, the NVSHMEM hop across "
                    "nodes cannot be captured (it counts chunks on the host, which a replay would repeat)");
  {
    std::lock_guard<std::mutex> lock(error_mutex_);
    last_op_ = op_name;
  }
  // The slots and signal counts carry from call to call: a call queued on another stream than
  // the last one's waits for it (all_to_all's hop and the host-driven route's rail hop alike).
  order_.begin(stream);
  // Both ways keep the same slots, signal values and counters, so either may take any call.
  if (device_driven_ && peers.size() <= size_t(kernels::kMaxExchangePeers))
    all_to_all_on_device(peers, sends, recvs, stream);
  else
    all_to_all_in_rounds(peers, sends, recvs, stream);
  order_.end(stream, std::make_shared<StreamMark>(device_, stream));
}

void NvshmemExchange::all_to_all_in_rounds(const std::vector<int>& peers, const std::vector<SendBuffer>& sends,
                                           const std::vector<RecvBuffer>& recvs, cudaStream_t stream) {
  const size_t S = size_t(num_slots_);
  uint64_t rounds = 0;
  for (int p : peers)
    rounds = std::max({rounds, chunks_of(sends[p].bytes, chunk_bytes_), chunks_of(recvs[p].bytes, chunk_bytes_)});
  const uint64_t timeout_ns = uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout_).count());
  auto flush = [&](kernels::WaitSignalsParams& w) {
    if (w.count == 0) return;
    w.timeout_ns = timeout_ns;
    w.error = error_device_;
    EP_CUDA_CHECK(kernels::launch_wait_signals(w, stream));
    w.count = 0;
  };
  auto add_wait = [&](kernels::WaitSignalsParams& w, const uint64_t* signal, uint64_t at_least, int peer) {
    if (w.count == kernels::kMaxWaitSignals) flush(w);
    w.signal[w.count] = signal;
    w.at_least[w.count] = at_least;
    w.peer[w.count] = peer;
    ++w.count;
  };
  for (uint64_t k = 0; k < rounds; ++k) {
    // Sends of round k: each waits for the peer to have emptied the slot's previous chunk.
    kernels::WaitSignalsParams w{};
    for (int p : peers) {
      if (k >= chunks_of(sends[p].bytes, chunk_bytes_)) continue;
      const uint64_t i = chunks_sent_[p] + k;
      if (i >= S) add_wait(w, credit_signal(base_, p, int(i % S)), i / S, p);
    }
    flush(w);
    for (int p : peers) {
      if (k >= chunks_of(sends[p].bytes, chunk_bytes_)) continue;
      const uint64_t i = chunks_sent_[p] + k;
      const size_t n = std::min(chunk_bytes_, sends[p].bytes - size_t(k) * chunk_bytes_);
      // Staged through our own symmetric memory: RDMA transports put only from registered memory.
      // The put is the blocking kind, so the stage is free again once the stream passes it.
      char* stage = send_slot(base_, p, int(i % S));
      EP_CUDA_CHECK(cudaMemcpyAsync(stage, static_cast<const char*>(sends[p].ptr) + k * chunk_bytes_, n,
                                    cudaMemcpyDeviceToDevice, stream));
      nvshmemx_putmem_signal_on_stream(slot(base_, rank_, int(i % S)), stage, n, full_signal(base_, rank_, int(i % S)),
                                       i / S + 1, NVSHMEM_SIGNAL_SET, p, stream);
      bytes_sent_ += n;
    }
    // Receives of round k: wait for the chunk, copy it out, give the slot back.
    for (int p : peers) {
      if (k >= chunks_of(recvs[p].bytes, chunk_bytes_)) continue;
      const uint64_t j = chunks_received_[p] + k;
      add_wait(w, full_signal(base_, p, int(j % S)), j / S + 1, p);
    }
    flush(w);
    for (int p : peers) {
      if (k >= chunks_of(recvs[p].bytes, chunk_bytes_)) continue;
      const uint64_t j = chunks_received_[p] + k;
      const size_t n = std::min(chunk_bytes_, recvs[p].bytes - size_t(k) * chunk_bytes_);
      EP_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(recvs[p].ptr) + k * chunk_bytes_, slot(base_, p, int(j % S)),
                                    n, cudaMemcpyDeviceToDevice, stream));
      nvshmemx_signal_op_on_stream(credit_signal(base_, rank_, int(j % S)), j / S + 1, NVSHMEM_SIGNAL_SET, p, stream);
    }
  }
  for (int p : peers) {
    chunks_sent_[p] += chunks_of(sends[p].bytes, chunk_bytes_);
    chunks_received_[p] += chunks_of(recvs[p].bytes, chunk_bytes_);
  }
}

void NvshmemExchange::all_to_all_on_device(const std::vector<int>& peers, const std::vector<SendBuffer>& sends,
                                           const std::vector<RecvBuffer>& recvs, cudaStream_t stream) {
  kernels::ExchangeParams p{};
  p.base = base_;
  p.rank = rank_;
  p.size = size_;
  p.num_slots = num_slots_;
  p.chunk_bytes = chunk_bytes_;
  p.timeout_ns = uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout_).count());
  p.error = error_device_;
  p.gave_up = gave_up_;
  p.whatif_copy_puts = nvshmem::whatif_copy_puts();
  // The peers in the order of their rounds in the schedule: both ends of a pair then order
  // their pairs alike (see ExchangeParams).
  std::vector<bool> is_peer(size_t(size_), false);
  for (int pe : peers) is_peer[size_t(pe)] = true;
  p.num_peers = 0;
  for (int round = 0; round < kernels::exchange_rounds(size_); ++round) {
    const int pe = kernels::exchange_partner(round, rank_, size_);
    if (pe < 0 || !is_peer[size_t(pe)]) continue;
    kernels::ExchangePeer& e = p.peers[p.num_peers++];
    e.pe = pe;
    e.send = static_cast<const char*>(sends[pe].ptr);
    e.send_bytes = sends[pe].bytes;
    e.sent_before = chunks_sent_[pe];
    e.recv = static_cast<char*>(recvs[pe].ptr);
    e.recv_bytes = recvs[pe].bytes;
    e.received_before = chunks_received_[pe];
    chunks_sent_[pe] += chunks_of(sends[pe].bytes, chunk_bytes_);
    chunks_received_[pe] += chunks_of(recvs[pe].bytes, chunk_bytes_);
    bytes_sent_ += sends[pe].bytes;
  }
  EP_CUDA_CHECK(kernels::launch_exchange(p, stream));
}

}  // namespace ep
