#include "backend/ops/moe_protocol.hpp"

#include <c10/util/Exception.h>

#include <cstring>

#include "backend/kernels/moe_meta.hpp"

namespace ep::moe {

Record make_record(OpKind op, uint64_t call_id, int64_t num_experts, int64_t hidden, int64_t dtype, int64_t num_topk,
                   bool has_scales, bool has_weights) {
  Record r;
  std::memset(&r, 0, sizeof(r));
  r.op = op;
  r.call_id = call_id;
  r.num_experts = num_experts;
  r.hidden = hidden;
  r.dtype = dtype;
  r.num_topk = num_topk;
  r.has_scales = has_scales;
  r.has_weights = has_weights;
  return r;
}

void set_rejected(Record& r, const std::string& why) {
  r.status = 1;
  std::strncpy(r.detail, why.c_str(), sizeof(r.detail) - 1);
}

namespace {

std::string op_label(OpKind op) { return op == OpKind::kDispatch ? "dispatch" : "combine"; }

void same(const char* op_name, int rank, int peer, const char* what, int64_t mine, int64_t theirs) {
  TORCH_CHECK(mine == theirs, op_name, ": the ranks disagree on ", what, ": rank ", rank, " has ", mine, ", rank ",
              peer, " has ", theirs, "; every rank of the group must make the same call");
}

}  // namespace

void check_records(const char* op_name, int rank, const Record& mine, const std::vector<Record>& theirs) {
  TORCH_CHECK_VALUE(mine.status == 0, op_name, " on rank ", rank, ": ", mine.detail);
  for (int p = 0; p < int(theirs.size()); ++p) {
    const Record& r = theirs[p];
    if (p == rank) continue;
    TORCH_CHECK_VALUE(r.status == 0, op_name, " on rank ", rank, ": rank ", p, " rejected its input (", r.detail,
                      "), so no rank goes on");
    TORCH_CHECK(r.op == mine.op, op_name, ": rank ", rank, " called ", op_label(mine.op), " while rank ", p,
                " called ", op_label(r.op), "; the ranks' calls are out of step");
    if (mine.op == OpKind::kDispatch) {
      TORCH_CHECK(r.call_id == mine.call_id, op_name, ": rank ", rank, " is at its dispatch #", mine.call_id,
                  " but rank ", p, " at #", r.call_id, "; the ranks' calls are out of step");
    } else {
      TORCH_CHECK(r.call_id == mine.call_id, op_name, ": rank ", rank, " combines with the handle of dispatch #",
                  mine.call_id, " but rank ", p, " with that of dispatch #", r.call_id,
                  "; every rank must pass the handle of the same dispatch");
    }
    same(op_name, rank, p, "num_experts", mine.num_experts, r.num_experts);
    same(op_name, rank, p, "the hidden size", mine.hidden, r.hidden);
    same(op_name, rank, p, "the dtype of x (as c10::ScalarType)", mine.dtype, r.dtype);
    same(op_name, rank, p, "the number of top-k slots sent", mine.num_topk, r.num_topk);
    same(op_name, rank, p, "whether fp8 scales are sent", mine.has_scales, r.has_scales);
    same(op_name, rank, p, "whether topk_weights are sent", mine.has_weights, r.has_weights);
    same(op_name, rank, p, "whether dispatch pushes (Options.moe_push, TORCH_EP_MOE_PUSH)", mine.push, r.push);
  }
}

std::vector<Record> dispatch_records(const DispatchArgs& a, int64_t num_ranks, uint64_t call_id,
                                     const int32_t* header) {
  const bool cached = a.handle_meta.has_value();
  const int64_t E = a.num_experts, per_rank = E / num_ranks;
  const kernels::MetaLayout l{num_ranks, E, a.x.size(0)};
  Record base = make_record(OpKind::kDispatch, call_id, E, a.x.size(1), int64_t(a.x.scalar_type()),
                            cached ? 0 : a.topk_idx->size(1), a.x_scales.has_value(), a.topk_weights.has_value());
  base.handle_id = cached ? uint64_t(a.handle_counts->call_id) : 0;
  base.num_tokens = a.x.size(0);
  if (!cached && header && (header[l.id_range()] < -1 || header[l.id_range() + 1] >= E))
    set_rejected(base, "topk_idx holds expert ids outside [-1, num_experts=" + std::to_string(E) +
                           "): the smallest is " + std::to_string(header[l.id_range()]) + ", the largest " +
                           std::to_string(header[l.id_range() + 1]));
  if (num_ranks <= kMaxMatrixRanks)
    for (int64_t p = 0; p < num_ranks; ++p)
      base.send_row[p] = cached ? int32_t(a.handle_counts->send[p]) : header ? header[l.tokens_per_rank() + p] : -1;
  std::vector<Record> records(num_ranks, base);
  for (int64_t p = 0; p < num_ranks; ++p) {
    if (cached) {
      records[p].rows = a.handle_counts->send[p];
    } else if (header) {
      records[p].rows = header[l.tokens_per_rank() + p];
      for (int64_t e = 0; e < per_rank; ++e)
        records[p].rows_per_expert[e] = header[l.tokens_per_rank_expert() + p * per_rank + e];
    } else {
      records[p].rows = -1;
    }
  }
  return records;
}

HandleCounts dispatch_counts(const DispatchArgs& a, int64_t rank, uint64_t call_id, const std::vector<int64_t>& send,
                             const std::vector<Record>& theirs) {
  const int64_t R = int64_t(theirs.size()), per_rank = a.num_experts / R;
  if (a.handle_meta) {
    const HandleCounts& h = *a.handle_counts;
    for (int64_t p = 0; p < R; ++p)
      TORCH_CHECK(theirs[p].handle_id == uint64_t(h.call_id) && theirs[p].rows == h.recv[p], "dispatch: rank ", p,
                  " re-dispatches along the handle of dispatch #", theirs[p].handle_id, " (sending ", theirs[p].rows,
                  " rows here) but rank ", rank, " along that of dispatch #", h.call_id, " (expecting ", h.recv[p],
                  "); every rank must pass the handle of the same dispatch");
    return h;
  }
  HandleCounts c;
  c.call_id = int64_t(call_id);
  c.num_worst_tokens = a.num_worst_tokens;
  c.send = send;
  c.per_expert.assign(per_rank, 0);
  for (int64_t p = 0; p < R; ++p) {
    c.recv.push_back(theirs[p].rows);
    for (int64_t e = 0; e < per_rank; ++e) c.per_expert[e] += theirs[p].rows_per_expert[e];
  }
  if (theirs[0].rows < 0) c.per_expert.assign(per_rank, -1);  // only the device knows
  if (R <= kMaxMatrixRanks)
    for (int64_t s = 0; s < R; ++s) c.sent.insert(c.sent.end(), theirs[s].send_row, theirs[s].send_row + R);
  return c;
}

std::vector<Record> combine_records(const CombineArgs& a, int64_t num_ranks) {
  const HandleCounts& h = a.handle_counts;
  std::vector<Record> records(num_ranks, make_record(OpKind::kCombine, uint64_t(h.call_id), a.num_experts,
                                                     a.x.size(1), int64_t(a.x.scalar_type()), 0, false,
                                                     a.topk_weights.has_value()));
  for (int64_t p = 0; p < num_ranks; ++p) {
    records[p].num_tokens = a.x.size(0);
    records[p].rows = h.recv[p];
    records[p].rows_back = h.send[p];
  }
  return records;
}

void check_combine_counts(const CombineArgs& a, int64_t rank, const std::vector<Record>& theirs) {
  const HandleCounts& h = a.handle_counts;
  for (int64_t p = 0; p < int64_t(theirs.size()); ++p)
    TORCH_CHECK(theirs[p].rows == h.send[p] && theirs[p].rows_back == h.recv[p], "combine: rank ", p,
                "'s handle says it got ", theirs[p].rows, " rows from rank ", rank, " and sent ", theirs[p].rows_back,
                ", but rank ", rank, "'s says ", h.send[p], " and ", h.recv[p],
                "; every rank must pass the handle of the same dispatch");
}

}  // namespace ep::moe
