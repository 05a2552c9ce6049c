// Combine across nodes on the device (internode_device.cuh), the dispatch's route backwards:
// every rank pushes its rows to the forwarder of each row's source (same node, the source's
// local index) while every source pushes its forward positions (routes) to its rail peers on the
// other nodes; each forwarder sums its node's rows per token (float32, local rank by local rank,
// rounded once) and puts one row per token to the source over the rail; the source sums the
// nodes' rows (float32, node by node, rounded once). For its own node the source is the
// forwarder: it sums those rows itself, in the same order and with the same rounding, as it
// sums the nodes' (no put to itself, no routes: they are its own dispatch positions). A rank
// that is the forwarder of its own rows (the sources with its local index) reads them from x in
// place where x allows it (x_in_place): at 2 ranks a node, half the rows are never pushed.
// Zero copy: a rank whose x is its combine_in region (combine_buffer; IxCtrl::zero_copy) pushes
// only its rows' weights; its node's ranks read its rows there through the mapping, and each
// tells it when they are done (combine_in_done), which combine_buffer waits for before the
// caller writes the region again.
#include "backend/kernels/internode_common.cuh"
#include "backend/kernels/module_kernels.hpp"
#include "backend/kernels/whatif_puts.cuh"

namespace ep::kernels::ix {
namespace {

// The inputs of this node's ranks as this rank reads them: rank j's combine_in through the
// mapping (null: j pushed its rows), j's first row from source (m, this rank's local index), j's
// prefix of that source, at [j * NN + m], and j's x rows: a row of j's at or past them was
// dropped by an overflowing dispatch (num_worst_tokens) and counts as not sent, as on one node
// (moe.cu). `first` is loaded where j's rows are read in place or j's x may be short (its
// record's worst_rows); `rows` is INT64_MAX where j's x holds every row it received.
struct NodeInputs {
  const char* base[kMaxLocal];
  int64_t first[kMaxRanks];
  int64_t rows[kMaxLocal];
};

// Block-wide, once the count words are complete: j signals them after its notify wrote its prefix,
// which stays until every rank has started the next call (each waits for all records there). The
// records are this call's (a peer's next call writes the other parity).
__device__ void load_node_inputs(const IxParams& p, NodeInputs& in) {
  const int L = p.layout.ranks_per_node, NN = p.layout.num_nodes;
  IxCtrl& c = ctrl(p);
  const IxRecord* got = at<IxRecord>(p.base, p.layout.records_recv()) + (c.seq & 1) * p.layout.num_ranks;
  const uint32_t zero_copy = c.zero_copy & ~(1u << p.local);  // its own rows are x (x_in_place)
  for (int j = threadIdx.x; j < L; j += blockDim.x) {
    const IxRecordHeader& r = got[rank_of(p, p.node, j)];
    in.base[j] = (zero_copy >> j) & 1 ? node_peer(p, at<char>(p.base, p.layout.combine_in()), rank_of(p, p.node, j))
                                      : nullptr;
    in.rows[j] = j == p.local ? p.x_rows : r.worst_rows ? r.num_tokens : INT64_MAX;
  }
  for (int i = threadIdx.x; i < L * NN; i += blockDim.x) {
    const int j = i / NN, s = rank_of(p, i % NN, p.local), peer = rank_of(p, p.node, j);
    int64_t first = 0;  // where LocalRows::row does not read it
    if (j == p.local) {
      first = c.prefix[s];
    } else if ((zero_copy >> j) & 1 || got[peer].worst_rows) {
      const IxCtrl* mapped = node_peer(p, &c, peer);
      first = mapped ? mapped->prefix[s] : get_word(&c.prefix[s], peer);
    }
    in.first[i] = first;
  }
  __syncthreads();
}

// Where local rank j's row `pos` of source s (on node m) lies for this rank as its forwarder, and
// its weights: this rank's own rows in x itself (x_in_place), a zero-copy rank's in its
// combine_in (weights pushed into the stage), else both in the stage, pushed there. Null for a
// row j's x does not hold (nothing was pushed for it; weights() is asked only where row() is not null).
struct LocalRows {
  const IxParams& p;
  const IxCtrl& c;
  const NodeInputs& in;
  __device__ bool in_place(int j) const { return p.x_in_place && j == p.local; }
  __device__ const char* staged(int j, int m, int32_t pos) const {
    return ix::row(p, p.layout.stage(), (int64_t(j) * p.layout.num_nodes + m) * p.layout.capacity + pos);
  }
  __device__ const char* row(int j, int s, int m, int32_t pos) const {
    if (pos < 0) return nullptr;
    const int64_t first = in.first[j * p.layout.num_nodes + m];
    if (in.rows[j] != INT64_MAX && first + pos >= in.rows[j]) return nullptr;  // dropped by an overflowing dispatch
    if (in_place(j)) return p.x + (c.prefix[s] + pos) * p.x_bytes;
    if (const char* base = in.base[j]) return base + (first + pos) * p.x_bytes;
    return staged(j, m, pos);
  }
  __device__ const float* weights(int j, int s, int m, int32_t pos) const {
    if (in_place(j)) return p.topk_weights + (c.prefix[s] + pos) * int64_t(p.num_topk);
    return reinterpret_cast<const float*>(staged(j, m, pos) + p.off_weights);
  }
};

__global__ void __launch_bounds__(kThreads) combine_push_kernel(IxParams p) {
  if (!call_ok(p)) return;
  const IxLayout& l = p.layout;
  const int R = l.num_ranks, L = l.ranks_per_node, NN = l.num_nodes;
  const int64_t C = l.capacity, K = p.num_topk;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const IxCtrl& c = ctrl(p);
  const int32_t* token_pos = p.meta + MetaLayout{R, p.num_experts, p.num_tokens}.token_pos();

  // As a source: the forward positions of every token sent to another node m (the dispatch's),
  // to the rail peer there, a chunk a put, each adding 1 to its route word for this node.
  int32_t* routes = at<int32_t>(p.base, l.route_send());
  for (int m = 0; m < NN; ++m) {
    if (m == p.node) continue;
    const int64_t n = p.node_count[m], chunks = (n + kChunkRows - 1) / kChunkRows;
    for (int64_t k = (blockIdx.x + int64_t(m) * 7) % gridDim.x; k < chunks; k += gridDim.x) {
      const int64_t first = k * kChunkRows, rows = n - first < kChunkRows ? n - first : kChunkRows;
      for (int64_t i = threadIdx.x; i < rows * L; i += blockDim.x) {
        const int64_t slot = first + i / L, t = p.node_tokens[int64_t(m) * p.num_tokens + slot];
        routes[(m * C + slot) * L + i % L] = token_pos[t * R + m * L + i % L];
      }
      __syncthreads();
      nvshmemx_putmem_signal_nbi_block(at<int32_t>(p.base, l.route_recv()) + (p.node * C + first) * L,
                                       routes + (m * C + first) * L, size_t(rows * L * 4), route_flag(p, p.node), 1,
                                       NVSHMEM_SIGNAL_ADD, rank_of(p, m, p.local));
      __syncthreads();
    }
  }

  // As a receiver of the dispatch: row i (of source s) back to the forwarder (this node, s's
  // local index), at stage[this local rank, s's node][its index among s's rows]. A row counts
  // `units` on the forwarder's count word for this rank (a put each for the row and its
  // weights); one closing signal per forwarder adds the total. Stores through the forwarder's
  // mapped buffer count in shared memory and go out in one signal per forwarder at the end
  // (as the dispatch's forward); puts, where it is not mapped, signal each. Zero copy: the
  // forwarders read the rows in this rank's combine_in; only their weights go (none without).
  __shared__ int pushed[kMaxLocal];
  if (threadIdx.x < L) pushed[threadIdx.x] = 0;
  __syncthreads();
  const bool zero_copy = (c.zero_copy >> p.local) & 1;
  const int units = zero_copy ? (p.num_topk > 0 ? 1 : 0) : (p.num_topk > 0 ? 2 : 1);
  const int64_t M = units > 0 ? c.prefix[R] : 0, warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t i = int64_t(blockIdx.x) * (kThreads / 32) + warp; i < M; i += warps) {
    const int s = source_of(c.prefix, R, i);
    const int forwarder = rank_of(p, p.node, s % L);
    if (p.x_in_place && forwarder == p.rank) continue;  // read from x by this rank's reduce and receive
    // Dropped by an overflowing dispatch: not in x. Nothing moves; the forwarder skips the row
    // (this rank's record says worst_rows) but counts it, as the closing signal does.
    if (i >= p.x_rows) {
      if (lane == 0) atomicAdd_block(&pushed[s % L], units);
      continue;
    }
    char* dst = row(p, l.stage(), (int64_t(p.local) * NN + s / L) * C + (i - c.prefix[s]));
    if (char* mapped = node_peer(p, dst, forwarder)) {
      if (!zero_copy) warp_copy(mapped, p.x + i * p.x_bytes, p.x_bytes, lane);
      for (int64_t e = lane; e < K; e += 32)
        at<float>(mapped, p.off_weights)[e] = p.topk_weights[i * K + e];
      if (lane == 0) atomicAdd_block(&pushed[s % L], units);
      continue;
    }
    if (!zero_copy)
      nvshmemx_putmem_signal_nbi_warp(dst, p.x + i * p.x_bytes, size_t(p.x_bytes), count_word(p, p.local), 1,
                                      NVSHMEM_SIGNAL_ADD, forwarder);
    if (p.num_topk > 0)
      nvshmemx_putmem_signal_nbi_warp(dst + p.off_weights, p.topk_weights + i * K, size_t(4 * K),
                                      count_word(p, p.local), 1, NVSHMEM_SIGNAL_ADD, forwarder);
  }
  __threadfence_system();  // this thread's stores before the counts that announce them
  __syncthreads();
  if (threadIdx.x < L && pushed[threadIdx.x] > 0)
    nvshmemx_signal_op(count_word(p, p.local), uint64_t(pushed[threadIdx.x]), NVSHMEM_SIGNAL_ADD,
                       rank_of(p, p.node, threadIdx.x));
  if (blockIdx.x == 0 && threadIdx.x < L) {
    int64_t puts = 0;
    if (!(p.x_in_place && threadIdx.x == p.local))
      for (int s = threadIdx.x; s < R; s += L) puts += c.recv[s];
    nvshmemx_signal_op(count_word(p, p.local), ll::closing_signal(units * puts + 1), NVSHMEM_SIGNAL_ADD,
                       rank_of(p, p.node, threadIdx.x));
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();  // route_send is written again by the next combine
}

// As a forwarder: once every local rank's rows and the other nodes' sources' routes are in, one
// row per relayed token, the float32 sum of its local ranks' rows in rank order rounded to x's
// dtype (weights summed in float32), into rail_send[m] (block m: never over this node's packed
// rows, which may hold the next dispatch's x), put chunk by chunk to the source on node m (m
// another node).
// kCopyPuts: the what-if of whatif_puts.cuh (IxParams::whatif_copy_puts), instances of their own.
template <typename T, bool kCopyPuts = false>
__global__ void __launch_bounds__(kThreads) combine_reduce_kernel(IxParams p) {
  if (!call_ok(p)) return;
  const IxLayout& l = p.layout;
  const int L = l.ranks_per_node, NN = l.num_nodes;
  const int64_t C = l.capacity, K = p.num_topk, H = p.hidden;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const IxCtrl& c = ctrl(p);
  const uint64_t seq = c.seq;
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  const uint64_t deadline = now_ns() + p.timeout_ns;
  for (int j = threadIdx.x; j < L; j += blockDim.x)
    if (!wait_complete(p, count_word(p, j), deadline)) {
      give_up(p, kReduceTimeout, rank_of(p, p.node, j));
      failed = 1;
    }
  for (int m = threadIdx.x; m < NN; m += blockDim.x)
    if (m != p.node &&
        !wait_at_least(p, route_flag(p, m), uint64_t((c.relay[m] + kChunkRows - 1) / kChunkRows), deadline)) {
      give_up(p, kReduceTimeout, rank_of(p, m, p.local));
      failed = 1;
    }
  __syncthreads();
  if (failed) return;
  __shared__ NodeInputs inputs;
  load_node_inputs(p, inputs);
  const int32_t* routes = at<int32_t>(p.base, l.route_recv());
  const LocalRows local{p, c, inputs};
  for (int m = 0; m < NN; ++m) {
    if (m == p.node) continue;  // the sources sum their own node's rows (combine_receive_kernel)
    const int64_t n = c.relay[m], chunks = (n + kChunkRows - 1) / kChunkRows;
    for (int64_t k = (blockIdx.x + int64_t(m) * 7) % gridDim.x; k < chunks; k += gridDim.x) {
      const int64_t first = k * kChunkRows, rows = n - first < kChunkRows ? n - first : kChunkRows;
      if (warp < rows) {
        const int64_t slot = first + warp;
        const int32_t* pos = routes + (m * C + slot) * L;
        const int s = rank_of(p, m, p.local);  // the source: its forwarder has its local index
        const char* src[kMaxLocal];
        for (int j = 0; j < L; ++j) src[j] = local.row(j, s, m, pos[j]);
        char* dst = block_row(p, l.rail_send(), m, slot);
        sum_rows<T>(dst, L, [&](int j) { return src[j]; }, H, lane);
        // Weights travel when the call has them (num_topk > 0), whatever this rank's own
        // outputs hold: a forwarder with no tokens of its own has a null out_weights.
        if (K > 0)
          for (int64_t e = lane; e < K; e += 32) {
            float acc = 0.f;
            for (int j = 0; j < L; ++j)
              if (src[j]) acc += local.weights(j, s, m, pos[j])[e];
            at<float>(dst, p.off_weights)[e] = acc;
          }
      }
      __syncthreads();
      put_signal_block<kCopyPuts, false>(row(p, l.rail_recv(), p.node * C + first),
                                         block_row(p, l.rail_send(), m, first), size_t(rows * p.row_stride),
                                         chunk_flag(p, p.node, k), seq, NVSHMEM_SIGNAL_SET, rank_of(p, m, p.local));
    }
  }
  __syncthreads();
  if (threadIdx.x == 0) nvshmem_quiet();  // rail_send is written again by the next call
}

// As the source: token t's output is the float32 sum, node by node, of the rows the nodes it
// went to sent back, rounded once; this node's row is the sum of its ranks' rows (in stage, at
// t's dispatch positions), rounded as a forwarder rounds it. A token sent nowhere gets zeros.
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_receive_kernel(IxParams p) {
  if (!call_ok(p)) {  // refused on every rank (no host waits under num_worst_tokens): zeros, not stale memory
    const int64_t stride = int64_t(gridDim.x) * blockDim.x, first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    for (int64_t i = first; i < p.num_tokens * p.hidden; i += stride) reinterpret_cast<T*>(p.out)[i] = from_float<T>(0.f);
    for (int64_t i = first; i < p.num_tokens * p.num_topk; i += stride) p.out_weights[i] = 0.f;
    return;
  }
  const IxLayout& l = p.layout;
  const int R = l.num_ranks, L = l.ranks_per_node, NN = l.num_nodes;
  const int64_t C = l.capacity, K = p.num_topk, H = p.hidden;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const uint64_t seq = ctrl(p).seq;
  const int32_t* token_pos = p.meta + MetaLayout{R, p.num_experts, p.num_tokens}.token_pos();
  __shared__ NodeInputs inputs;
  const LocalRows local{p, ctrl(p), inputs};
  __shared__ int failed;
  if (threadIdx.x == 0) failed = 0;
  __syncthreads();
  // This node's ranks' rows: their pushes are complete (as the reduce kernel waits for them).
  const uint64_t deadline = now_ns() + p.timeout_ns;
  for (int j = threadIdx.x; j < L; j += blockDim.x)
    if (!wait_complete(p, count_word(p, j), deadline)) {
      give_up(p, kReduceTimeout, rank_of(p, p.node, j));
      failed = 1;
    }
  __syncthreads();
  if (failed) return;
  load_node_inputs(p, inputs);
  const int64_t warps = int64_t(gridDim.x) * (kThreads / 32);
  for (int64_t t = int64_t(blockIdx.x) * (kThreads / 32) + warp; t < p.num_tokens; t += warps) {
    bool lost = false;
    if (lane == 0)
      for (int m = 0; m < NN; ++m) {
        const int32_t slot = p.node_pos[t * NN + m];
        if (m != p.node && slot >= 0 &&
            !wait_at_least(p, chunk_flag(p, m, slot / kChunkRows), seq, now_ns() + p.timeout_ns)) {
          give_up(p, kCombineTimeout, rank_of(p, m, p.local));
          lost = true;
          break;
        }
      }
    if (__shfl_sync(0xffffffffu, lost, 0)) break;
    __syncwarp();  // lane 0's acquire of the chunk flags orders the other lanes' reads of the rows
    const int32_t* slots = p.node_pos + t * NN;
    const int32_t* pos = token_pos + t * R + p.node * L;
    const auto node_row = [&](int m) -> const char* {
      return slots[m] >= 0 ? row(p, l.rail_recv(), m * C + slots[m]) : nullptr;
    };
    const auto local_row = [&](int j) -> const char* { return local.row(j, p.rank, p.node, pos[j]); };
    sum_node_rows<T>(p.out + t * H * int64_t(sizeof(T)), NN, node_row, p.node, L, local_row, H, lane);
    for (int64_t e = lane; e < K; e += 32) {  // weights: float32 throughout, in the same order
      float acc = 0.f;
      for (int m = 0; m < NN; ++m) {
        if (m != p.node) {
          if (const char* r = node_row(m)) acc += reinterpret_cast<const float*>(r + p.off_weights)[e];
        } else if (slots[m] >= 0) {
          float part = 0.f;
          for (int j = 0; j < L; ++j)
            if (local_row(j)) part += local.weights(j, p.rank, p.node, pos[j])[e];
          acc += part;
        }
      }
      p.out_weights[t * K + e] = acc;
    }
  }
  // This rank's reads of its node's zero-copy inputs are over (its reduce kernel ran before):
  // the last block past its reads tells each such rank, for combine_buffer's wait.
  const uint32_t zero_copy = ctrl(p).zero_copy & ~(1u << p.local);
  if (zero_copy == 0) return;
  __shared__ bool last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    last = atomicAdd(&ctrl(p).receive_blocks_done, 1u) == gridDim.x - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence_system();  // every block's loads before the signals
  for (int j = threadIdx.x; j < L; j += blockDim.x)
    if ((zero_copy >> j) & 1)
      nvshmemx_signal_op(combine_in_done(p, p.local), seq, NVSHMEM_SIGNAL_SET, rank_of(p, p.node, j));
}

// One warp: lane k waits for node rank k's reads of this rank's combine_in in the last combine
// that read it (IxCtrl::zero_copy_seq; 0: none yet).
__global__ void combine_in_wait_kernel(IxParams p) {
  const int k = int(threadIdx.x);
  if (k >= p.layout.ranks_per_node || k == p.local) return;
  const uint64_t deadline = now_ns() + p.timeout_ns;
  if (!wait_at_least(p, combine_in_done(p, k), ctrl(p).zero_copy_seq, deadline, /*heed_gave_up=*/false))
    give_up(p, kCombineInTimeout, rank_of(p, p.node, k));
}

}  // namespace

cudaError_t launch_combine_push(const IxParams& p, cudaStream_t stream) {
  combine_push_kernel<<<p.num_blocks, kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_combine_reduce(const IxParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kBFloat16:
      if (p.whatif_copy_puts)
        combine_reduce_kernel<__nv_bfloat16, true><<<p.num_blocks, kThreads, 0, stream>>>(p);
      else
        combine_reduce_kernel<__nv_bfloat16><<<p.num_blocks, kThreads, 0, stream>>>(p);
      break;
    case DType::kFloat16: combine_reduce_kernel<__half><<<p.num_blocks, kThreads, 0, stream>>>(p); break;
    default: combine_reduce_kernel<float><<<p.num_blocks, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

cudaError_t launch_combine_in_wait(const IxParams& p, cudaStream_t stream) {
  combine_in_wait_kernel<<<1, 32, 0, stream>>>(p);
  return cudaGetLastError();
}

cudaError_t launch_combine_receive(const IxParams& p, cudaStream_t stream) {
  const int grid = grid_for(p.num_blocks, (p.num_tokens + kThreads / 32 - 1) / (kThreads / 32));
  switch (p.dtype) {
    case DType::kBFloat16: combine_receive_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(p); break;
    case DType::kFloat16: combine_receive_kernel<__half><<<grid, kThreads, 0, stream>>>(p); break;
    default: combine_receive_kernel<float><<<grid, kThreads, 0, stream>>>(p); break;
  }
  return cudaGetLastError();
}

}  // namespace ep::kernels::ix

const void* ep::kernels::internode_combine_module_kernel() {
  return reinterpret_cast<const void*>(ep::kernels::ix::combine_in_wait_kernel);
}
