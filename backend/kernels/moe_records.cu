// Device records (moe_records.cuh): the notify kernel (one block of kMaxRanksPerNode threads,
// thread t the slot of rank t) publishes this rank's record, gathers every rank's, evaluates the
// verdict and writes this rank's plan. A pushing dispatch's push kernel then moves this rank's
// rows as moe_push.cu does (a warp per row, copy_row_to), with the receivers' outputs and row
// offsets from the plan instead of the handshake's counts; a combine's pull kernel (moe.cu,
// moe_unroll.cu, moe_bulk.cu) reads the peers' x from the plan (load_combine_sources).
#include "backend/kernels/moe_device.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/moe_records.cuh"
#include "backend/kernels/sync.cuh"

namespace ep::kernels {
namespace {

using L = MoeRecordsLayout;

__device__ __forceinline__ uint32_t* flag_in(char* region, int src) {
  return reinterpret_cast<uint32_t*>(region + L::full_flag(src));
}
__device__ __forceinline__ int64_t* plan_of(const MoeNotifyParams& p) {
  return reinterpret_cast<int64_t*>(p.records[p.rank] + L::kPlanOffset);
}

// Waits until *flag is 0 (a free slot); false after the deadline.
__device__ __forceinline__ bool wait_free(const uint32_t* flag, uint64_t deadline) {
  while (load_acquire(flag) != 0) {
    if (now_ns() > deadline) return false;
    __nanosleep(100);
  }
  return true;
}

// Waits until *flag != 0 and returns it (0 after the deadline).
__device__ __forceinline__ uint32_t wait_nonzero(const uint32_t* flag, uint64_t deadline) {
  uint32_t word;
  while ((word = load_acquire(flag)) == 0) {
    if (now_ns() > deadline) return 0;
    __nanosleep(100);
  }
  return word;
}

// The notify step, by one block (every thread calls it; threads 0..R-1 take the slots): publish,
// gather, verdict, plan, report, and the sizes where the host waits for them.
__device__ void notify_block(const MoeNotifyParams& p) {
  const int t = threadIdx.x, R = p.num_ranks, me = p.rank;
  __shared__ int64_t records[kMaxRanksPerNode][kMoeRecordWords];
  __shared__ int missing;  // 1 + a rank whose record did not come (a timeout, or released waits)
  if (t == 0) missing = 0;
  const uint64_t deadline = now_ns() + p.timeout_ns;
  const int32_t* sends = p.meta + MetaLayout::tokens_per_rank();
  // A dispatch's first round (no outputs yet: every rank's host waits for its sizes) sends its
  // tokens per local expert of each receiver with its record.
  const bool first_round = p.sizes != nullptr;
  const int64_t per_rank = p.num_experts / R;  // local experts (<= kMaxRecordExperts: the host checks)
  const MetaLayout l{R, p.num_experts, p.num_tokens};
  // Expert ids out of range refuse the call here, where the host has not seen them.
  int64_t status = p.record[kRecStatus], value = p.record[kRecStatusValue], value2 = p.record[kRecStatusValue2];
  if (status == kRefusedNone && p.check_expert_ids) {
    const int64_t lo = p.meta[l.id_range()], hi = p.meta[l.id_range() + 1];
    if (lo < -1 || hi >= p.num_experts) status = kRefusedExpertIds, value = lo, value2 = hi;
  }
  __syncthreads();

  // 1. This rank's record into rank t's slot for it, once t has read the one before.
  if (t < R) {
    uint32_t* flag = flag_in(p.records[t], me);
    if (!wait_free(flag, deadline)) {
      atomicExch(p.error, 1 + t);
      atomicCAS(&missing, 0, 1 + t);
    } else {
      volatile int64_t* record = reinterpret_cast<volatile int64_t*>(p.records[t] + L::record(me));
      for (int w = 0; w < kRecSend; ++w) record[w] = p.record[w];
      record[kRecStatus] = status;
      record[kRecStatusValue] = value;
      record[kRecStatusValue2] = value2;
      for (int d = 0; d < R; ++d) {
        record[kRecSend + d] = sends[d];
        record[kRecExpect + d] = p.record[kRecExpect + d];
      }
      if (first_round) {  // t's tokens per local expert
        volatile int32_t* experts = reinterpret_cast<volatile int32_t*>(p.records[t] + L::experts(me));
        const int32_t* mine = p.meta + l.tokens_per_rank_expert() + t * per_rank;
        for (int64_t e = 0; e < per_rank; ++e) experts[e] = mine[e];
      }
      __threadfence_system();
      store_release(flag, 1);
    }
  }
  // 2. Rank t's record from this rank's slot for it; then the slot is free again (where the host
  // waits for the sizes, once the tokens per expert that came with it are summed, below).
  bool got = false;
  if (t < R) {
    uint32_t* flag = flag_in(p.records[me], t);
    const uint32_t word = wait_nonzero(flag, deadline);
    if (word != 1) {  // 0: timed out; else a value the transport's release wrote
      if (word == 0) atomicExch(p.error, 1 + t);
      atomicCAS(&missing, 0, 1 + t);
    } else {
      const volatile int64_t* record = reinterpret_cast<const volatile int64_t*>(p.records[me] + L::record(t));
      for (int w = 0; w < kRecSend; ++w) records[t][w] = record[w];
      for (int d = 0; d < R; ++d) {
        records[t][kRecSend + d] = record[kRecSend + d];
        records[t][kRecExpect + d] = record[kRecExpect + d];
      }
      got = true;
      if (!first_round) store_release(flag, 0);
    }
  }
  __syncthreads();
  if (first_round) {  // the tokens per local expert, summed over the senders; then the slots are free
    if (!missing)
      for (int64_t e = t; e < per_rank; e += blockDim.x) {
        int64_t n = 0;
        for (int s = 0; s < R; ++s) n += reinterpret_cast<const volatile int32_t*>(p.records[me] + L::experts(s))[e];
        p.sizes[kSizesPerExpert + e] = n;
      }
    __threadfence_system();
    __syncthreads();
    if (got) store_release(flag_in(p.records[me], t), 0);
  }

  // 3. The verdict, the same on every rank that got every record, and this rank's plan.
  int64_t* plan = plan_of(p);
  if (t < R) {
    int64_t first_row = 0;  // this rank's rows for t come after those of the ranks before it
    for (int s = 0; s < me; ++s) first_row += missing ? 0 : records[s][kRecSend + t];
    plan[kPlanFirstRow + t] = first_row;
    // This rank's own capacity and outputs whatever came: its padding covers them even after a
    // timeout (offsets of -1 would leave its rows unwritten).
    plan[kPlanCapacity + t] = t == me ? p.record[kRecCapacity] : missing ? 0 : records[t][kRecCapacity];
    for (int i = 0; i < 4; ++i)
      plan[kPlanOffset + 4 * t + i] = t == me ? p.record[kRecOffset + i] : missing ? -1 : records[t][kRecOffset + i];
  }
  if (t == 0) {
    MoeVerdict v{kVerdictTimedOut, 0, me, missing - 1, 0, 0};
    if (!missing) v = moe_verdict(records, R);
    int64_t received = 0;
    for (int s = 0; s < R && !missing; ++s) received += records[s][kRecSend + me];
    plan[kPlanMoves] = v.moves() ? 1 : 0;
    // A verdict of every record is every rank's: the done half runs alike. Without one (a record
    // that never came) peers that got theirs may have moved rows: wait for their done, bounded.
    plan[kPlanSayDone] = v.moves() || missing ? 1 : 0;
    plan[kPlanReceived] = received;
    // Reported on every rank, but for a timeout (the transport's error word says it) and on a rank
    // whose host refused (its pool, an earlier overflow): that host raises its own reason at the call.
    const bool own_refusal = v.code == kVerdictRefused && p.record[kRecStatus] != kRefusedNone;
    volatile int64_t* report = p.report;
    const bool reported = v.code != kVerdictOk && v.code != kVerdictTimedOut && !own_refusal;
    if (reported && report[kMoeReportCode] != 0) {  // the host has not taken the last one: counted
      atomicAdd(reinterpret_cast<unsigned long long*>(p.report + kMoeReportLater), 1ull);
      report[kMoeReportLaterCallId] = p.record[kRecCallId];
      __threadfence_system();
    } else if (reported) {
      report[kMoeReportLater] = 0;  // a count the host's take may have left behind
      report[kMoeReportLaterCallId] = 0;
      report[kMoeReportDetail] = v.detail;
      report[kMoeReportRank] = v.rank;
      report[kMoeReportPeer] = v.peer;
      report[kMoeReportValue] = v.value;
      report[kMoeReportPeerValue] = v.peer_value;
      report[kMoeReportCallId] = p.record[kRecCallId];
      report[kMoeReportOp] = p.record[kRecOp];
      report[kMoeReportSeq] = p.call_seq;
      __threadfence_system();
      report[kMoeReportCode] = v.code;
    }
    if (p.sizes) {  // after the report: a host that finds a bad verdict here raises what it says
      volatile int64_t* sizes = p.sizes;
      sizes[kSizesCode] = v.code;
      sizes[kSizesPeer] = v.peer;
      for (int s = 0; s < R; ++s) {
        sizes[kSizesRecv + s] = missing ? 0 : records[s][kRecSend + me];
        for (int j = 0; j < R; ++j) sizes[kSizesSent + s * R + j] = missing ? 0 : records[s][kRecSend + j];
      }
      __threadfence_system();
      sizes[kSizesTicket] = p.record[kRecCallId];
    }
  }
  __syncthreads();  // the plan is whole (a fused kernel's block 0 publishes it next)
}

__global__ void __launch_bounds__(kMaxRanksPerNode) notify_kernel(MoeNotifyParams p) { notify_block(p); }

// A fused launch (DispatchRecordsParams::one_launch): block 0 runs the notify step, then says the
// plan is ready (this call's call_seq in the plan-ready word of this rank's records region); the
// other blocks wait for that word (bounded: block 0's own waits are), then read the plan. False
// where the wait gave up: that block moves nothing.
__device__ bool notify_in_block_zero(const DispatchRecordsParams& p) {
  uint64_t* ready = reinterpret_cast<uint64_t*>(p.notify.records[p.notify.rank] + L::kPlanReadyOffset);
  __shared__ bool seen;
  if (blockIdx.x == 0) {
    notify_block(p.notify);
    if (threadIdx.x == 0) {
      __threadfence();
      store_release(ready, uint64_t(p.notify.call_seq));
    }
    return true;
  }
  if (threadIdx.x == 0) {
    const uint64_t deadline = now_ns() + 2 * p.notify.timeout_ns;
    seen = true;
    while (load_acquire(ready) != uint64_t(p.notify.call_seq)) {
      if (now_ns() > deadline) {
        atomicCAS(p.notify.error, 0, 1 + p.notify.rank);  // block 0 never came: keep a peer it named
        seen = false;
        break;
      }
      __nanosleep(64);
    }
  }
  __syncthreads();
  return seen;
}

template <typename V, int kDepth, bool kOneLaunch>
__global__ void __launch_bounds__(kThreads) dispatch_planned_kernel(DispatchRecordsParams p) {
  __shared__ int64_t first_item[kMaxRanksPerNode + 1];  // where this rank's rows to rank d start in its send list
  __shared__ int64_t first_row_on[kMaxRanksPerNode];    // where they start among rank d's received rows
  __shared__ RowOutputs outputs[kMaxRanksPerNode];      // rank d's outputs as mapped here
  __shared__ int64_t capacity[kMaxRanksPerNode];
  const int R = p.notify.num_ranks, me = p.notify.rank;
  const int lane = threadIdx.x & 31;
  // Written by the notify kernel before this one, or by this grid's block 0. A block that gave up
  // waiting for it (the group fails) touches nothing: the plan there may be the last call's.
  const bool planned = kOneLaunch ? notify_in_block_zero(p) : true;
  const int64_t* plan = plan_of(p.notify);
  if (!planned) {
    handshake_end</*kPushed=*/true>(p.handshake, p.notify.num_ranks, true);
    return;
  }
  const bool moves = plan[kPlanMoves] != 0;

  if (threadIdx.x < 32) {  // lane d: R <= kMaxRanksPerNode = 32
    const int d = lane;
    int64_t sends = 0;
    if (d < R) {
      sends = moves ? p.src.meta[MetaLayout::tokens_per_rank() + d] : 0;
      first_row_on[d] = plan[kPlanFirstRow + d];
      capacity[d] = plan[kPlanCapacity + d];
      const int64_t* offset = plan + kPlanOffset + 4 * d;
      auto at = [&](int i) { return offset[i] < 0 ? nullptr : p.arenas[d] + offset[i]; };
      outputs[d] = {at(0), reinterpret_cast<float*>(at(1)), reinterpret_cast<int64_t*>(at(2)),
                    reinterpret_cast<float*>(at(3))};
    }
    for (int offset = 1; offset < 32; offset <<= 1) {  // inclusive scan of sends
      const int64_t below = __shfl_up_sync(0xffffffffu, sends, offset);
      if (d >= offset) sends += below;
    }
    if (d < R) first_item[d + 1] = sends;
    if (d == 0) first_item[0] = 0;
  }
  __syncthreads();
  // The rows that move, then this rank's padding: every row when nothing moves.
  push_send_list<V, kDepth>(p.src, R, me, p.notify.num_experts, first_item, first_row_on, outputs, capacity,
                            moves ? plan[kPlanReceived] : 0, p.row_bytes, p.num_scales, p.num_topk);
  // The done half only where rows may have moved (kPlanSayDone): a rank whose first round stopped
  // the call launched no kernel to say done.
  handshake_end</*kPushed=*/true>(p.handshake, R, plan[kPlanSayDone] != 0);
}

}  // namespace

cudaError_t launch_moe_notify(const MoeNotifyParams& p, cudaStream_t stream) {
  if (p.num_ranks < 1 || p.num_ranks > kMaxRanksPerNode || !p.meta) return cudaErrorInvalidValue;
  notify_kernel<<<1, kMaxRanksPerNode, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_dispatch_with_records(const DispatchRecordsParams& p, cudaStream_t stream) {
  if (p.num_blocks < 1) return cudaErrorInvalidValue;
  if (!p.one_launch) {
    const cudaError_t notified = launch_moe_notify(p.notify, stream);
    if (notified != cudaSuccess) return notified;
  } else if (p.notify.num_ranks < 1 || p.notify.num_ranks > kMaxRanksPerNode || !p.notify.meta || p.notify.sizes) {
    return cudaErrorInvalidValue;  // a first round (sizes) runs the notify kernel alone
  }
  // The widest access that the row size and this rank's x allow: the receivers' recv_x come from
  // the MoE pool's allocator, whose blocks are 512-byte aligned, and start their rows at multiples
  // of the row size.
  int vec = 16;
  while (vec > 1 && (p.row_bytes % vec != 0 || (p.src.x && !aligned(p.src.x, vec)))) vec /= 2;
  const int64_t rows = p.src.num_tokens * p.notify.num_ranks, own = p.notify.record[kRecCapacity];
  const int grid = grid_for_warps(p.num_blocks, rows > own ? rows : own);
  with_access_type(vec, [&](auto v) {
    if (p.one_launch) dispatch_planned_kernel<decltype(v), kPushDepth, true><<<grid, kThreads, 0, stream>>>(p);
    else dispatch_planned_kernel<decltype(v), kPushDepth, false><<<grid, kThreads, 0, stream>>>(p);
  });
  return cudaGetLastError();
}

const void* moe_records_module_kernel() { return reinterpret_cast<const void*>(notify_kernel); }

}  // namespace ep::kernels
