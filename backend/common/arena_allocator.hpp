// First-fit allocation of byte ranges inside one fixed arena (the comm pool's registered block,
// backend/transport/cuda/comm_pool.hpp). Offsets only: no memory is touched, so it is torch-
// and CUDA-free and tested on the CPU (tests/test_comm_pool.py). Thread-safe.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <unordered_map>

namespace ep {

class ArenaAllocator {
 public:
  // `bytes`: the arena; every range starts at a multiple of `alignment` (a power of two) and
  // takes a multiple of it.
  ArenaAllocator(size_t bytes, size_t alignment);

  // The offset of a free range of at least `bytes` (the lowest that fits), or nullopt when no
  // free range is large enough. Zero bytes take one alignment unit, so every offset is unique.
  std::optional<size_t> allocate(size_t bytes);
  // Frees the range at `offset`, merging it with free neighbours; returns its size.
  // Throws std::invalid_argument for an offset that allocate() did not return.
  size_t free(size_t offset);

  size_t bytes() const { return bytes_; }
  size_t alignment() const { return alignment_; }
  size_t used() const;           // bytes in allocated ranges (rounded sizes)
  size_t largest_free() const;   // the largest range allocate() could return now
  size_t num_allocations() const;

 private:
  const size_t bytes_, alignment_;
  mutable std::mutex mutex_;
  std::map<size_t, size_t> free_;                // offset -> size, disjoint, never adjacent
  std::unordered_map<size_t, size_t> allocated_;  // offset -> size
  size_t used_ = 0;
};

}  // namespace ep
