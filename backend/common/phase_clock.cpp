#include "backend/common/phase_clock.hpp"

#include <algorithm>
#include <map>
#include <mutex>

namespace ep::phase_clock {

std::atomic<bool> on{false};

namespace {
struct Sum {
  int64_t calls = 0;
  int64_t ns = 0;
};
std::mutex mutex;
std::map<const char*, Sum> sums;  // by the name's address: phase names are literals
}  // namespace

void enable(bool yes) { on.store(yes, std::memory_order_relaxed); }

void add(const char* phase, std::chrono::steady_clock::duration spent) {
  std::lock_guard<std::mutex> lock(mutex);
  Sum& s = sums[phase];
  s.calls += 1;
  s.ns += std::chrono::duration_cast<std::chrono::nanoseconds>(spent).count();
}

std::vector<Total> take() {
  std::map<std::string, Sum> merged;  // one literal may have several addresses (translation units)
  {
    std::lock_guard<std::mutex> lock(mutex);
    for (const auto& [name, s] : sums) {
      Sum& m = merged[name];
      m.calls += s.calls;
      m.ns += s.ns;
    }
    sums.clear();
  }
  std::vector<Total> out;
  for (const auto& [name, s] : merged) out.push_back({name, s.calls, s.ns});
  return out;
}

}  // namespace ep::phase_clock
