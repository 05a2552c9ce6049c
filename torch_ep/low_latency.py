"""Low-latency MoE dispatch and combine (DESIGN.md), for decoding: a fixed capacity per expert,
fp8 cast on the fly, no host synchronisation (capturable in a CUDA graph), and a receive hook so
that no SM waits while data is in flight.

The ops (torch.ops.ep.low_latency_*, backend/ops) run on NVSHMEM symmetric memory: every rank
casts its tokens once into its own buffer and the ranks that need them read them from there, over
NVLink / the shared GPU (and likewise for the expert outputs in combine). Ranks on other nodes,
which no load reaches, get them pushed instead, by NVSHMEM's device API (puts with a signal, over
IBGDA, IBRC or whatever NVSHMEM's remote transport is); Options.force_remote
(TORCH_EP_FORCE_REMOTE=1) takes that path between virtual nodes of one machine too.
NVSHMEM itself is set up here, once per process, on the first call: rank 0 of the group makes a
unique id with nvshmem4py, the group broadcasts it, every rank initialises NVSHMEM with it
(`nvshmem.core.init`), then the extension registers its own device state with that same host
library (nvshmemx_init_attr's entry). Where NVSHMEM was already initialised in the process (by
torch's NVSHMEM symmetric memory, say), that world is used as it is, if it is this group.

Before initialising, variables NVSHMEM reads at init get defaults where unset (never overriding
the user's): on one host NVSHMEM_REMOTE_TRANSPORT=none, NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo,
NVSHMEM_DISABLE_NCCL=1, NVSHMEM_DISABLE_NVLS=1; with no remote transport
NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=1; everywhere NVSHMEM_SYMMETRIC_SIZE large enough for the first
call's buffers (at least 2 GiB).

Rules, as DeepEP's:
- Every rank of the group makes the same calls with the same max_tokens_per_rank, hidden size,
  num_experts and top-k (the first call, and any that needs larger buffers, allocate
  collectively; do those outside CUDA-graph capture).
- At most two dispatches (and two combines) in flight: call the hook of dispatch i before sending
  dispatch i + 2. A send that would overwrite a buffer half a peer has not read waits (bounded
  by the group's timeout) instead of corrupting it.
- One NVSHMEM world per process: low-latency ops on a second group of other ranks raise.
- The ranks of a node must reach each other by NVLink P2P or share a GPU (ranks sharing a GPU
  need MPS: NVSHMEM's full multi-process-per-GPU mode). Groups that span nodes take larger
  buffers (the regions remote peers push into: about twice the symmetric memory).
- topk_idx names distinct experts per token (a repeated expert takes two slots of its capacity).
"""
from __future__ import annotations

import ctypes
import os
import socket
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import _C
from ._backend import get_backend
from .types import FP8_BLOCK, LowLatencyCombineResult, LowLatencyDispatchResult, LowLatencyHandle

__all__ = ["low_latency_dispatch", "low_latency_combine", "low_latency_combine_buffer", "check_errors",
           "remote_ranks"]

# Variables NVSHMEM reads at initialisation, defaulted (never overridden) when every rank of the
# group is on one host.
SINGLE_HOST_NVSHMEM_ENV = {
    "NVSHMEM_REMOTE_TRANSPORT": "none",
    "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
    "NVSHMEM_DISABLE_NCCL": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
MIN_SYMMETRIC_HEAP_BYTES = 2 << 30

_world: Optional[Tuple[int, ...]] = None  # global ranks of this process's NVSHMEM world
_combine_regions: dict = {}  # group name -> {(address, bytes)} of the combine buffers handed out


def _group(group):
    group = group or dist.group.WORLD
    if group is None:
        raise RuntimeError("torch_ep: no default process group; call dist.init_process_group(backend='ep') first")
    return group


def _require_nvshmem_and_cuda(op: str, t: torch.Tensor) -> None:
    if not _C.has_nvshmem:
        raise RuntimeError(f"{op}: {_C._ll_no_nvshmem_message}")
    if not t.is_cuda:
        raise ValueError(f"{op}: low-latency ops run on CUDA tensors, got {t.device} "
                         f"(torch_ep.reference.{op} is the CPU reference)")


def _refuse_autograd(op: str, **tensors: torch.Tensor) -> None:
    """The low-latency ops serve decoding and have no backward: refuse to silently detach."""
    if torch.is_grad_enabled():
        for name, t in tensors.items():
            if t.requires_grad:
                raise RuntimeError(f"{op}: {name} requires grad, but the low-latency ops have no autograd (they "
                                   f"serve decoding, as DeepEP's); call them under torch.no_grad() or on detached "
                                   f"tensors, or use torch_ep.dispatch / torch_ep.combine, which differentiate")


def _bootstrap_nvshmem(group, device: torch.device, heap_bytes: int) -> None:
    """Initialises NVSHMEM through nvshmem4py with a unique id broadcast over `group`."""
    try:
        import nvshmem.core as nvshmem_core
        try:
            from cuda.core import Device
        except ImportError:
            from cuda.core.experimental import Device
    except ImportError as e:
        raise RuntimeError(f"torch_ep low-latency ops initialise NVSHMEM with nvshmem4py, which did not import "
                           f"({type(e).__name__}: {e}); pip install nvshmem4py-cu13") from e
    hosts = [None] * group.size()
    dist.all_gather_object(hosts, socket.gethostname(), group=group)
    defaults = dict(SINGLE_HOST_NVSHMEM_ENV) if len(set(hosts)) == 1 else {}
    defaults["NVSHMEM_SYMMETRIC_SIZE"] = str(max(MIN_SYMMETRIC_HEAP_BYTES, heap_bytes * 3 // 2 + (256 << 20)))
    for name, value in defaults.items():
        os.environ.setdefault(name, value)
    _C._ll_nvshmem_env_defaults()  # no proxy thread without a remote transport (nvshmem_runtime.cpp)

    uid_bytes = [None]
    if group.rank() == 0:
        uid = nvshmem_core.get_unique_id()
        uid_bytes = [ctypes.string_at(uid.ptr, uid._data.nbytes)]
    dist.broadcast_object_list(uid_bytes, src=dist.get_global_rank(group, 0), group=group)
    uid = nvshmem_core.get_unique_id(empty=True)
    ctypes.memmove(uid.ptr, uid_bytes[0], len(uid_bytes[0]))
    with torch.cuda.device(device):
        nvshmem_core.init(device=Device(device.index), uid=uid, rank=group.rank(), nranks=group.size(),
                          initializer_method="uid")


def _init_nvshmem(group, device: torch.device, heap_bytes: int) -> None:
    global _world
    ranks = tuple(dist.get_process_group_ranks(group))
    if _world is not None:
        if _world != ranks:
            raise RuntimeError(f"torch_ep low-latency ops: this process's NVSHMEM world is the group of global ranks "
                               f"{list(_world)}; a group of ranks {list(ranks)} cannot use it (one group of "
                               f"low-latency ranks per process)")
        return
    if _C._ll_nvshmem_status() < 2:  # not initialised yet (by us, torch or the user)
        _bootstrap_nvshmem(group, device, heap_bytes)
    with torch.cuda.device(device):
        _C._ll_nvshmem_attach(group.rank(), group.size())
    _world = ranks


def _remote_plan(group) -> Tuple[bool, list]:
    """Whether the group spans nodes (its buffers then have the regions remote peers push into),
    and the ranks to reach by NVSHMEM puts even where they could be mapped (Options.force_remote:
    every rank on another node). Those NVSHMEM cannot map are remote in any case."""
    backend = get_backend(group)
    topology = backend.topology
    if topology.num_nodes <= 1:
        return False, []
    if not backend.config.force_remote:
        return True, []
    return True, [r for r in range(group.size()) if r // topology.ranks_per_node != topology.node]


def remote_ranks(group=None) -> list:
    """The ranks of the group that its low-latency kernels reach by NVSHMEM puts (other nodes),
    not by loads; empty before the first call."""
    return list(_C._ll_remote_ranks(_group(group).group_name)) if _C.has_nvshmem else []


def _ensure_buffers(group, device: torch.device, num_experts: int, max_tokens: int, hidden: int) -> None:
    """The group's symmetric buffers hold these sizes; else sets NVSHMEM up and (re)allocates
    them, collectively, and barriers the group."""
    name, size = group.group_name, group.size()
    local = num_experts // size
    spans_nodes, forced = _remote_plan(group)
    if _C._ll_buffer_fits(name, size, local, max_tokens, hidden, spans_nodes):
        return
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError("torch_ep low-latency ops: this call needs new (larger) symmetric buffers, which are "
                           "allocated collectively and cannot be during CUDA-graph capture; make one call of the same "
                           "sizes before capturing")
    _init_nvshmem(group, device, _C._ll_buffer_bytes(size, local, max_tokens, hidden, spans_nodes))
    config = get_backend(group).config
    _C._ll_reserve_buffer(name, group.rank(), size, device.index, config.timeout, config.num_sms, local, max_tokens,
                          hidden, spans_nodes, forced)
    dist.barrier(group=group)  # no peer writes into a buffer before its owner has cleared it


def low_latency_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, *, max_tokens_per_rank: int, num_experts: int,
                         use_fp8: bool = True, round_scale: bool = False, return_recv_hook: bool = False,
                         group=None) -> LowLatencyDispatchResult:
    """Sends each (token, top-k slot) to the rank owning its expert, into a fixed-capacity layout.

    x: [N, H] bfloat16, N <= max_tokens_per_rank, H a multiple of 128. topk_idx: [N, K] int64
    global expert ids (-1 = not routed); rank r owns experts [r*E/R, (r+1)*E/R).
    use_fp8: cast to float8_e4m3fn on the fly with one float32 scale per 128 channels,
    scale = max(amax, 1e-4) / 448, rounded up to a power of two with round_scale (so that
    dequantising is exact in any precision, as DeepEP's round_scale); else bf16 as is.
    Returns recv_x [E_local, R*max_tokens_per_rank, H] (or the fp8 pair with scales
    [E_local, R*max, H/128]), recv_count [E_local] int32 and the handle for combine; expert e's
    rows are packed from row 0 by source rank (as DeepEP's): rank r's at [e, b : b + handle.layout[e, r]]
    with b = handle.layout[e, :r].sum(), in r's (token, slot) order; recv_count[e] rows in all.
    With return_recv_hook the call only sends; the outputs are valid after `result.hook()`.
    """
    op = "low_latency_dispatch"
    g = _group(group)
    if round_scale and not use_fp8:
        raise ValueError(f"{op}: round_scale applies to fp8 scales only (use_fp8=False)")
    _refuse_autograd(op, x=x)
    if torch.compiler.is_compiling():
        _ensure_buffers_when_traced(g.group_name, x.device.index, num_experts, max_tokens_per_rank, x.shape[1])
    else:  # under torch.compile the op makes these checks itself
        _C._ll_check_dispatch_args(x, topk_idx, max_tokens_per_rank, num_experts, use_fp8, g.size())
        _require_nvshmem_and_cuda(op, x)
        _ensure_buffers(g, x.device, num_experts, max_tokens_per_rank, x.shape[1])
    send_only = return_recv_hook and _hook_traceable("low_latency_dispatch")
    recv_x, scales, count, src_info, layout, send_slot, half = torch.ops.ep.low_latency_dispatch(
        x, topk_idx, max_tokens_per_rank, num_experts, use_fp8, round_scale, send_only, g.group_name)
    handle = LowLatencyHandle(g.group_name, g.size(), num_experts, max_tokens_per_rank, x.shape[0], x.shape[1],
                              src_info, layout, send_slot, use_fp8)
    hook = None
    if return_recv_hook and not send_only:
        hook = _received
    elif return_recv_hook:
        name, num_topk = g.group_name, topk_idx.shape[1]

        def hook() -> None:
            torch.ops.ep.low_latency_dispatch_recv(recv_x, scales, count, src_info, layout, half,
                                                   max_tokens_per_rank, num_topk, num_experts, name)
    return LowLatencyDispatchResult(recv_x=(recv_x, scales) if use_fp8 else recv_x, recv_count=count, handle=handle,
                                    hook=hook)


def low_latency_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor,
                        handle: LowLatencyHandle, *, return_recv_hook: bool = False,
                        out: Optional[torch.Tensor] = None) -> LowLatencyCombineResult:
    """Sends each expert output row back to the token it came from and sums, per token,
    topk_weights[t, k] * row(t, k) over the valid slots k in order, in float32, to bf16.

    x: [E_local, R*max_tokens_per_rank, H] bfloat16, laid out as the dispatch's recv_x.
    topk_idx / topk_weights: [N, K] int64 / float32, the dispatch's routing and its weights.
    out: an optional [N, H] bf16 tensor to write into. With return_recv_hook the call only
    sends; combined_x is valid after `result.hook()`. x written into
    low_latency_combine_buffer(handle) is not copied: the peers read it where it is.
    """
    op = "low_latency_combine"
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle: expected the LowLatencyHandle of a low_latency_dispatch, got {type(handle).__name__}")
    compiling = torch.compiler.is_compiling()
    if not compiling:
        _check_not_inside_a_region(op, x, handle.group_name)
    n = topk_idx.shape[0] if topk_idx.dim() >= 1 else 0
    if n != handle.num_tokens:
        raise ValueError(f"{op}: topk_idx has {n} tokens but the handle's dispatch sent {handle.num_tokens}")
    if out is None:
        hidden = x.shape[-1] if x.dim() >= 1 else 0
        out = torch.empty((n, hidden), dtype=torch.bfloat16, device=x.device)
    _refuse_autograd(op, x=x, topk_weights=topk_weights)
    if compiling:
        _ensure_buffers_when_traced(handle.group_name, x.device.index, handle.num_experts,
                                    handle.max_tokens_per_rank, x.shape[2])
    else:  # under torch.compile the op makes these checks itself
        g = dist.distributed_c10d._resolve_process_group(handle.group_name)
        _C._ll_check_combine_args(x, topk_idx, topk_weights, handle.send_slot, handle.layout, out,
                                  handle.max_tokens_per_rank, handle.num_experts, g.size())
        _require_nvshmem_and_cuda(op, x)
        _ensure_buffers(g, x.device, handle.num_experts, handle.max_tokens_per_rank, x.shape[2])
    send_only = return_recv_hook and _hook_traceable("low_latency_combine")
    if compiling and not send_only:
        _combine_in_graph(x, topk_idx, topk_weights, handle.send_slot, handle.layout, out,
                          handle.max_tokens_per_rank, handle.num_experts, handle.group_name)
        half = 0
    else:
        half = torch.ops.ep.low_latency_combine(x, topk_idx, topk_weights, handle.send_slot, handle.layout, out,
                                                handle.max_tokens_per_rank, handle.num_experts, send_only,
                                                handle.group_name)
    hook = None
    if return_recv_hook and not send_only:
        hook = _received
    elif return_recv_hook:
        name, num_experts, max_tokens = handle.group_name, handle.num_experts, handle.max_tokens_per_rank
        send_slot = handle.send_slot

        def hook() -> None:
            torch.ops.ep.low_latency_combine_recv(topk_idx, send_slot, topk_weights, out, half, max_tokens,
                                                  num_experts, name)
    return LowLatencyCombineResult(out, hook)


def low_latency_combine_buffer(handle: LowLatencyHandle) -> torch.Tensor:
    """The [E_local, R*max_tokens_per_rank, H] bf16 tensor to write expert outputs into, so that
    the next low_latency_combine moves them once (zero copy, as DeepEP's zero_copy combine).

    It lives in the group's symmetric memory: the next low_latency_combine given it as x sends
    without copying, and the peers read the rows straight from it. Before returning, this
    queues a wait on the current stream (on the device, no host sync; capturable in a graph) for
    the peers to be done reading the region from the combine before last, so the caller's
    kernels may write it right away. Call it for each combine (it alternates between two
    regions, as the combines do); x that is any other tensor is copied in as usual.
    """
    if not isinstance(handle, LowLatencyHandle):
        raise TypeError(f"handle: expected the LowLatencyHandle of a low_latency_dispatch, got {type(handle).__name__}")
    g = dist.distributed_c10d._resolve_process_group(handle.group_name)
    device = handle.src_info.device
    local = handle.num_experts // handle.num_ranks
    buffer = _C._ll_combine_buffer(handle.group_name, local, handle.max_tokens_per_rank, handle.hidden, device)
    _combine_regions.setdefault(g.group_name, set()).add((buffer.data_ptr(), buffer.nbytes))
    return buffer


def _hook_traceable(op: str) -> bool:
    """Whether a receive hook can be split from its send here. The hook passes the buffer half the
    send used (0 or 1 by the call's parity). Traced by torch.compile, that half is data-dependent,
    which the op's schema allows only if it returns a SymInt; with an `int` return the traced
    graph would keep the half of the call it traced. Then, under torch.compile, the call sends
    and receives at once and its hook has nothing left to do (the outputs are valid on return)."""
    return not torch.compiler.is_compiling() or _HALF_IS_SYMBOLIC[op]


def _returns_symint(op: str) -> bool:
    return str(getattr(torch.ops.ep, op).default._schema.returns[-1].type) == "SymInt"


_HALF_IS_SYMBOLIC = {op: _returns_symint(op) for op in ("low_latency_dispatch", "low_latency_combine")}


def _received() -> None:
    """The hook of a call that already received (see _hook_traceable)."""


@torch.library.custom_op("ep::low_latency_combine_in_graph", mutates_args=("out",))
def _combine_in_graph(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, send_slot: torch.Tensor,
                      layout: torch.Tensor, out: torch.Tensor, max_tokens_per_rank: int, num_experts: int,
                      group_name: str) -> None:
    """ep::low_latency_combine sending and receiving at once, as torch.compile traces it: dynamo
    puts no op whose result is a bare int (the buffer half) in a graph."""
    torch.ops.ep.low_latency_combine(x, topk_idx, topk_weights, send_slot, layout, out, max_tokens_per_rank,
                                     num_experts, False, group_name)


@_combine_in_graph.register_fake
def _combine_in_graph_fake(x, topk_idx, topk_weights, send_slot, layout, out, max_tokens_per_rank, num_experts,
                           group_name) -> None:
    return None


@torch.compiler.assume_constant_result
def _ensure_buffers_when_traced(group_name: str, device_index: int, num_experts: int, max_tokens: int,
                                hidden: int) -> int:
    """_ensure_buffers, run by torch.compile as it traces a call (every rank traces its first call
    alike, so the collective set-up stays in step), not by the compiled code: what it runs then is
    only the op, which finds the buffers in place. The argument checks are the op's own."""
    g = dist.distributed_c10d._resolve_process_group(group_name)
    if not _C.has_nvshmem:
        raise RuntimeError(f"low-latency ops: {_C._ll_no_nvshmem_message}")
    if device_index is None:
        raise ValueError("low-latency ops run on CUDA tensors (torch_ep.reference has the CPU references)")
    _ensure_buffers(g, torch.device("cuda", device_index), num_experts, max_tokens, hidden)
    return 0


def _check_not_inside_a_region(op: str, x: torch.Tensor, group_name: str) -> None:
    start = x.data_ptr()
    for base, nbytes in _combine_regions.get(group_name, ()):
        if base < start < base + nbytes:
            raise ValueError(f"{op}: x lies inside a low_latency_combine_buffer but does not start where it does; "
                             f"pass the buffer itself (or a tensor of your own)")


def check_errors(group=None) -> None:
    """Raises what the group's low-latency kernels reported (a timeout waiting for a peer, more
    rows than the capacity, an expert id out of range) since the last check. Every op checks on
    entry; call this after a synchronize to see a failure of the last calls."""
    _C._ll_check_errors(_group(group).group_name)


# ------------------------------------------------------------------------------- fake kernels

def _group_size(group_name: str) -> int:
    return dist.distributed_c10d._resolve_process_group(group_name).size()


@torch.library.register_fake("ep::low_latency_dispatch")
def _dispatch_fake(x, topk_idx, max_tokens_per_rank, num_experts, use_fp8, round_scale, send_only, group_name):
    r = _group_size(group_name)
    local, rows, hidden = num_experts // r, r * max_tokens_per_rank, x.shape[1]
    recv_x = x.new_empty(local, rows, hidden, dtype=torch.float8_e4m3fn if use_fp8 else torch.bfloat16)
    scales = (x.new_empty(local, rows, hidden // FP8_BLOCK, dtype=torch.float32) if use_fp8
              else x.new_empty(0, dtype=torch.float32))
    return (recv_x, scales, x.new_empty(local, dtype=torch.int32), x.new_empty(local, rows, dtype=torch.int32),
            x.new_empty(local, r, dtype=torch.int32), x.new_empty(topk_idx.shape, dtype=torch.int32),
            _half_fake("low_latency_dispatch", send_only))


def _half_fake(op: str, send_only: bool):
    """The buffer half a call used: 0 or 1 by the call's parity, so data-dependent for a traced
    graph. Only the receive hook reads it (send_only); without one it is never used, and a
    constant keeps the op free of unbacked symbols (CUDA-graph partitions keep it inside). An op
    whose schema returns an `int` cannot return a data-dependent one (see _hook_traceable)."""
    if send_only and _HALF_IS_SYMBOLIC[op]:
        return torch.library.get_ctx().new_dynamic_size()
    return 0


@torch.library.register_fake("ep::low_latency_dispatch_recv")
def _dispatch_recv_fake(recv_x, recv_scales, recv_count, recv_src_info, recv_layout, half, max_tokens_per_rank,
                        num_topk, num_experts, group_name):
    return None


@torch.library.register_fake("ep::low_latency_combine")
def _combine_fake(x, topk_idx, topk_weights, send_slot, layout, out, max_tokens_per_rank, num_experts, send_only,
                  group_name):
    return _half_fake("low_latency_combine", send_only)


@torch.library.register_fake("ep::low_latency_combine_recv")
def _combine_recv_fake(topk_idx, send_slot, topk_weights, out, half, max_tokens_per_rank, num_experts, group_name):
    return None
