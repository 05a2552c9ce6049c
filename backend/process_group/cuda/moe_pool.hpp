// A group's MoE pool (Options.moe_push): an arena every rank maps (CommPool, as the comm pool's)
// under a torch MemPool. A pushing dispatch allocates its outputs there, so that every sender
// reaches them at the receiver's arena base plus an offset: no per-call export. torch's caching
// allocator keeps the pool's segments, so freed outputs are reused in stream order (and after
// record_stream's events), as any tensor's memory.
#pragma once

#include <ATen/cuda/MemPool.h>

#include <memory>
#include <mutex>

#include "backend/transport/cuda/comm_pool.hpp"

namespace ep {

struct MoePool {
  std::shared_ptr<CommPool> arena;
  std::unique_ptr<at::cuda::MemPool> mem_pool;  // torch's private pool, its segments carved from `arena`
  std::mutex route_mutex;  // one thread at a time routes its allocations into mem_pool
};

}  // namespace ep
