// Names the host phases of a call as ranges in torch.profiler's CPU timeline
// (tools/moe_profile.py, tools/a2a_profile.py); costs nothing when no profiler runs.
#pragma once

#include <ATen/record_function.h>

#include <optional>

namespace ep {

class Phases {
 public:
  void next(const char* name) {
    current_.reset();
    current_.emplace(at::RecordScope::USER_SCOPE);
    if (current_->isActive()) current_->before(name, c10::ArrayRef<const c10::IValue>{});
  }
  void end() { current_.reset(); }

 private:
  std::optional<at::RecordFunction> current_;
};

}  // namespace ep
