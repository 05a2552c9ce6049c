// What ranks tell each other at the start of every dispatch and combine, on CPU and CUDA alike.
//
// Each rank sends every peer one fixed-size record over the host channel before any data moves.
// The record carries the row counts the receiver needs to size its outputs, the shape of the
// call (so ranks that disagree all raise instead of corrupting memory), a status (so input one
// rank rejects makes every rank raise, and the group stays usable), and, on CUDA, the IPC
// handles of the buffers the peer's kernels read.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "backend/ops/moe_ops.hpp"

namespace ep::moe {

constexpr int kMaxLocalExperts = 1024;  // experts per rank a record can count
constexpr int kMaxRegions = 5;          // buffers a rank exports per call
constexpr int kMaxMatrixRanks = 32;     // groups up to this size keep every rank's sends in a handle

enum class OpKind : uint32_t { kDispatch = 0x45504431, kCombine = 0x45504332 };

// One exported buffer: a CUDA IPC handle of its allocation and the offset inside it.
struct PeerRegion {
  uint8_t ipc_handle[64];
  uint64_t offset;
  uint32_t valid;
  uint32_t pad;
};

// A pushing dispatch's receiver (CUDA, Options.moe_push): where its outputs lie in its MoE arena,
// which every rank maps, so that each sender writes them at that arena's base plus the offset.
struct PushTarget {
  int64_t offset[4];  // recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights; -1: none (empty)
  int64_t capacity;   // rows they hold
};

struct Record {
  OpKind op;
  int32_t status;        // 0, or this rank rejected its input (see `detail`)
  uint64_t call_id;      // dispatch: the group's dispatch count; combine: the handle's dispatch
  uint64_t handle_id;    // dispatch along a handle: the dispatch that made it; else 0
  int64_t num_experts;
  int64_t num_tokens;    // dispatch: my N (peers' kernels read my routing table); combine: my x's rows
  int64_t hidden;
  int64_t dtype;         // c10::ScalarType of x
  int64_t num_topk;      // 0 when topk_idx is not sent (a dispatch with a handle, or combine)
  int64_t has_scales;
  int64_t has_weights;
  int64_t rows;          // dispatch: rows I send you (-1: only the device knows); combine: rows
                         // you sent me at dispatch, which I now send back
  int64_t rows_back;     // combine: rows I sent you at dispatch
  int64_t relay_rows;    // dispatch across nodes: tokens I send to your node through you (you are
                         // my rail peer there, backend/ops/moe_internode.hpp); else 0
  int64_t push;          // dispatch: 1 when this call pushes (CUDA, Options.moe_push); the ranks must agree
  PushTarget target;     // dispatch that pushes: my outputs, where they were allocated before the
                         // exchange (a handle or num_worst_tokens); else capacity -1 (a second exchange)
  char detail[256];      // why `status` is set
  PeerRegion regions[kMaxRegions];
  int32_t rows_per_expert[kMaxLocalExperts];  // dispatch: my rows for each of your experts
  // dispatch, groups of up to kMaxMatrixRanks: my rows for every rank (-1: only the device knows),
  // so that each rank learns the whole send matrix from the records it gets anyway
  int32_t send_row[kMaxMatrixRanks];
};

// What a caller knows of its own side, to build its records.
Record make_record(OpKind op, uint64_t call_id, int64_t num_experts, int64_t hidden, int64_t dtype,
                   int64_t num_topk, bool has_scales, bool has_weights);
void set_rejected(Record& r, const std::string& why);

// Raises (ValueError for rejected input, RuntimeError for ranks that disagree) naming the op and
// the ranks, when any record, ours or a peer's, says the call cannot go on. Every rank sees
// every peer's record, so all of them raise together.
void check_records(const char* op_name, int rank, const Record& mine, const std::vector<Record>& theirs);

// A dispatch's records, one per peer. `header` is this rank's routing-table header
// (kernels/moe_meta.hpp) on the host, or null where only the device has it (num_worst_tokens
// on CUDA): then rows are -1 and expert ids cannot be checked.
std::vector<Record> dispatch_records(const DispatchArgs& a, int64_t num_ranks, uint64_t call_id,
                                     const int32_t* header);
// The dispatch's handle counts, from this rank's sends and the peers' records; raises on every
// rank when a re-dispatch's handles disagree.
HandleCounts dispatch_counts(const DispatchArgs& a, int64_t rank, uint64_t call_id, const std::vector<int64_t>& send,
                             const std::vector<Record>& theirs);
// A combine's records, and the check that every rank passed the handle of the same dispatch.
std::vector<Record> combine_records(const CombineArgs& a, int64_t num_ranks);
void check_combine_counts(const CombineArgs& a, int64_t rank, const std::vector<Record>& theirs);

}  // namespace ep::moe
