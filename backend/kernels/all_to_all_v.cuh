// Launchers of the all_to_all_v kernels: the split sizes never leave the device. Torch-free: raw
// pointers and one POD parameter struct for both kernels.
//
// Each rank registers one block (CUDA IPC, mapped by every peer), laid out by AllToAllVLayout:
//   records: per source rank, the record it published for this call (its splits, capacity, ...)
//   flags:   per source, "record here" (set by the source, cleared by this rank once read);
//            per (source, slot), "staging slot full" (set by the source, cleared by this rank);
//            per (destination, slot), "slot in the destination's block empty" (set by the
//            destination once drained, cleared by this rank before it fills the slot again)
//   staging: per source, two slots of chunk_bytes
// Flags go back to their initial values after every call (records: 0, full: 0, empty: 1), so
// calls need no sequence numbers and a captured CUDA graph replays.
//
// A call is two launches on the caller's stream:
//   plan (one block): wait until the record slot in each peer's block is free, write this rank's
//     record there and raise its flag; wait for every peer's record here, read it, free the slot.
//     Every rank then knows every rank's splits and capacity and computes the same plan: nothing
//     moves if any rank's splits are invalid or the ranks disagree on the row size; nothing goes
//     to a rank whose output would overflow. Writes output_splits, output_offsets and this
//     rank's part of the plan.
//   move (one block per peer offset b = 0..R-1): block b sends to rank + b and receives from
//     rank - b, in rounds: round k sends chunk k into the destination's slot k % 2 (after it
//     drained chunk k - 2), then receives chunk k from the source's slot k % 2 into the output.
//     A send waits only on a round k - 2 receive, a receive on the source's round-k send, which
//     precedes its own receive: no cycle. Block 0 copies this rank's rows to itself directly.
// Copies: two per byte between ranks (into staging, out of it), one within a rank.
// Every wait is bounded by timeout_ns; one that expires sets *error = 1 + the peer (the
// transport's watchdog then fails the group, naming op, rank and peer). Problems of the call
// itself (invalid splits, an overflowing output) go to *report, which the host raises later.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/kernels/all_to_all.cuh"  // kMaxRanksPerNode

namespace ep::kernels {

// Offsets in each rank's registered block. Host and device.
struct AllToAllVLayout {
  static constexpr size_t kRecordWords = kMaxRanksPerNode + 4;  // splits[R], then the fields below
  static constexpr size_t kCapacity = kMaxRanksPerNode;         // rows the output holds; -1: allocated after
  static constexpr size_t kStatus = kMaxRanksPerNode + 1;       // 0, or 1 + the first negative split's index,
                                                                // or kBadSum
  static constexpr size_t kRowBytes = kMaxRanksPerNode + 2;
  static constexpr size_t kNumRows = kMaxRanksPerNode + 3;      // rows of input
  static constexpr int64_t kBadSum = int64_t(1) << 40;
  static constexpr size_t kFlagsOffset = 16 << 10;
  static constexpr size_t kDataOffset = 64 << 10;
  static constexpr int kSlots = 2;

  uint64_t chunk_bytes;  // a staging slot

  __host__ __device__ static size_t record(int src) { return size_t(src) * kRecordWords * sizeof(int64_t); }
  __host__ __device__ static size_t record_flag(int src) { return kFlagsOffset + size_t(src) * 4; }
  __host__ __device__ static size_t full_flag(int src, int slot) {
    return kFlagsOffset + 256 + (size_t(src) * kSlots + slot) * 4;
  }
  __host__ __device__ static size_t empty_flag(int dst, int slot) {
    return kFlagsOffset + 512 + (size_t(dst) * kSlots + slot) * 4;
  }
  static constexpr size_t kFlagsBytes = 768;  // every flag above, for kMaxRanksPerNode ranks
  __host__ __device__ size_t slot(int src, int slot) const {
    return kDataOffset + (size_t(src) * kSlots + slot) * chunk_bytes;
  }
  __host__ __device__ size_t total_bytes(int num_ranks) const {
    return kDataOffset + size_t(num_ranks) * kSlots * chunk_bytes;
  }
};
static_assert(kMaxRanksPerNode * AllToAllVLayout::kRecordWords * sizeof(int64_t) <= AllToAllVLayout::kFlagsOffset,
              "the records fit before the flags");
static_assert(kMaxRanksPerNode * 4 <= 256 && kMaxRanksPerNode * AllToAllVLayout::kSlots * 4 <= 256 &&
                  AllToAllVLayout::kFlagsOffset + AllToAllVLayout::kFlagsBytes <= AllToAllVLayout::kDataOffset,
              "the flags fit before the staging slots");

// What the plan kernel reports for the host to raise (report[0] = 0: nothing).
enum AllToAllVReport : int64_t {
  kReportNone = 0,
  kReportOverflow = 1,   // [1] capacity, [2] rows that arrived
  kReportBadSplits = 2,  // [1] the rank, [2] its status (AllToAllVLayout::kStatus), [3] its splits' sum,
                         // [4] its rows, [5] its first negative split
  kReportRowBytes = 3,   // [1] a rank whose rows differ from this rank's, [2] its row bytes, [3] ours
};
constexpr int kReportWords = 8;

struct AllToAllVParams {
  int rank;
  int num_ranks;
  // this call
  const int64_t* input_splits;  // [R] on the device: rows for each rank
  int64_t num_rows;             // N, input's rows
  int64_t capacity;             // M, output's rows; -1 when the host allocates it after the plan
  int allow_extra_rows;         // input may hold rows past the splits' sum (they stay)
  int64_t row_bytes;
  const char* input;            // [N, row_bytes], contiguous
  char* output;                 // [M, row_bytes], contiguous (move only)
  int64_t* output_splits;       // [R]: rows that arrived from each rank (0s when nothing moved)
  int64_t* output_offsets;      // [R]: their exclusive cumulative sum
  int64_t* plan;                // [4R] device scratch: send rows, send row offsets, receive rows, receive row offsets
  // the group's registered blocks
  char* blocks[kMaxRanksPerNode];  // rank r's block as mapped here
  AllToAllVLayout layout;
  uint64_t timeout_ns;
  int* error;       // host-mapped: 1 + the peer a wait timed out on (fatal)
  int64_t* report;  // host-mapped: kReportWords, the first problem since the host last looked
};

cudaError_t launch_all_to_all_v_plan(const AllToAllVParams& params, cudaStream_t stream);
cudaError_t launch_all_to_all_v_move(const AllToAllVParams& params, cudaStream_t stream);

}  // namespace ep::kernels
