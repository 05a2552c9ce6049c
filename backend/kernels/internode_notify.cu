// The first steps of every internode dispatch and combine (internode_device.cuh): routing by node,
// and the notify step, the device's replacement of the host records (moe_protocol.hpp).
#include <cub/block/block_scan.cuh>

#include "backend/kernels/internode_common.cuh"
#include "backend/kernels/module_kernels.hpp"

namespace ep::kernels::ix {
namespace {

// Block m lists the tokens that go to node m (any of its ranks gets them), in token order.
__global__ void __launch_bounds__(kThreads) node_layout_kernel(IxParams p) {
  using Scan = cub::BlockScan<int, kThreads>;
  __shared__ typename Scan::TempStorage scan;
  __shared__ int base_s;
  const int m = int(blockIdx.x), L = p.layout.ranks_per_node, R = p.layout.num_ranks, NN = p.layout.num_nodes;
  const MetaLayout ml{R, p.num_experts, p.num_tokens};
  const int32_t* token_pos = p.meta + ml.token_pos();
  if (threadIdx.x == 0) base_s = 0;
  __syncthreads();
  for (int64_t start = 0; start < p.num_tokens; start += kThreads) {
    const int64_t t = start + threadIdx.x;
    int goes = 0;
    if (t < p.num_tokens)
      for (int j = 0; j < L; ++j) goes |= token_pos[t * R + m * L + j] >= 0;
    int before, total;
    Scan(scan).ExclusiveSum(goes, before, total);
    const int base = base_s;
    if (t < p.num_tokens) {
      p.node_pos[t * NN + m] = goes ? base + before : -1;
      if (goes) p.node_tokens[int64_t(m) * p.num_tokens + base + before] = int32_t(t);
    }
    __syncthreads();
    if (threadIdx.x == 0) base_s = base + total;
    __syncthreads();
  }
  if (threadIdx.x == 0) p.node_count[m] = base_s;
}

__device__ bool same_call(const IxRecordHeader& a, const IxRecordHeader& b) {
  return a.op == b.op && a.call_id == b.call_id && a.handle_id == b.handle_id && a.num_experts == b.num_experts &&
         a.hidden == b.hidden && a.dtype == b.dtype && a.num_topk == b.num_topk && a.has_scales == b.has_scales &&
         a.has_weights == b.has_weights;
}

// One block. Resets this rank's counters, puts a record to every rank (itself included), waits
// for every rank's, and publishes the verdict and counts to the device (ctrl) and the host.
__global__ void __launch_bounds__(kThreads) notify_kernel(IxParams p) {
  const IxLayout& l = p.layout;
  const int R = l.num_ranks, L = l.ranks_per_node, NN = l.num_nodes;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = kThreads / 32;
  const MetaLayout ml{R, p.num_experts, p.num_tokens};
  const bool with_experts = p.op == kDispatch && !p.cached;
  const int64_t per = p.num_experts / R;
  __shared__ uint64_t seq_s;
  __shared__ int bad_s, news_s, timed_out_s;
  __shared__ IxRecordHeader mine;
  IxCtrl& c = ctrl(p);
  if (threadIdx.x == 0) {
    seq_s = c.seq + 1;
    c.seq = seq_s;
    bad_s = R;  // the first rank refusing or disagreeing; R: none
    news_s = R;  // the same, leaving out kRefusedBefore (a refusal the ranks were told of already)
    timed_out_s = 0;
    mine = p.mine;
    if (with_experts && mine.status == kOk) {
      mine.id_min = p.meta[ml.id_range()];
      mine.id_max = p.meta[ml.id_range() + 1];
      if (p.num_tokens > 0 && (mine.id_min < -1 || mine.id_max >= p.num_experts)) mine.status = kBadExpertIds;
    }
  }
  // No peer adds to these before it has this call's record from this rank (sent below).
  for (int r = threadIdx.x; r < R; r += blockDim.x) *count_word(p, r) = 0;
  for (int m = threadIdx.x; m < NN; m += blockDim.x) *route_flag(p, m) = 0;
  __threadfence();
  __syncthreads();
  const uint64_t seq = seq_s;
  const int parity = int(seq & 1);
  IxRecord* sent = at<IxRecord>(p.base, l.records_send());
  IxRecord* got = at<IxRecord>(p.base, l.records_recv()) + parity * R;
  uint64_t* flags = at<uint64_t>(p.base, l.notify_flags()) + parity * R;

  for (int peer = warp; peer < R; peer += warps) {
    IxRecord& r = sent[peer];
    if (lane == 0) {
      memcpy(&r, &mine, kRecordHeaderBytes);
      r.rows = p.meta[ml.tokens_per_rank() + peer];
      r.relay_rows = peer % L == p.local ? p.node_count[peer / L] : 0;
    }
    if (with_experts)
      for (int64_t e = lane; e < per; e += 32) r.rows_per_expert[e] = p.meta[ml.tokens_per_rank_expert() + peer * per + e];
    __syncwarp();
    const size_t bytes = size_t(kRecordHeaderBytes + (with_experts ? 4 * per : 0));
    nvshmemx_putmem_signal_nbi_warp(got + p.rank, &r, bytes, flags + p.rank, seq, NVSHMEM_SIGNAL_SET, peer);
  }

  const uint64_t deadline = now_ns() + p.timeout_ns;
  for (int r = threadIdx.x; r < R; r += blockDim.x)
    if (!wait_at_least(p, flags + r, seq, deadline)) {
      give_up(p, kNotifyTimeout, r);
      atomicExch(&timed_out_s, 1);
    }
  __syncthreads();
  for (int r = threadIdx.x; r < R && !timed_out_s; r += blockDim.x) {
    const bool differs = !same_call(got[r], mine);
    if (got[r].status != kOk || differs) atomicMin(&bad_s, r);
    if ((got[r].status != kOk && got[r].status != kRefusedBefore) || differs) atomicMin(&news_s, r);
  }
  __syncthreads();
  const bool ok = bad_s == R && !timed_out_s;

  if (threadIdx.x == 0) {
    int64_t total = 0;
    for (int s = 0; s < R; ++s) {
      const int32_t n = ok ? got[s].rows : 0;
      c.prefix[s] = total;
      c.recv[s] = n;
      p.host->recv[s] = n;
      total += n;
    }
    c.prefix[R] = total;
    p.host->total_recv = total;
    for (int m = 0; m < NN; ++m) c.relay[m] = p.host->relay[m] = ok ? got[rank_of(p, m, p.local)].relay_rows : 0;
    // Zero copy: node rank j's rows are read in its combine_in where j's x is that region and every
    // rank of the node maps its peers; every rank of the node sees the same records, so all agree.
    uint32_t zero_copy = 0;
    bool maps = ok && p.op == kCombine;
    for (int j = 0; j < L && maps; ++j) maps = got[rank_of(p, p.node, j)].maps_node != 0;
    for (int j = 0; j < L && maps; ++j)
      if (got[rank_of(p, p.node, j)].zero_copy) zero_copy |= 1u << j;
    c.zero_copy = zero_copy;
    if ((zero_copy >> p.local) & 1) c.zero_copy_seq = seq;
    // A dispatch that goes ahead: its receivers read this rank's packed rows, and each of this
    // node's tells it when done (dispatch_in_done), which dispatch_buffer waits for.
    if (ok && p.op == kDispatch) c.dispatch_seq = seq;
    c.receive_blocks_done = 0;
    c.ok = ok;
  }
  for (int s = threadIdx.x; s < R; s += blockDim.x) p.host->send[s] = p.meta[ml.tokens_per_rank() + s];
  for (int m = threadIdx.x; m < NN; m += blockDim.x) p.host->node_send[m] = p.node_count[m];
  if (with_experts)
    for (int64_t e = threadIdx.x; e < per; e += blockDim.x) {
      int32_t sum = 0;
      for (int s = 0; s < R && ok; ++s) sum += got[s].rows_per_expert[e];
      p.host->per_expert[e] = sum;
    }
  // Headers for the host's messages (check_records), eight bytes a thread.
  for (int64_t i = threadIdx.x; i < int64_t(R) * (kRecordHeaderBytes / 8); i += blockDim.x) {
    const int64_t r = i / (kRecordHeaderBytes / 8), w = i % (kRecordHeaderBytes / 8);
    reinterpret_cast<int64_t*>(&p.host->records[r])[w] = reinterpret_cast<const int64_t*>(&got[r])[w];
  }
  __threadfence_system();
  __syncthreads();
  if (threadIdx.x == 0) {
    p.host->ok = ok;
    p.host->timed_out = timed_out_s;
    __threadfence_system();
    p.host->ticket = p.ticket;
    __threadfence_system();
    // A refusal no host waits for reaches the peers' hosts through their error words, and each
    // host carries it into the record of a later call (kRefusedBefore), which every rank then
    // refuses together: a host never raises it before a call's notify, which would leave that
    // rank out of the call while its peers wait for its record (and hosts learn it at different
    // calls: each reads its word whenever it starts a call). Not reported: a rank's own refusal
    // its host raised at this call already, and kRefusedBefore (no refusal chain). A rank whose
    // own record was fine, refused by peers carrying kRefusedBefore only, gets a notice instead
    // (IxHostCtrl::refused_by_peers), which its host raises after its next call is queued.
    if (!ok && !timed_out_s && !p.host_waits && news_s < R && !(news_s == p.rank && p.mine.status != kOk))
      report(p.error, kRejected, news_s);
    else if (!ok && !timed_out_s && !p.host_waits && news_s == R && mine.status == kOk && !p.host->refused_by_peers)
      p.host->refused_by_peers = int32_t(got[bad_s].detail) + 1;
    nvshmem_quiet();  // the record stage is reused by the next call
  }
}

}  // namespace

cudaError_t launch_node_layout(const IxParams& p, cudaStream_t stream) {
  if (p.layout.num_nodes < 1 || p.layout.ranks_per_node > kMaxLocal || p.layout.num_ranks > kMaxRanks)
    return cudaErrorInvalidValue;
  node_layout_kernel<<<p.layout.num_nodes, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_notify(const IxParams& p, cudaStream_t stream) {
  if (p.num_experts / p.layout.num_ranks > kMaxLocalExperts) return cudaErrorInvalidValue;
  notify_kernel<<<1, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace ep::kernels::ix

const void* ep::kernels::internode_notify_module_kernel() {
  return reinterpret_cast<const void*>(ep::kernels::ix::notify_kernel);
}
