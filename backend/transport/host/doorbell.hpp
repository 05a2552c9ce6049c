// An event count in shared memory: a rank sleeps on its own doorbell until a peer rings it.
// Peers ring after every change the owner may be waiting for (a slot filled, a slot freed),
// so one rank waits on one word however many channels it drives. Waiting spins briefly, then
// sleeps in futex(2), which works across processes on shared pages: with more ranks than
// cores a spinning waiter would steal the core its peer needs.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>

namespace ep {

struct alignas(64) Doorbell {
  std::atomic<uint32_t> count;     // bumped by every ring
  std::atomic<uint32_t> sleepers;  // > 0 while the owner is inside futex wait

  uint32_t snapshot() const { return count.load(std::memory_order_acquire); }
  void ring();
  // Returns when the count differs from `seen`, after `spin` polls, or after `max_sleep`.
  void wait(uint32_t seen, int spin, std::chrono::microseconds max_sleep);
};
static_assert(std::atomic<uint32_t>::is_always_lock_free, "shared-memory atomics must be lock-free");
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");

}  // namespace ep
