#include "backend/kernels/all_to_all_pool.cuh"
#include "backend/kernels/all_to_all_v.cuh"
#include "backend/kernels/copy.cuh"
#include "backend/kernels/early_launch.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/sync.cuh"

namespace ep::kernels {
namespace {

using L = AllToAllVLayout;
constexpr int kPlanThreads = kMaxRanksPerNode;  // one per rank
constexpr int kMoveThreads = 512;
// 16-byte loads in flight per thread: 64 KiB per block, 128 KiB per SM at two blocks (what
// tools/sm_copy_ceiling.cu found a copy needs to approach an SM's ceiling on the H200).
constexpr int kUnroll = 8;
// The smallest chunk a message is cut into (unless the slot is smaller): below it a chunk is not
// copied faster (one pass of the block's loads is a memory round trip whatever its size) and costs
// a handshake more.
constexpr uint64_t kMinStagedChunk = 32 << 10;
// Rounds a lane's share of a message takes at least, where the chunks stay >= kMinStagedChunk:
// a lane's receiver copies round j while its sender fills round j + 1, so with n rounds the two
// copies overlap for n - 1 of n + 1 steps; with 4 the pipeline's fill and drain cost a quarter.
constexpr uint64_t kMinRounds = 4;
static_assert(L::kRecordWords % 2 == 0, "the plan reads a record in 16-byte loads");

// The chunk size of a message of `bytes`: its bytes spread evenly over every lane in at least
// kMinRounds rounds (more where slot-sized chunks need more), in 16-byte multiples (vector copies
// stay aligned), at least kMinStagedChunk, at most a slot. A function of the message's size and
// the group's layout only: its sender and its receiver cut it alike (the plan gives the
// receiver's recv_rows[src] equal to the sender's send_rows[dst]).
__device__ __forceinline__ uint64_t message_chunk_bytes(uint64_t bytes, const AllToAllVLayout& layout) {
  const uint64_t slot = layout.chunk_bytes, lanes = uint64_t(layout.lanes);
  const uint64_t needed = (bytes + lanes * slot - 1) / (lanes * slot);
  const uint64_t rounds = needed > kMinRounds ? needed : kMinRounds;
  const uint64_t even = ((bytes + lanes * rounds - 1) / (lanes * rounds) + 15) / 16 * 16;
  const uint64_t chunk = even > kMinStagedChunk ? even : kMinStagedChunk;
  return chunk < slot ? chunk : slot;
}

__device__ __forceinline__ uint32_t* flag_at(char* block, size_t offset) {
  return reinterpret_cast<uint32_t*>(block + offset);
}

// Eager calls: a message rides with its record when it has 1..eager_bytes bytes. A function of
// its size alone, which its sender (its splits) and its receiver (the sender's record) agree on.
__device__ __forceinline__ bool eager_message(uint64_t bytes, uint64_t eager_bytes) {
  return bytes > 0 && bytes <= eager_bytes;
}

// The plan, by one block whose first kPlanThreads threads (one per rank) do the work: the plan
// kernel, or block 0 of the one-launch call kernel. kEager (p.eager_bytes > 0; a block of
// kMoveThreads): the eager messages too, see all_to_all_v.cuh.
template <bool kEager>
__device__ void plan(const AllToAllVParams& p) {
  const int t = threadIdx.x, R = p.num_ranks, me = p.rank;
  const uint64_t deadline = deadline_after(p.timeout_ns);
  __shared__ int64_t splits[kMaxRanksPerNode];                     // this rank's
  __shared__ __align__(16) int64_t records[kMaxRanksPerNode][L::kRecordWords];  // each source's
  __shared__ bool overflows[kMaxRanksPerNode];                     // per receiver
  __shared__ bool unreachable[kMaxRanksPerNode];                   // receives bytes outside its arena
  __shared__ int failed;                                           // a wait timed out
  if (t == 0) failed = 0;
  if (t < R) splits[t] = p.input_splits ? p.input_splits[t] : p.host_splits[t];
  __syncthreads();
  int64_t sum = 0, status = 0;
  for (int d = 0; d < R; ++d) {
    if (splits[d] < 0 && status == 0) status = 1 + d;
    sum += splits[d];
  }
  if (status == 0 && (p.allow_extra_rows ? sum > p.num_rows : sum != p.num_rows)) status = L::kBadSum;

  // Eager: the slots in the peers' blocks are free first, then the messages that fit go into
  // their eager regions (the record below publishes them); a source's slot is freed only once its
  // messages are copied out (the end of this function).
  __shared__ bool slot_free[kMaxRanksPerNode];    // eager: this rank's slot in peer t's block
  __shared__ bool record_read[kMaxRanksPerNode];  // eager: source t's record is here, read
  if constexpr (kEager) {
    if (t < R) {
      record_read[t] = false;
      slot_free[t] = wait_for(flag_at(p.blocks[t], L::record_flag(me)), 0, deadline, p.abort, p.gpu_scope);
      if (!slot_free[t]) {
        atomicExch(p.error, 1 + t);
        failed = 1;
      }
    }
    __syncthreads();
    if (status == 0) {  // else nothing moves, and the splits may reach past input
      const uint64_t row_bytes = uint64_t(p.row_bytes);
      int64_t offset = 0;
      for (int d = 0; d < R; ++d) {
        const uint64_t bytes = uint64_t(splits[d]) * row_bytes;
        if (d != me && slot_free[d] && eager_message(bytes, p.eager_bytes))
          block_copy_call<kUnroll, kMoveThreads>(p.blocks[d] + p.layout.eager_region(R, me, p.eager_bytes),
                                                 p.input + offset * row_bytes, bytes, StreamingLoad{}, PlainStore{});
        offset += splits[d];
      }
    }
    __syncthreads();  // every thread's stores are issued before the releases below
  }

  // 1. This rank's record into peer t's block, once t has read the one before.
  if (t < R) {
    uint32_t* flag = flag_at(p.blocks[t], L::record_flag(me));
    if (!(kEager ? slot_free[t] : wait_for(flag, 0, deadline, p.abort, p.gpu_scope))) {
      if (!kEager) atomicExch(p.error, 1 + t);  // eager: set above
      failed = 1;
    } else {
      // Plain stores, ordered before the flag by its release; the eager messages, written by
      // every thread before the barrier above, by a fence of their own first.
      int64_t* record = reinterpret_cast<int64_t*>(p.blocks[t] + L::record(me));
      for (int d = 0; d < R; ++d) record[d] = splits[d];
      record[L::kCapacity] = p.capacity;
      record[L::kStatus] = status;
      record[L::kRowBytes] = p.row_bytes;
      record[L::kNumRows] = p.num_rows;
      record[L::kHasExpected] = p.has_expected;
      if (p.has_expected)
        for (int s = 0; s < R; ++s) record[L::kExpected + s] = p.expected_splits[s];
      record[L::kOutArena] = p.out_arena;
      if constexpr (kEager) fence_in(p.gpu_scope);
      store_release_in(flag, 1, p.gpu_scope);
    }
  }
  // 2. Source t's record from this rank's block; then its slot is free again.
  if (t < R) {
    uint32_t* flag = flag_at(p.blocks[me], L::record_flag(t));
    if (!wait_for(flag, 1, deadline, p.abort, p.gpu_scope)) {
      atomicExch(p.error, 1 + t);
      failed = 1;
    } else {
      // The whole record at once, in 16-byte loads from L2 (ordered after the acquire above): a few
      // memory round trips, where a word at a time took one each.
      const longlong2* from = reinterpret_cast<const longlong2*>(p.blocks[me] + L::record(t));
      longlong2* to = reinterpret_cast<longlong2*>(records[t]);
#pragma unroll 8
      for (int c = 0; c < int(L::kRecordWords / 2); ++c) to[c] = __ldcg(from + c);
      if constexpr (kEager) record_read[t] = true;  // freed once its message is copied out
      else store_release_in(flag, 0, p.gpu_scope);
    }
  }
  __syncthreads();

  // 3. The plan, the same on every rank: nothing moves after a timeout, invalid splits on any
  // rank, ranks whose rows differ in size, or a receiver expecting other counts than its senders
  // send; nothing goes to a rank whose output would overflow.
  int bad_rank = -1, size_rank = -1, mismatch_to = -1, mismatch_from = -1;
  for (int s = 0; s < R; ++s) {
    if (bad_rank < 0 && records[s][L::kStatus] != 0) bad_rank = s;
    if (size_rank < 0 && records[s][L::kRowBytes] != p.row_bytes) size_rank = s;
  }
  for (int d = 0; d < R && mismatch_to < 0; ++d)
    if (records[d][L::kHasExpected])
      for (int s = 0; s < R && mismatch_to < 0; ++s)
        if (records[d][L::kExpected + s] != records[s][d]) mismatch_to = d, mismatch_from = s;
  const bool nothing = failed || bad_rank >= 0 || size_rank >= 0 || mismatch_to >= 0;
  if (t < R) {
    int64_t total = 0;
    for (int s = 0; s < R; ++s) total += records[s][t];
    overflows[t] = records[t][L::kCapacity] >= 0 && total > records[t][L::kCapacity];
    const int64_t arena = records[t][L::kOutArena];
    unreachable[t] = arena == -1 || (arena < 0 && total > 0);
  }
  __syncthreads();
  const bool overflow = !nothing && overflows[me];
  // One copy when every rank can take it (then the staged plan below moves nothing).
  bool direct = p.pool_plan != nullptr && !nothing;
  for (int d = 0; d < R; ++d) direct = direct && !unreachable[d];
  if (t < R) {
    int64_t send_offset = 0, recv_offset = 0, out_offset = 0;
    for (int s = 0; s < t; ++s) {
      send_offset += splits[s];
      out_offset += nothing ? 0 : records[s][me];
    }
    recv_offset = overflow ? 0 : out_offset;
    // The rows this rank sends t (plan[t]) are the rows t's plan receives from it (plan[2R + me]
    // there): splits[t] is records[me][t] on t, and nothing, overflows[t] and direct come out
    // alike on every rank (but for `failed`, which is fatal; row sizes that differ anywhere make
    // nothing everywhere). So the move kernel's two ends count, and cut into chunks, the same bytes.
    const int64_t arrived = nothing ? 0 : records[t][me];
    const int64_t send_rows = nothing || overflows[t] ? 0 : splits[t];
    // Eager messages moved by this block, not by the move (their sizes both ends agree on).
    const bool eager_to = kEager && eager_message(uint64_t(splits[t]) * uint64_t(p.row_bytes), p.eager_bytes);
    const bool eager_from = kEager && eager_message(uint64_t(records[t][me]) * uint64_t(p.row_bytes), p.eager_bytes);
    p.plan[t] = direct || eager_to ? 0 : send_rows;
    p.plan[R + t] = send_offset;
    p.plan[2 * R + t] = direct || overflow || eager_from ? 0 : arrived;
    p.plan[3 * R + t] = recv_offset;
    p.output_splits[t] = arrived;
    p.output_offsets[t] = out_offset;
    if (p.pool_plan) {
      // Where this rank's rows for t go: after those of the ranks before this one, in t's output.
      int64_t before = 0;
      for (int s = 0; s < me; ++s) before += records[s][t];
      p.pool_plan[PoolPlan::bytes(t)] = direct && !eager_to ? send_rows * p.row_bytes : 0;
      p.pool_plan[PoolPlan::arena_offset(R, t)] = records[t][L::kOutArena] + before * p.row_bytes;
      p.pool_plan[PoolPlan::input_offset(R, t)] = send_offset * p.row_bytes;
    }
  }
  if (t == 0 && p.pool_plan) p.pool_plan[PoolPlan::kDirect] = direct ? 1 : 0;
  if (t == 0 && !failed) {
    volatile int64_t* report = p.report;
    const int64_t code = bad_rank >= 0      ? kReportBadSplits
                         : size_rank >= 0   ? kReportRowBytes
                         : mismatch_to >= 0 ? kReportMismatch
                         : overflow         ? kReportOverflow
                                            : kReportNone;
    const bool earlier_waits = code != kReportNone && report[0] != kReportNone;
    if (earlier_waits) {
      // An earlier call's report still waits for the host: count this one, so that the host's
      // error says that later calls moved nothing either (calls run in turn: no other plan here).
      report[kReportDropped] = report[kReportDropped] + 1;
      report[kReportDroppedCallId] = p.call_id;
      __threadfence_system();
    } else if (code == kReportBadSplits) {
      int64_t bad_sum = 0;
      for (int d = 0; d < R; ++d) bad_sum += records[bad_rank][d];
      report[1] = bad_rank;
      report[2] = records[bad_rank][L::kStatus];
      report[3] = bad_sum;
      report[4] = records[bad_rank][L::kNumRows];
      const int64_t status = records[bad_rank][L::kStatus];
      report[5] = status != L::kBadSum ? records[bad_rank][status - 1] : 0;
    } else if (code == kReportRowBytes) {
      report[1] = size_rank;
      report[2] = records[size_rank][L::kRowBytes];
      report[3] = p.row_bytes;
    } else if (code == kReportMismatch) {
      report[1] = mismatch_to;
      report[2] = mismatch_from;
      report[3] = records[mismatch_to][L::kExpected + mismatch_from];
      report[4] = records[mismatch_from][mismatch_to];
    } else if (code == kReportOverflow) {
      int64_t arrived = 0;
      for (int s = 0; s < R; ++s) arrived += records[s][me];
      report[1] = p.capacity;
      report[2] = arrived;
    }
    if (code != kReportNone && !earlier_waits) {
      report[kReportDropped] = 0;  // the count of the last report taken
      report[kReportDroppedCallId] = 0;
      report[kReportCallId] = p.call_id;
      report[kReportOp] = p.op;
      __threadfence_system();
      report[0] = code;
    }
  }

  if constexpr (kEager) {
    // 4. The eager messages from the eager regions (this rank's own from input) into the output,
    // where the plan moves anything here; then the sources' record slots are free again.
    if (!nothing && !overflow) {
      const uint64_t row_bytes = uint64_t(p.row_bytes);
      int64_t out_rows = 0, own_offset = 0;
      for (int d = 0; d < me; ++d) own_offset += splits[d];
      for (int s = 0; s < R; ++s) {
        const uint64_t bytes = uint64_t(records[s][me]) * row_bytes;
        char* out = p.output + out_rows * row_bytes;
        if (eager_message(bytes, p.eager_bytes)) {
          if (s == me)
            block_copy_call<kUnroll, kMoveThreads>(out, p.input + own_offset * row_bytes, bytes, StreamingLoad{},
                                                   StreamingStore{});
          else
            block_copy_call<kUnroll, kMoveThreads>(out, p.blocks[me] + p.layout.eager_region(R, s, p.eager_bytes),
                                                   bytes, CachedGlobalLoad{}, StreamingStore{});
        }
        out_rows += records[s][me];
      }
    }
    __syncthreads();  // every thread has read the eager regions before they are handed back
    if (t < R && record_read[t]) {
      fence_in(p.gpu_scope);
      store_release_in(flag_at(p.blocks[me], L::record_flag(t)), 0, p.gpu_scope);
    }
  }
}

// Launched early (p.early_launch): the move is launched before the plan ends, but its blocks start
// only once the plan has met its peers, not while it waits for them. Letting them start at the
// plan's beginning cost the staged move 64 MiB 159-161 us against 144-146 a call (H100, 2 ranks,
// 27d69c4's what-if, two runs each), and no small call gained from it.
// With p.pool_self_first the move starts at the plan's beginning: its blocks copy this rank's message
// to itself meanwhile, and wait for the plan only after it.
__global__ void __launch_bounds__(kPlanThreads) all_to_all_v_plan_kernel(AllToAllVParams p) {
  wait_for_prior_grid();
  if (p.pool_self_first) let_next_grid_start();
  plan<false>(p);
  let_next_grid_start();
}

// The plan of an eager call (p.eager_bytes > 0), which copies too: a block of kMoveThreads.
__global__ void __launch_bounds__(kMoveThreads) all_to_all_v_eager_plan_kernel(AllToAllVParams p) {
  wait_for_prior_grid();
  if (p.pool_self_first) let_next_grid_start();
  plan<true>(p);
  let_next_grid_start();
}

// One launch: block 0 writes the plan, then raises this rank's "plan ready" flag (the last block
// to finish clears it again).
__device__ void publish_plan(const AllToAllVParams& p) {
  __syncthreads();  // every thread's words of the plan are written
  if (threadIdx.x == 0) {
    __threadfence();
    store_release_in(flag_at(p.blocks[p.rank], L::kPlanReady), 1, p.gpu_scope);
  }
}

// The other blocks of the launch wait for block 0's plan. Block 0 starts first (blocks go in index
// order) and its own waits give up after the timeout, so a bound of twice that leaves the report
// of a missing peer to block 0; this one fires only if block 0 never ran, and waited on no peer:
// kErrorNoPeer, unless block 0 named one.
__device__ bool await_plan(const AllToAllVParams& p) {
  __shared__ int ready;
  if (threadIdx.x == 0) {
    ready = wait_for(flag_at(p.blocks[p.rank], L::kPlanReady), 1, deadline_after(p.timeout_ns, 2), p.abort,
                     p.gpu_scope);
    if (!ready) atomicCAS(p.error, 0, kErrorNoPeer);
  }
  __syncthreads();
  return ready != 0;
}

// A word of the plan, read from L2: in the one launch another block wrote it during this kernel.
__device__ __forceinline__ int64_t plan_word(const int64_t* word) { return __ldcg(word); }

// A drained staging slot's lines leave L2 without being written back: the staged bytes then cost
// HBM nothing (the sender's next fill allocates the lines afresh), where an eviction would write
// them to memory. Whole 128-byte lines only (a slot starts on one; its tail line is the slot's too).
__device__ __forceinline__ void discard_from_l2(char* slot, uint64_t bytes) {
  if ((reinterpret_cast<uintptr_t>(slot) & 127) != 0) return;
  for (uint64_t line = threadIdx.x; line < (bytes + 127) / 128; line += blockDim.x)
    asm volatile("discard.global.L2 [%0], 128;" ::"l"(slot + line * 128) : "memory");
}

// The staged move's grid: a pair of blocks per (peer offset b, lane), kStagedRoles * R * lanes.
constexpr int kStagedRoles = 2;
__host__ __device__ __forceinline__ int staged_blocks(int num_ranks, int lanes) {
  return kStagedRoles * num_ranks * lanes;
}

// Blocks 2i and 2i + 1 are pair i = b * lanes + lane. For b = 0 both copy a share of this rank's
// own rows. For b > 0 the first (sender) puts chunks lane, lane + lanes, ... of the message to
// rank + b into that rank's slots; the second (receiver) copies those of rank - b out of this
// rank's slots. Apart, the two copies of a round run at once, and a sender fills one slot
// while the peer's receiver drains the other. A block waits only on the pair of the same index
// on another rank, and the two blocks of the lowest pending pair are resident together (blocks
// go in index order, and any share of the GPU holds two), so the grid need not be resident.
// A drain (p.output null): the senders send as planned, the receivers take each chunk and hand its
// slot back without copying it, and this rank's own rows stay where they are; the peers' moves end
// as usual (all_to_all_v_cuda, when the output could not be allocated after the plan).
__device__ void staged_move(const AllToAllVParams& p, int block) {
  const int R = p.num_ranks, me = p.rank, lanes = p.layout.lanes;
  const int pair = block / kStagedRoles, role = block % kStagedRoles;
  const int b = pair / lanes, lane = pair % lanes;
  const uint64_t deadline = deadline_after(p.timeout_ns);
  const int64_t* send_rows = p.plan;
  const int64_t* send_offsets = p.plan + R;
  const int64_t* recv_rows = p.plan + 2 * R;
  const int64_t* recv_offsets = p.plan + 3 * R;
  const uint64_t row_bytes = uint64_t(p.row_bytes);
  if (b == 0) {
    if (p.output == nullptr) return;  // a drain
    const uint64_t bytes = uint64_t(plan_word(recv_rows + me)) * row_bytes;
    // 16-byte multiples keep vector copies aligned; rounded up, so that fewer bytes than shares
    // still go (to the first)
    const int shares = kStagedRoles * lanes, share_index = lane * kStagedRoles + role;
    const uint64_t share = ((bytes + shares - 1) / shares + 15) / 16 * 16;
    const uint64_t from = share * share_index < bytes ? share * share_index : bytes;
    const uint64_t to = from + share < bytes ? from + share : bytes;
    block_copy_call<kUnroll, kMoveThreads>(p.output + plan_word(recv_offsets + me) * row_bytes + from,
                                           p.input + plan_word(send_offsets + me) * row_bytes + from, to - from,
                                           StreamingLoad{}, StreamingStore{});
    return;
  }
  __shared__ int go;
  if (role == 0) {
    const int dst = (me + b) % R;
    const uint64_t bytes = uint64_t(plan_word(send_rows + dst)) * row_bytes;
    const char* send = p.input + plan_word(send_offsets + dst) * row_bytes;
    // Each way's message has its own chunk size (message_chunk_bytes), the same on both its ends.
    const uint64_t chunk = message_chunk_bytes(bytes, p.layout), chunks = (bytes + chunk - 1) / chunk;
    // Round j puts chunk k = lane + j * lanes through this lane's slot j % 2.
    for (uint64_t j = 0, k = lane; k < chunks; ++j, k += lanes) {
      const int slot = int(j % L::kSlots);
      if (threadIdx.x == 0) {
        // dst drained round j - 2
        go = take(flag_at(p.blocks[me], L::empty_flag(dst, lane, slot)), deadline, p.abort, p.gpu_scope);
        if (!go) atomicExch(p.error, 1 + dst);
      }
      __syncthreads();
      if (!go) return;
      const uint64_t from = k * chunk, n = bytes - from < chunk ? bytes - from : chunk;
      block_copy_call<kUnroll, kMoveThreads>(p.blocks[dst] + p.layout.slot(me, lane, slot), send + from, n,
                                             StreamingLoad{}, PlainStore{});
      __syncthreads();  // every thread's stores are issued before the release below
      if (threadIdx.x == 0) {
        fence_in(p.gpu_scope);
        store_release_in(flag_at(p.blocks[dst], L::full_flag(me, lane, slot)), 1, p.gpu_scope);
      }
    }
  } else {
    const int src = (me + R - b) % R;
    const uint64_t bytes = uint64_t(plan_word(recv_rows + src)) * row_bytes;
    char* recv = p.output ? p.output + plan_word(recv_offsets + src) * row_bytes : nullptr;  // null: a drain
    const uint64_t chunk = message_chunk_bytes(bytes, p.layout), chunks = (bytes + chunk - 1) / chunk;
    for (uint64_t j = 0, k = lane; k < chunks; ++j, k += lanes) {
      const int slot = int(j % L::kSlots);
      if (threadIdx.x == 0) {
        go = take(flag_at(p.blocks[me], L::full_flag(src, lane, slot)), deadline, p.abort,
                  p.gpu_scope);  // src sent round j
        if (!go) atomicExch(p.error, 1 + src);
      }
      __syncthreads();
      if (!go) return;
      const uint64_t from = k * chunk, n = bytes - from < chunk ? bytes - from : chunk;
      char* staged = p.blocks[me] + p.layout.slot(src, lane, slot);
      if (recv) block_copy_call<kUnroll, kMoveThreads>(recv + from, staged, n, CachedGlobalLoad{}, StreamingStore{});
      __syncthreads();  // every thread has read the slot before it is dropped and handed back
      discard_from_l2(staged, n);
      __syncthreads();
      if (threadIdx.x == 0) {
        fence_in(p.gpu_scope);
        store_release_in(flag_at(p.blocks[src], L::empty_flag(me, lane, slot)), 1, p.gpu_scope);
      }
    }
  }
}

__global__ void __launch_bounds__(kMoveThreads, 2) all_to_all_v_move_kernel(AllToAllVParams p) {
  wait_for_prior_grid();
  staged_move(p, blockIdx.x);
}

__device__ __forceinline__ bool one_copy(const AllToAllVParams& p) {
  return p.pool_plan != nullptr && plan_word(p.pool_plan + PoolPlan::kDirect) != 0;
}

// Worker `worker` of p.pool_workers, once the plan chose one copy: its fixed piece of the call, or
// pieces taken in turn.
__device__ __forceinline__ void push_one_copy(const AllToAllVParams& p, int worker) {
  if (p.pool_pieces) pool::push_pieces<kUnroll, kMoveThreads, false>(p, [] { return true; });
  else pool::push<kUnroll, kMoveThreads>(p, worker, p.pool_workers);
}

// A worker of p.pool_self_first (pieces taken in turn): this rank's message to itself before the
// plan, then `plan_says_one_copy()` and the rest of the one copy; else (the plan chose the staged
// move) the staged move's block `block`, if there is one. `await()` waits for the plan, false if it
// never came.
template <typename AwaitPlan>
__device__ void push_self_first(const AllToAllVParams& p, int block, AwaitPlan await) {
  bool planned = false;
  const bool one = pool::push_pieces<kUnroll, kMoveThreads, true>(p, [&] {
    planned = await();
    return planned && one_copy(p);
  });
  if (!one && planned && block < staged_blocks(p.num_ranks, p.layout.lanes)) staged_move(p, block);
}

// Every block at its end: the last of the grid to get here resets the counter `finished` (and
// with `fused` the "plan ready" flag) for the next call, and after a one-copy move takes every
// source's "done" flag (this rank's own included): the call ends once this rank's output is whole.
__device__ void finish_call(const AllToAllVParams& p, size_t finished, bool fused) {
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* count = flag_at(p.blocks[p.rank], finished);
    __threadfence();  // block 0's plan is written before its count: the last block reads it
    last = atomicAdd(count, 1u) + 1 == gridDim.x;
    if (last) {
      __threadfence();  // the acquire side of the count: the plan is read after every block's count
      *reinterpret_cast<volatile uint32_t*>(count) = 0;
      if (fused) *reinterpret_cast<volatile uint32_t*>(flag_at(p.blocks[p.rank], L::kPlanReady)) = 0;
      // Every block took its last piece before it counted: the counter is free for the next call.
      if (p.pool_pieces) *reinterpret_cast<volatile uint32_t*>(flag_at(p.blocks[p.rank], L::kPoolNextPiece)) = 0;
    }
  }
  __syncthreads();
  // Every block counted, block 0 after its plan: the plan is there to read.
  if (last && one_copy(p)) pool::take_done(p);
}

// A group with a comm pool: one copy where the plan chose it (the first pool_workers blocks), else
// the staged move (the first staged_blocks blocks); the others end at once.
// kSelfFirst (p.pool_self_first): the plan let this grid start at its own beginning, and the workers
// copy this rank's message to itself before they wait for it.
template <bool kSelfFirst>
__global__ void __launch_bounds__(kMoveThreads, 2) all_to_all_v_move_any_kernel(AllToAllVParams p) {
  if (kSelfFirst && int(blockIdx.x) < p.pool_workers) {
    push_self_first(p, blockIdx.x, [] {
      wait_for_prior_grid();
      return true;
    });
  } else {
    wait_for_prior_grid();
    if (one_copy(p)) {
      if (int(blockIdx.x) < p.pool_workers) push_one_copy(p, blockIdx.x);
    } else if (int(blockIdx.x) < staged_blocks(p.num_ranks, p.layout.lanes)) staged_move(p, blockIdx.x);
  }
  let_next_grid_start();  // the next call's plan launches while the last block waits for the data
  finish_call(p, L::kPoolFinished, /*fused=*/false);
}

// A whole call in one launch: block 0 plans while the others wait for it, then the blocks move as
// the move kernels above do (blocks 1..pool_workers copy a one-copy move: block 0 starts late).
// kEager: block 0's plan moves the eager messages too.
template <bool kEager, bool kSelfFirst>
__global__ void __launch_bounds__(kMoveThreads, 2) all_to_all_v_call_kernel(AllToAllVParams p) {
  wait_for_prior_grid();
  bool planned = true;
  if (blockIdx.x == 0) {
    plan<kEager>(p);
    publish_plan(p);
  } else if (kSelfFirst && int(blockIdx.x) <= p.pool_workers) {
    // This rank's message to itself while block 0 meets the peers.
    push_self_first(p, blockIdx.x, [&] { return await_plan(p); });
    planned = false;  // moved above
  } else {
    planned = await_plan(p);
  }
  if (planned) {
    if (one_copy(p)) {
      if (blockIdx.x > 0 && int(blockIdx.x) <= p.pool_workers) push_one_copy(p, blockIdx.x - 1);
    } else if (int(blockIdx.x) < staged_blocks(p.num_ranks, p.layout.lanes)) {
      staged_move(p, blockIdx.x);
    }
  }
  let_next_grid_start();
  finish_call(p, L::kCallFinished, /*fused=*/true);
}

}  // namespace

cudaError_t launch_all_to_all_v_plan(const AllToAllVParams& params, cudaStream_t stream) {
  if (params.num_ranks < 1 || params.num_ranks > kMaxRanksPerNode || params.layout.chunk_bytes == 0)
    return cudaErrorInvalidValue;
  if (params.eager_bytes > 0)
    return launch_kernel(all_to_all_v_eager_plan_kernel, 1, kMoveThreads, stream, params.early_launch, params);
  return launch_kernel(all_to_all_v_plan_kernel, 1, kPlanThreads, stream, params.early_launch, params);
}

cudaError_t launch_all_to_all_v_move(const AllToAllVParams& params, cudaStream_t stream) {
  if (params.num_ranks < 1 || params.num_ranks > kMaxRanksPerNode || params.layout.chunk_bytes == 0 ||
      params.layout.lanes < 1 || params.layout.lanes > L::kMaxLanes)
    return cudaErrorInvalidValue;
  // A pair of blocks per (peer offset, lane), see staged_move: the grid need not be resident.
  return launch_kernel(all_to_all_v_move_kernel, staged_blocks(params.num_ranks, params.layout.lanes), kMoveThreads,
                       stream, params.early_launch, params);
}

cudaError_t launch_all_to_all_v_move_any(const AllToAllVParams& params, int blocks, cudaStream_t stream) {
  if (params.num_ranks < 1 || params.num_ranks > kMaxRanksPerNode || params.layout.chunk_bytes == 0 ||
      params.layout.lanes < 1 || params.layout.lanes > L::kMaxLanes || params.pool_plan == nullptr)
    return cudaErrorInvalidValue;
  const int staged = staged_blocks(params.num_ranks, params.layout.lanes);
  AllToAllVParams p = params;
  p.pool_workers = blocks > 0 ? blocks : 1;
  auto* kernel = p.pool_self_first ? all_to_all_v_move_any_kernel<true> : all_to_all_v_move_any_kernel<false>;
  return launch_kernel(kernel, p.pool_workers > staged ? p.pool_workers : staged, kMoveThreads, stream, p.early_launch, p);
}

cudaError_t launch_all_to_all_v_call(const AllToAllVParams& params, int pool_blocks, cudaStream_t stream) {
  if (params.num_ranks < 1 || params.num_ranks > kMaxRanksPerNode || params.layout.chunk_bytes == 0 ||
      params.layout.lanes < 1 || params.layout.lanes > L::kMaxLanes)
    return cudaErrorInvalidValue;
  // The staged move's blocks, or block 0 (the plan) and `pool_blocks` for a one copy: which one
  // runs is the plan's choice, made on the device.
  const int staged = staged_blocks(params.num_ranks, params.layout.lanes);
  AllToAllVParams p = params;
  p.pool_workers = params.pool_plan != nullptr ? (pool_blocks > 0 ? pool_blocks : 1) : 0;
  const int direct = p.pool_workers > 0 ? 1 + p.pool_workers : 0;
  const int grid = direct > staged ? direct : staged;
  auto* kernel = p.eager_bytes > 0 ? (p.pool_self_first ? all_to_all_v_call_kernel<true, true>
                                                          : all_to_all_v_call_kernel<true, false>)
                                   : (p.pool_self_first ? all_to_all_v_call_kernel<false, true>
                                                        : all_to_all_v_call_kernel<false, false>);
  return launch_kernel(kernel, grid, kMoveThreads, stream, p.early_launch, p);
}

const void* all_to_all_v_module_kernel() { return reinterpret_cast<const void*>(all_to_all_v_plan_kernel); }

}  // namespace ep::kernels
