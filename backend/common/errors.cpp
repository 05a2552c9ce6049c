#include "backend/common/errors.hpp"

#include <cstring>

namespace ep {

std::string errno_string(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

}  // namespace ep
