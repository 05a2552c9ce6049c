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

// Named phases of a call, each timed from its next() to the next one or the end of the scope,
// where the clock is on. Torch-free: the transports use it as is; phases.hpp's Phases adds the
// profiler's ranges.
class Steps {
 public:
  Steps() = default;
  Steps(const Steps&) = delete;
  Steps& operator=(const Steps&) = delete;
  ~Steps() { end(); }

  void next(const char* name) {
    end();
    if (enabled()) {
      timed_ = name;
      start_ = std::chrono::steady_clock::now();
    }
  }
  void end() {
    if (timed_) {
      add(timed_, std::chrono::steady_clock::now() - start_);
      timed_ = nullptr;
    }
  }

 private:
  const char* timed_ = nullptr;  // the phase being timed, if any
  std::chrono::steady_clock::time_point start_;
};

}  // namespace ep::phase_clock
