// The MoE ops (namespace ep, TORCH_LIBRARY): arguments as the device implementations receive
// them, after moe_ops.cpp has checked them, and the implementations' entry points.
//
// A dispatch handle travels as two tensors: `meta` (kernels/moe_meta.hpp, on the op's device)
// and `counts`, a CPU int64 vector laid out as below, so that the ops stay plain torch ops that
// torch.compile can trace.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <vector>

namespace ep {
class ProcessGroupEP;
}

namespace ep::moe {

// counts = [dispatch id, num_worst_tokens, rows sent to each rank (R), rows received from each
//           rank (R), received tokens per local expert (E/R), before any alignment,
//           then, for a dispatch routed across nodes only, its relay state (InternodeRoute,
//           backend/ops/moe_internode.hpp)]
// Counts only the device knows (a dispatch with num_worst_tokens on CUDA) are -1.
struct HandleCounts {
  int64_t call_id = 0;
  int64_t num_worst_tokens = 0;  // > 0: the dispatch's outputs had this many rows
  std::vector<int64_t> send, recv, per_expert;
  // [R * R]: rows rank s sent rank j at s * R + j (-1 where only the device knows); held by
  // groups of up to kMaxMatrixRanks (matrix_size), for DeepEP's rank_prefix_matrix
  std::vector<int64_t> sent;
  std::vector<int64_t> internode;  // empty: the dispatch took the intranode route

  static int64_t matrix_size(int64_t num_ranks);

  static HandleCounts parse(const std::vector<int64_t>& counts, int64_t num_ranks, int64_t experts_per_rank);
  at::Tensor to_tensor() const;
};

struct DispatchArgs {
  at::Tensor x;                          // [N, H] bf16/fp16/fp32, or fp8 with x_scales
  std::optional<at::Tensor> x_scales;    // [N, ceil(H/128)] float32
  std::optional<at::Tensor> topk_idx;    // [N, K] int64; absent when re-dispatching with a handle
  std::optional<at::Tensor> topk_weights;  // [N, K] float32
  std::optional<at::Tensor> handle_meta;   // set: re-dispatch along this handle's route
  std::optional<at::Tensor> layout_meta;   // set: topk_idx's table from get_dispatch_layout
  std::optional<at::Tensor> layout_header;  // set: that table's header, already on the host (CPU int32)
  std::optional<HandleCounts> handle_counts;
  int64_t num_experts = 0;
  int64_t num_worst_tokens = 0;  // > 0: outputs have this many rows and no host sync is needed
  bool placeholders = true;      // see placeholder() below
};

struct DispatchOutputs {
  at::Tensor recv_x, recv_x_scales, recv_topk_idx, recv_topk_weights;  // absent ones: placeholder()
  at::Tensor meta;    // the handle: routing table
  at::Tensor counts;  // the handle: HandleCounts::to_tensor()
};

struct CombineArgs {
  at::Tensor x;                            // [M, H]: one row per row dispatch delivered here
  std::optional<at::Tensor> topk_weights;  // [M, K] float32
  at::Tensor handle_meta;
  HandleCounts handle_counts;
  int64_t num_experts = 0;
  int64_t num_tokens = 0;  // N of the dispatch
  bool placeholders = true;  // see placeholder() below
};

// An output that holds nothing in this call (bf16's scales, a cached dispatch's ids, a given
// layout's table, combine's weights without weights): the ops' schemas return a fixed set of
// tensors, so the ops return an empty one; the direct call (torch_ep.moe's _C._dispatch_direct)
// takes an undefined one, None in Python, sparing the tensor's making, wrapping and freeing.
inline at::Tensor placeholder(bool wanted, const at::TensorOptions& options) {
  return wanted ? at::empty({0}, options) : at::Tensor();
}

struct CombineOutputs {
  at::Tensor combined_x, combined_topk_weights;  // the latter a placeholder() when no weights were given
};

// The "ep" backend of the group registered as `group_name`, for `device`'s tensors; raises naming
// `op` when there is none (shared by every op of TORCH_LIBRARY(ep)).
ProcessGroupEP& resolve_group(const std::string& group_name, const at::Device& device, const char* op);

// Layout: the routing table of `topk_idx` (meta) and, when asked, is_token_in_rank [N, R].
at::Tensor layout_cpu(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                      at::Tensor* is_token_in_rank);
DispatchOutputs dispatch_cpu(ProcessGroupEP& group, const DispatchArgs& args);
CombineOutputs combine_cpu(ProcessGroupEP& group, const CombineArgs& args);

// What a CUDA layout makes besides the routing table, each only where the caller asks (`want_*`).
struct LayoutExtras {
  bool want_counts = false, want_is_token_in_rank = false, want_host_header = false;
  at::Tensor num_tokens_per_rank, num_tokens_per_expert;  // [R], [E] int32: the header's columns
  at::Tensor is_token_in_rank;                            // [N, R] bool
  at::Tensor host_header;  // pinned CPU int32 [MetaLayout::host_header_size()], written by the
                           // kernel: read it through sizes_on_host
};
at::Tensor layout_cuda(const at::Tensor& topk_idx, int64_t num_experts, int64_t num_ranks,
                       LayoutExtras* extras = nullptr);
// A new route's sizes on the host: `host_header` (the layout kernel's) once its ready flags are
// set, waited for at most the group's timeout (raising with the op and the rank); where it is
// undefined (a layout made without one: under a capture, or by hand), the header of `meta`
// copied back on the current stream.
at::Tensor sizes_on_host(ProcessGroupEP& group, const at::Tensor& host_header, const at::Tensor& meta,
                         int64_t num_experts, int64_t num_tokens, const char* op);
DispatchOutputs dispatch_cuda(ProcessGroupEP& group, const DispatchArgs& args);
CombineOutputs combine_cuda(ProcessGroupEP& group, const CombineArgs& args);
// torch_ep.combine_buffer's zero-copy region [rows, hidden] (moe_internode_cuda.cpp), where the
// handle's dispatch took the device route across nodes; undefined elsewhere (a plain tensor does).
at::Tensor combine_buffer_cuda(ProcessGroupEP& group, const HandleCounts& handle_counts, int64_t rows,
                               int64_t hidden, at::ScalarType dtype, const at::Device& device);
// torch_ep.dispatch_buffer's views of this rank's packed rows (moe_internode_cuda.cpp): x [rows,
// hidden] of `dtype`, and for float8_e4m3fn its scales [rows, ceil(hidden / 128)] float32, row-
// strided, where the device route across nodes runs and its buffer is allocated; none elsewhere
// (plain tensors do).
std::vector<at::Tensor> dispatch_buffer_cuda(ProcessGroupEP& group, int64_t rows, int64_t hidden,
                                             at::ScalarType dtype, const at::Device& device);
// Whether t lies in those rows: dispatch passes it on as it is (row-strided), not contiguous().
bool in_dispatch_buffer(ProcessGroupEP& group, const at::Tensor& t);

// A CUDA dispatch's small outputs (fp8 scales, top-k ids and weights) in one allocation
// (cuda_outputs.hpp), unless TORCH_EP_OUTPUTS_TOGETHER=0. Read from the environment at the first
// call; tools/moe_profile.py sets it between calls (_C._set_outputs_together) to compare the two
// within one run, where the host's speed drifts between runs.
bool outputs_together();
void set_outputs_together(bool together);

}  // namespace ep::moe
