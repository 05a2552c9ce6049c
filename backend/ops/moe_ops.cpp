// Registration of the MoE ops and the argument checks they all share. The checks run before any
// communication, on the calling rank; what only the data can tell (expert ids out of range) is
// reported through the call's first exchange instead, so that every rank raises together.
#include "backend/ops/moe_ops.hpp"

#include <ATen/EmptyTensor.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <ATen/record_function.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/jit/frontend/tracer.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>
#include <torch/version.h>

#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>

#include "backend/common/env_switch.hpp"
#include "backend/common/phases.hpp"
#include "backend/kernels/moe_meta.hpp"
#include "backend/ops/moe_protocol.hpp"
#include "backend/ops/register_moe.hpp"
#include "backend/process_group/process_group_ep.hpp"

namespace ep::moe {

int64_t HandleCounts::matrix_size(int64_t num_ranks) {
  return num_ranks <= kMaxMatrixRanks ? num_ranks * num_ranks : 0;
}

HandleCounts HandleCounts::parse(const std::vector<int64_t>& counts, int64_t num_ranks, int64_t experts_per_rank) {
  const int64_t fixed = 2 + 2 * num_ranks + experts_per_rank + matrix_size(num_ranks);
  TORCH_CHECK_VALUE(int64_t(counts.size()) >= fixed, "handle: its counts hold ", counts.size(),
                    " values, but a handle of a group of ", num_ranks, " ranks with ", experts_per_rank,
                    " experts per rank holds at least ", fixed, "; was it made for another group or num_experts?");
  HandleCounts h;
  h.call_id = counts[0];
  h.num_worst_tokens = counts[1];
  h.send.assign(counts.begin() + 2, counts.begin() + 2 + num_ranks);
  h.recv.assign(counts.begin() + 2 + num_ranks, counts.begin() + 2 + 2 * num_ranks);
  const auto per_expert = counts.begin() + 2 + 2 * num_ranks, sent = per_expert + experts_per_rank;
  h.per_expert.assign(per_expert, sent);
  h.sent.assign(sent, sent + matrix_size(num_ranks));
  h.internode.assign(sent + matrix_size(num_ranks), counts.end());
  return h;
}

at::Tensor HandleCounts::to_tensor() const {
  const std::vector<int64_t>* parts[] = {&send, &recv, &per_expert, &sent, &internode};
  int64_t n = 2;
  for (const std::vector<int64_t>* part : parts) n += int64_t(part->size());
  // As at::empty's CPU kernel makes it, without the dispatcher's round trip (host time, issue 18);
  // every value is written below.
  at::Tensor t = at::Tensor(at::detail::empty_cpu({n}, at::kLong));
  int64_t* v = t.data_ptr<int64_t>();
  *v++ = call_id;
  *v++ = num_worst_tokens;
  for (const std::vector<int64_t>* part : parts) v = std::copy(part->begin(), part->end(), v);
  return t;
}

ProcessGroupEP& resolve_group(const std::string& group_name, const at::Device& device, const char* op) {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(group_name);
  } catch (const std::exception&) {
    TORCH_CHECK_VALUE(false, op, ": no process group is registered under the name '", group_name, "'");
  }
  c10::intrusive_ptr<c10d::Backend> backend;
  try {
    backend = pg->getBackend(device.type());
  } catch (const std::exception&) {
  }
  auto* ep_backend = dynamic_cast<ProcessGroupEP*>(backend.get());
  TORCH_CHECK_VALUE(ep_backend, op, ": the group '", group_name, "' has no 'ep' backend for ", device.type(),
                    " tensors; create it with backend=\"ep\"");
  return *ep_backend;
}

namespace {

using at::Tensor;

void check_experts(const char* op, int64_t num_experts, int64_t num_ranks) {
  TORCH_CHECK_VALUE(num_experts > 0, op, ": num_experts must be positive, got ", num_experts);
  TORCH_CHECK_VALUE(num_experts % num_ranks == 0, op, ": num_experts=", num_experts,
                    " must be divisible by the group size ", num_ranks, " (each rank owns num_experts/size experts)");
  TORCH_CHECK_VALUE(num_experts / num_ranks <= kMaxLocalExperts, op, ": num_experts/group size = ",
                    num_experts / num_ranks, " experts per rank; at most ", kMaxLocalExperts, " are supported");
}

void check_on(const char* op, const char* name, const Tensor& t, const at::Device& device) {
  TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but x is on ", device,
                    "; all tensors of one call must be on one device");
}

void check_topk(const char* op, const Tensor& topk_idx, int64_t rows, const at::Device& device) {
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong, op, ": topk_idx must be int64 (global expert ids, -1 = "
                   "not routed), got ", topk_idx.scalar_type());
  TORCH_CHECK_VALUE(topk_idx.dim() == 2 && topk_idx.size(0) == rows, op, ": topk_idx must have shape [", rows,
                    ", num_topk] (one row per token of x), got ", topk_idx.sizes());
  TORCH_CHECK_VALUE(topk_idx.size(1) >= 1 && topk_idx.size(1) <= 64, op,
                    ": topk_idx must have 1 to 64 slots per token, got ", topk_idx.size(1));
  check_on(op, "topk_idx", topk_idx, device);
}

void check_weights(const char* op, const Tensor& w, int64_t rows, int64_t num_topk, const at::Device& device) {
  TORCH_CHECK_TYPE(w.scalar_type() == at::kFloat, op, ": topk_weights must be float32, got ", w.scalar_type());
  TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == rows && (num_topk < 0 || w.size(1) == num_topk), op,
                    ": topk_weights must have shape [", rows, ", ", num_topk < 0 ? "num_topk" : std::to_string(num_topk),
                    "], got ", w.sizes());
  check_on(op, "topk_weights", w, device);
}

void check_payload(const char* op, const Tensor& x, const std::optional<Tensor>& scales) {
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [num_tokens, hidden], got shape ", x.sizes());
  TORCH_CHECK_VALUE(x.size(1) >= 1, op, ": x must have a hidden size of at least 1, got ", x.sizes());
  TORCH_CHECK_VALUE(x.device().is_cpu() || x.device().is_cuda(), op, ": x must be a CPU or CUDA tensor, got ",
                    x.device());
  if (x.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK_VALUE(scales.has_value(), op, ": an fp8 x comes as the pair (x, scales); scales are missing");
    const int64_t groups = (x.size(1) + 127) / 128;
    TORCH_CHECK_TYPE(scales->scalar_type() == at::kFloat, op, ": the fp8 scales must be float32, got ",
                     scales->scalar_type());
    TORCH_CHECK_VALUE(scales->dim() == 2 && scales->size(0) == x.size(0) && scales->size(1) == groups, op,
                      ": the fp8 scales must have shape [", x.size(0), ", ", groups,
                      "] (one per 128 channels), got ", scales->sizes());
    check_on(op, "the fp8 scales", *scales, x.device());
  } else {
    TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                         x.scalar_type() == at::kFloat,
                     op, ": x must be bfloat16, float16 or float32, or the pair (float8_e4m3fn x, float32 scales); "
                     "got ", x.scalar_type());
    TORCH_CHECK_VALUE(!scales.has_value(), op, ": scales are only taken with an fp8 x, but x is ", x.scalar_type());
  }
}

void check_meta(const char* op, const Tensor& meta, int64_t num_experts, int64_t num_ranks, int64_t num_tokens,
                const at::Device& device) {
  TORCH_CHECK_VALUE(meta.scalar_type() == at::kInt && meta.dim() == 1, op,
                    ": handle: its routing table must be a 1-D int32 tensor; is this a torch_ep handle?");
  const int64_t n = kernels::MetaLayout::tokens_for_size(meta.numel(), num_ranks, num_experts);
  TORCH_CHECK_VALUE(n >= 0, op, ": handle: its routing table does not fit a group of ", num_ranks, " ranks and ",
                    num_experts, " experts; was it made by another group or with another num_experts?");
  TORCH_CHECK_VALUE(num_tokens < 0 || n == num_tokens, op, ": handle: it routes ", n, " tokens but x has ",
                    num_tokens, " rows; it was made by a dispatch of other tokens");
  TORCH_CHECK_VALUE(meta.device() == device, op, ": handle: it lives on ", meta.device(), " but x is on ", device);
}

std::vector<int64_t> counts_vector(const char* op, const Tensor& counts) {
  TORCH_CHECK_VALUE(counts.scalar_type() == at::kLong && counts.dim() == 1 && counts.device().is_cpu(), op,
                    ": handle: its counts must be a 1-D int64 CPU tensor; is this a torch_ep handle?");
  const Tensor c = counts.contiguous();
  return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
}

// host_header: on CUDA, also the header in pinned host memory, written by the layout kernel
// (for dispatch(layout_header=), which then reads the sizes without waiting on the stream); an
// empty tensor otherwise.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> get_dispatch_layout(const Tensor& topk_idx, int64_t num_experts,
                                                                       int64_t num_ranks, bool host_header) {
  const char* op = "get_dispatch_layout";
  TORCH_CHECK_VALUE(num_ranks >= 1, op, ": num_ranks must be at least 1");
  check_experts(op, num_experts, num_ranks);
  check_topk(op, topk_idx, topk_idx.dim() == 2 ? topk_idx.size(0) : -1, topk_idx.device());
  const Tensor idx = topk_idx.contiguous();
  // Without a host header, an empty tensor on topk_idx's device: under torch.compile (which never
  // asks for one) every output of the op stays on that device.
  const Tensor no_header = at::empty({0}, idx.options().dtype(at::kInt));
  if (idx.is_cuda()) {
    LayoutExtras out;
    out.want_counts = out.want_is_token_in_rank = true;
    out.want_host_header = host_header;
    Tensor meta = layout_cuda(idx, num_experts, num_ranks, &out);
    return {out.num_tokens_per_rank, out.num_tokens_per_expert, out.is_token_in_rank, meta,
            host_header ? out.host_header : no_header};
  }
  Tensor in_rank;
  Tensor meta = layout_cpu(idx, num_experts, num_ranks, &in_rank);
  kernels::MetaLayout l{num_ranks, num_experts, idx.size(0)};
  return {meta.narrow(0, l.tokens_per_rank(), num_ranks).clone(),
          meta.narrow(0, l.pairs_per_expert(), num_experts).clone(), in_rank, meta, no_header};
}

// The ops' bodies; `placeholders` false (the direct call) leaves the outputs that hold nothing
// undefined (moe_ops.hpp's placeholder()).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch_with(
    const Tensor& x, const std::optional<Tensor>& x_scales, const std::optional<Tensor>& topk_idx,
    const std::optional<Tensor>& topk_weights, const std::optional<Tensor>& handle_meta,
    const std::optional<Tensor>& handle_counts, int64_t num_experts, int64_t num_worst_tokens, c10::string_view group_name,
    const std::optional<Tensor>& layout_meta, const std::optional<Tensor>& layout_header, bool placeholders) {
  const char* op = "dispatch";
  Phases phase;  // the argument checks, apart from the route's own phases (tools/moe_profile.py)
  phase.next("ep::dispatch/checks");
  check_payload(op, x, x_scales);
  ProcessGroupEP& group = resolve_group(std::string(group_name), x.device(), op);
  const int64_t R = group.getSize();
  check_experts(op, num_experts, R);
  TORCH_CHECK_VALUE(num_worst_tokens >= 0, op, ": num_worst_tokens must be >= 0, got ", num_worst_tokens);
  const int64_t N = x.size(0);

  DispatchArgs a;
  // dispatch_buffer's row-strided views go on as they are: the route across nodes finds them in
  // place (and copies out any other view of those rows).
  a.x = x.is_contiguous() || !in_dispatch_buffer(group, x) ? x.contiguous() : x;
  if (x_scales)
    a.x_scales = x_scales->is_contiguous() || !in_dispatch_buffer(group, *x_scales) ? x_scales->contiguous() : *x_scales;
  a.num_experts = num_experts;
  a.num_worst_tokens = num_worst_tokens;
  a.placeholders = placeholders;
  if (handle_meta) {
    TORCH_CHECK_VALUE(!topk_idx && !topk_weights, op, ": give either topk_idx (a new route) or a handle (an earlier "
                      "route), not both");
    check_meta(op, *handle_meta, num_experts, R, N, x.device());
    a.handle_meta = handle_meta->contiguous();
    TORCH_CHECK_VALUE(handle_counts.has_value(), op, ": a handle needs both its routing table and its counts");
    a.handle_counts = HandleCounts::parse(counts_vector(op, *handle_counts), R, num_experts / R);
    // Along the handle of a num_worst_tokens dispatch only the device knew the counts (the handle
    // holds -1): its outputs' rows are that dispatch's num_worst_tokens, whatever this call passed.
    if (a.num_worst_tokens == 0 && a.handle_counts->num_worst_tokens > 0)
      a.num_worst_tokens = a.handle_counts->num_worst_tokens;
  } else {
    TORCH_CHECK_VALUE(topk_idx.has_value(), op, ": give topk_idx and num_experts (a new route) or a handle");
    check_topk(op, *topk_idx, N, x.device());
    a.topk_idx = topk_idx->contiguous();
    if (layout_meta) {
      check_meta(op, *layout_meta, num_experts, R, N, x.device());
      a.layout_meta = layout_meta->contiguous();
      if (layout_header) {
        const kernels::MetaLayout l{R, num_experts, N};
        TORCH_CHECK_VALUE(!layout_header->is_cuda() && layout_header->scalar_type() == at::kInt &&
                              layout_header->dim() == 1 && layout_header->numel() == l.host_header_size(),
                          op, ": layout_header must be the layout's header on the host (CPU int32, ",
                          l.host_header_size(),
                          " values), got ", layout_header->scalar_type(), " ", layout_header->sizes(), " on ",
                          layout_header->device());
        a.layout_header = layout_header->contiguous();
      }
    } else {
      TORCH_CHECK_VALUE(!layout_header, op, ": layout_header comes with layout_meta");
    }
    if (topk_weights) {
      check_weights(op, *topk_weights, N, topk_idx->size(1), x.device());
      a.topk_weights = topk_weights->contiguous();
    }
  }
  phase.end();
  DispatchOutputs o = x.is_cuda() ? dispatch_cuda(group, a) : dispatch_cpu(group, a);
  return {o.recv_x, o.recv_x_scales, o.recv_topk_idx, o.recv_topk_weights, o.meta, o.counts};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> dispatch(
    const Tensor& x, const std::optional<Tensor>& x_scales, const std::optional<Tensor>& topk_idx,
    const std::optional<Tensor>& topk_weights, const std::optional<Tensor>& handle_meta,
    const std::optional<Tensor>& handle_counts, int64_t num_experts, int64_t num_worst_tokens, c10::string_view group_name,
    const std::optional<Tensor>& layout_meta, const std::optional<Tensor>& layout_header) {
  return dispatch_with(x, x_scales, topk_idx, topk_weights, handle_meta, handle_counts, num_experts, num_worst_tokens,
                       group_name, layout_meta, layout_header, /*placeholders=*/true);
}

std::tuple<Tensor, Tensor> combine_with(const Tensor& x, const std::optional<Tensor>& topk_weights,
                                        const Tensor& handle_meta, const Tensor& handle_counts, int64_t num_experts,
                                        c10::string_view group_name, bool placeholders) {
  const char* op = "combine";
  Phases phase;
  phase.next("ep::combine/checks");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) >= 1, op, ": x must be 2-D [received rows, hidden], got shape ",
                    x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf || x.scalar_type() == at::kFloat,
                   op, ": x must be bfloat16, float16 or float32, got ", x.scalar_type());
  ProcessGroupEP& group = resolve_group(std::string(group_name), x.device(), op);
  const int64_t R = group.getSize();
  check_experts(op, num_experts, R);
  check_meta(op, handle_meta, num_experts, R, -1, x.device());

  CombineArgs a;
  a.x = x.contiguous();
  a.handle_meta = handle_meta.contiguous();
  a.handle_counts = HandleCounts::parse(counts_vector(op, handle_counts), R, num_experts / R);
  a.num_experts = num_experts;
  a.num_tokens = kernels::MetaLayout::tokens_for_size(handle_meta.numel(), R, num_experts);
  a.placeholders = placeholders;
  int64_t rows = 0;
  for (int64_t n : a.handle_counts.recv) rows += n;
  if (a.handle_counts.num_worst_tokens > 0) {
    TORCH_CHECK_VALUE(x.size(0) == a.handle_counts.num_worst_tokens, op, ": x must have num_worst_tokens = ",
                      a.handle_counts.num_worst_tokens, " rows, as the dispatch's outputs had, got ", x.size(0));
  } else {
    TORCH_CHECK_VALUE(x.size(0) == rows, op, ": x must have one row per row the dispatch delivered to this rank (",
                      rows, "), got ", x.size(0));
  }
  if (topk_weights) {
    check_weights(op, *topk_weights, x.size(0), -1, x.device());
    a.topk_weights = topk_weights->contiguous();
  }
  phase.end();
  CombineOutputs o = x.is_cuda() ? combine_cuda(group, a) : combine_cpu(group, a);
  return {o.combined_x, o.combined_topk_weights};
}

std::tuple<Tensor, Tensor> combine(const Tensor& x, const std::optional<Tensor>& topk_weights,
                                   const Tensor& handle_meta, const Tensor& handle_counts, int64_t num_experts,
                                   c10::string_view group_name) {
  return combine_with(x, topk_weights, handle_meta, handle_counts, num_experts, group_name, /*placeholders=*/true);
}

// torch_ep.combine_buffer's region, or None where the caller makes a plain tensor: a CPU handle,
// a group on one node, another route. Eager only (not an op): it hands out persistent memory.
std::optional<Tensor> combine_buffer(const std::string& group_name, const Tensor& handle_counts, int64_t num_experts,
                                     int64_t rows, int64_t hidden, at::ScalarType dtype, const at::Device& device) {
  const char* op = "combine_buffer";
  if (!device.is_cuda()) return std::nullopt;
  ProcessGroupEP& group = resolve_group(group_name, device, op);
  const int64_t R = group.getSize();
  check_experts(op, num_experts, R);
  const HandleCounts h = HandleCounts::parse(counts_vector(op, handle_counts), R, num_experts / R);
  Tensor region = combine_buffer_cuda(group, h, rows, hidden, dtype, device);
  return region.defined() ? std::optional<Tensor>(region) : std::nullopt;
}

// torch_ep.dispatch_buffer's views, or none where the caller makes plain tensors: CPU, one node,
// the host route, a buffer no dispatch has allocated yet, rows past the capacity. Eager only.
std::vector<Tensor> dispatch_buffer(const std::string& group_name, int64_t rows, int64_t hidden,
                                    at::ScalarType dtype, const at::Device& device) {
  if (!device.is_cuda()) return {};
  return dispatch_buffer_cuda(resolve_group(group_name, device, "dispatch_buffer"), rows, hidden, dtype, device);
}

}  // namespace

#ifndef TORCH_EP_WITH_CUDA
at::Tensor layout_cuda(const at::Tensor&, int64_t, int64_t, LayoutExtras*) {
  TORCH_CHECK(false, "get_dispatch_layout: torch_ep was built without CUDA support");
}
DispatchOutputs dispatch_cuda(ProcessGroupEP&, const DispatchArgs&) {
  TORCH_CHECK(false, "dispatch: torch_ep was built without CUDA support");
}
CombineOutputs combine_cuda(ProcessGroupEP&, const CombineArgs&) {
  TORCH_CHECK(false, "combine: torch_ep was built without CUDA support");
}
Tensor combine_buffer_cuda(ProcessGroupEP&, const HandleCounts&, int64_t, int64_t, at::ScalarType, const at::Device&) {
  return {};
}
std::vector<Tensor> dispatch_buffer_cuda(ProcessGroupEP&, int64_t, int64_t, at::ScalarType, const at::Device&) {
  return {};
}
bool in_dispatch_buffer(ProcessGroupEP&, const Tensor&) { return false; }
#endif

// dispatch and combine exchange records on the host at every call and keep the handle's counts
// in a CPU tensor: inductor's CUDA graphs (mode="reduce-overhead") must run them outside the
// graph, between its partitions, rather than capture one call's host work (the tag says so). A
// dispatch with num_worst_tokens can still be captured whole with torch.cuda.graph.
const std::vector<at::Tag>& host_synced_op_tags() {
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  static const std::vector<at::Tag> tags{at::Tag::cudagraph_unsafe};
#else
  static const std::vector<at::Tag> tags;
#endif
  return tags;
}

namespace {
// Read from the environment at the first use (a bad value raises there, and is read again next time).
std::atomic<bool>& outputs_together_state() {
  static std::atomic<bool> state{env_switch_on_by_default("TORCH_EP_OUTPUTS_TOGETHER")};
  return state;
}
}  // namespace

bool outputs_together() { return outputs_together_state().load(std::memory_order_relaxed); }

void set_outputs_together(bool together) { outputs_together_state().store(together); }

TORCH_LIBRARY(ep, m) {
  m.def("get_dispatch_layout(Tensor topk_idx, int num_experts, int num_ranks, bool host_header=False) -> "
        "(Tensor num_tokens_per_rank, Tensor num_tokens_per_expert, Tensor is_token_in_rank, Tensor meta, "
        "Tensor host_header)");
  m.def("dispatch(Tensor x, Tensor? x_scales, Tensor? topk_idx, Tensor? topk_weights, Tensor? handle_meta, "
        "Tensor? handle_counts, int num_experts, int num_worst_tokens, str group_name, Tensor? layout_meta=None, Tensor? layout_header=None) -> "
        "(Tensor recv_x, Tensor recv_x_scales, Tensor recv_topk_idx, Tensor recv_topk_weights, Tensor meta, "
        "Tensor counts)", host_synced_op_tags());
  m.def("combine(Tensor x, Tensor? topk_weights, Tensor handle_meta, Tensor handle_counts, int num_experts, "
        "str group_name) -> (Tensor combined_x, Tensor combined_topk_weights)", host_synced_op_tags());
}

TORCH_LIBRARY_IMPL(ep, CPU, m) {
  m.impl("get_dispatch_layout", get_dispatch_layout);
  m.impl("dispatch", dispatch);
  m.impl("combine", combine);
}

TORCH_LIBRARY_IMPL(ep, CUDA, m) {
  m.impl("get_dispatch_layout", get_dispatch_layout);
  m.impl("dispatch", dispatch);
  m.impl("combine", combine);
}

}  // namespace ep::moe

namespace ep {

void register_moe(pybind11::module_& m) {
  namespace py = pybind11;
  // The ops' own functions for plain eager tensors, without the dispatcher's boxed call of
  // eleven arguments and six outputs: torch_ep.moe calls them (unless TORCH_EP_DIRECT_CALL=0)
  // where nothing could intercept the op (no tensor subclass, mode, functorch transform or
  // compile). The profiler still sees the op's name. Outputs that hold nothing come back as None.
  m.def("_dispatch_direct",
        [](const at::Tensor& x, const std::optional<at::Tensor>& x_scales, const std::optional<at::Tensor>& topk_idx,
           const std::optional<at::Tensor>& topk_weights, const std::optional<at::Tensor>& handle_meta,
           const std::optional<at::Tensor>& handle_counts, int64_t num_experts, int64_t num_worst_tokens,
           const std::string& group_name, const std::optional<at::Tensor>& layout_meta,
           const std::optional<at::Tensor>& layout_header) {
          RECORD_FUNCTION("ep::dispatch", std::vector<c10::IValue>());
          return moe::dispatch_with(x, x_scales, topk_idx, topk_weights, handle_meta, handle_counts, num_experts,
                                    num_worst_tokens, group_name, layout_meta, layout_header, /*placeholders=*/false);
        });
  m.def("_combine_direct",
        [](const at::Tensor& x, const std::optional<at::Tensor>& topk_weights, const at::Tensor& handle_meta,
           const at::Tensor& handle_counts, int64_t num_experts, const std::string& group_name) {
          RECORD_FUNCTION("ep::combine", std::vector<c10::IValue>());
          return moe::combine_with(x, topk_weights, handle_meta, handle_counts, num_experts, group_name,
                                   /*placeholders=*/false);
        });
  // Whether the direct call may stand in for the op (torch_ep.moe._direct): no torch function or
  // dispatch mode, functorch transform or jit trace is active, and every argument is None or a
  // plain torch.Tensor, no subclass (DTensor, FakeTensor). One call instead of five Python ones
  // (0.2 against 1.1 us on the CPU machine). functorch keeps its front key in the thread's included
  // set while any transform's layer is on its stack.
  m.def("_direct_allowed", [](const py::args& args) {
    if (at::impl::torch_function_mode_enabled() || c10::impl::TorchDispatchModeTLS::stack_len() > 0 ||
        c10::impl::tls_is_dispatch_key_included(c10::DispatchKey::FuncTorchDynamicLayerFrontMode) ||
        torch::jit::tracer::isTracing())
      return false;
    for (const py::handle arg : args)
      if (!arg.is_none() && Py_TYPE(arg.ptr()) != reinterpret_cast<PyTypeObject*>(THPVariableClass)) return false;
    return true;
  });
  m.def("_set_outputs_together", &moe::set_outputs_together, py::arg("together"),
        "TORCH_EP_OUTPUTS_TOGETHER from now on (tools/moe_profile.py's A/B in one run)");
  m.def("_combine_buffer", &moe::combine_buffer, py::arg("group_name"), py::arg("handle_counts"),
        py::arg("num_experts"), py::arg("rows"), py::arg("hidden"), py::arg("dtype"), py::arg("device"),
        "torch_ep.combine_buffer's zero-copy region, or None (the caller makes a plain tensor)");
  m.def("_dispatch_buffer", &moe::dispatch_buffer, py::arg("group_name"), py::arg("rows"), py::arg("hidden"),
        py::arg("dtype"), py::arg("device"),
        "torch_ep.dispatch_buffer's views of this rank's packed rows ([x] or [x, scales]), or [] (plain tensors)");
}

}  // namespace ep
