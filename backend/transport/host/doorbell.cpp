#include "backend/transport/host/doorbell.hpp"

#include <linux/futex.h>
#include <sched.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <climits>

namespace ep {
namespace {

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

// Shared (not FUTEX_PRIVATE) futex ops: the word lives in memory mapped by several processes.
long futex(std::atomic<uint32_t>* word, int op, uint32_t val, const timespec* timeout) {
  return syscall(SYS_futex, reinterpret_cast<uint32_t*>(word), op, val, timeout, nullptr, 0);
}

}  // namespace

void Doorbell::ring() {
  count.fetch_add(1, std::memory_order_seq_cst);
  if (sleepers.load(std::memory_order_seq_cst) > 0) futex(&count, FUTEX_WAKE, INT_MAX, nullptr);
}

void Doorbell::wait(uint32_t seen, int spin, std::chrono::microseconds max_sleep) {
  for (int i = 0; i < spin; ++i) {
    if (count.load(std::memory_order_acquire) != seen) return;
    cpu_relax();
  }
  sleepers.fetch_add(1, std::memory_order_seq_cst);
  // Re-check after announcing ourselves: a ring between the spin and here is not lost, and
  // futex itself returns at once if the word no longer equals `seen`.
  if (count.load(std::memory_order_seq_cst) == seen) {
    timespec ts;
    ts.tv_sec = max_sleep.count() / 1000000;
    ts.tv_nsec = (max_sleep.count() % 1000000) * 1000;
    futex(&count, FUTEX_WAIT, seen, &ts);
  }
  sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

}  // namespace ep
