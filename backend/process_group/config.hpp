// What a user can set on an "ep" group: torch_ep.Options (Python) fills this struct, from its
// arguments or from the TORCH_EP_* environment variables, once, when the group is created.
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdint>

namespace ep {

struct Config {
  std::chrono::milliseconds timeout{std::chrono::minutes(30)};  // every wait, host and device
  bool host_transport = true;           // CPU all_to_all over shared memory (else Gloo)
  size_t host_slot_bytes = 256 << 10;   // shared-memory chunk size
  int host_num_slots = 8;               // chunks in flight per pair of ranks
  bool host_one_copy = true;            // large CPU messages by process_vm_readv where allowed
  size_t cuda_buffer_bytes = 64 << 20;  // registered receive buffer per rank (CUDA)
  size_t comm_pool_bytes = size_t(1) << 30;  // torch_ep.comm_pool's arena per rank (CUDA), reserved by its
                                             // first call on the group
  int num_sms = 0;                      // SM budget of communication kernels; 0 = automatic
  // Per intranode CUDA kernel (dispatch of bf16 or other rows, dispatch of fp8 rows, i.e. with
  // scales, combine), as torch_ep/sm_table.py resolves them for this GPU and group size:
  int auto_sms_dispatch = 0;            // where num_sms is 0: the budget measured
  int auto_sms_dispatch_fp8 = 0;        // (torch_ep/data/sm_table.json); 0 = every SM
  int auto_sms_combine = 0;
  int moe_copy_dispatch = 1;            // how it copies: kernels::MoeCopy (0 warp, 1 unroll, the
  int moe_copy_dispatch_fp8 = 1;        // fallback, 2 bulk; torch_ep.options.MOE_COPIES)
  int moe_copy_combine = 1;
  bool moe_push = false;                // intranode CUDA dispatch pushes rows into outputs it allocates from
                                        // the MoE pool (opt-in until measured; false: each rank pulls)
  size_t moe_pool_bytes = size_t(1) << 30;  // that pool's arena per rank, reserved with the MoE transport
  bool moe_device_records = false;      // with moe_push: every eager dispatch and combine exchanges its
                                        // records through the device (kernels/moe_records.cuh), not the host
  bool moe_one_launch = false;          // with moe_device_records: a dispatch's notify step in its push kernel
  int ranks_per_node = 0;               // override of the node size; 0 = detect
  int launch_local_world_size = 0;      // the launcher's LOCAL_WORLD_SIZE where the group is the launch
  bool blocking_wait = false;           // CUDA Work.wait() blocks the CPU and raises on errors
  bool all_to_all_v_device = true;      // CUDA all_to_all_v keeps its splits on the device (its kernels)
  bool all_to_all_device = false;       // CUDA all_to_all_single on the same kernels: no host control
                                        // exchange, but staged (two copies): opt-in until it has a one-copy path
  // The device protocol's kernels (CUDA all_to_all_v, and all_to_all_single on it); 0 = automatic.
  int all_to_all_lanes = 0;             // staged move: pipelines per pair of ranks (the smallest over the ranks)
  size_t all_to_all_slot_bytes = 0;     // staged move: a staging slot, the largest chunk (the smallest over
                                        // the ranks; automatic: 128 KiB, less where cuda_buffer_bytes is)
  int all_to_all_pool_blocks = 0;       // one-copy move: the blocks that copy (automatic: two per SM of this
                                        // rank's share, less the plan's block, more for large calls: pieces
                                        // of at most 128 KiB)
  size_t all_to_all_kernel_bytes = size_t(8) << 20;  // host protocol: a rank whose largest message has at most
                                        // this many bytes sends with one kernel, else by the copy engines
  size_t all_to_all_pool_piece_bytes = 0;  // one-copy move in pieces taken in turn: a piece (a multiple of
                                        // 64 KiB; 0: 64 KiB, one pass of a block's loads); each rank its own
  bool all_to_all_one_launch = false;   // plan and move in one kernel launch (slower on one H200: two launches)
  size_t all_to_all_eager_bytes = 0;    // all_to_all_single on the device protocol: messages of at most this
                                        // many bytes ride with the plan's records (0: off; the smallest over
                                        // the ranks; a multiple of 16)
  bool force_remote = false;            // low-latency ops reach other nodes' ranks by NVSHMEM puts even
                                        // where they could map them (tests the path across nodes on one)
  bool internode_device = true;         // CUDA dispatch/combine across nodes driven by the device (NVSHMEM
                                        // device API, no host rounds); false: the host-driven route
  bool internode_a2a_device = true;     // CUDA all_to_all across nodes: its NVSHMEM hop in one launch, not
                                        // rounds the host queues (false: the rounds)
  bool internode_node_p2p = true;       // device route: the node hop by stores/loads through mapped peer
                                        // buffers (NVLink); false: NVSHMEM puts/gets inside a node too
  int64_t internode_capacity = 4096;    // device route: most tokens per rank per call (sizes its buffer)
  int64_t internode_row_bytes = 0;      // device route: least row stride its buffer is sized for (0: from
                                        // the first call, at least 16.5 KiB)
  int64_t internode_combine_rows = 0;   // device route: rows (of that stride) of combine_buffer's region
                                        // (0: ranks x internode_capacity, every row a rank can receive)
};

}  // namespace ep
