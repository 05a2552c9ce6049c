"""MoE dispatch and combine on an "ep" group (the API of DESIGN.md).

The work is done by the torch ops ep::get_dispatch_layout, ep::dispatch and ep::combine
(backend/ops, CPU and CUDA kernels). This module gives them their Python signatures, autograd
(dispatch's backward is a combine of the gradients, combine's a dispatch along the handle),
fake kernels for torch.compile, and async_op.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import _C  # noqa: F401  (registers the ep:: ops)
from .types import FP8_BLOCK, CombineResult, DispatchHandle, DispatchLayout, DispatchResult, Payload, send_matrix_size

__all__ = ["get_dispatch_layout", "dispatch", "combine", "combine_buffer", "dispatch_buffer", "MoEWork"]


def _group(group):
    group = group or dist.group.WORLD
    if group is None:
        raise RuntimeError("torch_ep: no default process group; call dist.init_process_group(backend='ep') first")
    return group


def _split_payload(x: Payload) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    if isinstance(x, (tuple, list)):
        if len(x) != 2:
            raise ValueError(f"x: expected a tensor or the fp8 pair (x, scales), got a sequence of {len(x)}")
        return x[0], x[1]
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a tensor or the fp8 pair (x, scales), got {type(x).__name__}")
    return x, None


# ------------------------------------------------------------------------------- async_op

class MoEWork:
    """What an async_op call returns: wait() makes the current stream wait for the op (no CPU
    block), as a ProcessGroupNCCL Work does; CPU ops are complete when they return."""

    def __init__(self, event: Optional[torch.cuda.Event] = None, outputs=(), device=None):
        self._event, self._device = event, device
        self._outputs = [t for t in outputs if isinstance(t, torch.Tensor) and t.is_cuda]

    def wait(self, timeout=None) -> bool:
        if self._event is not None:
            stream = torch.cuda.current_stream(self._device)
            stream.wait_event(self._event)
            # The outputs were made on the side stream; tell the allocator the caller uses them.
            for t in self._outputs:
                t.record_stream(stream)
        return True

    def is_completed(self) -> bool:
        return self._event is None or self._event.query()

    def synchronize(self) -> None:
        if self._event is not None:
            self._event.synchronize()


_side_streams: dict = {}


def _run(fn, inputs, async_op: bool):
    """Runs fn() now, or on a side stream that first waits for the caller's work (async_op)."""
    if not async_op:
        return fn(), None
    device = next((t.device for t in inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
    if device.type != "cuda":
        return fn(), MoEWork()
    caller = torch.cuda.current_stream(device)
    side = _side_streams.setdefault(device, torch.cuda.Stream(device))
    side.wait_stream(caller)
    with torch.cuda.stream(side):
        outputs = fn()
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t.record_stream(side)
    event = torch.cuda.Event()
    event.record(side)
    flat = [t for group in outputs for t in (group if isinstance(group, (tuple, list)) else (group,))]
    return outputs, MoEWork(event, flat, device)


# ------------------------------------------------------------------------------- autograd

def _needs_grad(x: torch.Tensor, weights: Optional[torch.Tensor] = None) -> bool:
    """Whether a gradient can flow through an op on x (and weights): autograd.Function costs tens
    of microseconds per call, so it runs only then."""
    return torch.is_grad_enabled() and (x.requires_grad or (weights is not None and weights.requires_grad))


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_scales, topk_idx, topk_weights, handle_meta, handle_counts, num_experts, num_worst_tokens,
                group_name, layout_meta=None, layout_header=None):
        out = torch.ops.ep.dispatch(x, x_scales, topk_idx, topk_weights, handle_meta, handle_counts, num_experts,
                                    num_worst_tokens, group_name, layout_meta, layout_header)
        recv_x, recv_scales, recv_idx, recv_w, meta, counts = out
        if handle_meta is not None:
            meta, counts = handle_meta, handle_counts
        elif layout_meta is not None:
            meta = layout_meta
        ctx.num_experts, ctx.group_name, ctx.has_weights = num_experts, group_name, topk_weights is not None
        ctx.save_for_backward(meta, counts, recv_idx if topk_weights is not None else None)
        ctx.mark_non_differentiable(recv_scales, recv_idx, out[4], out[5])
        return out

    @staticmethod
    def backward(ctx, grad_x, _scales, _idx, grad_w, _meta, _counts):
        meta, counts, recv_idx = ctx.saved_tensors
        weights = None
        if ctx.has_weights and ctx.needs_input_grad[3] and grad_w is not None:
            # Slots of other ranks' experts were zeros, not the weights: no gradient flows there.
            weights = grad_w.masked_fill(recv_idx < 0, 0)
        if grad_x is None:
            return (None,) * 11
        combined, combined_w = torch.ops.ep.combine(grad_x.contiguous(), weights, meta, counts, ctx.num_experts,
                                                    ctx.group_name)
        return combined, None, None, combined_w if weights is not None else None, None, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_weights, handle_meta, handle_counts, num_experts, num_worst_tokens, group_name):
        ctx.num_experts, ctx.num_worst_tokens, ctx.group_name = num_experts, num_worst_tokens, group_name
        ctx.save_for_backward(handle_meta, handle_counts)
        return torch.ops.ep.combine(x, topk_weights, handle_meta, handle_counts, num_experts, group_name)

    @staticmethod
    def backward(ctx, grad_x, grad_w):
        meta, counts = ctx.saved_tensors
        grad_x = grad_x.contiguous() if grad_x is not None else None
        recv_x = torch.ops.ep.dispatch(grad_x, None, None, None, meta, counts, ctx.num_experts,
                                       ctx.num_worst_tokens, ctx.group_name)[0] if grad_x is not None else None
        recv_w = None
        if ctx.needs_input_grad[1] and grad_w is not None and grad_w.numel():
            # Weights go back along the same route as a float32 payload.
            recv_w = torch.ops.ep.dispatch(grad_w.contiguous(), None, None, None, meta, counts, ctx.num_experts,
                                           ctx.num_worst_tokens, ctx.group_name)[0]
        return recv_x, recv_w, None, None, None, None, None


# ------------------------------------------------------------------------------- public API

# The ops, looked up once: each torch.ops.ep.<op> is two attribute lookups through the op
# namespaces' Python (about 0.5 us a call).
_layout_op, _dispatch_op, _combine_op = torch.ops.ep.get_dispatch_layout, torch.ops.ep.dispatch, torch.ops.ep.combine

# The direct call (TORCH_EP_DIRECT_CALL=0 turns it off; read at the first call): eager dispatch
# and combine on plain tensors call the ops' functions through pybind (_C._dispatch_direct,
# _C._combine_direct), not through the dispatcher's boxed call (2.0 against 0.5 us for a call of
# dispatch's schema on the CPU machine), and take None for the outputs that hold nothing in the call
# (bf16's scales, a given layout's table, a cached dispatch's ids and counts), which the op returns
# as empty tensors: on an H100 host a cached dispatch's handle took 0.7-1.0 us against 2.8-4.2, its
# outputs 2.9-4.6 against 5.9-9.6 (tools/moe_profile.py's phase clock, session 33).
_DIRECT = None
_direct_allowed = _C._direct_allowed  # the checks after the switch, in one call (moe_ops.cpp)


def _direct(*tensors) -> bool:
    """Whether the direct call may stand in for the op: nothing that intercepts ops is
    active (a torch function or dispatch mode, a functorch transform, compile, the jit tracer) and
    every tensor (or None) is a plain torch.Tensor, no subclass (DTensor, FakeTensor)."""
    global _DIRECT
    if torch.compiler.is_compiling():  # first: a trace never reads the switch or sets the global
        return False
    if _DIRECT is None:
        value = os.environ.get("TORCH_EP_DIRECT_CALL", "1") or "1"
        if value not in ("0", "1"):
            raise ValueError(f"TORCH_EP_DIRECT_CALL={value!r}: expected 0 or 1")
        _DIRECT = value == "1"
    return _DIRECT and _direct_allowed(*tensors)


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, group=None) -> DispatchLayout:
    """Where each token of `topk_idx` [N, K] goes: tokens per rank, token-expert pairs per expert,
    and is_token_in_rank [N, R]. Local: no communication. Passing the result to
    dispatch(layout=) spares dispatch its own layout step (DeepEP's calling convention)."""
    g = _group(group)
    # The group's own size() (dist.get_world_size costs ~3 us a call): the same number for a
    # ProcessGroup; the non-member placeholder takes get_world_size's -1 as before.
    return _layout(topk_idx, num_experts, g.size() if isinstance(g, dist.ProcessGroup) else dist.get_world_size(g))


def _layout(topk_idx: torch.Tensor, num_experts: int, size: int) -> DispatchLayout:
    """get_dispatch_layout on a group of `size` ranks (torch_ep.deep_ep's Buffer knows its size)."""
    # On CUDA the kernel also writes the sizes to pinned host memory, so that a dispatch with this
    # layout reads them there (no copy, event or stream wait); not inside a trace or a capture.
    host_header = topk_idx.is_cuda and not torch.compiler.is_compiling() and not torch.cuda.is_current_stream_capturing()
    per_rank, per_expert, in_rank, meta, header = _layout_op(topk_idx, num_experts, size, host_header)
    return DispatchLayout(per_rank, per_expert, in_rank, meta, header if host_header else None)


def dispatch(x: Payload, topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None, *,
             num_experts: Optional[int] = None, group=None, layout: Optional[DispatchLayout] = None,
             handle: Optional[DispatchHandle] = None, expert_alignment: int = 1, num_worst_tokens: int = 0,
             async_op: bool = False) -> DispatchResult:
    """Sends each token to every rank that owns one of its experts, once per rank.

    Give `topk_idx` [N, K] (global expert ids, -1 = not routed) and `num_experts`, or the
    `handle` of an earlier dispatch to send new data along the same route. Received rows are
    ordered by source rank, then by the source's token order. `num_worst_tokens` > 0 makes every
    output that many rows long (real rows first, then padding that routes nowhere: expert -1,
    weight 0, recv_x zero on CPU and unspecified on CUDA), so that a CUDA dispatch needs no host
    synchronisation and can be captured in a graph. `layout` (from get_dispatch_layout) is
    accepted for DeepEP-style call sites; the op computes its own routing table in any case.
    """
    g = _group(group)
    size, name = g.size(), g.group_name
    x_data, x_scales = (x, None) if isinstance(x, torch.Tensor) else _split_payload(x)
    if expert_alignment < 1:
        raise ValueError(f"expert_alignment must be >= 1, got {expert_alignment}")
    if handle is not None:
        if not isinstance(handle, DispatchHandle):
            raise TypeError(f"handle: expected the DispatchHandle of an earlier torch_ep dispatch, got "
                            f"{type(handle).__name__}")
        if topk_idx is not None or topk_weights is not None:
            raise ValueError("give either topk_idx (a new route) or handle (an earlier route), not both")
        outputs, work = _along(x_data, x_scales, handle, name, num_experts, async_op)
        return DispatchResult(outputs[0] if x_scales is None else (outputs[0], outputs[1]), None, None, None,
                              handle, work, expert_alignment)
    if topk_idx is None or num_experts is None:
        raise ValueError("dispatch needs topk_idx and num_experts, or the handle of an earlier dispatch")
    layout_meta = layout_header = None
    if layout is not None:
        if layout.is_token_in_rank.shape != (topk_idx.shape[0], size):  # a torch.Size is a tuple
            raise ValueError(f"layout: its is_token_in_rank has shape {tuple(layout.is_token_in_rank.shape)}, "
                             f"expected {(topk_idx.shape[0], size)}; was it made for this topk_idx?")
        layout_meta = layout.meta
        layout_header = layout.header if layout_meta is not None else None
    outputs, handle, work = _new_route(x_data, x_scales, topk_idx, topk_weights, num_experts, num_worst_tokens, name,
                                       size, layout_meta, layout_header, async_op)
    return DispatchResult(outputs[0] if x_scales is None else (outputs[0], outputs[1]), outputs[2],
                          outputs[3] if topk_weights is not None else None, None, handle, work, expert_alignment)


def _along(x_data, x_scales, handle: DispatchHandle, name: str, num_experts=None, async_op=False):
    """dispatch along `handle` (a DispatchHandle) on the group named `name`, after the checks that
    it belongs there and routes x's rows: (the op's six outputs, work). torch_ep.deep_ep's
    cached dispatch calls it too."""
    if handle.group_name != name:
        raise ValueError(f"handle: it was made on group {handle.group_name!r}, not on this call's group "
                         f"{name!r}")
    if num_experts is not None and num_experts != handle.num_experts:
        raise ValueError(f"num_experts={num_experts} differs from the handle's {handle.num_experts}")
    if x_data.dim() >= 1 and x_data.shape[0] != handle.num_tokens:
        raise ValueError(f"x: the handle routes {handle.num_tokens} tokens but x has {x_data.shape[0]} rows")
    return _issue_dispatch(x_data, x_scales, None, None, handle.meta, handle.counts, handle.num_experts,
                           handle.num_worst_tokens, name, None, None, async_op)


def _new_route(x_data, x_scales, topk_idx, topk_weights, num_experts, num_worst_tokens, name, size, layout_meta,
               layout_header, async_op=False):
    """dispatch along a new route, its arguments checked: (the op's six outputs, the handle, work).
    torch_ep.deep_ep's Buffer calls it after its own checks (the same, on DeepEP's arguments)."""
    outputs, work = _issue_dispatch(x_data, x_scales, topk_idx, topk_weights, None, None, num_experts,
                                    num_worst_tokens, name, layout_meta, layout_header, async_op)
    shape = x_data.shape  # read once: each .shape / .dim() is a call into the tensor (~0.1-0.2 us)
    handle = DispatchHandle(name, size, num_experts, shape[0],
                            layout_meta if layout_meta is not None else outputs[4], outputs[5], num_worst_tokens,
                            shape[1] if len(shape) == 2 else 0)
    return outputs, handle, work


def _issue_dispatch(x_data, x_scales, topk_idx, topk_weights, meta, counts, num_experts, num_worst_tokens, name,
                    layout_meta, layout_header, async_op):
    if _needs_grad(x_data, topk_weights):
        op = _Dispatch.apply
    elif _direct(x_data, x_scales, topk_idx, topk_weights, meta, counts, layout_meta, layout_header):
        op = _C._dispatch_direct
    else:
        op = _dispatch_op
    if not async_op:
        return op(x_data, x_scales, topk_idx, topk_weights, meta, counts, num_experts, num_worst_tokens, name,
                  layout_meta, layout_header), None
    return _run(lambda: op(x_data, x_scales, topk_idx, topk_weights, meta, counts, num_experts, num_worst_tokens,
                           name, layout_meta, layout_header), [x_data, x_scales, topk_idx, topk_weights, meta], True)


def combine(x: torch.Tensor, handle: DispatchHandle, topk_weights: Optional[torch.Tensor] = None, *, group=None,
            async_op: bool = False) -> CombineResult:
    """The reverse route of `handle`'s dispatch: for each token, the sum (in float32, unweighted)
    of the rows the ranks it went to send back, as x's dtype; likewise for topk_weights."""
    g = _group(group)
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: expected the DispatchHandle of a torch_ep dispatch, got {type(handle).__name__}")
    (combined, combined_w), work = _combine_along(x, handle, topk_weights, g.group_name, async_op)
    return CombineResult(combined, combined_w if topk_weights is not None else None, work)


def _combine_along(x, handle: DispatchHandle, topk_weights, name: str, async_op=False):
    """combine along `handle` (a DispatchHandle) on the group named `name`, after the check that it
    belongs there: (the op's two outputs, work). torch_ep.deep_ep's combine calls it too."""
    if handle.group_name != name:
        raise ValueError(f"handle: it was made on group {handle.group_name!r}, not on this call's group "
                         f"{name!r}")
    if _needs_grad(x, topk_weights):
        op, args = _Combine.apply, (x, topk_weights, handle.meta, handle.counts, handle.num_experts,
                                    handle.num_worst_tokens, name)
    else:
        op = _C._combine_direct if _direct(x, topk_weights, handle.meta, handle.counts) else _combine_op
        args = (x, topk_weights, handle.meta, handle.counts, handle.num_experts, name)
    return _run(lambda: op(*args), [x, topk_weights], True) if async_op else (op(*args), None)


COMBINE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@torch.compiler.disable
def combine_buffer(handle: DispatchHandle, dtype: Optional[torch.dtype] = None, *,
                   hidden: Optional[int] = None) -> torch.Tensor:
    """The [M, H] tensor to write expert outputs into, for combine(it, handle): M the rows the
    dispatch of `handle` delivered to this rank (its recv_x rows: num_worst_tokens where given),
    H the dispatch's hidden size unless `hidden` is given, `dtype` bfloat16 unless given
    (DeepEP's combine dtype; float16 and float32 are taken too).

    Where the dispatch took the device route across nodes, it is this rank's region of the
    group's NVSHMEM buffer: a combine given it as x leaves the rows where they are, and the
    ranks of this node read them there (zero copy, as low_latency_combine_buffer). Before
    returning, it queues on the current stream a wait (on the device, bounded by the group's
    timeout; capturable in a CUDA graph) until those ranks are done reading the region in the
    previous combine, so the caller's kernels may write it at once: call it before each combine
    and write only the tensor of that call. On one node where the group pushes (Options.moe_push),
    it is a tensor of the group's MoE pool, which every rank maps: a combine given it as x exports
    nothing and, with Options.moe_device_records, copies nothing into the pool first. Elsewhere
    (CPU, one node without push, the host-driven route, a node whose ranks do not map each other,
    a full pool, or a region too small: Options.internode_combine_rows) it is a plain torch.empty
    of that shape on the handle's device, so code stays portable.
    Eager only: under torch.compile it runs outside the graph (a graph break).
    """
    if not isinstance(handle, DispatchHandle):
        raise TypeError(f"handle: expected the DispatchHandle of a torch_ep dispatch, got {type(handle).__name__}")
    dtype = torch.bfloat16 if dtype is None else dtype
    if dtype not in COMBINE_DTYPES:
        raise TypeError(f"dtype: combine takes bfloat16, float16 or float32, got {dtype}")
    hidden = handle.hidden if hidden is None else hidden
    if hidden < 1:
        raise ValueError(f"hidden: expected a positive hidden size, got {hidden}"
                         + (" (the handle records none; pass hidden=)" if handle.hidden == 0 else ""))
    if handle.num_worst_tokens > 0:
        rows = handle.num_worst_tokens
    else:
        recv = handle.recv_counts
        if any(n < 0 for n in recv):
            raise ValueError("handle: its dispatch's received rows are known only on the device")
        rows = sum(recv)
    device = handle.meta.device
    region = _C._combine_buffer(handle.group_name, handle.counts, handle.num_experts, rows, hidden, dtype, device)
    return region if region is not None else torch.empty((rows, hidden), dtype=dtype, device=device)


DISPATCH_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


@torch.compiler.disable
def dispatch_buffer(num_tokens: int, hidden: int, dtype: torch.dtype = torch.bfloat16, *, group=None,
                    device=None) -> Payload:
    """The [num_tokens, hidden] tensor to write a dispatch's x into, for dispatch(it, ...) on
    `group`: `dtype` bfloat16 unless given (float16 and float32 too); for torch.float8_e4m3fn
    the pair (x [num_tokens, hidden], scales [num_tokens, ceil(hidden / 128)] float32) that
    dispatch takes. `device`: the current CUDA device where CUDA is available, else the CPU.

    Where dispatch takes the device route across nodes, it is a view of this rank's packed rows
    in the group's NVSHMEM buffer (row-strided: rows lie the buffer's row stride apart, the
    scales beside each row's payload): a dispatch given it as x (and the scales view as scales)
    leaves the payload where it is and writes only each row's routing fields beside it, one
    copy fewer per token (zero copy). Before returning, it queues on the current stream a wait
    (on the device, bounded by the group's timeout; capturable in a CUDA graph) until this
    node's ranks are done reading those rows in the previous dispatch, so the caller's kernels
    may write it at once. It is one region per rank: call it before each dispatch, write the
    tensor it returned, and dispatch from it before the group's next dispatch (which packs its
    rows there; a combine in between leaves them alone). Elsewhere (CPU, one node, the host-
    driven route, before the group's first dispatch across nodes allocated the buffer, more
    tokens than Options.internode_capacity) it is a plain torch.empty, so code stays portable.
    Eager only: under torch.compile it runs outside the graph (a graph break).
    """
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens: expected a number of tokens >= 0, got {num_tokens!r}")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1:
        raise ValueError(f"hidden: expected a positive hidden size, got {hidden!r}")
    if dtype not in DISPATCH_DTYPES:
        raise TypeError(f"dtype: dispatch takes bfloat16, float16, float32, or float8_e4m3fn with its scales; "
                        f"got {dtype}")
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device: expected a CPU or CUDA device, got {device}")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    g = _group(group)
    views = _C._dispatch_buffer(g.group_name, num_tokens, hidden, dtype, device)
    fp8 = dtype == torch.float8_e4m3fn
    if not views:
        views = [torch.empty((num_tokens, hidden), dtype=dtype, device=device)]
        if fp8:
            views.append(torch.empty((num_tokens, -(-hidden // FP8_BLOCK)), dtype=torch.float32, device=device))
    return (views[0], views[1]) if fp8 else views[0]


# ------------------------------------------------------------------------------- fake kernels

def _group_size(group_name: str) -> int:
    return dist.distributed_c10d._resolve_process_group(group_name).size()


def _route_tail(group_name: str, device: torch.device):
    """The length of a handle's state across nodes: 0 on one node; 3 on the device-driven route
    (CUDA, NVSHMEM built, Options.internode_device: [nodes, ranks per node, route tag]); else
    None, data-dependent (the host-driven route keeps each relayed token's targets)."""
    from ._backend import get_backend
    backend = get_backend(dist.distributed_c10d._resolve_process_group(group_name))
    if backend.num_nodes <= 1:
        return 0
    if device.type == "cuda" and _C.has_nvshmem and backend.config.internode_device:
        return 3  # backend/ops/cuda/moe_internode_device.cpp: counts.internode
    return None


@torch.library.register_fake("ep::get_dispatch_layout")
def _layout_fake(topk_idx, num_experts, num_ranks, host_header=False):
    n = topk_idx.shape[0]
    if host_header and topk_idx.is_cuda:
        header = torch.empty(_meta_header(num_ranks, num_experts) + num_ranks, dtype=torch.int32, device="cpu")
    else:
        header = topk_idx.new_empty(0, dtype=torch.int32)
    return (topk_idx.new_empty(num_ranks, dtype=torch.int32), topk_idx.new_empty(num_experts, dtype=torch.int32),
            topk_idx.new_empty(n, num_ranks, dtype=torch.bool),
            topk_idx.new_empty(_meta_header(num_ranks, num_experts) + 2 * n * num_ranks, dtype=torch.int32), header)


def _meta_header(num_ranks: int, num_experts: int) -> int:
    # MetaLayout::header_size() of backend/kernels/moe_meta.hpp
    return num_ranks + 2 * num_experts + 2


@torch.library.register_fake("ep::dispatch")
def _dispatch_fake(x, x_scales, topk_idx, topk_weights, handle_meta, handle_counts, num_experts, num_worst_tokens,
                   group_name, layout_meta=None, layout_header=None):
    r = _group_size(group_name)
    rows = num_worst_tokens if num_worst_tokens > 0 else torch.library.get_ctx().new_dynamic_size()
    n, hidden = x.shape
    recv_x = x.new_empty(rows, hidden)
    recv_scales = x_scales.new_empty(rows, x_scales.shape[1]) if x_scales is not None else x.new_empty(0, dtype=torch.float32)
    if handle_meta is None:
        k = topk_idx.shape[1]
        recv_idx = x.new_empty(rows, k, dtype=torch.int64)
        recv_w = x.new_empty(rows, k, dtype=torch.float32) if topk_weights is not None else x.new_empty(0, dtype=torch.float32)
        meta = x.new_empty(0 if layout_meta is not None else _meta_header(r, num_experts) + 2 * n * r,
                           dtype=torch.int32)
        fixed = 2 + 2 * r + num_experts // r + send_matrix_size(r)
        tail = _route_tail(group_name, x.device)
        size = fixed + tail if tail is not None else torch.library.get_ctx().new_dynamic_size(min=fixed)
        counts = torch.empty(size, dtype=torch.int64, device="cpu")
    else:
        recv_idx = x.new_empty(0, dtype=torch.int64)
        recv_w = x.new_empty(0, dtype=torch.float32)
        meta = x.new_empty(0, dtype=torch.int32)
        counts = torch.empty(0, dtype=torch.int64, device="cpu")
    return recv_x, recv_scales, recv_idx, recv_w, meta, counts


@torch.library.register_fake("ep::combine")
def _combine_fake(x, topk_weights, handle_meta, handle_counts, num_experts, group_name):
    r = _group_size(group_name)
    n = (handle_meta.shape[0] - _meta_header(r, num_experts)) // (2 * r)
    combined_w = (x.new_empty(n, topk_weights.shape[1], dtype=torch.float32) if topk_weights is not None
                  else x.new_empty(0, dtype=torch.float32))
    return x.new_empty(n, x.shape[1]), combined_w
