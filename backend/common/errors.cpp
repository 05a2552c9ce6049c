#include "backend/common/errors.hpp"

#include <cstring>

namespace ep {

std::string errno_string(int err) { return std::string(std::strerror(err)) + " (errno " + std::to_string(err) + ")"; }

std::string dispatch_overflow_message(int64_t call_id, int64_t rank, int64_t received, int64_t num_worst_tokens,
                                      bool dropped) {
  std::string why = "dispatch #" + std::to_string(call_id) + ": rank " + std::to_string(rank) + " received " +
                    std::to_string(received) + " rows, more than num_worst_tokens=" + std::to_string(num_worst_tokens);
  if (dropped)
    why += "; its outputs hold the first " + std::to_string(num_worst_tokens) +
           " and the combines along its handle left the others out";
  return why + " (num_worst_tokens must cover the rows a rank can receive: at most its peers' tokens in all)";
}

}  // namespace ep
