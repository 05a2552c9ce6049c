// Experimental block sizes of the kernels across nodes, for benchmark runs only: read from the
// environment once, when a group's transport across nodes is made (all ranks must set the same).
// Off by default (unset or 0: the kernels' own sizes); not Options, not in torch_ep.options'
// table: docs/internode.md names them.
//   TORCH_EP_INTERNODE_SEND_THREADS    512 | 1024: the dispatch send kernel (pack and rail puts)
//                                      and the combine push kernel at that block size
//                                      (kernels/internode_dispatch.cu, internode_combine.cu)
//   TORCH_EP_INTERNODE_REDUCE_THREADS  512 | 1024: the combine reduce kernel's variant
//                                      (launch_combine_reduce says what each changes)
//   TORCH_EP_EXCHANGE_THREADS          256 | 512 | 1024: all_to_all's exchange kernel across
//                                      nodes (kernels/internode_exchange.cu); its slots are
//                                      sized so that the grid stays resident
// Header without NVSHMEM types.
#pragma once

#include <cstdlib>
#include <initializer_list>
#include <string>

#include "backend/common/errors.hpp"

namespace ep {

// The value of `name` (0 where unset or empty), which must be 0 or one of `allowed`.
inline int experimental_threads(const char* name, std::initializer_list<int> allowed) {
  const char* text = std::getenv(name);
  if (text == nullptr || *text == '\0') return 0;
  char* end = nullptr;
  const long value = std::strtol(text, &end, 10);
  if (*end == '\0' && value == 0) return 0;
  for (int a : allowed)
    if (*end == '\0' && value == a) return a;
  std::string list;
  for (int a : allowed) list += (list.empty() ? "" : ", ") + std::to_string(a);
  throw CommError(std::string("torch_ep: ") + name + "=" + text + ": expected 0 (the default) or one of " + list);
}

}  // namespace ep
