#include "backend/transport/cuda/comm_pool.hpp"

#include "backend/transport/cuda/cuda_check.hpp"

namespace ep {

namespace {

std::string mib(size_t bytes) { return std::to_string(bytes >> 20) + " MiB"; }

}  // namespace

CommPool::CommPool(Rendezvous& rdv, int device, size_t bytes, const std::string& tag)
    : rank_(rdv.rank()), device_(device), allocator_(bytes, kAlignment) {
  buffers_ = std::make_unique<PeerBuffers>(rdv, device, allocator_.bytes(), tag);
  base_ = buffers_->block(rank_);
}

void* CommPool::allocate(size_t bytes, int device, std::string* why) {
  std::lock_guard<std::mutex> lock(mutex_);
  const std::string where = "torch_ep.comm_pool (rank " + std::to_string(rank_) + "): ";
  if (closed_) {
    *why = where + "its group was destroyed; allocate from the pool of a live group";
    return nullptr;
  }
  if (device != device_) {
    *why = where + "this pool holds memory of cuda:" + std::to_string(device_) + ", not cuda:" + std::to_string(device);
    return nullptr;
  }
  const auto offset = allocator_.allocate(bytes);
  if (!offset) {
    *why = where + "its arena of " + mib(allocator_.bytes()) + " has no free range of " + std::to_string(bytes) +
           " bytes (" + mib(allocator_.bytes() - allocator_.used()) + " free, the largest range " +
           mib(allocator_.largest_free()) + "). Raise TORCH_EP_COMM_POOL_BYTES (Options.comm_pool_bytes), or free " +
           "tensors of the pool and call torch.cuda.empty_cache()";
    return nullptr;
  }
  return base_ + *offset;
}

bool CommPool::release(void* ptr) {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto* p = static_cast<const char*>(ptr);
  if (!buffers_ || p < base_ || p >= base_ + allocator_.bytes()) return false;
  allocator_.free(size_t(p - base_));
  if (closed_ && allocator_.num_allocations() == 0) free_arena();
  return true;
}

void CommPool::close() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (closed_) return;
  closed_ = true;
  if (!buffers_) return;
  buffers_->close_peers();
  if (allocator_.num_allocations() == 0) free_arena();
}

void CommPool::free_arena() {
  buffers_.reset();
  base_ = nullptr;
}

int64_t CommPool::offset_of(const void* ptr, size_t bytes) const {
  const auto* p = static_cast<const char*>(ptr);
  if (!base_ || p < base_ || bytes > allocator_.bytes() || size_t(p - base_) > allocator_.bytes() - bytes) return -1;
  return int64_t(p - base_);
}

}  // namespace ep
