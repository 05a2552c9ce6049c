// Sizes, offsets and error codes of the low-latency kernels (backend/kernels/low_latency.cuh),
// shared by host code that needs no CUDA headers (argument checks, buffer sizes).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EP_LL_HOST_DEVICE __host__ __device__
#else
#define EP_LL_HOST_DEVICE
#endif

namespace ep::kernels::ll {

constexpr int kThreads = 512;         // threads per block of every low-latency kernel
constexpr int kMaxRanks = 64;          // ranks of one low-latency group
constexpr int kChannelsPerScale = 128;  // fp8: one float32 scale per 128 channels
constexpr int kHiddenMultiple = 128;   // the hidden size must be a multiple of this

// Kernel error codes written to the host-mapped error word: kind * 65536 + peer + 1.
enum ErrorKind : int {
  kDispatchSendTimeout = 1,  // waiting for a receiver's credit
  kDispatchRecvTimeout = 2,  // waiting for a sender's flag
  kCombineSendTimeout = 3,
  kCombineRecvTimeout = 4,
  kDispatchOverflow = 5,     // more than max_tokens messages from one rank to one expert
  kBadExpert = 6,            // a topk_idx entry outside [-1, num_experts)
  kNoPeerMapping = 7,        // nvshmem_ptr gave no address for a peer
};
inline int error_kind(int code) { return code >> 16; }
inline int error_peer(int code) { return (code & 0xffff) - 1; }

// Byte offsets inside one half of the symmetric buffer.
struct LowLatencyLayout {
  int64_t num_ranks = 0, num_local_experts = 0, max_tokens = 0, max_topk = 0, max_hidden = 0;

  static LowLatencyLayout of(int64_t num_ranks, int64_t num_local_experts, int64_t max_tokens, int64_t max_topk,
                             int64_t max_hidden) {
    LowLatencyLayout l;
    l.num_ranks = num_ranks;
    l.num_local_experts = num_local_experts;
    l.max_tokens = max_tokens;
    l.max_topk = max_topk;
    l.max_hidden = max_hidden;
    return l;
  }

  EP_LL_HOST_DEVICE static int64_t align(int64_t n) { return (n + 127) / 128 * 128; }
  // One dispatch message (header + the larger of the bf16 and fp8 payloads), 16-byte aligned.
  EP_LL_HOST_DEVICE static int64_t message_bytes(int64_t hidden, bool fp8) {
    const int64_t payload = fp8 ? hidden + hidden / kChannelsPerScale * 4 : hidden * 2;
    return (16 + payload + 15) / 16 * 16;
  }
  EP_LL_HOST_DEVICE int64_t max_message_bytes() const { return message_bytes(max_hidden, false); }
  EP_LL_HOST_DEVICE int64_t dispatch_region() const { return 0; }
  EP_LL_HOST_DEVICE int64_t dispatch_flags() const {
    return align(dispatch_region() + num_local_experts * num_ranks * max_tokens * max_message_bytes());
  }
  EP_LL_HOST_DEVICE int64_t combine_region() const { return align(dispatch_flags() + num_local_experts * num_ranks * 8); }
  // The combine region holds this rank's expert outputs, [E_local][R][max_tokens] rows of H bf16
  // (a call's own sizes, packed: the layout of low_latency_combine's x), which peers pull.
  EP_LL_HOST_DEVICE int64_t combine_region_bytes() const { return num_local_experts * num_ranks * max_tokens * max_hidden * 2; }
  EP_LL_HOST_DEVICE int64_t combine_flags() const { return align(combine_region() + combine_region_bytes()); }
  EP_LL_HOST_DEVICE int64_t dispatch_credits() const { return align(combine_flags() + num_ranks * 8); }
  EP_LL_HOST_DEVICE int64_t combine_credits() const { return align(dispatch_credits() + num_ranks * 8); }
  EP_LL_HOST_DEVICE int64_t counters() const { return align(combine_credits() + num_ranks * 8); }
  EP_LL_HOST_DEVICE int64_t half_bytes() const { return align(counters() + 4 * 4); }
  EP_LL_HOST_DEVICE int64_t total_bytes() const { return 2 * half_bytes(); }
};

// Grid counters of one half (LowLatencyLayout::counters), one per kernel.
enum Counter : int { kDispatchSendCounter = 0, kDispatchRecvCounter = 1, kCombineSendCounter = 2, kCombineRecvCounter = 3 };

// Phase trace (TORCH_EP_LL_TRACE=1, tools/ll_trace.py): thread 0 of each block writes the
// global timer (ns) at up to kTracePoints points of each kernel, at
// trace[(kernel * kTraceBlocks + block) * kTracePoints + point]; kernel is the Counter.
constexpr int kTraceBlocks = 256;
constexpr int kTracePoints = 8;
constexpr int64_t kTraceWords = 4 * kTraceBlocks * kTracePoints;

}  // namespace ep::kernels::ll
