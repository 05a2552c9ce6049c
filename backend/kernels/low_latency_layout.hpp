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
  kDispatchSendTimeout = 1,  // waiting for the receivers of the call before last to be done reading
  kDispatchRecvTimeout = 2,  // waiting for a sender's tokens
  kCombineSendTimeout = 3,
  kCombineRecvTimeout = 4,
  kDispatchOverflow = 5,     // more than max_tokens pairs from one rank to one expert
  kBadExpert = 6,            // a topk_idx entry outside [-1, num_experts)
  kAborted = 7,              // the host aborted the group (LowLatencyBuffer::abort; peer: this rank)
};
EP_LL_HOST_DEVICE inline int error_kind(int code) { return code >> 16; }
EP_LL_HOST_DEVICE inline int error_peer(int code) { return (code & 0xffff) - 1; }
// A call's own problem, which the host raises once and clears (the group stays usable), as
// opposed to a timeout or an abort, after which every call raises. They go to words of their own
// (GroupArgs::pending, GroupArgs::error), so that clearing the one never loses the other.
EP_LL_HOST_DEVICE inline bool pending_report(int code) {
  return error_kind(code) == kDispatchOverflow || error_kind(code) == kBadExpert;
}

// Byte offsets inside one half of the symmetric buffer (the protocol: low_latency.cuh).
struct LowLatencyLayout {
  int64_t num_ranks = 0, num_local_experts = 0, max_tokens = 0, max_hidden = 0;
  int64_t remote = 0;  // 1: the regions remote peers push into (groups that span nodes)

  static LowLatencyLayout of(int64_t num_ranks, int64_t num_local_experts, int64_t max_tokens, int64_t max_hidden,
                             bool remote = false) {
    return LowLatencyLayout{num_ranks, num_local_experts, max_tokens, max_hidden, remote ? 1 : 0};
  }

  EP_LL_HOST_DEVICE static int64_t align(int64_t n) { return (n + 127) / 128 * 128; }
  // One token as the dispatch sends it (fp8: H bytes then H/128 float32 scales; bf16: 2H
  // bytes), 16-byte aligned.
  EP_LL_HOST_DEVICE static int64_t token_bytes(int64_t hidden, bool fp8) {
    const int64_t payload = fp8 ? hidden + hidden / kChannelsPerScale * 4 : hidden * 2;
    return (payload + 15) / 16 * 16;
  }
  EP_LL_HOST_DEVICE int64_t num_experts() const { return num_local_experts * num_ranks; }
  // This rank's tokens, cast once: [max_tokens] of token_bytes (bf16 is the larger).
  EP_LL_HOST_DEVICE int64_t dispatch_tokens() const { return 0; }
  // Per expert of the whole group, the pairs q = t*K + k this rank sends it, in pair order:
  // [num_experts][max_tokens] int32; then how many, [num_experts] int32.
  EP_LL_HOST_DEVICE int64_t dispatch_lists() const {
    return align(dispatch_tokens() + max_tokens * token_bytes(max_hidden, false));
  }
  EP_LL_HOST_DEVICE int64_t dispatch_counts() const { return align(dispatch_lists() + num_experts() * max_tokens * 4); }
  // Completion words (uint64 [R], one per peer): "rank r's tokens are out" (set by r, read here).
  EP_LL_HOST_DEVICE int64_t dispatch_flags() const { return align(dispatch_counts() + num_experts() * 4); }
  // The combine region holds this rank's expert outputs, [E_local][R * max_tokens] rows of H bf16
  // (a call's own sizes: the layout of low_latency_combine's x, rows packed by source rank as in
  // dispatch's recv_x), which peers pull.
  EP_LL_HOST_DEVICE int64_t combine_region() const { return align(dispatch_flags() + num_ranks * 8); }
  EP_LL_HOST_DEVICE int64_t combine_region_bytes() const { return num_local_experts * num_ranks * max_tokens * max_hidden * 2; }
  // "rank r's expert outputs are in its combine region" (set by r, read here).
  EP_LL_HOST_DEVICE int64_t combine_flags() const { return align(combine_region() + combine_region_bytes()); }
  // "rank r is done reading this half's tokens / combine region" (set by r, read here).
  EP_LL_HOST_DEVICE int64_t dispatch_credits() const { return align(combine_flags() + num_ranks * 8); }
  EP_LL_HOST_DEVICE int64_t combine_credits() const { return align(dispatch_credits() + num_ranks * 8); }
  EP_LL_HOST_DEVICE int64_t counters() const { return align(combine_credits() + num_ranks * 8); }
  // Where rank r's rows for local expert le start in this rank's combine region (packed, as
  // dispatch's recv_x): [E_local][R] int32, published by combine send for the readers.
  EP_LL_HOST_DEVICE int64_t combine_offsets() const { return align(counters() + 4 * 4); }
  // Where remote peers (another node: no load or store reaches them, only NVSHMEM's device API)
  // push what local peers would read in place. Empty unless `remote`.
  // Dispatch tokens from remote senders: [R][max_tokens] tokens of a call's token_bytes, rank r's
  // token t at [r][t] (those of r's tokens that have a pair for one of this rank's experts).
  EP_LL_HOST_DEVICE int64_t remote_tokens() const { return align(combine_offsets() + num_experts() * 4); }
  EP_LL_HOST_DEVICE int64_t remote_tokens_bytes() const {
    return remote * num_ranks * max_tokens * token_bytes(max_hidden, false);
  }
  // Their lists and counts for this rank's experts: [R][E_local][max_tokens] int32 pairs q = t*K + k;
  // [R][E_local] int32.
  EP_LL_HOST_DEVICE int64_t remote_lists() const { return align(remote_tokens() + remote_tokens_bytes()); }
  EP_LL_HOST_DEVICE int64_t remote_counts() const {
    return align(remote_lists() + remote * num_ranks * num_local_experts * max_tokens * 4);
  }
  // Combine rows from remote owners: [E][max_tokens] rows of H bf16, row (e, slot) answering this
  // rank's pair with send_slot `slot` for expert e.
  EP_LL_HOST_DEVICE int64_t remote_rows() const { return align(remote_counts() + remote * num_ranks * num_local_experts * 4); }
  EP_LL_HOST_DEVICE int64_t remote_rows_bytes() const { return remote * num_experts() * max_tokens * max_hidden * 2; }
  // Per rank, how many of its experts this rank's dispatch send has numbered so far ([R] uint32,
  // groups across nodes only; this rank's own, back to zero by the end of the send that raised it).
  EP_LL_HOST_DEVICE int64_t owner_arrivals() const { return align(remote_rows() + remote_rows_bytes()); }
  EP_LL_HOST_DEVICE int64_t half_bytes() const { return align(owner_arrivals() + remote * num_ranks * 4); }
  EP_LL_HOST_DEVICE int64_t total_bytes() const { return 2 * half_bytes(); }
};

// A completion word is complete when its two halves are equal and nonzero: each of the n writes
// adds 1, and one of them also adds n << 32, whatever the order they land in. A write is a
// block's arrival (local peers), or one NVSHMEM put-with-signal (the data a remote peer pushes:
// the word completes once all of it has landed). Initially the credits are complete ("nothing
// to protect yet") and the flags zero.
constexpr uint64_t kCompleteWord = (uint64_t(1) << 32) | 1;

// Grid counters of one half (LowLatencyLayout::counters), one per kernel: the blocks that have
// passed the kernel's wait, so that the last one can reset the words waited on.
enum Counter : int { kDispatchSendCounter = 0, kDispatchRecvCounter = 1, kCombineSendCounter = 2, kCombineRecvCounter = 3 };

// Phase trace (TORCH_EP_LL_TRACE=1, tools/ll_profile.py): thread 0 of each block writes the
// global timer (ns) at up to kTracePoints points of each kernel, at
// trace[(kernel * kTraceBlocks + block) * kTracePoints + point]; kernel is the Counter.
constexpr int kTraceBlocks = 256;
constexpr int kTracePoints = 8;
constexpr int64_t kTraceWords = 4 * kTraceBlocks * kTracePoints;

}  // namespace ep::kernels::ll
