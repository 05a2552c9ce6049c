// Registration of the low-latency ops, their argument checks, and the Python bindings of the
// NVSHMEM runtime they run on. Without NVSHMEM in the build the ops still exist (fake kernels,
// argument checks) and raise, after the checks, what to install.
#include "backend/ops/low_latency_ops.hpp"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/library.h>

#include <pybind11/chrono.h>
#include <pybind11/stl.h>

#include "backend/common/env_switch.hpp"
#include "backend/kernels/low_latency_layout.hpp"
#include "backend/ops/register_low_latency.hpp"

namespace ep::ll {

const char* const kNoNvshmemMessage =
    "low-latency dispatch/combine need NVSHMEM, and this torch_ep was built without it. Install it with `pip "
    "install nvidia-nvshmem-cu13 nvshmem4py-cu13` into an environment with a CUDA build of torch and nvcc, then "
    "rebuild torch_ep (`pip install --no-build-isolation -e .`; TORCH_EP_WITH_NVSHMEM=1 makes a missing NVSHMEM "
    "fail the build)";

bool built_with_nvshmem() {
#ifdef TORCH_EP_WITH_NVSHMEM
  return true;
#else
  return false;
#endif
}

namespace {

using at::Tensor;
using kernels::ll::kChannelsPerScale;
using kernels::ll::kHiddenMultiple;

int64_t group_size(c10::string_view group_name, const char* op) {
  c10::intrusive_ptr<c10d::ProcessGroup> pg;
  try {
    pg = c10d::resolve_process_group(std::string(group_name));
  } catch (const std::exception&) {
    TORCH_CHECK_VALUE(false, op, ": no process group is registered under the name '", group_name, "'");
  }
  return pg->getSize();
}

void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& x) {
  TORCH_CHECK_VALUE(t.device() == x.device(), op, ": ", name, " is on ", t.device(), " but x is on ", x.device(),
                    "; all tensors of one call must be on one device");
}

void check_experts(const char* op, int64_t num_experts, int64_t num_ranks) {
  TORCH_CHECK_VALUE(num_experts > 0, op, ": num_experts must be positive, got ", num_experts);
  TORCH_CHECK_VALUE(num_experts % num_ranks == 0, op, ": num_experts=", num_experts,
                    " must be divisible by the group size ", num_ranks, " (each rank owns num_experts/size experts)");
  TORCH_CHECK_VALUE(num_ranks <= kernels::ll::kMaxRanks, op, ": groups of up to ", kernels::ll::kMaxRanks,
                    " ranks are supported, this one has ", num_ranks);
}

void check_topk_idx(const char* op, const Tensor& topk_idx, const Tensor& x, int64_t num_tokens) {
  TORCH_CHECK_TYPE(topk_idx.scalar_type() == at::kLong, op, ": topk_idx must be int64 (global expert ids, -1 = "
                   "not routed), got ", topk_idx.scalar_type());
  TORCH_CHECK_VALUE(topk_idx.dim() == 2 && topk_idx.size(0) == num_tokens, op, ": topk_idx must have shape [",
                    num_tokens, ", num_topk] (one row per token), got ", topk_idx.sizes());
  TORCH_CHECK_VALUE(topk_idx.size(1) >= 1 && topk_idx.size(1) <= 64, op,
                    ": topk_idx must have 1 to 64 slots per token, got ", topk_idx.size(1));
  check_same_device(op, "topk_idx", topk_idx, x);
}

void check_hidden(const char* op, int64_t hidden) {
  TORCH_CHECK_VALUE(hidden > 0 && hidden % kHiddenMultiple == 0, op, ": the hidden size must be a positive multiple "
                    "of ", kHiddenMultiple, " (fp8 scales cover 128 channels; rows move in 16-byte vectors), got ",
                    hidden);
}

}  // namespace

void check_dispatch_args(const Tensor& x, const Tensor& topk_idx, int64_t max_tokens_per_rank, int64_t num_experts,
                         bool use_fp8, int64_t num_ranks) {
  const char* op = "low_latency_dispatch";
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, op, ": x must be bfloat16 (", (use_fp8 ? "cast to fp8 " : ""),
                   "on the fly), got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 2, op, ": x must be 2-D [num_tokens, hidden], got shape ", x.sizes());
  check_hidden(op, x.size(1));
  TORCH_CHECK_VALUE(max_tokens_per_rank >= 1, op, ": max_tokens_per_rank must be >= 1, got ", max_tokens_per_rank);
  TORCH_CHECK_VALUE(x.size(0) <= max_tokens_per_rank, op, ": x has ", x.size(0),
                    " tokens, more than max_tokens_per_rank=", max_tokens_per_rank);
  check_experts(op, num_experts, num_ranks);
  check_topk_idx(op, topk_idx, x, x.size(0));
}

void check_combine_args(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights, const Tensor& send_slot,
                        const Tensor& layout, const Tensor& out, int64_t max_tokens_per_rank, int64_t num_experts,
                        int64_t num_ranks) {
  const char* op = "low_latency_combine";
  check_experts(op, num_experts, num_ranks);
  TORCH_CHECK_VALUE(max_tokens_per_rank >= 1, op, ": max_tokens_per_rank must be >= 1, got ", max_tokens_per_rank);
  const int64_t E_local = num_experts / num_ranks, rows = num_ranks * max_tokens_per_rank;
  TORCH_CHECK_TYPE(x.scalar_type() == at::kBFloat16, op, ": x must be bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() == 3 && x.size(0) == E_local && x.size(1) == rows, op, ": x must have shape [", E_local,
                    ", ", rows, ", hidden] ([local experts, group size * max_tokens_per_rank, hidden], as "
                    "low_latency_dispatch's recv_x), got ", x.sizes());
  check_hidden(op, x.size(2));
  TORCH_CHECK_VALUE(topk_idx.dim() == 2, op, ": topk_idx must be 2-D [num_tokens, num_topk], got ", topk_idx.sizes());
  const int64_t N = topk_idx.size(0);
  TORCH_CHECK_VALUE(N <= max_tokens_per_rank, op, ": topk_idx has ", N, " tokens, more than max_tokens_per_rank=",
                    max_tokens_per_rank);
  check_topk_idx(op, topk_idx, x, N);
  TORCH_CHECK_TYPE(topk_weights.scalar_type() == at::kFloat, op, ": topk_weights must be float32, got ",
                   topk_weights.scalar_type());
  TORCH_CHECK_VALUE(topk_weights.sizes() == topk_idx.sizes(), op, ": topk_weights must have topk_idx's shape ",
                    topk_idx.sizes(), ", got ", topk_weights.sizes());
  check_same_device(op, "topk_weights", topk_weights, x);
  TORCH_CHECK_VALUE(layout.scalar_type() == at::kInt && layout.dim() == 2 && layout.size(0) == E_local &&
                        layout.size(1) == num_ranks,
                    op, ": handle: it does not fit this group and num_experts (layout ", layout.sizes(),
                    "); was it made by another group's or another num_experts' dispatch?");
  TORCH_CHECK_VALUE(send_slot.scalar_type() == at::kInt && send_slot.sizes() == topk_idx.sizes(), op,
                    ": handle: its send_slot ", send_slot.sizes(), " does not match topk_idx ", topk_idx.sizes(),
                    "; combine takes the topk_idx its dispatch was given");
  check_same_device(op, "the handle", send_slot, x);
  check_same_device(op, "the handle", layout, x);
  TORCH_CHECK_TYPE(out.scalar_type() == at::kBFloat16, op, ": out must be bfloat16, got ", out.scalar_type());
  TORCH_CHECK_VALUE(out.dim() == 2 && out.size(0) == N && out.size(1) == x.size(2) && out.is_contiguous(), op,
                    ": out must be a contiguous [", N, ", ", x.size(2), "] tensor, got ", out.sizes(),
                    out.is_contiguous() ? "" : " (not contiguous)");
  check_same_device(op, "out", out, x);
}

namespace {

void require_cuda(const char* op, const Tensor& x) {
  TORCH_CHECK(built_with_nvshmem(), op, ": ", kNoNvshmemMessage);
  TORCH_CHECK_VALUE(x.is_cuda(), op, ": low-latency ops run on CUDA tensors, got ", x.device(),
                    " (torch_ep.reference.", op, " is the CPU reference)");
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, int64_t> low_latency_dispatch(
    const Tensor& x, const Tensor& topk_idx, int64_t max_tokens_per_rank, int64_t num_experts, bool use_fp8,
    bool round_scale, bool send_only, c10::string_view group_name) {
  const char* op = "low_latency_dispatch";
  check_dispatch_args(x, topk_idx, max_tokens_per_rank, num_experts, use_fp8, group_size(group_name, op));
  TORCH_CHECK_VALUE(use_fp8 || !round_scale, op, ": round_scale applies to fp8 scales only (use_fp8=False)");
  require_cuda(op, x);
  DispatchOutputs o = dispatch_cuda(x.contiguous(), topk_idx.contiguous(), max_tokens_per_rank, num_experts, use_fp8,
                                    round_scale, send_only, std::string(group_name));
  return {o.recv_x, o.recv_scales, o.recv_count, o.recv_src_info, o.recv_layout, o.send_slot, o.half};
}

void low_latency_dispatch_recv(const Tensor& recv_x, const Tensor& recv_scales, const Tensor& recv_count,
                               const Tensor& recv_src_info, const Tensor& recv_layout, int64_t half,
                               int64_t max_tokens_per_rank, int64_t num_topk, int64_t num_experts,
                               c10::string_view group_name) {
  const char* op = "low_latency_dispatch (receive hook)";
  const int64_t R = group_size(group_name, op);
  check_experts(op, num_experts, R);
  const int64_t E_local = num_experts / R, rows = R * max_tokens_per_rank;
  TORCH_CHECK_VALUE(half == 0 || half == 1, op, ": half must be 0 or 1, got ", half);
  TORCH_CHECK_VALUE(num_topk >= 1 && num_topk <= 64, op, ": num_topk must be 1 to 64, got ", num_topk);
  TORCH_CHECK_VALUE(recv_x.dim() == 3 && recv_x.size(0) == E_local && recv_x.size(1) == rows && recv_x.is_contiguous(),
                    op, ": recv_x must be the contiguous [", E_local, ", ", rows, ", hidden] tensor its send made, got ",
                    recv_x.sizes());
  const bool fp8 = recv_x.scalar_type() == at::kFloat8_e4m3fn;
  TORCH_CHECK_VALUE(!fp8 || (recv_scales.dim() == 3 && recv_scales.size(2) == recv_x.size(2) / kChannelsPerScale), op,
                    ": recv_scales do not match recv_x");
  require_cuda(op, recv_x);
  DispatchOutputs o{recv_x, recv_scales, recv_count, recv_src_info, recv_layout, at::Tensor(), half};
  dispatch_recv_cuda(o, max_tokens_per_rank, num_topk, num_experts, std::string(group_name));
}

int64_t low_latency_combine(const Tensor& x, const Tensor& topk_idx, const Tensor& topk_weights,
                            const Tensor& send_slot, const Tensor& layout, const Tensor& out,
                            int64_t max_tokens_per_rank, int64_t num_experts, bool send_only,
                            c10::string_view group_name) {
  const char* op = "low_latency_combine";
  check_combine_args(x, topk_idx, topk_weights, send_slot, layout, out, max_tokens_per_rank, num_experts,
                     group_size(group_name, op));
  require_cuda(op, x);
  return combine_cuda(x.contiguous(), topk_idx.contiguous(), topk_weights.contiguous(), send_slot.contiguous(),
                      layout.contiguous(), out, max_tokens_per_rank, num_experts, send_only, std::string(group_name));
}

void low_latency_combine_recv(const Tensor& topk_idx, const Tensor& send_slot, const Tensor& topk_weights,
                              const Tensor& out, int64_t half, int64_t max_tokens_per_rank, int64_t num_experts,
                              c10::string_view group_name) {
  const char* op = "low_latency_combine (receive hook)";
  TORCH_CHECK_VALUE(half == 0 || half == 1, op, ": half must be 0 or 1, got ", half);
  TORCH_CHECK_VALUE(topk_weights.sizes() == topk_idx.sizes() && send_slot.sizes() == topk_idx.sizes() &&
                        send_slot.scalar_type() == at::kInt && out.dim() == 2 && out.size(0) == topk_idx.size(0) &&
                        out.is_contiguous() && out.scalar_type() == at::kBFloat16,
                    op, ": topk_idx, send_slot, topk_weights and out do not match the send's");
  require_cuda(op, out);
  combine_recv_cuda(topk_idx.contiguous(), send_slot.contiguous(), topk_weights.contiguous(), out, half,
                    max_tokens_per_rank, num_experts, std::string(group_name));
}

}  // namespace

#ifndef TORCH_EP_WITH_NVSHMEM
DispatchOutputs dispatch_cuda(const Tensor&, const Tensor&, int64_t, int64_t, bool, bool, bool, const std::string&) {
  TORCH_CHECK(false, "low_latency_dispatch: ", kNoNvshmemMessage);
}
void dispatch_recv_cuda(const DispatchOutputs&, int64_t, int64_t, int64_t, const std::string&) {
  TORCH_CHECK(false, "low_latency_dispatch: ", kNoNvshmemMessage);
}
int64_t combine_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     int64_t, int64_t, bool, const std::string&) {
  TORCH_CHECK(false, "low_latency_combine: ", kNoNvshmemMessage);
}
void combine_recv_cuda(const Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t, int64_t, int64_t,
                       const std::string&) {
  TORCH_CHECK(false, "low_latency_combine: ", kNoNvshmemMessage);
}
Tensor combine_buffer_cuda(const std::string&, int64_t, int64_t, int64_t, const at::Device&) {
  TORCH_CHECK(false, "low_latency_combine_buffer: ", kNoNvshmemMessage);
}
int nvshmem_status() { return 0; }
void nvshmem_attach(int, int) { TORCH_CHECK(false, kNoNvshmemMessage); }
void nvshmem_env_defaults() {}
bool buffer_fits(const std::string&, int64_t, int64_t, int64_t, int64_t, bool) { return false; }
bool reserve_buffer(const std::string&, int, int, int, std::chrono::milliseconds, int, int64_t, int64_t, int64_t, bool,
                    const std::vector<int>&) {
  TORCH_CHECK(false, kNoNvshmemMessage);
}
std::vector<int> remote_ranks(const std::string&) { return {}; }
void check_errors(const std::string&, const char*) {}
std::vector<uint64_t> trace(const std::string&) { return {}; }
#endif

int64_t buffer_bytes(int64_t num_ranks, int64_t num_local_experts, int64_t max_tokens, int64_t hidden, bool remote) {
  return kernels::ll::LowLatencyLayout::of(num_ranks, num_local_experts, max_tokens, hidden, remote).total_bytes();
}

TORCH_LIBRARY_FRAGMENT(ep, m) {
  m.def("low_latency_dispatch(Tensor x, Tensor topk_idx, int max_tokens_per_rank, int num_experts, bool use_fp8, "
        "bool round_scale, bool send_only, str group_name) -> (Tensor recv_x, Tensor recv_scales, Tensor recv_count, "
        "Tensor recv_src_info, Tensor recv_layout, Tensor send_slot, int half)");
  m.def("low_latency_dispatch_recv(Tensor(a!) recv_x, Tensor(b!) recv_scales, Tensor(c!) recv_count, "
        "Tensor(d!) recv_src_info, Tensor(e!) recv_layout, int half, int max_tokens_per_rank, int num_topk, "
        "int num_experts, str group_name) -> ()");
  m.def("low_latency_combine(Tensor x, Tensor topk_idx, Tensor topk_weights, Tensor send_slot, Tensor layout, "
        "Tensor(a!) out, int max_tokens_per_rank, int num_experts, bool send_only, str group_name) -> int");
  m.def("low_latency_combine_recv(Tensor topk_idx, Tensor send_slot, Tensor topk_weights, Tensor(a!) out, int half, "
        "int max_tokens_per_rank, int num_experts, str group_name) -> ()");
}

TORCH_LIBRARY_IMPL(ep, CPU, m) {
  m.impl("low_latency_dispatch", low_latency_dispatch);
  m.impl("low_latency_dispatch_recv", low_latency_dispatch_recv);
  m.impl("low_latency_combine", low_latency_combine);
  m.impl("low_latency_combine_recv", low_latency_combine_recv);
}

TORCH_LIBRARY_IMPL(ep, CUDA, m) {
  m.impl("low_latency_dispatch", low_latency_dispatch);
  m.impl("low_latency_dispatch_recv", low_latency_dispatch_recv);
  m.impl("low_latency_combine", low_latency_combine);
  m.impl("low_latency_combine_recv", low_latency_combine_recv);
}

}  // namespace ep::ll

namespace ep {

ll::RemotePuts ll::parse_remote_puts(const char* value) {
  const std::string mode = value ? value : "";
  if (mode.empty()) return {0, false, false, true};
  if (mode == "token") return {0, false};
  if (mode == "fenced") return {0, true};
  if (mode == "block") return {0, false, true};
  if (mode == "grouped") return {1, false};
  if (mode == "batched") return {4, false};
  const std::string digits = mode.rfind("batched", 0) == 0 ? mode.substr(7) : "";
  const bool numeric =
      !digits.empty() && digits.size() <= 2 && digits.find_first_not_of("0123456789") == std::string::npos;
  const int n = numeric ? std::stoi(digits) : 0;
  TORCH_CHECK_VALUE(n >= 1 && n <= 64, "TORCH_EP_LL_REMOTE_PUTS='", mode,
                    "': expected token, fenced, grouped, batched or batchedN with N in 1..64, or block");
  return {n, false};
}

void register_low_latency(pybind11::module_& m) {
  namespace py = pybind11;
  m.attr("has_nvshmem") = ll::built_with_nvshmem();
  m.attr("_ll_no_nvshmem_message") = ll::kNoNvshmemMessage;
  m.def("_ll_check_dispatch_args", &ll::check_dispatch_args, py::arg("x"), py::arg("topk_idx"),
        py::arg("max_tokens_per_rank"), py::arg("num_experts"), py::arg("use_fp8"), py::arg("num_ranks"));
  m.def("_ll_check_combine_args", &ll::check_combine_args, py::arg("x"), py::arg("topk_idx"), py::arg("topk_weights"),
        py::arg("send_slot"), py::arg("layout"), py::arg("out"), py::arg("max_tokens_per_rank"), py::arg("num_experts"),
        py::arg("num_ranks"));
  m.def("_ll_nvshmem_status", &ll::nvshmem_status, "nvshmemx_init_status() (0 without NVSHMEM in the build)");
  m.def("_ll_nvshmem_env_defaults", &ll::nvshmem_env_defaults,
        "defaults NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=1 where NVSHMEM_REMOTE_TRANSPORT is none (before initialising)");
  m.def("_ll_nvshmem_attach", &ll::nvshmem_attach, py::arg("rank"), py::arg("size"),
        py::call_guard<py::gil_scoped_release>());
  m.def("_ll_buffer_fits", &ll::buffer_fits);
  m.def("_ll_reserve_buffer", &ll::reserve_buffer, py::call_guard<py::gil_scoped_release>());
  m.def("_ll_buffer_bytes", &ll::buffer_bytes);
  m.def("_ll_remote_ranks", &ll::remote_ranks,
        "the ranks the group's low-latency kernels reach through NVSHMEM's device API (puts), not by loads");
  m.def("_ll_trace", &ll::trace, py::call_guard<py::gil_scoped_release>(),
        "the low-latency kernels' phase timestamps (TORCH_EP_LL_TRACE=1; tools/ll_profile.py)");
  m.def("_ll_combine_buffer", &ll::combine_buffer_cuda, py::arg("group_name"), py::arg("num_local_experts"),
        py::arg("max_tokens_per_rank"), py::arg("hidden"), py::arg("device"));
  m.def("_ll_parse_remote_puts", [](std::optional<std::string> value) {
    const ll::RemotePuts puts = ll::parse_remote_puts(value ? value->c_str() : nullptr);
    return std::make_tuple(puts.tokens, puts.one_fence, puts.block_signals, puts.automatic);
  }, py::arg("value"), "TORCH_EP_LL_REMOTE_PUTS's parse, for tests: (tokens per put, one fence per token, "
     "signals per block, picked per buffer)");
  m.def("_env_switch", [](const std::string& name, std::optional<std::string> value) {
    return env_switch(name.c_str(), value ? value->c_str() : nullptr);
  }, py::arg("name"), py::arg("value"), "an on/off environment switch's parse (TORCH_EP_WHATIF_COPY_PUTS), for tests");
  m.def("_env_switch_on_by_default", [](const std::string& name) { return env_switch_on_by_default(name.c_str()); },
        py::arg("name"),
        "a switch that is on unless set to 0, read from the environment (TORCH_EP_DIRECT_GPU_SCOPE), for tests");
  m.def("_ll_check_errors", [](const std::string& group_name) { ll::check_errors(group_name, "low-latency ops"); });
}

}  // namespace ep
