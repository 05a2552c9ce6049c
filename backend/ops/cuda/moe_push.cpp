#include "backend/ops/cuda/moe_push.hpp"

#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "backend/process_group/cuda/moe_pool.hpp"
#include "backend/process_group/process_group_ep.hpp"
#include "backend/transport/cuda/cuda_check.hpp"
#include "backend/transport/cuda/cuda_transport.hpp"

namespace ep::moe {
namespace {

// Routes this thread's allocations on `device` into the MoE pool for its lifetime, as
// torch.cuda.use_mem_pool does (begin, end, then release the pool's use count begin took).
class RouteToPool {
 public:
  RouteToPool(MoePool& pool, c10::DeviceIndex device)
      : lock_(pool.route_mutex), device_(device), id_(pool.mem_pool->id()) {
    c10::cuda::CUDACachingAllocator::beginAllocateToPool(
        device_, id_, [thread = std::this_thread::get_id()](cudaStream_t) { return std::this_thread::get_id() == thread; });
  }
  ~RouteToPool() {
    c10::cuda::CUDACachingAllocator::endAllocateToPool(device_, id_);
    c10::cuda::CUDACachingAllocator::releasePool(device_, id_);
  }
  RouteToPool(const RouteToPool&) = delete;
  RouteToPool& operator=(const RouteToPool&) = delete;

 private:
  std::lock_guard<std::mutex> lock_;
  c10::DeviceIndex device_;
  c10::MempoolId_t id_;
};

std::string mib(size_t bytes) { return std::to_string((bytes + (1 << 20) - 1) >> 20) + " MiB"; }

// What a receiver sends in the second exchange.
struct TargetRecord {
  int32_t status;  // 0, or this rank could not allocate its outputs (`detail`)
  int32_t pad;
  PushTarget target;
  char detail[256];
};

}  // namespace

bool push_this_call(ProcessGroupEP& group, cudaStream_t stream) {
  return group.config().moe_push && !stream_capturing(stream);
}

bool allocate_from_pool(MoePool& pool, int rank, const DispatchArgs& a, int64_t capacity, DispatchOutputs& o,
                        PushTarget& target, std::string* why) {
  const bool cached = a.handle_meta.has_value();
  const int64_t H = a.x.size(1), K = cached ? 0 : a.topk_idx->size(1);
  const at::TensorOptions floats = a.x.options().dtype(at::kFloat);
  const int64_t bytes = capacity * (H * int64_t(a.x.element_size()) + (a.x_scales ? a.x_scales->size(1) * 4 : 0) +
                                    (cached ? 0 : K * 8) + (a.topk_weights ? K * 4 : 0));
  // Kept under a record's 255 characters of detail.
  const std::string where = "rank " + std::to_string(rank) + ": the MoE pool (TORCH_EP_MOE_POOL_BYTES";
  try {
    RouteToPool route(pool, a.x.device().index());
    o.recv_x = at::empty({capacity, H}, a.x.options());
    o.recv_x_scales = a.x_scales ? at::empty({capacity, a.x_scales->size(1)}, a.x_scales->options())
                                 : at::empty({0}, floats);
    o.recv_topk_idx = cached ? at::empty({0}, a.x.options().dtype(at::kLong))
                             : at::empty({capacity, K}, a.x.options().dtype(at::kLong));
    o.recv_topk_weights = a.topk_weights ? at::empty({capacity, K}, floats) : at::empty({0}, floats);
  } catch (const c10::OutOfMemoryError&) {
    o = DispatchOutputs{};
    *why = where + ": " + mib(pool.arena->bytes()) + " a rank, " + mib(pool.arena->used()) +
           " held) cannot hold this dispatch's outputs (" + std::to_string(capacity) + " rows, " + mib(size_t(bytes)) +
           "); raise TORCH_EP_MOE_POOL_BYTES or keep fewer dispatch outputs alive";
    return false;
  } catch (const std::exception& e) {  // any other failure is a refusal too: every rank raises, none hangs
    o = DispatchOutputs{};
    *why = where + ") could not allocate this dispatch's outputs (" + std::to_string(capacity) + " rows, " +
           mib(size_t(bytes)) + "): " + e.what();
    return false;
  }
  const at::Tensor* outputs[4] = {&o.recv_x, &o.recv_x_scales, &o.recv_topk_idx, &o.recv_topk_weights};
  for (int i = 0; i < 4; ++i) {
    const at::Tensor& t = *outputs[i];
    target.offset[i] = t.numel() ? pool.arena->offset_of(t.data_ptr(), t.nbytes()) : -1;
    if (t.numel() && target.offset[i] < 0) {
      o = DispatchOutputs{};
      *why = where + ") did not get this dispatch's outputs: this thread's allocations go to another pool "
             "(torch.cuda.use_mem_pool or a reduce-overhead torch.compile warm-up around a pushing dispatch?)";
      return false;
    }
  }
  target.capacity = capacity;
  return true;
}

std::vector<PushTarget> exchange_targets(CudaTransport& transport, const PushTarget& mine, const std::string& why,
                                         const char* op) {
  const int R = transport.size(), rank = transport.rank();
  TargetRecord record;
  std::memset(&record, 0, sizeof(record));
  record.target = mine;
  if (!why.empty()) {
    record.status = 1;
    std::strncpy(record.detail, why.c_str(), sizeof(record.detail) - 1);
  }
  std::vector<TargetRecord> records(static_cast<size_t>(R), record);
  std::vector<TargetRecord> theirs(records.size());
  transport.exchange(records.data(), theirs.data(), sizeof(TargetRecord), op);
  TORCH_CHECK_VALUE(why.empty(), op, " on rank ", rank, ": ", why);
  std::vector<PushTarget> targets;
  for (int p = 0; p < R; ++p) {
    TORCH_CHECK_VALUE(theirs[p].status == 0, op, " on rank ", rank, ": rank ", p, " could not allocate its outputs (",
                      theirs[p].detail, "), so no rank goes on");
    targets.push_back(theirs[p].target);
  }
  return targets;
}

void set_targets(MoePool& pool, int num_ranks, const std::vector<PushTarget>& targets, kernels::DispatchTarget* dst) {
  for (int d = 0; d < num_ranks; ++d) {
    char* base = pool.arena->arena(d);
    TORCH_CHECK(base, "dispatch: rank ", d, "'s MoE arena is not mapped here (the group is shutting down?)");
    const PushTarget& t = targets[size_t(d)];
    auto at = [&](int i) { return t.offset[i] < 0 ? nullptr : base + t.offset[i]; };
    dst[d].recv_x = at(0);
    dst[d].recv_x_scales = reinterpret_cast<float*>(at(1));
    dst[d].recv_topk_idx = reinterpret_cast<int64_t*>(at(2));
    dst[d].recv_topk_weights = reinterpret_cast<float*>(at(3));
    dst[d].capacity = t.capacity;
  }
}

}  // namespace ep::moe
