// all_to_all_v: an all_to_all of rows whose split sizes are a tensor (torch_ep.all_to_all_v).
//
//   ep::all_to_all_v(input, input_splits, group_name) -> (output, output_splits, output_offsets)
//       allocates output with exactly the rows that arrive
//   ep::all_to_all_v_into(input, input_splits, output!, group_name, allow_extra_rows=False)
//       -> (output_splits, output_offsets): fills the first rows of a given output (capacity M)
//
// Rows from rank s land at output[output_offsets[s] : output_offsets[s] + output_splits[s]],
// the offsets being the exclusive cumulative sum of output_splits (rank order, from row 0).
//
// How a call runs on the host path:
//   1. records: every rank sends every peer the same record, [capacity, status, splits[R]]
//      (capacity -1: the op allocates), over the group's host channel. So every rank learns
//      the whole split matrix and every capacity, and all ranks agree on what moves:
//        - a rank whose input_splits are invalid (negative, or not summing to its rows) makes
//          every rank raise, before any data moves;
//        - a rank that would receive more rows than its output holds receives none: its
//          senders send it nothing, it raises naming output, its capacity and the rows that
//          arrived, and the group stays in step.
//   2. data: the list form of all_to_all over views of input and output, on the group's own
//      transport (shared memory, or the CUDA transport on the comm stream, which the caller's
//      stream then waits for).
// That is the CPU path, and CUDA's by default and where the kernels cannot reach every rank
// (ranks on several hosts, or more than kMaxRanksPerNode): there step 1 first reads input_splits
// on the host, and a CUDA graph capture raises. With Options.all_to_all_v_device (the default)
// and elsewhere on CUDA the splits never leave the device
// (backend/ops/cuda/all_to_all_v_cuda.cpp, backend/kernels/all_to_all_v.cuh): the same
// agreement runs in a kernel, and what only it can see raises later (torch_ep.check_errors, or
// the next call once queued).
#include <c10/core/DeviceGuard.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include "backend/ops/all_to_all_v.hpp"
#include "backend/ops/moe_ops.hpp"  // resolve_group
#include "backend/process_group/process_group_ep.hpp"

#ifdef TORCH_EP_WITH_CUDA
#include <cuda_runtime.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace ep::a2av {
namespace {

using at::Tensor;

constexpr const char* kOp = "all_to_all_v";
constexpr int64_t kAllocate = -1;  // capacity of a call that allocates its output

// What each rank sends every peer: [capacity, status, splits[R]] (int64).
enum Field : int64_t { kCapacity = 0, kStatus = 1, kSplits = 2 };
enum Status : int64_t { kOk = 0, kBadSplits = 1 };

std::string join(const std::vector<int64_t>& v) {
  std::ostringstream s;
  s << "[";
  for (size_t i = 0; i < v.size(); ++i) s << (i ? ", " : "") << v[i];
  s << "]";
  return s.str();
}

// Checks what the calling rank can check alone: raises before any communication.
void check_args(const Tensor& input, const Tensor& input_splits, const std::optional<Tensor>& output, int64_t R) {
  TORCH_CHECK_VALUE(input.dim() >= 1, kOp, ": input must have at least one dimension ([N, *], rows along dim 0), "
                    "got a 0-d tensor");
  TORCH_CHECK_VALUE(input.device().is_cpu() || input.device().is_cuda(), kOp,
                    ": input must be a CPU or CUDA tensor, got ", input.device());
  TORCH_CHECK_VALUE(!input.is_sparse(), kOp, ": input is sparse, which is not supported");
  TORCH_CHECK_TYPE(input_splits.scalar_type() == at::kLong, kOp,
                   ": input_splits must be an int64 tensor (rows for each rank), got ", input_splits.scalar_type());
  TORCH_CHECK_VALUE(input_splits.dim() == 1 && input_splits.size(0) == R, kOp, ": input_splits must have shape [",
                    R, "] (one count per rank of the group), got ", input_splits.sizes());
  TORCH_CHECK_VALUE(input_splits.device() == input.device(), kOp, ": input_splits is on ", input_splits.device(),
                    " but input is on ", input.device(), "; input_splits must be on input's device");
  if (!output) return;
  TORCH_CHECK_VALUE(output->device() == input.device(), kOp, ": output is on ", output->device(), " but input is on ",
                    input.device(), "; both must be on one device");
  TORCH_CHECK_TYPE(output->scalar_type() == input.scalar_type(), kOp, ": output has dtype ", output->scalar_type(),
                   " but input has dtype ", input.scalar_type(), "; they must match");
  if (output->dim() != input.dim() || output->sizes().slice(1) != input.sizes().slice(1)) {
    std::string rows = "[M";
    for (int64_t d = 1; d < input.dim(); ++d) rows += ", " + std::to_string(input.size(d));
    TORCH_CHECK_VALUE(false, kOp, ": output must have shape ", rows, "] (rows shaped like input's), got ",
                      output->sizes());
  }
  TORCH_CHECK_VALUE(!output->is_sparse(), kOp, ": output is sparse, which is not supported");
}

// The splits on the host (on CUDA: a copy, which waits for the caller's stream).
std::vector<int64_t> host_splits(const Tensor& input_splits) {
#ifdef TORCH_EP_WITH_CUDA
  if (input_splits.is_cuda()) {
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    cudaStreamIsCapturing(c10::cuda::getCurrentCUDAStream(input_splits.device().index()).stream(), &capture);
    TORCH_CHECK(capture == cudaStreamCaptureStatusNone, kOp, ": input_splits are read on the host here, which a "
                "CUDA graph capture cannot do; the device path (Options.all_to_all_v_device, on by default for "
                "ranks of one host, at most 32) keeps them on the device");
  }
#endif
  const Tensor s = input_splits.to(at::kCPU).contiguous();
  return std::vector<int64_t>(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + s.numel());
}

// Who sends whom how many rows, agreed by every rank (step 1 above).
struct Plan {
  std::vector<int64_t> send;   // rows this rank sends each rank (0 to a rank that overflows)
  std::vector<int64_t> recv;   // rows this rank receives from each rank (all 0 if it overflows)
  std::vector<int64_t> arrived;  // rows each rank sent this rank, whether or not they fit
  int64_t total_arrived = 0;
  bool overflow = false;       // more rows arrived than this rank's output holds
};

Plan agree(ProcessGroupEP& group, const std::vector<int64_t>& splits, int64_t rows, int64_t capacity,
           bool allow_extra_rows) {
  const int64_t R = group.getSize(), me = group.getRank();
  // The data-dependent checks: reported through the exchange, so that every rank raises.
  std::string bad;
  int64_t sum = 0;
  for (int64_t d = 0; d < R && bad.empty(); ++d) {
    if (splits[d] < 0) bad = "input_splits[" + std::to_string(d) + "] is " + std::to_string(splits[d]) +
                             ", expected a count >= 0";
    sum += splits[d];
  }
  if (bad.empty() && (allow_extra_rows ? sum > rows : sum != rows))
    bad = "input_splits " + join(splits) + " sum to " + std::to_string(sum) + " but input has " +
          std::to_string(rows) + " rows (dim 0)";

  const size_t width = size_t(kSplits + R);
  std::vector<int64_t> record(width);
  record[kCapacity] = capacity;
  record[kStatus] = bad.empty() ? kOk : kBadSplits;
  std::copy(splits.begin(), splits.end(), record.begin() + kSplits);
  std::vector<int64_t> theirs(width * R);
  std::vector<SendBuffer> sends(R);
  std::vector<RecvBuffer> recvs(R);
  for (int64_t p = 0; p < R; ++p) {
    sends[p] = {record.data(), width * sizeof(int64_t)};
    recvs[p] = {theirs.data() + p * width, width * sizeof(int64_t)};
  }
  group.host_exchange(sends, recvs, kOp);
  auto field = [&](int64_t rank, int64_t f) { return theirs[rank * width + f]; };

  TORCH_CHECK_VALUE(bad.empty(), kOp, ": rank ", me, ": ", bad, "; no data moved");
  for (int64_t s = 0; s < R; ++s)
    TORCH_CHECK_VALUE(field(s, kStatus) == kOk, kOp, ": rank ", s, " passed invalid input_splits (its own error "
                      "says how); no data moved on any rank");

  Plan plan;
  plan.send.assign(R, 0);
  plan.recv.assign(R, 0);
  plan.arrived.assign(R, 0);
  for (int64_t d = 0; d < R; ++d) {
    int64_t total = 0;
    for (int64_t s = 0; s < R; ++s) total += field(s, kSplits + d);
    const bool overflows = field(d, kCapacity) != kAllocate && total > field(d, kCapacity);
    plan.send[d] = overflows ? 0 : splits[d];
    if (d == me) plan.overflow = overflows;
  }
  for (int64_t s = 0; s < R; ++s) {
    plan.arrived[s] = field(s, kSplits + me);
    plan.total_arrived += plan.arrived[s];
    plan.recv[s] = plan.overflow ? 0 : plan.arrived[s];
  }
  return plan;
}

// Step 2: the rows, on the group's transport, as the list form of all_to_all over views of
// input and output (rows bound for a rank that overflows stay where they are); the caller's
// stream (or thread) waits for them.
void move_rows(ProcessGroupEP& group, const Tensor& input, const std::vector<int64_t>& splits, const Tensor& output,
               const Plan& plan) {
  const int64_t R = group.getSize();
  std::vector<Tensor> inputs(R), outputs(R);
  int64_t in_at = 0, out_at = 0;
  for (int64_t p = 0; p < R; ++p) {
    inputs[p] = input.narrow(0, in_at, plan.send[p]);
    in_at += splits[p];
    outputs[p] = output.narrow(0, out_at, plan.recv[p]);
    out_at += plan.recv[p];
  }
  c10d::AllToAllOptions opts;
  c10::intrusive_ptr<c10d::Work> work = group.alltoall(outputs, inputs, opts);
  std::optional<pybind11::gil_scoped_release> no_gil;  // CPU: peers may take a while
  if (Py_IsInitialized() && PyGILState_Check()) no_gil.emplace();
  work->wait();
}

Tensor exclusive_cumsum(const std::vector<int64_t>& v) {
  std::vector<int64_t> out(v.size(), 0);
  for (size_t i = 1; i < v.size(); ++i) out[i] = out[i - 1] + v[i - 1];
  return at::tensor(out, at::kLong);
}

// Runs a call into `output` (allocated by the caller or by all_to_all_v); returns the splits and
// offsets on the host.
std::pair<Tensor, Tensor> run(ProcessGroupEP& group, const Tensor& input, const Tensor& input_splits,
                              const std::optional<Tensor>& given, Tensor* allocated, bool allow_extra_rows) {
#ifdef TORCH_EP_WITH_CUDA
  // The device path (Options.all_to_all_v_device, on by default): the splits stay on the device
  // where the kernels reach every rank.
  if (input.is_cuda() && group.config().all_to_all_v_device)
    if (std::shared_ptr<AllToAllVState> state = group.all_to_all_v_state(input.device(), kOp))
      return all_to_all_v_cuda(group, *state, input, input_splits, given, allocated, allow_extra_rows);
#endif
  const c10::DeviceGuard guard(input.device());
  const std::vector<int64_t> splits = host_splits(input_splits);
  const int64_t capacity = given ? given->size(0) : kAllocate;
  const Plan plan = agree(group, splits, input.size(0), capacity, allow_extra_rows);
  Tensor output;
  if (given) {
    output = *given;
  } else {
    std::vector<int64_t> shape = input.sizes().vec();
    shape[0] = plan.total_arrived;
    output = *allocated = at::empty(shape, input.options());
  }
  move_rows(group, input, splits, output, plan);  // a rank that overflows still sends its rows
  TORCH_CHECK(!plan.overflow, kOp, ": rank ", group.getRank(), ": output has room for ", capacity,
              " rows (its capacity, dim 0) but ", plan.total_arrived, " rows arrived (from each rank: ",
              join(plan.arrived), "); nothing was written to output. Give an output of at least ",
              plan.total_arrived, " rows, or none (output=None allocates it)");
  return {at::tensor(plan.arrived, at::kLong).to(input.device()), exclusive_cumsum(plan.arrived).to(input.device())};
}

std::tuple<Tensor, Tensor, Tensor> all_to_all_v(const Tensor& input, const Tensor& input_splits,
                                                c10::string_view group_name) {
  ProcessGroupEP& group = moe::resolve_group(std::string(group_name), input.device(), kOp);
  check_args(input, input_splits, std::nullopt, group.getSize());
  Tensor output;
  auto [splits, offsets] = run(group, input, input_splits, std::nullopt, &output, /*allow_extra_rows=*/false);
  return {output, splits, offsets};
}

std::tuple<Tensor, Tensor> all_to_all_v_into(const Tensor& input, const Tensor& input_splits, Tensor& output,
                                             c10::string_view group_name, bool allow_extra_rows) {
  ProcessGroupEP& group = moe::resolve_group(std::string(group_name), input.device(), kOp);
  check_args(input, input_splits, output, group.getSize());
  auto [splits, offsets] = run(group, input, input_splits, output, nullptr, allow_extra_rows);
  return {splits, offsets};
}

}  // namespace
}  // namespace ep::a2av

namespace ep {

TORCH_LIBRARY_FRAGMENT(ep, m) {
  m.def("all_to_all_v(Tensor input, Tensor input_splits, str group_name) -> "
        "(Tensor output, Tensor output_splits, Tensor output_offsets)");
  // allow_extra_rows: input may hold rows past the splits' sum, which stay (autograd's backward
  // sends a gradient of a given output's whole capacity).
  m.def("all_to_all_v_into(Tensor input, Tensor input_splits, Tensor(a!) output, str group_name, "
        "bool allow_extra_rows=False) -> (Tensor output_splits, Tensor output_offsets)");
}

TORCH_LIBRARY_IMPL(ep, CPU, m) {
  m.impl("all_to_all_v", a2av::all_to_all_v);
  m.impl("all_to_all_v_into", a2av::all_to_all_v_into);
}

TORCH_LIBRARY_IMPL(ep, CUDA, m) {
  m.impl("all_to_all_v", a2av::all_to_all_v);
  m.impl("all_to_all_v_into", a2av::all_to_all_v_into);
}

}  // namespace ep
