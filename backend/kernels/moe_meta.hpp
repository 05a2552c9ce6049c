// The routing table of one dispatch ("meta"): one int32 array per rank, on the op's device,
// written by the layout step, never modified afterwards, and kept in the dispatch handle. Kernels on peers read parts of it
// through IPC, so its layout is shared by the CPU code, the CUDA kernels and the host glue.
// Torch-free: plain offsets, usable on host and device.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define EP_HOST_DEVICE __host__ __device__
#else
#define EP_HOST_DEVICE
#endif

namespace ep::kernels {

struct MetaLayout {
  int64_t num_ranks;    // R
  int64_t num_experts;  // E, a multiple of R; rank r owns experts [r*E/R, (r+1)*E/R)
  int64_t num_tokens;   // N, tokens this rank dispatches

  EP_HOST_DEVICE int64_t experts_per_rank() const { return num_experts / num_ranks; }
  // [R] rows this rank sends to each rank: a token goes once to every rank owning one of its experts
  EP_HOST_DEVICE static constexpr int64_t tokens_per_rank() { return 0; }
  // [E] token-expert pairs per global expert (-1 slots excluded)
  EP_HOST_DEVICE int64_t pairs_per_expert() const { return num_ranks; }
  // [R, E/R] tokens sent to rank r that list its local expert e (once per token)
  EP_HOST_DEVICE int64_t tokens_per_rank_expert() const { return num_ranks + num_experts; }
  // [2] smallest and largest expert id seen (clamped to int32), to reject bad input
  EP_HOST_DEVICE int64_t id_range() const { return num_ranks + 2 * num_experts; }
  // What the host copies back after the layout step: everything above.
  EP_HOST_DEVICE int64_t header_size() const { return id_range() + 2; }
  // The header as the layout kernel writes it to the host: the header, then a ready flag per
  // rank r, set once r's part of the header is there.
  EP_HOST_DEVICE int64_t host_header_size() const { return header_size() + num_ranks; }
  // [N, R] row of token t among the rows sent to rank r, or -1 when it does not go there
  EP_HOST_DEVICE int64_t token_pos() const { return header_size(); }
  // [R, N] the tokens sent to rank r, in token order (the first tokens_per_rank[r] are valid)
  EP_HOST_DEVICE int64_t send_tokens() const { return header_size() + num_tokens * num_ranks; }
  EP_HOST_DEVICE int64_t size() const { return header_size() + 2 * num_tokens * num_ranks; }

  // The N a meta array of `size` elements was made for; -1 when it fits no N.
  EP_HOST_DEVICE static int64_t tokens_for_size(int64_t size, int64_t num_ranks, int64_t num_experts) {
    const int64_t rest = size - (num_ranks + 2 * num_experts + 2);
    if (rest < 0 || rest % (2 * num_ranks)) return -1;
    return rest / (2 * num_ranks);
  }
};

}  // namespace ep::kernels
