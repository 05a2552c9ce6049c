// Host time per phase of a call without torch.profiler (tools/moe_profile.py, tools/a2a_profile.py).
// The profiler places host time but inflates it: every CUDA call it records costs microseconds,
// billed to the range around it. A steady clock per phase costs tens of nanoseconds, and one
// relaxed load while off (the default).
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <string>
#include <vector>

namespace ep::phase_clock {

extern std::atomic<bool> on;
inline bool enabled() { return on.load(std::memory_order_relaxed); }
void enable(bool yes);

void add(const char* phase, std::chrono::steady_clock::duration spent);

struct Total {
  std::string phase;
  int64_t calls;
  int64_t ns;
};
// Every phase's count and time since the last take, merged by name, sorted by name; cleared.
std::vector<Total> take();

}  // namespace ep::phase_clock
