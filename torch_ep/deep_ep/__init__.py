"""DeepEP v1's Python API (`Buffer`, `Config`, `EventOverlap`, `topk_idx_t`) on torch_ep.

Code written for DeepEP's legacy `Buffer` switches with one import::

    from torch_ep import deep_ep          # instead of: import deep_ep
    buffer = deep_ep.Buffer(group, num_nvl_bytes)
    per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(topk_idx, num_experts)
    recv_x, recv_topk_idx, recv_topk_weights, per_expert_list, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=topk_idx, topk_weights=topk_weights)
    combined_x, combined_topk_weights, event = buffer.combine(expert_out, handle, recv_topk_weights)

Every call is one call of torch_ep's own ops (torch_ep.get_dispatch_layout / dispatch / combine /
low_latency_dispatch / low_latency_combine / low_latency_combine_buffer) on an "ep" group over
the ranks of `group`: `group` itself when its backend is "ep", else one group made once per
set of ranks (`dist.new_group(ranks, backend="ep")`, over a subgroup with
use_local_synchronization, so that only its ranks take part, as in DeepEP) and reused by later
Buffers over the same ranks: an NCCL group, a Gloo group or the default group all work. Groups that
span nodes take torch_ep's hierarchical route with the same calls. CPU tensors run on torch_ep's
shared-memory transport, so DeepEP-API code can be tested without a GPU (the low-latency calls
excepted: they need CUDA and NVSHMEM, as torch_ep's own; across nodes they push to remote ranks
by NVSHMEM puts, within a node they load over NVLink).

Streams and events, as DeepEP's: the high-throughput calls (and the low-latency ones with
async_finish) run on the Buffer's communication stream (`get_comm_stream()`), after
`previous_event` or, without one, after the current stream's work. Without async_finish the
current stream then waits for them; with it they return an EventOverlap whose
`current_stream_wait()` (or the `with` form's exit) makes the current stream wait. Outputs are
recorded on the current stream unless allocate_on_comm_stream. A call with neither
previous_event nor async_finish runs on the current stream itself: the order is the same (after
the stream's work, before what follows), without two cross-stream waits and outputs that the
allocator could not reuse in stream order. On CPU tensors every call has
finished when it returns: an event is one that has already happened (current_stream_wait() does
nothing), and a `previous_event` holding a CUDA event is waited for on the host first.

Handles are DeepEP's tuples (same length, so callers that unpack them keep working) that also
carry torch_ep's handle in an attribute, `handle.native`; a tuple not made here is refused.
- Intranode dispatch: (rank_prefix_matrix, None, None, None, is_token_in_rank, None).
  rank_prefix_matrix [R, R] int32: entry [i][j] = rows rank j receives from ranks 0..i. In groups
  of up to 32 ranks the dispatch's own records carry every rank's send counts, so it costs no
  exchange, and the matrix is made (a copy to the GPU) when the element is first read: made at
  once, the copy queued behind the dispatch cost it 60 % of its time on the H200. Otherwise, and
  for a CUDA dispatch with num_worst_tokens (sizes on the device only), one small
  all_to_all_single of the counts per dispatch on the "ep" group (on the device, with no host
  synchronisation, in the latter case). torch_ep has no channels and keeps no recv_src_idx, so
  elements 1-3 and 5 are None.
- Across nodes: DeepEP's 10-tuple with is_token_in_rank at 0 and recv_gbl_rank_prefix_sum ([R]
  int32, rows received from ranks 0..i; made when first read) at 6, None elsewhere.
- Low latency: (recv_src_info, recv_layout_range, num_max_dispatch_tokens_per_rank, hidden,
  num_experts). recv_src_info [E_local, R*max] int32: each received row's token index at its
  source rank. recv_layout_range [E_local, R] int64: (begin << 32) | count for the rows of each
  source rank. See "Differences" for where those rows are.

Differences from DeepEP (each one raises naming the argument where a caller could rely on it):
- `comm` (an mpi4py communicator) without `group`: ValueError; torch_ep runs on torch.distributed.
- `enable_shrink=True` and the mask-buffer methods: ValueError; torch_ep cannot mask ranks.
- `allow_nvlink_for_low_latency_mode=False` with low_latency_mode: ValueError; inside a node
  torch_ep's low-latency path runs over NVLink P2P (or a shared GPU) only, it has no RDMA-only
  mode (across nodes it pushes by NVSHMEM puts; Options.force_remote forces that between
  virtual nodes).
- Low-latency calls on a Buffer made without low_latency_mode: ValueError, as DeepEP asserts.
- `dispatch` without `topk_idx` (DeepEP can route by is_token_in_rank alone): ValueError;
  torch_ep routes by topk_idx. num_tokens_per_rank / num_tokens_per_expert / is_token_in_rank
  must still be given (DeepEP's rule) and checked for shape; the routing comes from topk_idx.
- A cached dispatch (`handle=`) with a num_worst_tokens other than its route's: ValueError; the
  route keeps the sizes of the dispatch that made it.
- `dispatch_wait_recv_cost_stats`, `combine_wait_recv_cost_stats`, `use_logfmt=True`: ValueError.
- `zero_copy=True` with an `x` that is not the tensor get_next_low_latency_combine_buffer
  returned: ValueError (DeepEP would silently send the buffer's stale content).
- `get_local_buffer_tensor`: NotImplementedError; torch_ep exposes no raw buffer.
- Low-latency receive layout: each expert's rows are packed from row 0 as DeepEP's, but by
  source rank (rank r's after those of ranks before it), not in arrival order: deterministic;
  rows [0, recv_count[e]) are the valid ones and recv_layout_range gives each (begin, count).
- fp8 scales of low_latency_dispatch are float32 [E_local, R*max, H/128] row-major (DeepEP's
  are column-major in the last two dimensions; the values are the same). With use_ue8m0 they
  are packed to int32 [E_local, R*max, ceil(H/512)], column-major as DeepEP's.
- `bias` of combine is added after the sum was rounded to x's dtype (DeepEP adds it before):
  results can differ by one rounding.
Accepted with no effect (nothing to tune or size here, results unchanged): num_nvl_bytes,
num_rdma_bytes, num_qps_per_rank, allow_mnnvl, Config's chunk sizes, `config` arguments, and
clean_low_latency_buffer (torch_ep's buffers need no cleaning). Buffer.set_num_sms applies to
the "ep" groups made after it (Options.num_sms); a group that already was "ep" keeps its own.
torch_ep can do more than DeepEP in places, and does: num_worst_tokens across nodes, x in fp16
or fp32, any number of ranks in get_dispatch_config.
"""
import torch

from .buffer import Buffer
from .utils import Config, EventHandle, EventOverlap

# The integer type of top-k expert ids (DeepEP builds it as int64 by default; torch_ep always is).
topk_idx_t = torch.int64

__all__ = ["Buffer", "Config", "EventOverlap", "EventHandle", "topk_idx_t"]
