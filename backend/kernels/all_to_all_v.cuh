// Launchers of the all_to_all_v kernels: the split sizes never leave the device. Torch-free: raw
// pointers and one POD parameter struct for every kernel.
//
// Each rank registers one block (CUDA IPC, mapped by every peer), laid out by AllToAllVLayout:
//   records: per source rank, the record it published for this call (its splits, capacity, ...)
//   flags:   per source, "record here" (set by the source, cleared by this rank once read);
//            per (source, lane, slot), "staging slot full" (set by the source, cleared by this
//            rank); per (destination, lane, slot), "slot in the destination's block empty" (set by
//            the destination once drained, cleared by this rank before it fills the slot again)
//   staging: per (source, lane), two slots of chunk_bytes
// Flags go back to their initial values after every call (records: 0, full: 0, empty: 1), so
// calls need no sequence numbers and a captured CUDA graph replays.
//
// A call is one launch on its stream (all_to_all_v without an output: two, see below):
//   plan (block 0): wait until the record slot in each peer's block is free, write this rank's
//     record there and raise its flag; wait for every peer's record here, read it, free the slot.
//     Every rank then knows every rank's splits and capacity and computes the same plan: nothing
//     moves if any rank's splits are invalid or the ranks disagree on the row size; nothing goes
//     to a rank whose output would overflow. Writes output_splits, output_offsets and this
//     rank's part of the plan, then raises this rank's "plan ready" flag; the other blocks wait
//     for it (bounded), then move. The last block to finish clears the flag and the counters.
//     all_to_all_v with no output runs the plan alone (a kernel of one block), the host waits for
//     the sizes and allocates the output, then the move alone (TORCH_EP_ALL_TO_ALL_ONE_LAUNCH=0:
//     every call so).
//   move (two blocks per peer offset b = 0..R-1 and lane): a message is cut into chunks, and
//     chunk k travels in lane k % lanes, so each pair of ranks has `lanes` independent pipelines.
//     Each message has its own chunk size, a function of its bytes and the layout alone (its
//     sender and receiver agree on its bytes, so they cut it alike): its bytes spread evenly over
//     every lane in at least 4 rounds, chunks of at least 32 KiB (one pass of a block's loads
//     costs a memory round trip whatever its size) and at most a slot. Lanes and slot are the
//     group's (TORCH_EP_ALL_TO_ALL_LANES, _SLOT_BYTES; by default 32 lanes at 2 ranks, 8 at 4, 4
//     at 8, and 128 KiB slots): 64 MiB at 2 ranks sends 32 MiB to the peer as 8 rounds of 128 KiB
//     in each of 32 lanes, so the peer drains round j while round j + 1 fills.
//     For (b, lane) a sender block sends to rank + b and a receiver block receives from
//     rank - b, in rounds: the sender's round j puts its j-th chunk into its lane's slot j % 2 in
//     the destination's block (after the destination drained round j - 2); the receiver's round
//     j copies the source's j-th chunk of that lane into the output, drops the slot's lines from
//     L2 unwritten (discard) and hands the slot back. The slots in use stay small enough for L2
//     (16 MiB per rank at 2 ranks), so a staged byte costs HBM one read and one write, as in a
//     single copy; the input is read and the output written evict-first, to leave L2 to them.
//     A send waits only on a round j - 2 receive, a receive on the round-j send: no cycle, and the
//     two copies of a round run at once. The blocks of b = 0 copy this rank's rows to itself.
// Copies: two per byte between ranks (into staging, out of it), one within a rank.
// One copy (groups with a comm pool, backend/kernels/all_to_all_pool.cuh): each record also says
// where the rank's output lies in its comm pool arena, which every peer has mapped since the pool
// was created. When every rank that receives bytes has its output there, the plan says so on every
// rank alike, the staged plan moves nothing, and the blocks (but block 0) write each message
// straight into its receiver's output, one contiguous piece of the call's bytes per block
// (TORCH_EP_ALL_TO_ALL_POOL_BLOCKS of them, by default two per SM of this rank's share, less
// one for the plan's block); the
// last block of a message raises the receiver's "done" flag for this source, and the receiver's
// last block takes every source's flag before the call ends. Otherwise (some output outside the
// arenas) the same launch runs the staged move above. With pool_self_first (below) the blocks
// copy this rank's rows to itself before the plan is there.
// Eager (eager_bytes > 0, all_to_all_single with TORCH_EP_ALL_TO_ALL_EAGER_BYTES): a message of
// 1..eager_bytes bytes rides with its record. The plan (a block of kMoveThreads) waits until each
// peer's record slot is free, writes the rank's messages that fit into their receivers' eager
// regions, then publishes the records; once it has every record it plans as above, copies the
// messages that fit from its eager regions (its own straight from input) into the output, and
// only then frees the record slots (a sender's next call waits for that before it rewrites the
// region). Which messages are eager is a function of their size alone, so both ends agree (the
// records give every rank every message's size); the plan moves nothing else for them, staged or
// one copy. A rank all of whose messages fit (its splits both ways, known on the host) launches
// the plan alone: one launch, one cross-process round trip; it publishes no arena (out_arena -1),
// so no rank of that call takes the one copy, whose done flags it would never take.
// Every wait is bounded by timeout_ns (and ends when *abort is set); one that gives up sets
// *error = 1 + the peer, or kErrorNoPeer (the transport's watchdog then fails the group, naming
// op, rank and peer). Problems of the call itself (invalid splits, an overflowing output) go to *report,
// which the host raises later.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/kernels/all_to_all.cuh"  // kMaxRanksPerNode

namespace ep::kernels {

// The one copy's smallest piece: one pass of a move block's loads (512 threads, 8 x 16 B each).
constexpr uint64_t kPoolMinPiece = 64 << 10;

// Offsets in each rank's registered block. Host and device.
struct AllToAllVLayout {
  // A record: splits[R], the fields below, then expected[R] (the rows this rank expects from
  // each rank, all_to_all_single's output_split_sizes; unchecked unless kHasExpected), then
  // kOutArena.
  static constexpr size_t kRecordWords = 2 * kMaxRanksPerNode + 6;
  static constexpr size_t kCapacity = kMaxRanksPerNode;         // rows the output holds; -1: allocated after
  static constexpr size_t kStatus = kMaxRanksPerNode + 1;       // 0, or 1 + the first negative split's index,
                                                                // or kBadSum
  static constexpr size_t kRowBytes = kMaxRanksPerNode + 2;
  static constexpr size_t kNumRows = kMaxRanksPerNode + 3;      // rows of input
  static constexpr size_t kHasExpected = kMaxRanksPerNode + 4;
  static constexpr size_t kExpected = kMaxRanksPerNode + 5;
  static constexpr size_t kOutArena = 2 * kMaxRanksPerNode + 5;  // AllToAllVParams::out_arena
  static constexpr int64_t kBadSum = int64_t(1) << 40;
  static constexpr size_t kFlagsOffset = 32 << 10;
  static constexpr size_t kDataOffset = 64 << 10;
  static constexpr int kSlots = 2;
  static constexpr int kMaxLanes = 32;

  uint64_t chunk_bytes;  // a staging slot: the largest chunk
  int lanes;             // pipelines per pair of ranks, 1..kMaxLanes

  // Lanes for a group of `num_ranks`: the move kernel has 2 * num_ranks * lanes blocks, two per
  // SM of a rank's share of one GPU shared by `num_ranks` under MPS (132 SMs: 128 blocks at 2
  // ranks, 64 up to 16): a block moves ~20-30 GB/s, and the pipelines' flag round trips are hidden
  // only with many of them in flight.
  __host__ __device__ static int lanes_for(int num_ranks) {
    return num_ranks <= 2 ? 32 : num_ranks <= 4 ? 8 : num_ranks <= 8 ? 4 : num_ranks <= 16 ? 2 : 1;
  }
  // The default staging slot: small enough that every slot in use stays in L2 between its fill and
  // its drain (2 ranks x 32 lanes x 2 slots x 128 KiB = 16 MiB per rank), so a staged byte costs
  // HBM one read and one write, as a one-copy byte does; large enough for 2 passes of a block.
  static constexpr uint64_t kDefaultSlotBytes = 128 << 10;

  __host__ __device__ static size_t record(int src) { return size_t(src) * kRecordWords * sizeof(int64_t); }
  __host__ __device__ static size_t record_flag(int src) { return kFlagsOffset + size_t(src) * 4; }
  static constexpr size_t kLaneFlagsBytes = size_t(kMaxRanksPerNode) * kMaxLanes * kSlots * 4;
  __host__ __device__ static size_t full_flag(int src, int lane, int slot) {
    return kFlagsOffset + 1024 + ((size_t(src) * kMaxLanes + lane) * kSlots + slot) * 4;
  }
  __host__ __device__ static size_t empty_flag(int dst, int lane, int slot) {
    return kFlagsOffset + 1024 + kLaneFlagsBytes + ((size_t(dst) * kMaxLanes + lane) * kSlots + slot) * 4;
  }
  // One copy: "source's messages here are complete" (set by the source, taken by this rank);
  // per destination, chunks of this rank's message already written (this rank's blocks count,
  // the last resets); this rank's blocks that finished the call (the last resets).
  __host__ __device__ static size_t pool_done_flag(int src) {
    return kFlagsOffset + 1024 + 2 * kLaneFlagsBytes + size_t(src) * 4;
  }
  __host__ __device__ static size_t pool_chunk_count(int dst) {
    return kFlagsOffset + 1024 + 2 * kLaneFlagsBytes + kMaxRanksPerNode * 4 + size_t(dst) * 4;
  }
  static constexpr size_t kPoolFinished = kFlagsOffset + 1024 + 2 * kLaneFlagsBytes + 2 * kMaxRanksPerNode * 4;
  // One launch (plan and move fused): "the plan is written" (block 0 sets it, the last block to
  // finish clears it), and this rank's blocks that finished the call (the last resets it).
  static constexpr size_t kPlanReady = kPoolFinished + 4;
  static constexpr size_t kCallFinished = kPoolFinished + 8;
  // One copy in pieces taken in turn (AllToAllVParams::pool_pieces): the next piece to take (the
  // last block to finish resets it).
  static constexpr size_t kPoolNextPiece = kPoolFinished + 12;
  static constexpr size_t kFlagsBytes = 1024 + 2 * kLaneFlagsBytes + 2 * kMaxRanksPerNode * 4 + 16;  // every flag above
  __host__ __device__ size_t slot(int src, int lane, int slot) const {
    return kDataOffset + ((size_t(src) * lanes + lane) * kSlots + slot) * chunk_bytes;
  }
  __host__ __device__ size_t total_bytes(int num_ranks) const {
    return kDataOffset + size_t(num_ranks) * lanes * kSlots * chunk_bytes;
  }
  // Eager calls (AllToAllVParams::eager_bytes > 0): per source, its message to this rank, written
  // with its record; after the staging slots, so the block grows only where the option is on.
  __host__ __device__ size_t eager_region(int num_ranks, int src, uint64_t eager_bytes) const {
    return total_bytes(num_ranks) + size_t(src) * eager_bytes;
  }
  __host__ __device__ size_t total_bytes(int num_ranks, uint64_t eager_bytes) const {
    return eager_region(num_ranks, num_ranks, eager_bytes);
  }
};
static_assert(kMaxRanksPerNode * AllToAllVLayout::kRecordWords * sizeof(int64_t) <= AllToAllVLayout::kFlagsOffset,
              "the records fit before the flags");
static_assert(kMaxRanksPerNode * 4 <= 1024 &&
                  AllToAllVLayout::kFlagsOffset + AllToAllVLayout::kFlagsBytes <= AllToAllVLayout::kDataOffset,
              "the flags fit before the staging slots");

// What the plan kernel reports for the host to raise (report[0] = 0: nothing).
enum AllToAllVReport : int64_t {
  kReportNone = 0,
  kReportOverflow = 1,   // [1] capacity, [2] rows that arrived
  kReportBadSplits = 2,  // [1] the rank, [2] its status (AllToAllVLayout::kStatus), [3] its splits' sum,
                         // [4] its rows, [5] its first negative split
  kReportRowBytes = 3,   // [1] a rank whose rows differ from this rank's, [2] its row bytes, [3] ours
  kReportMismatch = 4,   // [1] a receiver, [2] a sender, [3] rows the receiver expects, [4] rows the sender sends
};
constexpr int kReportWords = 10;
constexpr int kReportOp = 6;      // every report: the op of the call whose plan made it (AllToAllVOp)
constexpr int kReportCallId = 7;  // every report: the call_id of the call whose plan made it
// Later calls that found a problem while the word held an earlier one (their outputs were not
// written either), and the last of them; zeroed by the next fresh report.
constexpr int kReportDropped = 8;
constexpr int kReportDroppedCallId = 9;
enum AllToAllVOp : int64_t { kOpAllToAllV = 0, kOpAllToAllSingle = 1 };

struct AllToAllVParams {
  int rank;
  int num_ranks;
  // this call
  const int64_t* input_splits;  // [R] on the device: rows for each rank; null: host_splits
  int64_t host_splits[kMaxRanksPerNode];     // the splits, known on the host (all_to_all_single)
  int has_expected;                          // the receiver states what it expects from each rank:
  int64_t expected_splits[kMaxRanksPerNode]; // any disagreement moves nothing on any rank
  int64_t num_rows;             // N, input's rows
  int64_t capacity;             // M, output's rows; -1 when the host allocates it after the plan
  int allow_extra_rows;         // input may hold rows past the splits' sum (they stay)
  int64_t row_bytes;
  const char* input;            // [N, row_bytes], contiguous
  char* output;                 // [M, row_bytes], contiguous (move only); null: the staged move drains
  int64_t* output_splits;       // [R]: rows that arrived from each rank (0s when nothing moved)
  int64_t* output_offsets;      // [R]: their exclusive cumulative sum
  int64_t* plan;                // [4R] device scratch: send rows, send row offsets, receive rows, receive row offsets
  // the group's registered blocks
  char* blocks[kMaxRanksPerNode];  // rank r's block as mapped here
  AllToAllVLayout layout;
  uint64_t timeout_ns;
  int* error;       // host-mapped: 1 + the peer a wait timed out on, or kErrorNoPeer (fatal)
  const int* abort;  // host-mapped: non-zero once the transport failed (abort() too); every wait then gives up
  int64_t* report;  // host-mapped: kReportWords, the first problem since the host last looked
                    // (and a count of those after it)
  int64_t call_id;  // the host's count of this group's calls, for the report
  int64_t op;       // AllToAllVOp, for the report
  // one copy (a group with a comm pool; launch_all_to_all_v_move_any)
  int64_t out_arena;              // this rank's output in its arena: its byte offset there; -2: it
                                  // receives nothing (output empty); -1: out of reach (no one copy)
  char* pool[kMaxRanksPerNode];   // rank r's comm pool arena as mapped here
  int64_t* pool_plan;             // [1 + 3R] device scratch: one copy (1) or staged (0); bytes for each
                                  // destination, their offset in its arena, their offset in input; or null
  int pool_workers;               // the blocks that copy when it is one copy (the launchers set it)
  // eager (last, so that the other kernels' parameters keep their offsets)
  uint64_t eager_bytes;           // 0: off. Else a message of 1..eager_bytes bytes rides with its
                                  // sender's record (the eager region), a multiple of 16
  // Launched early (early_launch.cuh; TORCH_EP_EARLY_LAUNCH): the move is launched while the plan
  // meets the peers and starts as it ends, and the next call's plan while the move's last block
  // waits for the data.
  bool early_launch;
  // The kernels' flags and fences (the records', the plan's, the staged slots', the one copy's) at
  // GPU scope, not system scope (TORCH_EP_DEVICE_GPU_SCOPE): only where every peer shares this GPU
  // (ranks under MPS), as AllToAllDirectParams::gpu_scope. The host's report stays at system scope.
  bool gpu_scope;
  // The one copy in pieces of pool_piece_bytes that the blocks take in turn from a counter, not one
  // piece a block fixed in advance (TORCH_EP_POOL_PIECES=0 for the latter): a block that starts
  // late (another kernel holding its SM) takes fewer pieces instead of adding a wave at the end.
  bool pool_pieces;
  // With pool_pieces: each block takes the next piece's number while it copies the current one
  // (TORCH_EP_POOL_TICKET_AHEAD), and the pieces' size, a multiple of kPoolMinPiece (0: that)
  // (Options.all_to_all_pool_piece_bytes).
  bool pool_ticket_ahead;
  uint64_t pool_piece_bytes;
  // With pool_pieces, all_to_all_single only (TORCH_EP_POOL_SELF_FIRST): the move's blocks start as
  // the plan does and copy this rank's message to itself, whose place the host knows (its splits,
  // expected_splits and out_arena), while the plan meets the peers; the rest waits for the plan.
  // A call the plan refuses (the ranks disagree) may then have written this rank's own rows.
  bool pool_self_first;
};

// The plan's pool_plan, for the host (tests) and the move kernels.
struct PoolPlan {
  static constexpr int kDirect = 0;
  __host__ __device__ static int bytes(int dst) { return 1 + dst; }
  __host__ __device__ static int arena_offset(int num_ranks, int dst) { return 1 + num_ranks + dst; }
  __host__ __device__ static int input_offset(int num_ranks, int dst) { return 1 + 2 * num_ranks + dst; }
  __host__ __device__ static int words(int num_ranks) { return 1 + 3 * num_ranks; }
};

// With params.eager_bytes > 0 the plan also moves the eager messages (see above).
cudaError_t launch_all_to_all_v_plan(const AllToAllVParams& params, cudaStream_t stream);
cudaError_t launch_all_to_all_v_move(const AllToAllVParams& params, cudaStream_t stream);
// The move of a group with a comm pool (params.pool_plan set): one copy where the plan chose it,
// else the staged move. `blocks`: the grid when it is one copy (at least the staged move's).
cudaError_t launch_all_to_all_v_move_any(const AllToAllVParams& params, int blocks, cudaStream_t stream);
// A whole call, plan and move, in one launch (params.output given): the staged move's grid, or
// with params.pool_plan set 1 + `pool_blocks` blocks where that is more (a one-copy move by blocks
// 1..pool_blocks; block 0 plans).
cudaError_t launch_all_to_all_v_call(const AllToAllVParams& params, int pool_blocks, cudaStream_t stream);

}  // namespace ep::kernels
