// Dispatch and combine across nodes, driven by the device (launchers; kernels in
// internode_notify.cu, internode_dispatch.cu, internode_combine.cu). Torch-free: raw pointers and
// one POD parameter struct for the whole family. The route is DeepEP's hierarchical one
// (backend/ops/moe_internode.hpp): source s = (node n, local l) sends a token once to every node
// m owning one of its experts, to its rail peer (m, l), which forwards it to m's owning ranks;
// s packs each token once and puts every other node's rows from that one packed copy; its own
// node's ranks get it from the packed copy in place (no put to itself, no forward), and in
// combine s sums its own node's rows itself. The forward moves no row: the forwarder tells each
// receiver where its rows lie in the forwarder's rail_recv, and the receiver reads them there.
//
// Every access to a rank on another node goes through NVSHMEM's device API (put/get with signal,
// signal ops), also between virtual nodes of one GPU, so the same code runs over IBGDA/IBRC. The
// node hop (ranks of one node: NVLink) stores and loads through the peers' mapped buffers
// (nvshmem_ptr), a chunk's rows announced by one signal, as the intranode route does; where a
// peer is not mapped, or with IxParams::node_p2p off, it too goes through puts and gets.
//
// Symmetric buffer of one group (IxLayout; C = capacity, tokens per rank per call; W = row
// stride in bytes; NN nodes, L ranks per node, R = NN * L). Rows lie a call's stride apart: W in
// a dispatch (so that dispatch_buffer knows where each row's payload goes before the call), the
// row's fields in a combine (its sums go over the rail in chunks of contiguous rows). rail_send's
// node blocks lie C x W bytes apart whatever the stride (block_row), so that a combine's sums
// never reach this node's packed rows; the other regions' blocks lie C rows of the call apart:
//   rail_send  [NN][C] rows   dispatch: [this node][t] is token t packed, once for every node it
//                             goes to (read in place by this node's ranks, put from to the rail
//                             peers); its payload and scales are the zero-copy dispatch input
//                             (dispatch_buffer: the caller writes x there, the pack adds the
//                             rest); combine: [m] the forwarder's sums for node m (m another node)
//   rail_recv  [NN][C] rows   dispatch: what rail peers sent, by source node and rail slot;
//                             combine: the sums per node, at the source
//   stage      [R][C]  rows   combine: rows back, by (sending local rank j, source node m) = j * NN + m
//                             (only their weights where j's rows are read in place: zero copy)
//   combine_in [combine_rows] rows   combine: the zero-copy input (combine_buffer), dense [M, H]:
//                             where a rank's x is this region, its node's ranks read its rows here
//                             through the mapping instead of having them pushed into their stage
//   route_send/route_recv [NN][C][L] int32  combine: each relayed token's row index at every
//                             local rank of the node (the dispatch's forward positions)
//   own_slots  [L][C] int32   dispatch: for own-node rank j, the packed row (token index, in
//                             rail_send[own node]) of each row this rank sends it, in j's row order
//   relay_slots [R][C] int32  dispatch: for another node's source s, the rail_recv slot (at the
//                             forwarder, this node's rank with s's local index) of each row s
//                             sends this rank, in its row order (the forwarder writes them)
//   records    send [R], recv [2][R]   the notify step's per-call records (parity of seq)
//   signals    notify [2][R], chunk [NN][C/B] (combine), route [NN], count [R],
//              row [NN][C] (dispatch: one per rail slot, set by the put of that row),
//              combine_in_done [L] (node rank k: the last call whose reads of this rank's
//              combine_in k has finished), dispatch_in_done [L] (node rank k: the last dispatch
//              whose reads of this rank's packed rows k has finished) (uint64)
//   ctrl       this rank's device state of the call (IxCtrl)
// Calls are numbered on the device (ctrl.seq, the same on every rank since every call is
// collective): notify, chunk and row signals are SET to seq and waited for with >= seq, counters
// are reset by the notify step before this rank's record goes out (no peer adds to them before
// it has that record), so nothing is reset by the host and a CUDA graph replays.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "backend/kernels/moe_meta.hpp"  // EP_HOST_DEVICE

namespace ep::kernels::ix {

constexpr int kMaxRanks = 128;           // group size
constexpr int kMaxLocal = 8;             // ranks per node
constexpr int kMaxLocalExperts = 1024;   // experts per rank
constexpr int kChunkRows = 16;           // rows per rail put: one per warp of a block
constexpr int kThreads = 512;            // a block of the kernels
constexpr int kPutThreads = 1024;        // the dispatch send kernel's block where it only puts

enum Op : int32_t { kDispatch = 1, kCombine = 2 };
// Record status: why a rank refuses the call (every rank then refuses alike).
enum Status : int32_t {
  kOk = 0, kOverCapacity = 1, kBadExpertIds = 2, kRowTooWide = 3, kBadHandle = 4,
  kOverflowed = 5,  // an earlier dispatch (num_worst_tokens) on this rank received more rows than it holds
  kRefusedBefore = 6,  // rank `detail` refused an earlier call that no host waited for (this rank's kRejected)
};
// Error word (host-mapped): kind * 65536 + peer + 1, the first one wins, except that a timeout
// replaces a pending kRejected or kOverflow (the host clears those at its next call).
enum ErrorKind : int {
  kNotifyTimeout = 1,   // a rank's record never came
  kForwardTimeout = 2,  // the rail peer's chunk never came (peer: that source)
  kReceiveTimeout = 3,  // a forwarder's rows never came (peer: the forwarder)
  kReduceTimeout = 4,   // combine: a local rank's rows or a source's routes never came
  kCombineTimeout = 5,  // combine: a node's sums never came (peer: its forwarder)
  kRejected = 6,        // a call no host waited for was refused by rank `peer` (its status)
  kOverflow = 7,        // a dispatch received more rows than num_worst_tokens (peer: this rank)
  kCombineInTimeout = 8,  // combine_buffer: node rank `peer` never finished reading this rank's combine_in
  kDispatchInTimeout = 9,  // dispatch_buffer: node rank `peer` never finished reading this rank's packed rows
  kAborted = 10,           // the host aborted the group (InternodeBuffer::abort; peer: this rank)
};
EP_HOST_DEVICE inline int error_kind(int code) { return code / 65536; }
EP_HOST_DEVICE inline int error_peer(int code) { return code % 65536 - 1; }
// Whether `code` is one the host clears when its next call refuses with it
// (InternodeBuffer::take_pending): a refusal no host waited for, or an overflow. The other kinds
// are timeouts, which the host raises for good.
EP_HOST_DEVICE inline bool pending_refusal(int code) {
  return error_kind(code) == kRejected || error_kind(code) == kOverflow;
}

// What every rank tells every peer at the start of a call (the fields check_records compares).
struct IxRecordHeader {
  int32_t op;
  int32_t status;
  int64_t call_id;     // dispatch: the group's dispatch number; combine: the handle's
  int64_t handle_id;   // dispatch along a handle: the handle's dispatch; else 0
  int64_t num_experts;
  int64_t hidden;
  int64_t dtype;
  int64_t num_topk;
  int64_t has_scales;
  int64_t has_weights;
  int64_t num_tokens;  // N
  int64_t detail;      // with status: the value refused (N, or the row bytes)
  int32_t id_min, id_max;  // expert ids seen (dispatch without handle)
  int32_t rows;        // tokens I send to you
  int32_t relay_rows;  // tokens I send to your node through you (you are my rail peer there)
  int32_t zero_copy;   // combine: my x is my combine_in region (my node's ranks may read it in place)
  int32_t maps_node;   // combine: I map every rank of my node (node_p2p): I can read their combine_in
  int32_t worst_rows;  // combine: my x has num_worst_tokens rows (num_tokens), which may be fewer than I
                       // received (an overflowing dispatch): my rows past them count as not sent
  int32_t pad;
};
struct IxRecord : IxRecordHeader {
  int32_t rows_per_expert[kMaxLocalExperts];  // dispatch without handle: per expert of yours
};
constexpr int64_t kRecordHeaderBytes = int64_t(sizeof(IxRecordHeader));
static_assert(kRecordHeaderBytes % 8 == 0, "records are copied in 8-byte words");

// What the notify step leaves in host-mapped memory; the host reads it after `ticket` shows.
struct IxHostCtrl {
  volatile int64_t ticket;  // the call's ticket, written last
  int32_t ok;               // every record fine and consistent
  int32_t timed_out;
  int64_t total_recv;                       // rows this rank receives
  int32_t recv[kMaxRanks];                  // rows from each source
  int32_t send[kMaxRanks];                  // rows to each rank
  int32_t node_send[kMaxRanks];             // [NN] tokens to each node
  int32_t relay[kMaxRanks];                 // [NN] tokens each rail peer sends through this rank
  int32_t per_expert[kMaxLocalExperts];     // received tokens per local expert
  IxRecordHeader records[kMaxRanks];
  // A notice, apart from the error word (which it would contend with): a call no host waited for
  // was refused by its peers' records (each carried kRefusedBefore: rank `refused_by_peers - 1`
  // refused an earlier call) while this rank's own accepted it, so its outputs are padding. Set
  // by the notify, cleared by the host, which raises it after its next call is queued and never
  // carries it into a record (the peers raised that refusal already: no refusal chain).
  volatile int32_t refused_by_peers;
};

// Device state of the current call, in the symmetric buffer (never read by peers).
// Node peers read `prefix` through the mapping (zero copy) between their call's notify and the next.
struct IxCtrl {
  uint64_t seq;
  int32_t ok;
  uint32_t zero_copy;              // combine: bit j set where node rank j's rows are read in its combine_in
  int64_t prefix[kMaxRanks + 1];   // received rows before each source; [R] = total
  int32_t recv[kMaxRanks];
  int32_t relay[kMaxRanks];        // [NN] tokens the rail peer on node m sends through this rank
  uint64_t zero_copy_seq;          // the last call whose combine read this rank's combine_in (0: none)
  uint64_t dispatch_seq;           // the last dispatch that went ahead (its node ranks read this rank's packed rows)
  uint32_t receive_blocks_done;    // the receive kernel's blocks past their reads (reset by the notify)
  uint32_t gave_up;                // set by a wait that timed out, or by the host's abort: every wait of
                                   // this rank's kernels, queued calls' included, ends at once, for good
};

struct IxLayout {
  int num_ranks, num_nodes, ranks_per_node;
  int64_t capacity;      // C
  int64_t row_bytes;     // W, a multiple of 16
  int64_t combine_rows;  // rows of W bytes in combine_in (Options.internode_combine_rows)

  EP_HOST_DEVICE int64_t chunks() const { return (capacity + kChunkRows - 1) / kChunkRows; }
  EP_HOST_DEVICE int64_t rail_send() const { return 0; }
  EP_HOST_DEVICE int64_t rail_recv() const { return rail_send() + num_nodes * capacity * row_bytes; }
  EP_HOST_DEVICE int64_t stage() const { return rail_recv() + num_nodes * capacity * row_bytes; }
  EP_HOST_DEVICE int64_t combine_in() const { return align(stage() + int64_t(num_ranks) * capacity * row_bytes); }
  EP_HOST_DEVICE int64_t combine_in_bytes() const { return combine_rows * row_bytes; }
  EP_HOST_DEVICE int64_t route_send() const { return align(combine_in() + combine_in_bytes()); }
  EP_HOST_DEVICE int64_t route_recv() const { return route_send() + align(num_nodes * capacity * ranks_per_node * 4); }
  EP_HOST_DEVICE int64_t own_slots() const { return route_recv() + align(num_nodes * capacity * ranks_per_node * 4); }
  EP_HOST_DEVICE int64_t relay_slots() const { return own_slots() + align(ranks_per_node * capacity * 4); }
  EP_HOST_DEVICE int64_t records_send() const { return relay_slots() + align(num_ranks * capacity * 4); }
  EP_HOST_DEVICE int64_t records_recv() const { return records_send() + num_ranks * int64_t(sizeof(IxRecord)); }
  EP_HOST_DEVICE int64_t notify_flags() const { return records_recv() + 2 * num_ranks * int64_t(sizeof(IxRecord)); }
  EP_HOST_DEVICE int64_t chunk_flags() const { return notify_flags() + 2 * num_ranks * 8; }
  EP_HOST_DEVICE int64_t route_flags() const { return chunk_flags() + num_nodes * chunks() * 8; }
  EP_HOST_DEVICE int64_t row_flags() const { return route_flags() + num_nodes * 8; }
  EP_HOST_DEVICE int64_t counts() const { return row_flags() + num_nodes * capacity * 8; }
  EP_HOST_DEVICE int64_t combine_in_done() const { return counts() + num_ranks * 8; }
  EP_HOST_DEVICE int64_t dispatch_in_done() const { return combine_in_done() + ranks_per_node * 8; }
  EP_HOST_DEVICE int64_t ctrl() const { return align(dispatch_in_done() + ranks_per_node * 8); }
  // This rank's packed rows (rail_send[node]): dispatch_buffer's region, C rows of W bytes.
  EP_HOST_DEVICE int64_t dispatch_in(int node) const { return rail_send() + node * capacity * row_bytes; }
  EP_HOST_DEVICE int64_t total_bytes() const { return align(ctrl() + int64_t(sizeof(IxCtrl))); }
  EP_HOST_DEVICE static int64_t align(int64_t b) { return (b + 255) / 256 * 256; }
};

enum class DType : int { kBFloat16 = 0, kFloat16 = 1, kFloat32 = 2 };

struct IxParams {
  // the group
  char* base;  // this rank's symmetric buffer (its address names every peer's copy too)
  IxLayout layout;
  int rank, node, local;
  uint64_t timeout_ns;
  int* error;          // host-mapped error word
  IxHostCtrl* host;    // host-mapped (device address)
  int num_blocks;      // SM budget of the kernels that wait on peers
  bool node_p2p;       // the node hop by stores/loads where NVSHMEM maps the peer (else puts/gets)
  bool whatif_copy_puts;  // the rail puts in the kernels' what-if instances (whatif_puts.cuh)
  // the call
  int32_t op;
  int64_t row_stride;  // bytes between rows of this call in a block (dispatch: layout.row_bytes;
                       // combine: its fields, <= that), a multiple of 16
  int64_t ticket;      // written to host->ticket by the notify step
  bool host_waits;     // a host reads the notify's result (else refusals go to the error word)
  IxRecordHeader mine;  // this rank's record header (status set by the host where it refuses)
  const int32_t* meta;  // the rank-level routing table (moe_meta.hpp) of this rank's tokens
  int64_t num_tokens;   // N
  int64_t num_experts;
  bool cached;          // dispatch along a handle: no ids/weights travel
  // routing by node (node_layout): scratch on the device
  int32_t* node_count;   // [NN]
  int32_t* node_tokens;  // [NN, N] tokens to node m in token order (rail slot = index)
  int32_t* node_pos;     // [N, NN] rail slot of token t at node m, or -1
  // dispatch rows: payload | scales | topk ids (int64) | weights | positions [R] int32 (the row's
  // index at every rank of the group, -1 where it does not go: one packed row serves the
  // forwarders of every node, each reading its own node's L), each field at a 16-byte offset
  const char* x;  // [N, x_bytes]
  int64_t x_bytes;
  const float* x_scales;  // [N, num_scales] or null
  int num_scales;
  const int64_t* topk_idx;     // [N, K] or null
  const float* topk_weights;   // [N, K] or null
  int num_topk;
  int64_t off_scales, off_ids, off_weights, off_pos;  // field offsets in a row
  bool x_packed;       // x already lies in this rank's packed rows (dispatch_buffer): the pack leaves it
  bool scales_packed;  // x_scales likewise, at off_scales
  // dispatch outputs
  char* recv_x;
  float* recv_x_scales;
  int64_t* recv_topk_idx;
  float* recv_topk_weights;
  int64_t out_rows;  // rows the outputs hold: num_worst_tokens, or the total the host read
  // combine: x [x_rows, hidden] rows back (| weights at off_weights), outputs [N, hidden]; a
  // received row at or past x_rows (dropped by an overflowing dispatch) counts as not sent
  int64_t x_rows;
  bool x_in_place;  // x is 16-byte aligned: this rank, as the forwarder of its own rows, reads
                    // them from x (and topk_weights) instead of pushing them into its own stage
  DType dtype;
  int64_t hidden;
  char* out;
  float* out_weights;
};

// Routing by node, from the rank-level table (meta): node_count, node_tokens, node_pos.
cudaError_t launch_node_layout(const IxParams& p, cudaStream_t stream);
// The records: put to every rank, wait for every rank's, check them, publish the counts.
cudaError_t launch_notify(const IxParams& p, cudaStream_t stream);
// Dispatch: one pack per token and rail puts from it (sender), forwarding (rail peer), then into
// the outputs (receiver; rows from its own node it gets from the sender's packed rows in place).
cudaError_t launch_dispatch_send(const IxParams& p, cudaStream_t stream);
cudaError_t launch_dispatch_forward(const IxParams& p, cudaStream_t stream);
cudaError_t launch_dispatch_receive(const IxParams& p, cudaStream_t stream);
// Combine: rows back to the forwarders (and routes to them), their sums to the sources, and
// the sums over nodes.
cudaError_t launch_combine_push(const IxParams& p, cudaStream_t stream);
cudaError_t launch_combine_reduce(const IxParams& p, cudaStream_t stream);
cudaError_t launch_combine_receive(const IxParams& p, cudaStream_t stream);
// combine_buffer: waits (bounded) until this node's ranks are done reading this rank's
// combine_in in the last combine that read it, so that the caller may write it.
cudaError_t launch_combine_in_wait(const IxParams& p, cudaStream_t stream);
// dispatch_buffer: likewise for this rank's packed rows and the last dispatch that went ahead
// (its rail puts are complete where the send kernel ended: nvshmem_quiet).
cudaError_t launch_dispatch_in_wait(const IxParams& p, cudaStream_t stream);

}  // namespace ep::kernels::ix
