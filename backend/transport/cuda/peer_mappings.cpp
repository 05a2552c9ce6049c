#include "backend/transport/cuda/peer_mappings.hpp"

#include <cstring>

#include "backend/transport/cuda/cuda_check.hpp"

namespace ep {
namespace {

CUdeviceptr dptr(const void* p) { return reinterpret_cast<CUdeviceptr>(p); }

// Bounds the table where no trace hook reports frees: ids of freed blocks never come back.
constexpr size_t kMaxUnreportedExports = 4096;

}  // namespace

bool ExportTable::export_allocation(const void* ptr, cudaIpcMemHandle_t* handle, uint64_t* offset, Export* last) {
  // A lookup costs a driver call; at 8 ranks a call's 7 receive spans would ask 7 times for one
  // output, so a span inside the block `last` found reuses it.
  if (last && last->base <= dptr(ptr) && dptr(ptr) < last->end) {
    *handle = last->handle;
    *offset = dptr(ptr) - last->base;
    return true;
  }
  unsigned long long buffer_id = 0;
  CUdeviceptr base = 0;
  size_t range = 0;
  CUpointer_attribute attrs[3] = {CU_POINTER_ATTRIBUTE_BUFFER_ID, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR,
                                  CU_POINTER_ATTRIBUTE_RANGE_SIZE};
  void* values[3] = {&buffer_id, &base, &range};
  if (cuPointerGetAttributes(3, attrs, values, dptr(ptr)) != CUDA_SUCCESS || base == 0) return false;
  std::lock_guard<std::mutex> lock(mutex_);
  auto it = exported_.find(buffer_id);
  if (it == exported_.end()) {
    cudaIpcMemHandle_t h;
    // Exportable when the buffer is a plain cudaMalloc allocation (torch's caching allocator
    // without expandable segments); otherwise the call takes the staged path.
    if (cudaIpcGetMemHandle(&h, reinterpret_cast<void*>(base)) != cudaSuccess) {
      cudaGetLastError();  // clear the failed export
      return false;
    }
    if (exported_.size() > kMaxUnreportedExports && !frees_reported_.load(std::memory_order_relaxed))
      exported_.clear();
    it = exported_.emplace(buffer_id, std::make_pair(base, h)).first;
  }
  *handle = it->second.second;
  *offset = dptr(ptr) - it->second.first;
  if (last) *last = {base, base + range, *handle};
  return true;
}

void ExportTable::forget(uintptr_t base, size_t bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = exported_.begin(); it != exported_.end();) {
    const CUdeviceptr b = it->second.first;
    if (b < base || b >= base + bytes) {
      ++it;
      continue;
    }
    FreedExportsLog* l = log();
    const uint64_t n = l->count.load(std::memory_order_relaxed);
    l->handles[n % FreedExportsLog::kEntries] = it->second.second;
    l->count.store(n + 1, std::memory_order_release);  // the entry is whole before the count says so
    it = exported_.erase(it);
  }
}

PeerMappings::PeerMappings(Rendezvous& rdv, const std::string& tag)
    : rank_(rdv.rank()), opened_(rdv.size()), seen_(rdv.size(), 0) {
  std::string id;
  if (rank_ == 0) {
    id = ShmSegment::unique_id();
    rdv.set(tag + "/id", to_bytes(id));
  } else {
    const std::vector<uint8_t> bytes = rdv.get(tag + "/id");
    id.assign(bytes.begin(), bytes.end());
  }
  logs_ = ShmSegment::map_per_rank(rdv, tag, "/torch_ep_freed_" + id, sizeof(FreedExportsLog));
}

PeerMappings::~PeerMappings() {
  for (auto& peer : opened_)
    for (auto& [handle, ptr] : peer) cudaIpcCloseMemHandle(ptr);
  for (const Closing& c : closing_) cudaIpcCloseMemHandle(c.ptr);
}

char* PeerMappings::open(int peer, const cudaIpcMemHandle_t& handle) {
  const std::string k = key(handle);
  auto it = opened_[peer].find(k);
  if (it != opened_[peer].end()) return it->second;
  // A handle whose mapping waits to be closed maps to the same address again, counted once more
  // by CUDA: the pending close then leaves this mapping open.
  void* ptr = nullptr;
  EP_CUDA_CHECK(cudaIpcOpenMemHandle(&ptr, handle, cudaIpcMemLazyEnablePeerAccess));
  return opened_[peer][k] = static_cast<char*>(ptr);
}

void PeerMappings::retire(int peer, std::unordered_map<std::string, char*>::iterator it, uint64_t tracked) {
  closing_.push_back({it->second, tracked});
  opened_[peer].erase(it);
}

void PeerMappings::sweep(const std::atomic<uint64_t>& tracked_calls, const std::atomic<uint64_t>& completed_calls) {
  std::unique_lock<std::mutex> lock(mutex_, std::try_to_lock);
  if (!lock.owns_lock()) return;  // a call is between its lookups and its tracking: next poll
  const uint64_t tracked = tracked_calls.load(std::memory_order_acquire);
  for (int p = 0; p < int(logs_.size()); ++p) {
    if (p == rank_ || !logs_[p].data()) continue;
    const auto* log = reinterpret_cast<const FreedExportsLog*>(logs_[p].data());
    const uint64_t count = log->count.load(std::memory_order_acquire);
    if (count == seen_[p]) continue;
    bool lost = count - seen_[p] > FreedExportsLog::kEntries;
    for (uint64_t i = lost ? count : seen_[p]; i < count; ++i) {
      cudaIpcMemHandle_t h;
      std::memcpy(&h, &log->handles[i % FreedExportsLog::kEntries], sizeof(h));
      auto it = opened_[p].find(key(h));
      if (it != opened_[p].end()) retire(p, it, tracked);
    }
    // The owner may have lapped us while we read: then some entries were overwritten mid-read.
    lost = lost || log->count.load(std::memory_order_acquire) - seen_[p] > FreedExportsLog::kEntries;
    if (lost)  // every mapping of this peer may be stale: all go, and calls map what they meet again
      while (!opened_[p].empty()) retire(p, opened_[p].begin(), tracked);
    seen_[p] = count;
  }
  const uint64_t completed = completed_calls.load(std::memory_order_acquire);
  for (size_t i = 0; i < closing_.size();) {
    if (closing_[i].after > completed) {
      ++i;
      continue;
    }
    cudaIpcCloseMemHandle(closing_[i].ptr);
    closing_[i] = closing_.back();
    closing_.pop_back();
  }
}

size_t PeerMappings::open_count() {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t n = 0;
  for (const auto& peer : opened_) n += peer.size();
  return n;
}

size_t PeerMappings::closing_count() {
  std::lock_guard<std::mutex> lock(mutex_);
  return closing_.size();
}

}  // namespace ep
