// CudaTransport::all_to_all, the host protocol: the control exchange of sizes and receive
// handles over shared memory, then the direct path (one copy: the copy engines, or one kernel for
// small messages) or the staged path through the registered blocks (cuda_transport.hpp).
#include <cuda.h>

#include <algorithm>
#include <cstring>

#include "backend/common/env_switch.hpp"
#include "backend/common/phase_clock.hpp"
#include "backend/kernels/all_to_all.cuh"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/cuda_transport.hpp"

namespace ep {
namespace {

// The self copy from this size on runs beside the peers' traffic (all_to_all below).
constexpr size_t kSelfCopyBesideBytes = size_t(1) << 20;

// What a rank tells one peer at the start of every call.
struct ControlRecord {
  uint64_t send_bytes;    // what I send you
  uint64_t expect_bytes;  // what I expect from you
  uint64_t offset;        // where in the exported allocation your data goes
  uint32_t exported;      // 1 when `handle` is valid (or nothing is expected)
  uint32_t pad;
  cudaIpcMemHandle_t handle;
};
static_assert(sizeof(ControlRecord) <= 256, "a control record fits one control slot");

void wait_flag(cudaStream_t s, uint32_t* flag) {
  EP_CU_CHECK(cuStreamWaitValue32(s, reinterpret_cast<CUdeviceptr>(flag), 1, CU_STREAM_WAIT_VALUE_GEQ));
}
void write_flag(cudaStream_t s, uint32_t* flag, uint32_t value) {
  EP_CU_CHECK(cuStreamWriteValue32(s, reinterpret_cast<CUdeviceptr>(flag), value, CU_STREAM_WRITE_VALUE_DEFAULT));
}

}  // namespace

std::shared_ptr<StreamMark> CudaTransport::all_to_all(const std::vector<SendBuffer>& sends,
                                                     const std::vector<RecvBuffer>& recvs, cudaStream_t stream,
                                                     const char* op_name) {
  phase_clock::Steps step;  // the host's share of a call, for tools/a2a_profile.py
  step.next("ep::host_protocol/checks");
  check_healthy(op_name);
  EP_CUDA_CHECK(cudaSetDevice(buffers_.device()));
  const std::unique_lock<std::mutex> hold = hold_mappings();  // until the call is tracked

  // 1. Control exchange: sizes both ways, and where each peer's data should land.
  step.next("ep::host_protocol/export");
  std::vector<ControlRecord> mine(size_), theirs(size_);
  bool all_exported = true;
  Export last;  // the output's allocation, looked up once
  for (int p = 0; p < size_; ++p) {
    ControlRecord& r = mine[p];
    std::memset(&r, 0, sizeof(r));
    r.send_bytes = sends[p].bytes;
    r.expect_bytes = recvs[p].bytes;
    r.exported = 1;
    if (p == rank_ || recvs[p].bytes == 0) continue;
    if (!export_allocation(recvs[p].ptr, &r.handle, &r.offset, &last)) {
      r.exported = 0;
      all_exported = false;
    }
  }
  std::vector<SendBuffer> ctrl_sends(size_);
  std::vector<RecvBuffer> ctrl_recvs(size_);
  for (int p = 0; p < size_; ++p) {
    ctrl_sends[p] = {&mine[p], sizeof(ControlRecord)};
    ctrl_recvs[p] = {&theirs[p], sizeof(ControlRecord)};
  }
  step.next("ep::host_protocol/exchange");  // the peers' records: this rank waits for the last to come
  control_exchange(ctrl_sends, ctrl_recvs, op_name);
  std::vector<int> peers;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    if (theirs[p].expect_bytes != sends[p].bytes || theirs[p].send_bytes != recvs[p].bytes) {
      // Both ranks of the pair raise; peers that queued work with them are released by their
      // watchdogs. The flags no longer agree, so this transport takes no more calls.
      std::string msg = std::string(op_name) + ": rank " + name(rank_) + " sends " +
                        std::to_string(sends[p].bytes) + " bytes to rank " + name(p) + " and expects " +
                        std::to_string(recvs[p].bytes) + ", but rank " + name(p) + " expects " +
                        std::to_string(theirs[p].expect_bytes) + " and sends " +
                        std::to_string(theirs[p].send_bytes) + ": the ranks' split sizes disagree";
      fail(msg);
      throw CommError(msg);
    }
    all_exported = all_exported && theirs[p].exported;
    if (sends[p].bytes || recvs[p].bytes) peers.push_back(p);
  }
  // Every rank sent its export flag to every peer, so all ranks compute the same AND and agree
  // on the path.

  // 2. Data.
  step.next("ep::host_protocol/self_copy");
  all_to_all_order_.begin(stream);
  // Where the peers' messages go by the copy engines and this rank's own message is at least as
  // large as theirs together (2 ranks), the self copy runs on a stream of its own, forked here and
  // joined before the call's end, rather than ahead of them on `stream`: it waits on no flag, and
  // queued first it holds back this rank's copies by half the call's bytes. H100, 2 ranks, 64 MiB
  // a rank, three runs: 105.4-110.8 us against 114.0-128.3 in line. At 4 ranks (a quarter of the
  // bytes) it gained nothing (260.4-272.3 against 237.3-277.8); beside the direct kernel it takes
  // its SMs; below 1 MiB the fork and join (two event records and two waits) cost more than they
  // save; not inside a capture. TORCH_EP_WHATIF_SELF_COPY_IN_LINE=1 keeps it in line (measurements).
  const bool by_kernel = all_exported && !peers.empty() && moves_by_kernel(sends);
  size_t to_peers = 0;
  for (int p : peers) to_peers += sends[p].bytes;
  static const bool in_line = env_switch("TORCH_EP_WHATIF_SELF_COPY_IN_LINE");
  const bool self_beside = !in_line && all_exported && !by_kernel && !peers.empty() &&
                           sends[rank_].bytes >= kSelfCopyBesideBytes && sends[rank_].bytes >= to_peers &&
                           !stream_capturing(stream);
  if (self_beside) queue_after(device(), self_copy_stream_, stream);
  // Where the direct kernel runs, it copies the self message too, in slices after the peers'
  // (launch_direct_kernel): no cudaMemcpyAsync of its own, whose host time (about 6 us a call on
  // the phase clock) is as much as the kernel's launch where small calls are host-bound. H100,
  // 4 KiB-1 MiB a rank, two alternations: 2 ranks 20.5-28.5 us against 23.4-32.8, 8 ranks
  // 37.3-47.0 against 45.9-50.4. TORCH_EP_WHATIF_SELF_COPY_APART=1 issues it apart (measurements).
  static const bool self_apart = env_switch("TORCH_EP_WHATIF_SELF_COPY_APART");
  const bool self_in_kernel = by_kernel && !self_apart;
  if (sends[rank_].bytes && !self_in_kernel)
    EP_CUDA_CHECK(cudaMemcpyAsync(recvs[rank_].ptr, sends[rank_].ptr, sends[rank_].bytes, cudaMemcpyDeviceToDevice,
                                  self_beside ? self_copy_stream_ : stream));
  // The join, also where queueing the peers' traffic throws: no write of the self copy outlives
  // the call's stream.
  auto join_self_copy = [&] {
    if (self_beside) queue_after(device(), stream, self_copy_stream_);
  };
  try {
    step.next("ep::host_protocol/launch");  // the peers' outputs opened (cached), then the kernel or the copies
    if (all_exported) {
      std::vector<char*> remote(size_, nullptr);
      for (int p = 0; p < size_; ++p)
        if (p != rank_ && sends[p].bytes) remote[p] = open_peer_allocation(p, theirs[p].handle) + theirs[p].offset;
      if (peers.empty()) {
        // Nothing crosses ranks (world size 1, or all-zero splits to peers): the self copy is all.
      } else if (by_kernel) {
        // One kernel: it waits on every peer at once where stream waits queue one by one, and
        // spreads each message over blocks (CudaTransportConfig::kernel_bytes).
        launch_direct_kernel(sends, remote, recvs, self_in_kernel, stream);
      } else {
        enqueue_direct(sends, remote, recvs, stream);
      }
    } else {
      enqueue_staged(sends, recvs, stream);
    }
  } catch (...) {
    try {
      join_self_copy();
    } catch (...) {
    }
    throw;
  }
  join_self_copy();

  step.next("ep::host_protocol/track");
  std::shared_ptr<StreamMark> end = track(op_name, stream, std::move(peers));
  all_to_all_order_.end(stream, end);
  return end;
}

bool CudaTransport::moves_by_kernel(const std::vector<SendBuffer>& sends) const {
  size_t largest = 0;
  for (int p = 0; p < size_; ++p)
    if (p != rank_) largest = std::max(largest, sends[p].bytes);
  return largest <= kernel_bytes_ && size_ <= kernels::kMaxRanksPerNode;
}

void CudaTransport::enqueue_direct(const std::vector<SendBuffer>& sends, const std::vector<char*>& remote_outputs,
                                   const std::vector<RecvBuffer>& recvs, cudaStream_t stream) {
  // All "ready" signals go first, so no rank's copies wait on a rank that is itself waiting.
  for (int i = 1; i < size_; ++i) {
    const int src = (rank_ + size_ - i) % size_;
    if (recvs[src].bytes) write_flag(stream, ready_flag(src, rank_), 1);
  }
  for (int i = 1; i < size_; ++i) {
    const int dst = (rank_ + i) % size_;  // rotated, so that not every rank copies to rank 0 first
    if (!sends[dst].bytes) continue;
    wait_flag(stream, ready_flag(rank_, dst));
    write_flag(stream, ready_flag(rank_, dst), 0);
    EP_CUDA_CHECK(cudaMemcpyAsync(remote_outputs[dst], sends[dst].ptr, sends[dst].bytes, cudaMemcpyDeviceToDevice,
                                  stream));
    write_flag(stream, done_flag(dst, rank_), 1);
  }
  for (int i = 1; i < size_; ++i) {
    const int src = (rank_ + size_ - i) % size_;
    if (!recvs[src].bytes) continue;
    wait_flag(stream, done_flag(rank_, src));
    write_flag(stream, done_flag(rank_, src), 0);
  }
}

void CudaTransport::launch_direct_kernel(const std::vector<SendBuffer>& sends,
                                        const std::vector<char*>& remote_outputs,
                                        const std::vector<RecvBuffer>& recvs, bool with_self, cudaStream_t stream) {
  kernels::AllToAllDirectParams p{};
  p.rank = rank_;
  p.size = size_;
  p.num_blocks = direct_blocks();
  p.slices_done = slices_done();
  p.timeout_ns = uint64_t(std::chrono::duration_cast<std::chrono::nanoseconds>(timeout_).count());
  p.error = kernel_error_device_;
  p.gpu_scope = direct_gpu_scope_;  // decided once, in cuda_transport.cpp's constructor
  p.early_launch = early_launch_;
  for (int peer = 0; peer < size_; ++peer) {
    if (peer == rank_) {  // the self message where the kernel copies it: its slices with the peers', no flags
      if (!with_self) continue;
      p.send[peer] = static_cast<const char*>(sends[peer].ptr);
      p.remote_recv[peer] = static_cast<char*>(recvs[peer].ptr);
      p.send_bytes[peer] = sends[peer].bytes;
      continue;
    }
    if (sends[peer].bytes) {
      p.send[peer] = static_cast<const char*>(sends[peer].ptr);
      p.remote_recv[peer] = remote_outputs[peer];
      p.send_bytes[peer] = sends[peer].bytes;
      p.ready_to_wait[peer] = ready_flag(rank_, peer);
      p.done_to_set[peer] = done_flag(peer, rank_);
    }
    if (recvs[peer].bytes) {
      p.ready_to_set[peer] = ready_flag(peer, rank_);
      p.done_to_wait[peer] = done_flag(rank_, peer);
    }
  }
  EP_CUDA_CHECK(kernels::launch_all_to_all_direct(p, stream));
}

void CudaTransport::enqueue_staged(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                                   cudaStream_t stream) {
  std::vector<size_t> send_chunks(size_, 0), recv_chunks(size_, 0);
  size_t rounds = 0;
  for (int p = 0; p < size_; ++p) {
    if (p == rank_) continue;
    send_chunks[p] = (sends[p].bytes + chunk_bytes_ - 1) / chunk_bytes_;
    recv_chunks[p] = (recvs[p].bytes + chunk_bytes_ - 1) / chunk_bytes_;
    rounds = std::max({rounds, send_chunks[p], recv_chunks[p]});
  }
  // Round k sends every peer its chunk k, then receives every peer's chunk k. A send waits only
  // on the peer draining chunk k-2 (queued in round k-2), a receive on the peer's round-k send,
  // which the peer queued before its own receives: every stream keeps moving.
  for (size_t k = 0; k < rounds; ++k) {
    const int slot = int(k % kSlots);
    for (int i = 1; i < size_; ++i) {
      const int dst = (rank_ + i) % size_;
      if (k >= send_chunks[dst]) continue;
      const size_t n = std::min(chunk_bytes_, sends[dst].bytes - k * chunk_bytes_);
      wait_flag(stream, empty_flag(rank_, dst, slot));
      write_flag(stream, empty_flag(rank_, dst, slot), 0);
      EP_CUDA_CHECK(cudaMemcpyAsync(slot_data(dst, rank_, slot), static_cast<const char*>(sends[dst].ptr) +
                                    k * chunk_bytes_, n, cudaMemcpyDeviceToDevice, stream));
      write_flag(stream, full_flag(dst, rank_, slot), 1);
    }
    for (int i = 1; i < size_; ++i) {
      const int src = (rank_ + size_ - i) % size_;
      if (k >= recv_chunks[src]) continue;
      const size_t n = std::min(chunk_bytes_, recvs[src].bytes - k * chunk_bytes_);
      wait_flag(stream, full_flag(rank_, src, slot));
      write_flag(stream, full_flag(rank_, src, slot), 0);
      EP_CUDA_CHECK(cudaMemcpyAsync(static_cast<char*>(recvs[src].ptr) + k * chunk_bytes_, slot_data(rank_, src, slot),
                                    n, cudaMemcpyDeviceToDevice, stream));
      write_flag(stream, empty_flag(src, rank_, slot), 1);
    }
  }
}

}  // namespace ep
