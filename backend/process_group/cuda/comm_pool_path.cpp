// ProcessGroupEP's comm pool (torch_ep.comm_pool): the arena every rank maps once
// (backend/transport/cuda/comm_pool.hpp), and the torch allocator that carves the segments of a
// torch.cuda.MemPool out of it. torch's caching allocator keeps those segments and splits them
// into tensors; it comes back to this allocator only for a new segment or to return one.
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/csrc/cuda/CUDAPluggableAllocator.h>
#include <torch/csrc/utils/pybind.h>

#include <mutex>
#include <vector>

#include "backend/kernels/all_to_all.cuh"  // kMaxRanksPerNode
#include "backend/ops/all_to_all_v.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/process_group/cuda/moe_pool.hpp"
#include "backend/transport/cuda/comm_pool.hpp"
#include "backend/transport/cuda/cuda_transport.hpp"  // moe_exchanges

namespace ep {

namespace {

using TorchAllocator = c10::cuda::CUDACachingAllocator::CUDAAllocator;

// Why this thread's last allocation from a comm pool failed ("" after a success). torch retries a
// failed segment once it has returned cached ones, then raises its own out-of-memory error; the
// observer below adds this reason to it, as a warning just before.
thread_local std::string last_failure;

void explain_out_of_memory() {
  static std::once_flag once;
  std::call_once(once, [] {
    try {
      c10::cuda::CUDACachingAllocator::attachOutOfMemoryObserver([](int64_t, size_t, size_t, size_t) {
        if (last_failure.empty()) return;
        TORCH_WARN(last_failure);
        last_failure.clear();
      });
    } catch (const std::exception&) {
      // A current allocator without observers: torch's message alone.
    }
  });
}

// Every comm pool allocator this process made, kept to its end. torch's MemPool and its private
// pool hold the allocator by raw pointer, and the pool returns its segments (through the
// allocator) whenever its last tensor goes, which may be long after the MemPool and the group.
// An allocator is small; the arena it points to is freed by CommPool once closed and empty.
std::shared_ptr<TorchAllocator> keep_for_the_process(std::shared_ptr<TorchAllocator> allocator) {
  static std::mutex mutex;
  static auto* kept = new std::vector<std::shared_ptr<TorchAllocator>>();  // never destroyed: no exit-order trap
  std::lock_guard<std::mutex> lock(mutex);
  kept->push_back(allocator);
  return allocator;
}

// A torch allocator over `arena`, kept for the process. `explain`: a failed segment's reason
// goes into torch's out-of-memory error (the comm pool); the MoE pool's dispatch words its own.
std::shared_ptr<TorchAllocator> allocator_over(std::shared_ptr<CommPool> arena, bool explain) {
  if (explain) explain_out_of_memory();
  return keep_for_the_process(torch::cuda::CUDAPluggableAllocator::createCustomAllocator(
      [arena, explain](size_t bytes, int device, cudaStream_t) -> void* {
        std::string why;
        void* ptr = arena->allocate(bytes, device, &why);
        if (explain) last_failure = std::move(why);
        return ptr;
      },
      [arena](void* ptr, size_t, int, cudaStream_t) { arena->release(ptr); }));
}

// Every rank's arena of `bytes` (collective); a failure raises naming `what` and `variable`.
std::shared_ptr<CommPool> make_arena(Rendezvous& rendezvous, int device, size_t bytes, const std::string& tag,
                                     const std::string& what, const char* variable) {
  try {
    return std::make_shared<CommPool>(rendezvous, device, bytes, tag);
  } catch (const std::exception& e) {
    C10_THROW_ERROR(DistBackendError, what + " (" + std::to_string(bytes) + " bytes per rank, " + variable +
                                          ") failed: " + e.what());
  }
}

}  // namespace

std::shared_ptr<CommPool> ProcessGroupEP::comm_pool() const {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  return comm_pool_;
}

pybind11::object ProcessGroupEP::comm_pool_allocator(int device) {
  const char* op = "comm_pool";
  std::shared_ptr<void> allocator;
  {
    pybind11::gil_scoped_release no_gil;  // collective: peers may take a while
    // The device protocol's state first (collective): calls on pool tensors run on its kernels.
    std::shared_ptr<AllToAllVState> state = all_to_all_v_state(at::Device(at::kCUDA, c10::DeviceIndex(device)), op);
    TORCH_CHECK(state, "torch_ep.comm_pool: needs every rank of the group on one host (each maps its peers' arenas "
                "through CUDA IPC) and at most ", kernels::kMaxRanksPerNode, " ranks; this group has ", getSize(),
                " ranks", topology_.multi_node() ? " on several nodes" : "");
    std::lock_guard<std::mutex> lock(cuda_mutex_);
    if (!comm_pool_) {
      c10::cuda::CUDAGuard guard{c10::DeviceIndex(device)};
      std::shared_ptr<CommPool> pool = make_arena(rendezvous_, device, config_.comm_pool_bytes, "ep/cuda/comm_pool",
                                                  "torch_ep.comm_pool: setting up the arenas", "TORCH_EP_COMM_POOL_BYTES");
      comm_allocator_ = allocator_over(pool, /*explain=*/true);
      comm_pool_ = std::move(pool);
    }
    TORCH_CHECK_VALUE(comm_pool_->device() == device, "torch_ep.comm_pool: this group's pool is on cuda:",
                      comm_pool_->device(), ", but the current device is cuda:", device);
    allocator = comm_allocator_;
  }
  return pybind11::cast(std::static_pointer_cast<TorchAllocator>(allocator));
}

std::vector<int64_t> ProcessGroupEP::comm_pool_stats() {
  std::shared_ptr<CommPool> pool = comm_pool();
  std::shared_ptr<AllToAllVState> state = all_to_all_v_state(at::Device(at::kCUDA), "comm_pool", /*create=*/false);
  if (!pool || !state) return {};
  return {int64_t(pool->bytes()), int64_t(pool->used()), last_call_one_copy(*state) ? 1 : 0};
}

std::shared_ptr<MoePool> ProcessGroupEP::make_moe_pool(int device, const char* op) {
  c10::cuda::CUDAGuard guard{c10::DeviceIndex(device)};
  auto pool = std::make_shared<MoePool>();
  pool->arena = make_arena(rendezvous_, device, config_.moe_pool_bytes, "ep/cuda/moe_pool",
                           std::string(op) + ": setting up the MoE pool for TORCH_EP_MOE_PUSH", "TORCH_EP_MOE_POOL_BYTES");
  // A failed segment makes torch raise OutOfMemoryError; the dispatch turns that into its own
  // error naming TORCH_EP_MOE_POOL_BYTES (moe_push.cpp), so no reason is kept here.
  pool->mem_pool = std::make_unique<at::cuda::MemPool>(allocator_over(pool->arena, /*explain=*/false));
  return pool;
}

std::shared_ptr<MoePool> ProcessGroupEP::moe_pool_if_any() const {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  return moe_pool_;
}

std::vector<int64_t> ProcessGroupEP::moe_pool_stats() {
  std::shared_ptr<MoePool> pool = moe_pool_if_any();
  if (!pool) return {};
  return {int64_t(pool->arena->bytes()), int64_t(pool->arena->used())};
}

int64_t ProcessGroupEP::moe_pool_offset(int64_t ptr, int64_t bytes) {
  std::shared_ptr<MoePool> pool = moe_pool_if_any();
  return pool ? pool->arena->offset_of(reinterpret_cast<const void*>(ptr), size_t(bytes)) : -1;
}

int64_t ProcessGroupEP::moe_exchanges() {
  std::lock_guard<std::mutex> lock(cuda_mutex_);
  return moe_transport_ ? int64_t(moe_transport_->exchanges()) : 0;
}

std::vector<int64_t> ProcessGroupEP::peer_mappings() {
  std::shared_ptr<CudaTransport> moe, a2a;
  {
    std::lock_guard<std::mutex> lock(cuda_mutex_);
    moe = moe_transport_;
    a2a = cuda_transport_;
  }
  std::vector<int64_t> counts;
  for (CudaTransport* t : {moe.get(), a2a.get()}) {
    counts.push_back(t ? int64_t(t->mappings().open_count()) : 0);
    counts.push_back(t ? int64_t(t->mappings().closing_count()) : 0);
  }
  return counts;
}

void ProcessGroupEP::close_comm_pool() {
  std::shared_ptr<CommPool> pool;
  std::shared_ptr<MoePool> moe;
  std::shared_ptr<AllToAllVState> state;
  {
    std::lock_guard<std::mutex> lock(cuda_mutex_);
    pool = std::move(comm_pool_);
    comm_allocator_.reset();  // kept for the process (keep_for_the_process): segments may still come back
    moe = std::move(moe_pool_);
    state = a2av_state_;
  }
  if (!pool && !moe) return;
  // A call in flight may still write the peers' arenas through their mappings: eager calls on
  // any stream, and graph replays, which no call order sees. Shutdown, so the whole device.
  const int device = moe ? moe->arena->device() : state ? device_of(*state) : -1;
  if (device >= 0) {
    c10::cuda::CUDAGuard guard(c10::DeviceIndex(device));
    cudaDeviceSynchronize();
  }
  if (pool) pool->close();
  if (moe) {
    c10::cuda::CUDAGuard guard(c10::DeviceIndex(moe->arena->device()));
    moe->arena->close();
    // torch gives back the pool's free segments now, the rest as their tensors go (the allocator
    // is kept for the process, as the comm pool's). Not while a dispatch routes into it.
    std::lock_guard<std::mutex> route(moe->route_mutex);
    moe->mem_pool.reset();
  }
}

}  // namespace ep
