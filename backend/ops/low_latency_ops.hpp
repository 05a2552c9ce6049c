// The low-latency MoE ops (namespace ep, registered as a TORCH_LIBRARY_FRAGMENT beside the
// MoE ops): argument checks shared by the ops and Python, and the CUDA implementations
// (backend/ops/cuda/low_latency_cuda.cpp, built only with NVSHMEM).
//
// ep::low_latency_dispatch(x, topk_idx, max_tokens_per_rank, num_experts, use_fp8, round_scale,
//                          send_only, group_name)
//     -> (recv_x, recv_scales, recv_count, recv_src_info, recv_layout, send_slot, half)
// ep::low_latency_dispatch_recv(recv_x!, recv_scales!, recv_count!, recv_src_info!, recv_layout!,
//                               half, max_tokens_per_rank, num_topk, num_experts, group_name)
// ep::low_latency_combine(x, topk_idx, topk_weights, send_slot, layout, out!, max_tokens_per_rank,
//                         num_experts, send_only, group_name) -> half
// ep::low_latency_combine_recv(topk_idx, send_slot, topk_weights, out!, half, max_tokens_per_rank,
//                              num_experts, group_name)
// With send_only the op launches its send kernel only and returns the buffer half it used;
// the *_recv op (the Python hook) launches the receive kernel into the same outputs.
#pragma once

#include <ATen/ATen.h>

#include <chrono>
#include <string>
#include <vector>

namespace ep::ll {

// What to install when torch_ep was built without NVSHMEM.
extern const char* const kNoNvshmemMessage;
bool built_with_nvshmem();

// TORCH_EP_LL_REMOTE_PUTS's value (null: unset): how a dispatch across nodes puts its tokens
// (DispatchSendParams::remote_put_tokens, remote_one_fence): unset or "" picks per buffer
// (`automatic`: "block" where NVSHMEM reaches every remote peer by P2P, "token" where a NIC does),
// "token" {0, false} (a warp per token, a put with its signal per token and owner), "fenced" {0, true} (the same puts
// without signals, then one fence, then the signals: one fence per token, not per put),
// "grouped" {1, false} (a block per group of tokens, still a put per token and owner), "batched"
// {4, false} or "batchedN" {N, false}, N in 1..64 (a put per run of up to N consecutive tokens);
// anything else raises ValueError naming the variable.
struct RemotePuts {
  int tokens = 0;
  bool one_fence = false;
  bool block_signals = false;  // "block": DispatchSendParams::remote_block_signals
  bool automatic = false;      // unset: block_signals follows LowLatencyBuffer::remote_by_p2p
};
RemotePuts parse_remote_puts(const char* value);

// Checks of every argument (dtype, shape, device, ranges) before anything runs; they raise
// ValueError / TypeError naming the argument.
void check_dispatch_args(const at::Tensor& x, const at::Tensor& topk_idx, int64_t max_tokens_per_rank,
                         int64_t num_experts, bool use_fp8, int64_t num_ranks);
void check_combine_args(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                        const at::Tensor& send_slot, const at::Tensor& layout, const at::Tensor& out,
                        int64_t max_tokens_per_rank, int64_t num_experts, int64_t num_ranks);

struct DispatchOutputs {
  at::Tensor recv_x;         // [E_local, R*max, H] float8_e4m3fn or bf16
  at::Tensor recv_scales;    // [E_local, R*max, H/128] float32 (fp8), else empty
  at::Tensor recv_count;     // [E_local] int32
  at::Tensor recv_src_info;  // [E_local, R*max] int32: t*K + k at the source rank
  at::Tensor recv_layout;    // [E_local, R] int32: rows from each rank
  at::Tensor send_slot;      // [N, K] int32: each (token, slot)'s row among its expert's rows from this rank
  int64_t half = 0;
};

// ---- CUDA implementations (arguments already checked)
DispatchOutputs dispatch_cuda(const at::Tensor& x, const at::Tensor& topk_idx, int64_t max_tokens_per_rank,
                              int64_t num_experts, bool use_fp8, bool round_scale, bool send_only,
                              const std::string& group_name);
void dispatch_recv_cuda(const DispatchOutputs& outputs, int64_t max_tokens_per_rank, int64_t num_topk,
                        int64_t num_experts, const std::string& group_name);
int64_t combine_cuda(const at::Tensor& x, const at::Tensor& topk_idx, const at::Tensor& topk_weights,
                     const at::Tensor& send_slot, const at::Tensor& layout, const at::Tensor& out,
                     int64_t max_tokens_per_rank, int64_t num_experts, bool send_only, const std::string& group_name);
void combine_recv_cuda(const at::Tensor& topk_idx, const at::Tensor& send_slot, const at::Tensor& topk_weights,
                       const at::Tensor& out, int64_t half, int64_t max_tokens_per_rank, int64_t num_experts,
                       const std::string& group_name);
// The combine region of the half the group's next combine uses, as the [E_local, R*max, H] bf16
// tensor its x would be (low_latency_combine_buffer), once its readers are done with it.
at::Tensor combine_buffer_cuda(const std::string& group_name, int64_t num_local_experts, int64_t max_tokens_per_rank,
                               int64_t hidden, const at::Device& device);

// ---- the runtime, for torch_ep/low_latency.py
int nvshmem_status();
void nvshmem_attach(int rank, int size);
void nvshmem_env_defaults();  // nvshmem::default_local_only_env (nothing without NVSHMEM)
// Whether the group's buffer holds these sizes (false before its first reserve). `remote`: with
// the regions remote peers push into (groups that span nodes).
bool buffer_fits(const std::string& group_name, int64_t num_ranks, int64_t num_local_experts, int64_t max_tokens,
                 int64_t hidden, bool remote);
// Collective: allocates or grows the group's symmetric buffer; true when it did (the caller
// then barriers the group before any kernel may write into a peer's new buffer). The kernels
// reach `remote_ranks`, and peers nvshmem_ptr cannot map, through NVSHMEM's device API only.
bool reserve_buffer(const std::string& group_name, int rank, int size, int device, std::chrono::milliseconds timeout,
                    int num_sms, int64_t num_local_experts, int64_t max_tokens, int64_t hidden, bool remote,
                    const std::vector<int>& remote_ranks);
// Symmetric bytes the buffer of these sizes takes.
int64_t buffer_bytes(int64_t num_ranks, int64_t num_local_experts, int64_t max_tokens, int64_t hidden, bool remote);
// The ranks the group's kernels reach through NVSHMEM's device API (empty without a buffer).
std::vector<int> remote_ranks(const std::string& group_name);
// Raises what the group's kernels reported since the last check (no-op without a buffer).
void check_errors(const std::string& group_name, const char* op);
// The kernels' phase timestamps (LowLatencyBuffer::trace); empty unless tracing.
std::vector<uint64_t> trace(const std::string& group_name);

}  // namespace ep::ll
