// Names the host phases of a call as ranges in torch.profiler's CPU timeline, and times them on
// a steady clock where the phase clock is on (phase_clock.hpp); costs nothing when neither is.
#pragma once

#include <ATen/record_function.h>

#include <optional>

#include "backend/common/phase_clock.hpp"

namespace ep {

class Phases {
 public:
  Phases() = default;
  Phases(const Phases&) = delete;
  Phases& operator=(const Phases&) = delete;
  ~Phases() { close(); }  // the last phase ends with the call, returned or raised

  void next(const char* name) {
    close();
    current_.emplace(at::RecordScope::USER_SCOPE);
    if (current_->isActive()) current_->before(name, c10::ArrayRef<const c10::IValue>{});
    clock_.next(name);
  }
  void end() { close(); }

 private:
  void close() {
    current_.reset();
    clock_.end();
  }

  std::optional<at::RecordFunction> current_;
  phase_clock::Steps clock_;
};

}  // namespace ep
