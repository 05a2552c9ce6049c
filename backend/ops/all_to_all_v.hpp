// all_to_all_v's CUDA path (backend/ops/cuda/all_to_all_v_cuda.cpp): the split sizes stay on the
// device (backend/kernels/all_to_all_v.cuh). The op itself is registered in all_to_all_v_ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "backend/common/phases.hpp"

struct CUstream_st;  // cudaStream_t, without CUDA's headers (this one is built without CUDA too)

namespace ep {

class CudaTransport;
class ProcessGroupEP;
class StreamMark;
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

// A group's comm pool (backend/transport/cuda/comm_pool.hpp) as one call sees it.
struct CommPoolCall {
  char* const* arenas;    // [R]: rank r's arena as mapped here
  int64_t output_offset;  // this rank's output: its byte offset in its arena; -2: empty; -1: outside
};

struct AllToAllSingleCall {
  int64_t call_id;
  std::shared_ptr<StreamMark> end;  // its kernels' end on the stream; null inside a graph capture
};
// all_to_all_single on the same kernels, queued on `stream` (after the group's previous call,
// whatever stream that ran on): byte counts known on the host go in the kernel's parameters, and
// the device checks each receiver's recv_bytes against what its senders send (a disagreement
// moves nothing on any rank; it raises at the next call, or where take_all_to_all_single_report
// hands it to the call's Work). Throws CommError where the transport failed (the caller raises it
// through the group's fault log). `pool` (a group with a comm pool, every call of it): the plan
// chooses one copy when every rank's output that receives bytes lies in its arena, else the
// staged move. `phase`: the caller's, which this call moves on through its own phases.
AllToAllSingleCall all_to_all_single_cuda(AllToAllVState& state, int rank, const char* input, char* output,
                                          const std::vector<size_t>& send_bytes,
                                          const std::vector<size_t>& recv_bytes, CUstream_st* stream,
                                          const CommPoolCall* pool, Phases& phase);
// Whether the last call of a group with a comm pool moved its bytes with one copy (waits for the
// device: for tests).
bool last_call_one_copy(AllToAllVState& state);
// The error the call `call_id` reported, taken, or "".
std::string take_all_to_all_single_report(AllToAllVState& state, int64_t call_id, int rank);
std::shared_ptr<CudaTransport> shared_transport_of(AllToAllVState& state);

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
