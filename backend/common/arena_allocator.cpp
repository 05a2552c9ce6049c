#include "backend/common/arena_allocator.hpp"

#include <iterator>
#include <stdexcept>
#include <string>

namespace ep {

ArenaAllocator::ArenaAllocator(size_t bytes, size_t alignment) : bytes_(bytes / alignment * alignment), alignment_(alignment) {
  if (alignment == 0 || (alignment & (alignment - 1)) != 0)
    throw std::invalid_argument("ArenaAllocator: alignment " + std::to_string(alignment) + " is not a power of two");
  if (bytes_ > 0) free_.emplace(0, bytes_);
}

std::optional<size_t> ArenaAllocator::allocate(size_t bytes) {
  if (bytes > bytes_) return std::nullopt;
  const size_t size = bytes == 0 ? alignment_ : (bytes + alignment_ - 1) / alignment_ * alignment_;
  std::lock_guard<std::mutex> lock(mutex_);
  for (auto it = free_.begin(); it != free_.end(); ++it) {
    if (it->second < size) continue;
    const size_t offset = it->first, rest = it->second - size;
    free_.erase(it);
    if (rest > 0) free_.emplace(offset + size, rest);
    allocated_.emplace(offset, size);
    used_ += size;
    return offset;
  }
  return std::nullopt;
}

size_t ArenaAllocator::free(size_t offset) {
  std::lock_guard<std::mutex> lock(mutex_);
  auto found = allocated_.find(offset);
  if (found == allocated_.end())
    throw std::invalid_argument("ArenaAllocator: offset " + std::to_string(offset) + " was not allocated here");
  const size_t size = found->second;
  allocated_.erase(found);
  used_ -= size;
  size_t start = offset, length = size;
  auto next = free_.lower_bound(offset);
  if (next != free_.end() && next->first == offset + size) {  // the free range just after
    length += next->second;
    next = free_.erase(next);
  }
  if (next != free_.begin()) {  // the free range just before
    auto prev = std::prev(next);
    if (prev->first + prev->second == offset) {
      start = prev->first;
      length += prev->second;
      free_.erase(prev);
    }
  }
  free_.emplace(start, length);
  return size;
}

size_t ArenaAllocator::used() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return used_;
}

size_t ArenaAllocator::largest_free() const {
  std::lock_guard<std::mutex> lock(mutex_);
  size_t largest = 0;
  for (const auto& [offset, size] : free_) largest = size > largest ? size : largest;
  return largest;
}

size_t ArenaAllocator::num_allocations() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return allocated_.size();
}

}  // namespace ep
