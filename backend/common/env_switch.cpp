#include "backend/common/env_switch.hpp"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace ep {

bool env_switch(const char* name, const char* value) {
  const std::string v = value ? value : "";
  TORCH_CHECK_VALUE(v.empty() || v == "0" || v == "1", name, "='", v, "': expected 0 or 1");
  return v == "1";
}

bool env_switch(const char* name) { return env_switch(name, std::getenv(name)); }

bool env_switch_on_by_default(const char* name) {
  const char* value = std::getenv(name);
  return !value || !*value || env_switch(name, value);
}

}  // namespace ep
