// A group's comm pool (torch_ep.comm_pool): one arena per rank, cudaMalloc'd and mapped by every
// peer once, at creation (CUDA IPC through the Rendezvous, as PeerBuffers). torch's allocator
// carves its segments out of this rank's arena (allocate/release); a kernel that knows a peer's
// offset inside that peer's arena writes there directly, with no per-call handle exchange.
//
// Lifetime: close() (the group goes) unmaps the peers' arenas at once; this rank's arena is freed
// once it is closed and every segment torch took from it came back. Torch-free.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <string>

#include "backend/common/arena_allocator.hpp"
#include "backend/transport/cuda/peer_buffers.hpp"

namespace ep {

class CommPool {
 public:
  // Segments start at multiples of this (torch's own segments are 2 MiB multiples).
  static constexpr size_t kAlignment = 512;

  // Collective over the ranks of `rdv`: every rank reserves `bytes` on `device`.
  CommPool(Rendezvous& rdv, int device, size_t bytes, const std::string& tag);
  CommPool(const CommPool&) = delete;
  CommPool& operator=(const CommPool&) = delete;

  // A segment of `bytes` from this rank's arena, or null with *why saying why (torch then
  // raises its out-of-memory error; comm_pool_path.cpp adds this reason as a warning).
  void* allocate(size_t bytes, int device, std::string* why);
  // Gives a segment back; frees the arena once closed and empty. Unknown pointers are ignored
  // (false): the allocator of a pool whose arena went may still hold none of ours.
  bool release(void* ptr);
  // Unmaps the peers' arenas; later allocations fail. Idempotent.
  void close();

  // Rank r's arena as mapped here (null once closed). Callers hold no lock: the arenas stay
  // mapped until close(), which the group calls after its last call ended.
  char* arena(int r) const { return buffers_ ? buffers_->block(r) : nullptr; }
  // The offset of [ptr, ptr + bytes) in this rank's arena, or -1 when it lies outside.
  int64_t offset_of(const void* ptr, size_t bytes) const;
  // An all_to_all output's word for the one-copy plan (AllToAllVParams::out_arena): -2 where it
  // is empty (either move will do), else offset_of.
  int64_t output_offset(const void* ptr, size_t bytes) const { return bytes == 0 ? -2 : offset_of(ptr, bytes); }
  size_t bytes() const { return allocator_.bytes(); }
  size_t used() const { return allocator_.used(); }
  int device() const { return device_; }
  int rank() const { return rank_; }

 private:
  void free_arena();  // with mutex_ held

  int rank_, device_;
  ArenaAllocator allocator_;
  std::mutex mutex_;                     // buffers_, closed_
  std::unique_ptr<PeerBuffers> buffers_;  // null once freed
  char* base_ = nullptr;                 // this rank's arena (never unmapped while segments live)
  bool closed_ = false;
};

}  // namespace ep
