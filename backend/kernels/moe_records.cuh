// Device records of the eager MoE calls (Options.moe_device_records, under Options.moe_push): every
// pushing dispatch and every combine. No record goes through the host: each rank's notify kernel (one block) publishes its
// record into a slot of every peer's MoE transport block, reads every peer's record from its own,
// and evaluates moe_verdict on the same R records as every other rank, so every rank reaches the
// same verdict and the group stays in step without a host rendezvous. The kernel that follows on
// the stream (dispatch: the push kernel; combine: the pull kernels of moe.cuh, CombineParams::plan)
// reads this rank's plan from its block: whether anything moves, where rows start, where the
// peers' tensors lie in their MoE arenas. A dispatch whose host waits for its sizes (no handle, no
// num_worst_tokens) makes two rounds: the first without outputs (capacity -1), whose notify kernel
// also writes the sizes to host-mapped memory (MoeSizesWord); the host allocates the outputs, then
// the second round, with them, and the push kernel.
//
// Slots (all_to_all_v's plan protocol, all_to_all_v.cuh): per source, a flag in the owner's block,
// 0 "slot free", 1 "the source's record is here". The source waits for 0, writes, raises 1; the
// owner waits for 1, copies the record, writes 0. Flags go back to 0 after every call, so
// back-to-back calls need no sequence numbers. A record published means "my stream reached this
// call, my outputs may be written (dispatch), my x may be read (combine)": the ready half of the
// pull's handshake.
//
// Host and device: the layout, the record's words, the verdict (a pure function, compiled with
// g++ by tests/test_build.py) and the launchers.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "backend/kernels/moe.cuh"
#include "backend/kernels/moe_meta.hpp"  // EP_HOST_DEVICE

namespace ep::kernels {

// ---- a record: int64 words
enum MoeRecordWord : int {
  kRecOp = 0,         // kMoeRecordDispatch or kMoeRecordCombine
  kRecCallId,         // dispatch: the group's dispatch count; combine: its handle's dispatch. Ranks at
                      // other ids (or ops) are out of step
  kRecHandleId,       // along a handle (dispatch or combine): the dispatch that made it; else 0
  kRecNumExperts,     // the checks every rank's call must share, from here to kRecPush
  kRecHidden,
  kRecDtype,          // c10::ScalarType of x
  kRecNumTopk,        // 0 when topk_idx is not sent (a handle)
  kRecHasScales,
  kRecHasWeights,
  kRecPush,           // 1: this rank pushes (every rank that publishes a record does)
  kRecWaits,          // dispatch: 1 where the host waits for the sizes (two rounds), 0 where it knows them
  kRecStatus,         // 0, or MoeRefusal: this rank cannot take part (kRecStatusValue, kRecStatusValue2)
  kRecStatusValue,
  kRecStatusValue2,
  kRecCapacity,       // dispatch: rows this rank's outputs hold (num_worst_tokens, or the handle's received
                      // rows; -1 in a first round: not allocated yet); combine: rows of its x (a row past them
                      // was dropped by an overflowing dispatch)
  kRecOffset,         // [4] where they lie in its MoE arena; dispatch: recv_x, recv_x_scales, recv_topk_idx,
                      // recv_topk_weights; combine: x, topk_weights, -1, -1; -1: none
  kRecSend = kRecOffset + 4,             // [kMaxRanksPerNode] rows this rank sends each rank (its row of
                                         // the send matrix, from its routing table on the device; combine:
                                         // the handle's, so the rows it sent at dispatch)
  kRecExpect = kRecSend + kMaxRanksPerNode,  // [kMaxRanksPerNode] rows its handle expects from each
                                             // rank (received at dispatch); -1: no expectation
  kMoeRecordWords = kRecExpect + kMaxRanksPerNode,
};
constexpr int64_t kMoeRecordDispatch = 0x45504452;  // "EPDR"
constexpr int64_t kMoeRecordCombine = 0x45504352;   // "EPCR"
constexpr int kFirstCheckedWord = kRecNumExperts, kLastCheckedWord = kRecWaits;
constexpr int kMaxRecordExperts = 1024;  // local experts whose counts a dispatch's record carries

// Why a rank cannot take part (kRecStatus): it still publishes its record, so no peer waits in vain.
enum MoeRefusal : int64_t {
  kRefusedNone = 0,
  kRefusedPool = 1,       // its MoE pool could not hold its outputs (combine: the copy of its x): value = their rows
  kRefusedExpertIds = 2,  // its topk_idx holds ids outside [-1, num_experts): value = the smallest, value2 the largest
  kRefusedOverflow = 3,   // an earlier dispatch of its (pulling, or a graph replay) overflowed num_worst_tokens and
                          // was not raised yet: its host raises that at this call, as the host records' path does
};

// ---- the verdict every rank reaches on the same records (first problem found, in this order)
enum MoeVerdictCode : int64_t {
  kVerdictOk = 0,
  kVerdictRefused = 1,    // `rank` refused (detail = MoeRefusal; value, peer_value its status values)
  kVerdictOutOfStep = 2,  // detail kRecCallId: `rank` is at call #value, rank 0 (`peer`) at #peer_value;
                          // detail kRecOp: `rank` makes op `value` (kMoeRecord*), rank 0 op `peer_value`
  kVerdictMismatch = 3,   // record word `detail` differs: `rank` has value, rank 0 (`peer`) peer_value
  kVerdictHandle = 4,     // detail 0: `rank` dispatches along the handle of #value, rank 0 along #peer_value;
                          // detail 1: receiver `rank` expects value rows from `peer`, which sends peer_value
  kVerdictOverflow = 5,   // dispatch: receiver `rank` gets value rows, its outputs hold peer_value: rows move,
                          // those past the capacity are dropped by their senders
  kVerdictTimedOut = 6,   // this rank did not get `peer`'s record (a timeout: fatal, not the same on every rank)
};
struct MoeVerdict {
  int64_t code;
  int64_t detail;
  int64_t rank;
  int64_t peer;
  int64_t value;
  int64_t peer_value;
  EP_HOST_DEVICE bool moves() const { return code == kVerdictOk || code == kVerdictOverflow; }
};

// A pure function of the records of ranks 0..num_ranks-1 (records[s] is rank s's): every rank
// computes it on the same words, so every rank reaches the same verdict.
EP_HOST_DEVICE inline MoeVerdict moe_verdict(const int64_t (*records)[kMoeRecordWords], int num_ranks) {
  MoeVerdict v{kVerdictOk, 0, -1, -1, 0, 0};
  const int R = num_ranks;
  for (int s = 0; s < R; ++s)
    if (records[s][kRecStatus] != kRefusedNone)
      return {kVerdictRefused, records[s][kRecStatus], s, -1, records[s][kRecStatusValue], records[s][kRecStatusValue2]};
  for (int s = 1; s < R; ++s)
    if (records[s][kRecOp] != records[0][kRecOp])
      return {kVerdictOutOfStep, kRecOp, s, 0, records[s][kRecOp], records[0][kRecOp]};
  for (int s = 1; s < R; ++s)
    if (records[s][kRecCallId] != records[0][kRecCallId])
      return {kVerdictOutOfStep, kRecCallId, s, 0, records[s][kRecCallId], records[0][kRecCallId]};
  for (int w = kFirstCheckedWord; w <= kLastCheckedWord; ++w)
    for (int s = 1; s < R; ++s)
      if (records[s][w] != records[0][w]) return {kVerdictMismatch, w, s, 0, records[s][w], records[0][w]};
  for (int s = 1; s < R; ++s)
    if (records[s][kRecHandleId] != records[0][kRecHandleId])
      return {kVerdictHandle, 0, s, 0, records[s][kRecHandleId], records[0][kRecHandleId]};
  for (int d = 0; d < R; ++d)
    for (int s = 0; s < R; ++s) {
      const int64_t expected = records[d][kRecExpect + s], sent = records[s][kRecSend + d];
      if (expected >= 0 && expected != sent) return {kVerdictHandle, 1, d, s, expected, sent};
    }
  if (records[0][kRecOp] != kMoeRecordDispatch) return v;  // a combine's capacity is its x's rows
  for (int d = 0; d < R; ++d) {
    int64_t arriving = 0;
    for (int s = 0; s < R; ++s) arriving += records[s][kRecSend + d];
    if (records[d][kRecCapacity] >= 0 && arriving > records[d][kRecCapacity])
      return {kVerdictOverflow, 0, d, -1, arriving, records[d][kRecCapacity]};
  }
  return v;
}

// ---- this rank's plan, written by its notify kernel for the kernel that follows: int64 words
enum MoePlanWord : int {
  kPlanMoves = 0,   // 1: rows move (the verdict allows it); 0: nothing moves (dispatch: outputs are
                    // padding; combine: every token sums no row)
  kPlanReceived,    // rows every rank sends this one
  kPlanFirstRow,    // [kMaxRanksPerNode] where this rank's rows start among rank d's received rows
  kPlanCapacity = kPlanFirstRow + kMaxRanksPerNode,  // [kMaxRanksPerNode] rank d's kRecCapacity
  kPlanOffset = kPlanCapacity + kMaxRanksPerNode,    // [kMaxRanksPerNode][4] rank d's kRecOffset
  kPlanSayDone = kPlanOffset + 4 * kMaxRanksPerNode,  // 1: the kernel runs the done half (rows move, or a
                                                      // record never came, so peers may have moved some)
  kMoePlanWords,
};

// ---- what the notify kernel reports for the host to raise later (host-mapped; [0] = 0: nothing)
enum MoeReportWord : int {
  kMoeReportCode = 0,  // MoeVerdictCode
  kMoeReportDetail,
  kMoeReportRank,
  kMoeReportPeer,
  kMoeReportValue,
  kMoeReportPeerValue,
  kMoeReportCallId,    // the call whose notify found it (its kRecCallId)
  kMoeReportLater,     // problems found while this report waited for the host (they had no slot)
  kMoeReportLaterCallId,  // the last of those calls
  kMoeReportOp,        // the op whose notify found it (kMoeRecordDispatch or kMoeRecordCombine)
  kMoeReportSeq,       // that call's MoeNotifyParams::call_seq: tells this call's report from an earlier one's
  kMoeReportWords,
};

// ---- what the first round's notify kernel of a dispatch the host waits for writes to host-mapped
// memory (MoeNotifyParams::sizes): int64 words, the ticket last
enum MoeSizesWord : int {
  kSizesTicket = 0,  // the call id of the words below, written once they are there (the host waits for it)
  kSizesCode,        // the verdict's MoeVerdictCode (kVerdictTimedOut: kSizesPeer's record never came)
  kSizesPeer,
  kSizesRecv,        // [kMaxRanksPerNode] rows each rank sends this one
  kSizesSent = kSizesRecv + kMaxRanksPerNode,                  // [R][R] rows rank s sends rank j at s * R + j
  kSizesPerExpert = kSizesSent + kMaxRanksPerNode * kMaxRanksPerNode,  // [E/R] rows for each local expert
  kMoeSizesWords = kSizesPerExpert + kMaxRecordExperts,
};

// ---- offsets in each rank's records region (a part of its MoE transport block, CudaTransport::records)
struct MoeRecordsLayout {
  // The flags come first: the transport's release of stuck waits writes their bytes 0x01, which
  // ends a wait for a record with a value no peer stores (1): the call moves nothing.
  EP_HOST_DEVICE static constexpr size_t full_flag(int src) { return size_t(src) * 4; }
  static constexpr size_t kFlagsBytes = kMaxRanksPerNode * 4;
  // uint64: the call_seq of the last plan a fused launch's block 0 wrote (DispatchRecordsParams::one_launch)
  static constexpr size_t kPlanReadyOffset = kFlagsBytes;
  static constexpr size_t kPlanOffset = 256;
  static constexpr size_t kRecordsOffset = kPlanOffset + ((kMoePlanWords * 8 + 255) / 256) * 256;
  EP_HOST_DEVICE static constexpr size_t record(int src) { return kRecordsOffset + size_t(src) * kMoeRecordWords * 8; }
  // A dispatch's record goes with its tokens per local expert of the receiver (int32, E/R of them).
  static constexpr size_t kExpertsOffset = kRecordsOffset + size_t(kMaxRanksPerNode) * kMoeRecordWords * 8;
  EP_HOST_DEVICE static constexpr size_t experts(int src) { return kExpertsOffset + size_t(src) * kMaxRecordExperts * 4; }
  static constexpr size_t kBytes = kExpertsOffset + size_t(kMaxRanksPerNode) * kMaxRecordExperts * 4;
};
static_assert(MoeRecordsLayout::kPlanReadyOffset + 8 <= MoeRecordsLayout::kPlanOffset, "the flags fit before the plan");

// What a notify kernel needs: this rank's record, where every rank's records region is mapped,
// where to report.
struct MoeNotifyParams {
  int num_ranks;
  int rank;
  int64_t num_experts;
  const int32_t* meta;                // this rank's routing table (combine: its handle's)
  int64_t num_tokens;                 // its N
  bool check_expert_ids;              // topk_idx is sent: refuse ids outside [-1, num_experts) (from the
                                      // table's id range, which no host has read)
  int64_t call_seq;                   // this rank's count of calls with device records (both rounds of a call
                                      // alike), for the report: combines along one handle share a call id
  int64_t record[kMoeRecordWords];    // this rank's record as its host knows it; the device adds its send row
  char* records[kMaxRanksPerNode];    // rank r's records region as mapped here
  int64_t* report;                    // host-mapped, kMoeReportWords: the first problem since the host looked
                                      // and a count of later ones
  int64_t* sizes;                     // host-mapped, kMoeSizesWords: where a first round writes the sizes the
                                      // host waits for; null: none (the host knows its outputs)
  uint64_t timeout_ns;                // the bound on each wait for a slot or a record
  int* error;                         // host-mapped: 1 + the rank a wait timed out on
};

// The notify kernel alone (one block): the records, the verdict, this rank's plan (in its records
// region, kPlanOffset) and the report. A combine launches it before its pull kernel, whose
// CombineParams::plan points at that plan.
cudaError_t launch_moe_notify(const MoeNotifyParams& params, cudaStream_t stream);

struct DispatchRecordsParams {
  MoeNotifyParams notify;             // its bound and error word are the handshake's
  DispatchSource src;                 // this rank's inputs and routing table
  char* arenas[kMaxRanksPerNode];     // rank r's MoE arena as mapped here
  int64_t row_bytes;                  // H * element size
  int num_scales;
  int num_topk;
  int num_blocks;                     // the SM budget
  Handshake handshake;                // the done half (the records are the ready half), where rows move
  bool one_launch;                    // the notify step as block 0 of the push kernel (Options.moe_one_launch):
                                      // one launch; the other blocks wait for its plan
};

cudaError_t launch_dispatch_with_records(const DispatchRecordsParams& params, cudaStream_t stream);

}  // namespace ep::kernels
