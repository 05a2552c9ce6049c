// Errors the transports raise. They carry the op, the rank and the peer so that the message a
// user sees says where and why; the process group maps them onto torch.distributed errors.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

namespace ep {

// The ranks disagree (split sizes, handles, sequence) or a system call failed.
class CommError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A wait ran past the group's timeout: a peer never arrived. A CommError too, so that every
// place that maps communication failures onto torch errors maps timeouts with them.
class TimeoutError : public CommError {
 public:
  using CommError::CommError;
};

std::string errno_string(int err);

// The error of a dispatch whose rank received more rows than num_worst_tokens, CPU and CUDA
// alike; `dropped`: the call returned with the rows that fit (CUDA, where only the kernel saw it).
std::string dispatch_overflow_message(int64_t call_id, int64_t rank, int64_t received, int64_t num_worst_tokens,
                                      bool dropped);

}  // namespace ep
