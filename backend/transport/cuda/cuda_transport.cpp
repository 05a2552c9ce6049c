#include "backend/transport/cuda/cuda_transport.hpp"

#include <cuda.h>

#include <algorithm>

#include "backend/transport/cuda/cuda_check.hpp"

namespace ep {
namespace {

// Block layout: [full flags: size x 2][empty flags: size x 2] ... padding ... [regions].
// Region `src` (size x 2 slots of chunk_bytes) starts at kDataOffset + src * 2 * chunk_bytes.
constexpr size_t kDataOffset = 64 << 10;
constexpr int kSlots = 2;
constexpr size_t kChunkAlign = 4096;

CUdeviceptr dptr(const void* p) { return reinterpret_cast<CUdeviceptr>(p); }

}  // namespace

uint32_t* CudaTransport::full_flag(int owner, int src, int slot) const {
  return reinterpret_cast<uint32_t*>(buffers_.block(owner)) + src * kSlots + slot;
}
uint32_t* CudaTransport::empty_flag(int owner, int dst, int slot) const {
  return reinterpret_cast<uint32_t*>(buffers_.block(owner)) + size_ * kSlots + dst * kSlots + slot;
}
char* CudaTransport::slot_data(int owner, int src, int slot) const {
  return buffers_.block(owner) + kDataOffset + (size_t(src) * kSlots + slot) * chunk_bytes_;
}

CudaTransport::CudaTransport(Rendezvous& rdv, const CudaTransportConfig& config, const std::string& tag)
    : rank_(rdv.rank()),
      size_(rdv.size()),
      timeout_(config.timeout),
      buffers_(rdv, config.device,
               kDataOffset + std::max<size_t>(config.buffer_bytes / (rdv.size() * kSlots * kChunkAlign), 1) *
                                 kChunkAlign * rdv.size() * kSlots,
               tag + "/buffers"),
      chunk_bytes_(std::max<size_t>(config.buffer_bytes / (rdv.size() * kSlots * kChunkAlign), 1) * kChunkAlign) {
  static_assert(kDataOffset >= 2 * 4096 * kSlots * sizeof(uint32_t), "flags must fit before the data");
  EP_CUDA_CHECK(cudaSetDevice(config.device));
  // full = 0 (nothing sent), empty = 1 (every slot free).
  std::vector<uint32_t> flags(size_t(size_) * kSlots * 2, 0);
  std::fill(flags.begin() + size_ * kSlots, flags.end(), 1u);
  EP_CUDA_CHECK(cudaMemcpy(buffers_.block(rank_), flags.data(), flags.size() * sizeof(uint32_t),
                           cudaMemcpyHostToDevice));
  peer_streams_.assign(size_, nullptr);
  for (int p = 0; p < size_; ++p)
    if (p != rank_) EP_CUDA_CHECK(cudaStreamCreateWithFlags(&peer_streams_[p], cudaStreamNonBlocking));
  EP_CUDA_CHECK(cudaStreamCreateWithFlags(&watchdog_stream_, cudaStreamNonBlocking));
  rdv.barrier(tag + "/ready");  // no peer writes our flags before they are initialised
  watchdog_ = std::thread([this] { watch(); });
}

CudaTransport::~CudaTransport() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    stopping_ = true;  // calls still in flight finish, or time out and are released, first
  }
  cv_.notify_all();
  watchdog_.join();  // returns once nothing is in flight (releasing stuck waits if needed)
  cudaSetDevice(buffers_.device());
  for (cudaStream_t s : peer_streams_)
    if (s) {
      cudaStreamSynchronize(s);
      cudaStreamDestroy(s);
    }
  if (watchdog_stream_) {
    cudaStreamSynchronize(watchdog_stream_);
    cudaStreamDestroy(watchdog_stream_);
  }
}

std::string CudaTransport::error() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return error_;
}

void CudaTransport::all_to_all(const std::vector<SendBuffer>& sends, const std::vector<RecvBuffer>& recvs,
                               cudaStream_t stream, const char* op_name) {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!error_.empty())
      throw CommError(std::string(op_name) + ": this group's CUDA transport stopped after an earlier error and "
                      "takes no more calls; destroy the process group. The error was: " + error_);
  }
  EP_CUDA_CHECK(cudaSetDevice(buffers_.device()));
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  EP_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const bool capturing = capture != cudaStreamCaptureStatusNone;

  if (sends[rank_].bytes)
    EP_CUDA_CHECK(cudaMemcpyAsync(recvs[rank_].ptr, sends[rank_].ptr, sends[rank_].bytes, cudaMemcpyDeviceToDevice,
                                  stream));
  Inflight op{op_name, std::chrono::steady_clock::now(), {}, nullptr};
  cudaEvent_t fork;
  EP_CUDA_CHECK(cudaEventCreateWithFlags(&fork, cudaEventDisableTiming));
  EP_CUDA_CHECK(cudaEventRecord(fork, stream));
  for (int i = 1; i < size_; ++i) {
    const int peer = (rank_ + i) % size_;  // rotated, so that not every rank starts with rank 0
    const size_t send_chunks = (sends[peer].bytes + chunk_bytes_ - 1) / chunk_bytes_;
    const size_t recv_chunks = (recvs[peer].bytes + chunk_bytes_ - 1) / chunk_bytes_;
    if (send_chunks == 0 && recv_chunks == 0) continue;
    cudaStream_t s = peer_streams_[peer];
    EP_CUDA_CHECK(cudaStreamWaitEvent(s, fork, 0));
    const auto* src = static_cast<const char*>(sends[peer].ptr);
    auto* dst = static_cast<char*>(recvs[peer].ptr);
    // Chunk k of each direction, interleaved: a send waits only on the peer draining chunk k-2,
    // a receive only on the peer's chunk k, so every rank's stream keeps moving.
    for (size_t k = 0; k < std::max(send_chunks, recv_chunks); ++k) {
      const int slot = int(k % kSlots);
      if (k < send_chunks) {
        const size_t n = std::min(chunk_bytes_, sends[peer].bytes - k * chunk_bytes_);
        EP_CU_CHECK(cuStreamWaitValue32(s, dptr(empty_flag(rank_, peer, slot)), 1, CU_STREAM_WAIT_VALUE_GEQ));
        EP_CU_CHECK(cuStreamWriteValue32(s, dptr(empty_flag(rank_, peer, slot)), 0, CU_STREAM_WRITE_VALUE_DEFAULT));
        EP_CUDA_CHECK(cudaMemcpyAsync(slot_data(peer, rank_, slot), src + k * chunk_bytes_, n,
                                      cudaMemcpyDeviceToDevice, s));
        EP_CU_CHECK(cuStreamWriteValue32(s, dptr(full_flag(peer, rank_, slot)), 1, CU_STREAM_WRITE_VALUE_DEFAULT));
      }
      if (k < recv_chunks) {
        const size_t n = std::min(chunk_bytes_, recvs[peer].bytes - k * chunk_bytes_);
        EP_CU_CHECK(cuStreamWaitValue32(s, dptr(full_flag(rank_, peer, slot)), 1, CU_STREAM_WAIT_VALUE_GEQ));
        EP_CU_CHECK(cuStreamWriteValue32(s, dptr(full_flag(rank_, peer, slot)), 0, CU_STREAM_WRITE_VALUE_DEFAULT));
        EP_CUDA_CHECK(cudaMemcpyAsync(dst + k * chunk_bytes_, slot_data(rank_, peer, slot), n,
                                      cudaMemcpyDeviceToDevice, s));
        EP_CU_CHECK(cuStreamWriteValue32(s, dptr(empty_flag(peer, rank_, slot)), 1, CU_STREAM_WRITE_VALUE_DEFAULT));
      }
    }
    cudaEvent_t joined;
    EP_CUDA_CHECK(cudaEventCreateWithFlags(&joined, cudaEventDisableTiming));
    EP_CUDA_CHECK(cudaEventRecord(joined, s));
    EP_CUDA_CHECK(cudaStreamWaitEvent(stream, joined, 0));
    op.peer_done.emplace_back(peer, joined);
  }
  if (capturing) {  // a captured graph runs later, where the watchdog cannot see it
    for (auto& [peer, e] : op.peer_done) cudaEventDestroy(e);
    cudaEventDestroy(fork);
    return;
  }
  cudaEventDestroy(fork);  // destruction is deferred by CUDA until the recorded work completes
  EP_CUDA_CHECK(cudaEventCreateWithFlags(&op.done, cudaEventDisableTiming));
  EP_CUDA_CHECK(cudaEventRecord(op.done, stream));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    inflight_.push_back(std::move(op));
  }
  cv_.notify_all();
}

void CudaTransport::release_waits() {
  // Non-zero bytes in every flag of ours: each GEQ-1 wait on this rank passes.
  cudaMemsetAsync(buffers_.block(rank_), 0x01, size_t(size_) * kSlots * 2 * sizeof(uint32_t), watchdog_stream_);
}

void CudaTransport::watch() {
  cudaSetDevice(buffers_.device());
  std::unique_lock<std::mutex> lock(mutex_);
  for (;;) {
    const bool releasing = !error_.empty();
    cv_.wait_for(lock, releasing ? std::chrono::milliseconds(1) : std::chrono::milliseconds(50));
    while (!inflight_.empty()) {
      Inflight& op = inflight_.front();
      const cudaError_t state = cudaEventQuery(op.done);
      if (state == cudaErrorNotReady) {
        const auto elapsed = std::chrono::steady_clock::now() - op.start;
        if (error_.empty() && elapsed > timeout_) {
          std::string peers;
          for (auto& [peer, e] : op.peer_done)
            if (cudaEventQuery(e) == cudaErrorNotReady) peers += (peers.empty() ? "" : ", ") + std::to_string(peer);
          error_ = op.op + ": timed out on rank " + std::to_string(rank_) + " after " +
                   std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(elapsed).count()) +
                   " ms waiting for peer rank(s) " + peers + ": the peer never arrived or stalled";
        }
        if (!error_.empty()) release_waits();
        break;
      }
      for (auto& [peer, e] : op.peer_done) cudaEventDestroy(e);
      cudaEventDestroy(op.done);
      if (state != cudaSuccess && error_.empty()) error_ = op.op + ": CUDA error " + cudaGetErrorString(state);
      inflight_.pop_front();
    }
    if (stopping_ && inflight_.empty()) return;
  }
}

}  // namespace ep
