// all_to_all_v's CUDA path (backend/ops/cuda/all_to_all_v_cuda.cpp): the split sizes stay on the
// device (backend/kernels/all_to_all_v.cuh). The op itself is registered in all_to_all_v_ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>

namespace ep {

class CudaTransport;
class ProcessGroupEP;
class Rendezvous;
struct Config;

// A group's state for all_to_all_v on CUDA: registered blocks every rank maps (records, flags,
// staging) and a flags-only CudaTransport for the watchdog and the errors that stop the group.
class AllToAllVState;

// Collective over the ranks of `rdv` (every rank on one host, at most kMaxRanksPerNode).
std::shared_ptr<AllToAllVState> create_all_to_all_v_state(Rendezvous& rdv, const Config& config, int device,
                                                          const std::string& tag);
CudaTransport& transport_of(AllToAllVState& state);
// The group's abort(): the kernels' waits in flight give up, and later calls raise `why`.
void abort_all_to_all_v(AllToAllVState& state, const std::string& why);
int device_of(const AllToAllVState& state);

// Raises (on this rank) what the kernels of earlier calls reported and no call raised yet: an
// output too small, invalid splits on some rank, ranks whose rows differ in size.
void check_all_to_all_v_reports(AllToAllVState& state, int rank, const char* op);

// One call on the caller's stream. With `given` there is no host synchronisation: problems the
// kernels find raise at the next call, once that one is queued (or at check_all_to_all_v_reports).
// Without, the output is allocated once the sizes are known (one wait), into *allocated, and
// they raise at the call.
// Returns output_splits and output_offsets, on the device.
std::pair<at::Tensor, at::Tensor> all_to_all_v_cuda(ProcessGroupEP& group, AllToAllVState& state,
                                                    const at::Tensor& input, const at::Tensor& input_splits,
                                                    const std::optional<at::Tensor>& given, at::Tensor* allocated,
                                                    bool allow_extra_rows);

}  // namespace ep
