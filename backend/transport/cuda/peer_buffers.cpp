#include "backend/transport/cuda/peer_buffers.hpp"

#include <cstring>

#include "backend/transport/cuda/cuda_check.hpp"

namespace ep {

PeerBuffers::PeerBuffers(Rendezvous& rdv, int device, size_t bytes, const std::string& tag)
    : rank_(rdv.rank()), device_(device), bytes_(bytes), blocks_(rdv.size(), nullptr) {
  EP_CUDA_CHECK(cudaSetDevice(device));
  EP_CUDA_CHECK(cudaMalloc(reinterpret_cast<void**>(&blocks_[rank_]), bytes));
  cudaIpcMemHandle_t handle;
  EP_CUDA_CHECK(cudaIpcGetMemHandle(&handle, blocks_[rank_]));
  const auto* h = reinterpret_cast<const uint8_t*>(&handle);
  auto handles = rdv.all_gather(tag + "/ipc", std::vector<uint8_t>(h, h + sizeof(handle)));
  for (int r = 0; r < rdv.size(); ++r) {
    if (r == rank_) continue;
    cudaIpcMemHandle_t peer;
    std::memcpy(&peer, handles[r].data(), sizeof(peer));
    void* ptr = nullptr;
    EP_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, peer, cudaIpcMemLazyEnablePeerAccess));
    blocks_[r] = static_cast<char*>(ptr);
  }
  rdv.barrier(tag + "/mapped");
}

namespace {

// Makes `device` current for its lifetime: the comm pool frees its arena from inside torch's
// allocator, whose caller's current device must stay as it was.
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) cudaSetDevice(device);
  }
  ~DeviceScope() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

}  // namespace

void PeerBuffers::close_peers() {
  DeviceScope scope(device_);
  for (size_t r = 0; r < blocks_.size(); ++r) {
    if (int(r) == rank_ || !blocks_[r]) continue;
    cudaIpcCloseMemHandle(blocks_[r]);
    blocks_[r] = nullptr;
  }
}

bool PeerBuffers::all_on_this_gpu() const {
  bool here = true;
  for (size_t r = 0; r < blocks_.size() && here; ++r) {
    cudaPointerAttributes where{};
    if (int(r) != rank_ && (!blocks_[r] || cudaPointerGetAttributes(&where, blocks_[r]) != cudaSuccess ||
                            where.type != cudaMemoryTypeDevice || where.device != device_))
      here = false;
  }
  cudaGetLastError();  // a failed query above leaves no error behind
  return here;
}

PeerBuffers::~PeerBuffers() {
  close_peers();
  DeviceScope scope(device_);
  if (blocks_[rank_]) cudaFree(blocks_[rank_]);
}

}  // namespace ep
