"""Pure-PyTorch references of torch_ep's ops, for tests.

Each reference takes another route than the op it checks. all_to_all_single here is built on
all_gather_object (delegated to the inner backend), so a fault in torch_ep's transport cannot
hide in both; the MoE references (get_dispatch_layout, dispatch, combine) are built on
all_to_all_single, as DESIGN.md asks, and are themselves checked against a brute-force
all_gather computation in tests/test_reference_moe.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from .types import CombineResult, DispatchLayout, DispatchResult, Payload


def _splits(rows: int, splits: Optional[Sequence[int]], size: int) -> List[int]:
    if splits is None or len(splits) == 0:
        return [rows // size] * size
    return list(splits)


def _pack(t: torch.Tensor):
    # Raw bytes: pickling tensors of some dtypes (fp8) is not supported by torch.save. A clone,
    # not contiguous(): a "contiguous" tensor with size-1 dims can keep strides view() refuses.
    t = t.detach().cpu().clone(memory_format=torch.contiguous_format)
    return str(t.dtype).removeprefix("torch."), tuple(t.shape), t.reshape(-1).view(torch.uint8).numpy().tobytes()


def _unpack(packed) -> torch.Tensor:
    dtype, shape, data = packed
    flat = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    return flat.view(getattr(torch, dtype)).reshape(shape)


def _all_gather(value, group):
    gathered: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def all_to_all_single(output_shape, input: torch.Tensor, output_split_sizes=None, input_split_sizes=None,
                      group=None) -> torch.Tensor:
    """What all_to_all_single should leave in an output of `output_shape`, on the CPU."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    in_splits = _splits(input.shape[0], input_split_sizes, size)
    pieces = []
    for packed, splits in _all_gather((_pack(input), in_splits), group):
        start = sum(splits[:rank])
        pieces.append(_unpack(packed)[start:start + splits[rank]])
    return torch.cat(pieces).reshape(output_shape)


def all_to_all(input_tensor_list: Sequence[torch.Tensor], group=None) -> List[torch.Tensor]:
    """What the list form of all_to_all should leave in each output, on the CPU."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    gathered = _all_gather([_pack(t) for t in input_tensor_list], group)
    return [_unpack(gathered[src][rank]) for src in range(size)]


def all_to_all_v(input: torch.Tensor, input_splits: torch.Tensor, *, output: Optional[torch.Tensor] = None,
                 group=None):
    """torch_ep.all_to_all_v on all_to_all_single: the splits go first (an int64
    all_to_all_single), then the rows, into `output`'s first rows (raising, with nothing written,
    when they do not fit) or into a new tensor of exactly the received rows. Returns an
    AllToAllVResult (no work). Not differentiable: the tests derive the expected gradients."""
    from .types import AllToAllVResult

    size = dist.get_world_size(group)
    if input_splits.shape != (size,) or input_splits.dtype != torch.int64:
        raise ValueError(f"input_splits must be int64 [{size}], got {input_splits.dtype} {tuple(input_splits.shape)}")
    output_splits = torch.empty_like(input_splits)
    dist.all_to_all_single(output_splits, input_splits.contiguous(), group=group)
    send, recv = input_splits.tolist(), output_splits.tolist()
    rows = torch.empty((sum(recv), *input.shape[1:]), dtype=input.dtype, device=input.device)
    dist.all_to_all_single(rows, input.contiguous(), recv, send, group=group)
    if output is None:
        output = rows
    elif rows.shape[0] > output.shape[0]:
        raise ValueError(f"all_to_all_v: output has room for {output.shape[0]} rows but {rows.shape[0]} arrived")
    else:
        output[:rows.shape[0]] = rows
    offsets = torch.cumsum(output_splits, 0) - output_splits
    return AllToAllVResult(output, output_splits, offsets)


# --------------------------------------------------------------------------- MoE dispatch / combine

def _experts_per_rank(num_experts: int, size: int) -> int:
    if num_experts % size:
        raise ValueError(f"num_experts={num_experts} must be divisible by the group size {size}")
    return num_experts // size


@dataclass
class ReferenceHandle:
    """The reference's own route record (the real ops' DispatchHandle holds a device table)."""
    num_experts: int
    num_tokens: int
    send_token_index: torch.Tensor  # [S] int64: token ids this rank sent, grouped by target rank
    send_counts: List[int]
    recv_counts: List[int]
    num_recv_tokens_per_expert: List[int]  # unpadded


def get_dispatch_layout(topk_idx: torch.Tensor, num_experts: int, group=None) -> DispatchLayout:
    """Where each token goes: -1 slots are not routed; rank r owns experts [r*E/R, (r+1)*E/R)."""
    size = dist.get_world_size(group)
    per_rank = _experts_per_rank(num_experts, size)
    valid = topk_idx >= 0
    owner = torch.where(valid, topk_idx // per_rank, torch.zeros_like(topk_idx))
    is_token_in_rank = torch.zeros(topk_idx.shape[0], size, dtype=torch.bool, device=topk_idx.device)
    rows = torch.arange(topk_idx.shape[0], device=topk_idx.device).unsqueeze(1).expand_as(topk_idx)
    is_token_in_rank[rows[valid], owner[valid]] = True
    per_expert = torch.bincount(topk_idx[valid], minlength=num_experts)
    return DispatchLayout(is_token_in_rank.sum(0).to(torch.int32), per_expert.to(torch.int32), is_token_in_rank)


def _exchange_rows(t: torch.Tensor, send_counts: List[int], recv_counts: List[int], group) -> torch.Tensor:
    out = torch.empty((sum(recv_counts), *t.shape[1:]), dtype=t.dtype, device=t.device)
    dist.all_to_all_single(out, t.contiguous(), recv_counts, send_counts, group=group)
    return out


def dispatch(x: Payload, topk_idx: Optional[torch.Tensor] = None, topk_weights: Optional[torch.Tensor] = None, *,
             num_experts: Optional[int] = None, group=None, expert_alignment: int = 1,
             handle: Optional[ReferenceHandle] = None) -> DispatchResult:
    """Sends each token once to every rank owning one of its experts (rows by source rank, then
    source token order); the receiver sees its own experts' local ids and weights, -1 / 0 else.
    With `handle`, sends x along that earlier route and returns no top-k."""
    if handle is not None:
        def resend(t):
            return _exchange_rows(t[handle.send_token_index], handle.send_counts, handle.recv_counts, group)
        recv_x = tuple(resend(t) for t in x) if isinstance(x, tuple) else resend(x)
        per_expert = [-(-n // expert_alignment) * expert_alignment for n in handle.num_recv_tokens_per_expert]
        return DispatchResult(recv_x, None, None, per_expert, handle)
    size = dist.get_world_size(group)
    per_rank = _experts_per_rank(num_experts, size)
    layout = get_dispatch_layout(topk_idx, num_experts, group)
    send_index = torch.cat([layout.is_token_in_rank[:, dst].nonzero().flatten() for dst in range(size)])
    send_counts = layout.num_tokens_per_rank.tolist()
    counts = torch.tensor(send_counts, dtype=torch.int64, device=topk_idx.device)
    recv_counts_t = torch.empty_like(counts)
    dist.all_to_all_single(recv_counts_t, counts, group=group)
    recv_counts = recv_counts_t.tolist()

    def send(t):
        return _exchange_rows(t[send_index], send_counts, recv_counts, group)

    recv_x = tuple(send(t) for t in x) if isinstance(x, tuple) else send(x)
    # Each sent row carries the ids of the experts its target owns, made local; -1 elsewhere.
    target = torch.repeat_interleave(torch.arange(size, device=topk_idx.device), counts)
    sent_idx = topk_idx[send_index]
    mine = (sent_idx >= 0) & (sent_idx // per_rank == target.unsqueeze(1))
    local_idx = torch.where(mine, sent_idx - target.unsqueeze(1) * per_rank, torch.full_like(sent_idx, -1))
    recv_topk_idx = _exchange_rows(local_idx, send_counts, recv_counts, group)
    recv_topk_weights = None
    if topk_weights is not None:
        sent_w = torch.where(mine, topk_weights[send_index].float(), torch.zeros_like(topk_weights[send_index].float()))
        recv_topk_weights = _exchange_rows(sent_w, send_counts, recv_counts, group)
    unpadded = [int((recv_topk_idx == e).any(dim=1).sum()) for e in range(per_rank)]
    per_expert = [-(-n // expert_alignment) * expert_alignment for n in unpadded]
    handle = ReferenceHandle(num_experts=num_experts, num_tokens=topk_idx.shape[0], send_token_index=send_index,
                             send_counts=send_counts, recv_counts=recv_counts, num_recv_tokens_per_expert=unpadded)
    return DispatchResult(recv_x, recv_topk_idx, recv_topk_weights, per_expert, handle)


def combine(x: torch.Tensor, handle: ReferenceHandle, topk_weights: Optional[torch.Tensor] = None, *,
            group=None, ranks_per_node: Optional[int] = None) -> CombineResult:
    """The reverse route of dispatch: each token's rows from every rank it went to, summed in
    float32 (unweighted), in the dtype of `x`.

    Across nodes of `ranks_per_node` ranks (default: the group's own nodes where it is an "ep"
    group spanning several), the arithmetic of the hierarchical route: for each node, the
    float32 sum of its ranks' rows (rank order) rounded to x's dtype; then the float32 sum of
    those, node by node, in x's dtype. Weights stay float32 throughout, summed node by node.
    Pass ranks_per_node=0 for the one-node sum."""
    if ranks_per_node is None:
        ranks_per_node = _group_ranks_per_node(group)
    if 0 < ranks_per_node < dist.get_world_size(group):
        return _combine_by_node(x, handle, topk_weights, group, ranks_per_node)
    back = _exchange_rows(x, handle.recv_counts, handle.send_counts, group)
    combined = torch.zeros((handle.num_tokens, *x.shape[1:]), dtype=torch.float32, device=x.device)
    combined.index_add_(0, handle.send_token_index, back.float())
    combined_w = None
    if topk_weights is not None:
        back_w = _exchange_rows(topk_weights.float(), handle.recv_counts, handle.send_counts, group)
        combined_w = torch.zeros((handle.num_tokens, topk_weights.shape[1]), dtype=torch.float32, device=x.device)
        combined_w.index_add_(0, handle.send_token_index, back_w)
    return CombineResult(combined.to(x.dtype), combined_w)


def _group_ranks_per_node(group) -> int:
    from ._backend import get_backend
    try:
        return get_backend(group).ranks_per_node
    except ValueError:  # not an "ep" group: one node
        return 0


def _combine_by_node(x, handle, topk_weights, group, ranks_per_node):
    size = dist.get_world_size(group)
    num_nodes = size // ranks_per_node
    # Row i of what comes back answers token send_token_index[i], from rank target[i].
    target = torch.repeat_interleave(torch.arange(size), torch.tensor(handle.send_counts, dtype=torch.int64))
    node_of_row = target // ranks_per_node

    def reduce(t, round_to):
        back = _exchange_rows(t, handle.recv_counts, handle.send_counts, group)
        total = torch.zeros((handle.num_tokens, *t.shape[1:]), dtype=torch.float32)
        partials, tokens = [], []
        for node in range(num_nodes):
            rows = (node_of_row == node).nonzero().flatten()
            partial = torch.zeros((handle.num_tokens, *t.shape[1:]), dtype=torch.float32)
            partial.index_add_(0, handle.send_token_index[rows], back[rows].float())
            reached = torch.unique(handle.send_token_index[rows])  # sorted: token order
            partials.append(partial[reached].to(round_to).float())
            tokens.append(reached)
        # Node by node, as the source adds what each node sends back.
        total.index_add_(0, torch.cat(tokens), torch.cat(partials))
        return total

    combined = reduce(x, x.dtype).to(x.dtype)
    combined_w = reduce(topk_weights.float(), torch.float32) if topk_weights is not None else None
    return CombineResult(combined, combined_w)


# --------------------------------------------------------------------------- low-latency dispatch / combine

FP8_BLOCK = 128  # channels per fp8 scale
_HEADER_BYTES = 16  # per message: int32 (local expert or 0, slot or 0, t*K + k, 0)


def cast_fp8_blocks(x: torch.Tensor, round_scale: bool = False):
    """(x_fp8 [N, H] float8_e4m3fn, scales [N, H/128] float32) with the low-latency kernel's
    arithmetic, step for step in float32: amax of each 128 channels (at least 1e-4),
    scale = amax / 448 (rounded up to a power of two with round_scale: the exponent goes up by one
    unless the mantissa is zero), x_fp8 = fp8(x * (1 / scale)), round to nearest even."""
    n, h = x.shape
    xf = x.float().reshape(n, h // FP8_BLOCK, FP8_BLOCK)
    scale = xf.abs().amax(dim=2).clamp(min=1e-4) / 448.0
    if round_scale:
        bits = scale.view(torch.int32)
        bits = torch.where((bits & 0x7FFFFF) != 0, (bits & 0x7F800000) + 0x800000, bits)
        scale = bits.view(torch.float32)
    inv = 1.0 / scale
    return (xf * inv.unsqueeze(2)).reshape(n, h).to(torch.float8_e4m3fn), scale


def _exchange_messages(messages: torch.Tensor, dest: torch.Tensor, size: int, group):
    """all_to_all_single of uint8 message rows to `dest` ranks; returns (rows, source rank of each)."""
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    recv = _exchange_rows(messages[order], send_counts.tolist(), recv_counts.tolist(), group)
    src = torch.repeat_interleave(torch.arange(size, device=messages.device), recv_counts)
    return recv, src


def _header(*columns: torch.Tensor) -> torch.Tensor:
    cols = list(columns) + [torch.zeros_like(columns[0])] * (4 - len(columns))
    return torch.stack([c.to(torch.int32) for c in cols], dim=1).view(torch.uint8)


def _packed_begin(layout: torch.Tensor) -> torch.Tensor:
    """[E_local, R]: where rank r's rows for each local expert start (the rows of ranks before r)."""
    layout = layout.long()
    return layout.cumsum(1) - layout


def low_latency_dispatch(x: torch.Tensor, topk_idx: torch.Tensor, *, max_tokens_per_rank: int, num_experts: int,
                         use_fp8: bool = True, round_scale: bool = False, group=None):
    """torch_ep.low_latency_dispatch on all_to_all_single: each (token t, slot k) with expert e
    is one message to e's owner, at slot = its position among this rank's (t, k) pairs for e in
    (t, k) order (pairs past max_tokens_per_rank are dropped, as the kernel does). fp8 payloads
    are cast by cast_fp8_blocks, the kernel's arithmetic, so they compare bit for bit too.
    Returns a LowLatencyDispatchResult (no hook); rows past each (expert, rank)'s count are zero."""
    from .types import LowLatencyDispatchResult, LowLatencyHandle

    size = dist.get_world_size(group)
    local = _experts_per_rank(num_experts, size)
    n, hidden = x.shape
    k_slots = topk_idx.shape[1]
    if bool(((topk_idx < -1) | (topk_idx >= num_experts)).any()):
        raise ValueError(f"topk_idx holds expert ids outside [-1, {num_experts})")
    flat = topk_idx.reshape(-1)
    pairs = (flat >= 0).nonzero().flatten()  # q = t*K + k, in order
    experts = flat[pairs]
    counts = torch.bincount(experts, minlength=num_experts)
    order = torch.argsort(experts, stable=True)
    slot = torch.empty_like(pairs)
    slot[order] = torch.arange(pairs.numel(), device=x.device) - (torch.cumsum(counts, 0) - counts)[experts[order]]
    keep = slot < max_tokens_per_rank
    pairs, experts, slot = pairs[keep], experts[keep], slot[keep]
    send_slot = torch.full((n * k_slots,), -1, dtype=torch.int32, device=x.device)
    send_slot[pairs] = slot.to(torch.int32)
    tokens = pairs // k_slots

    if use_fp8:
        x8, scales = cast_fp8_blocks(x, round_scale)
        # reshape(-1) first: an empty scales tensor may carry a stride that view() refuses
        payload = torch.cat([x8.view(torch.uint8), scales.reshape(-1).view(torch.uint8).reshape(n, hidden // FP8_BLOCK * 4)],
                            dim=1)
    else:
        payload = x.to(torch.bfloat16).contiguous().view(torch.uint8).reshape(n, 2 * hidden)
    messages = torch.cat([_header(experts % local, slot, pairs), payload[tokens]], dim=1)
    recv, src = _exchange_messages(messages, experts // local, size, group)

    head = recv[:, :_HEADER_BYTES].contiguous().view(torch.int32).long()
    le, slot, q = head[:, 0], head[:, 1], head[:, 2]
    layout = torch.zeros(local * size, dtype=torch.int64, device=x.device)
    layout.index_add_(0, le * size + src, torch.ones_like(le))
    layout = layout.view(local, size)
    # Each expert's rows packed from row 0 by source rank: rank s's start after ranks < s'.
    row = _packed_begin(layout)[le, src] + slot
    rows = size * max_tokens_per_rank
    body = recv[:, _HEADER_BYTES:]
    if use_fp8:
        recv_x = torch.zeros(local, rows, hidden, dtype=torch.uint8, device=x.device)
        recv_x[le, row] = body[:, :hidden]
        recv_scales = torch.zeros(local, rows, hidden // FP8_BLOCK, dtype=torch.float32, device=x.device)
        recv_scales[le, row] = body[:, hidden:].contiguous().view(torch.float32)
        out_x = (recv_x.view(torch.float8_e4m3fn), recv_scales)
    else:
        recv_x = torch.zeros(local, rows, hidden, dtype=torch.bfloat16, device=x.device)
        recv_x[le, row] = body.contiguous().view(torch.bfloat16)
        out_x = recv_x
    src_info = torch.zeros(local, rows, dtype=torch.int32, device=x.device)
    src_info[le, row] = q.to(torch.int32)
    layout = layout.to(torch.int32)
    handle = LowLatencyHandle(getattr(group or dist.group.WORLD, "group_name", ""), size, num_experts,
                              max_tokens_per_rank, n, hidden, src_info, layout, send_slot.view(n, k_slots), use_fp8)
    return LowLatencyDispatchResult(out_x, layout.sum(dim=1, dtype=torch.int32), handle, None)


def low_latency_combine(x: torch.Tensor, topk_idx: torch.Tensor, topk_weights: torch.Tensor, handle, *,
                        group=None, out: Optional[torch.Tensor] = None):
    """torch_ep.low_latency_combine on all_to_all_single: row [e, begin(e, r) + i] (i < layout[e, r],
    begin(e, r) the rows of ranks before r) goes back to rank r as its (t, k) = src_info; then out[t] = bf16(sum over k = 0..K-1 with a
    valid expert of float32(w[t, k]) * float32(row)), multiply then add, in k order (the kernel's
    arithmetic). Returns a LowLatencyCombineResult (no hook)."""
    from .types import LowLatencyCombineResult

    size = dist.get_world_size(group)
    local, rows, hidden = x.shape
    max_tokens = handle.max_tokens_per_rank
    counts = handle.layout.long()
    index = torch.arange(max_tokens, device=x.device)
    valid = index.view(1, 1, max_tokens) < counts.view(local, size, 1)          # [E_local, R, max]
    le, r, i = valid.nonzero(as_tuple=True)
    row = _packed_begin(counts)[le, r] + i
    q = handle.src_info[le, row].long()
    messages = torch.cat([_header(q), x[le, row].to(torch.bfloat16).contiguous().view(torch.uint8)], dim=1)
    recv, _ = _exchange_messages(messages, r, size, group)

    n, k_slots = topk_idx.shape
    slots = torch.zeros(n * k_slots, hidden, dtype=torch.bfloat16, device=x.device)
    slots[recv[:, :_HEADER_BYTES].contiguous().view(torch.int32)[:, 0].long()] = \
        recv[:, _HEADER_BYTES:].contiguous().view(torch.bfloat16)
    slots = slots.view(n, k_slots, hidden)
    acc = torch.zeros(n, hidden, dtype=torch.float32, device=x.device)
    for k in range(k_slots):
        routed = ((topk_idx[:, k] >= 0) & (topk_idx[:, k] < handle.num_experts)).unsqueeze(1)
        acc = torch.where(routed, acc + topk_weights[:, k:k + 1].float() * slots[:, k].float(), acc)
    combined = acc.to(torch.bfloat16)
    if out is not None:
        out.copy_(combined)
        combined = out
    return LowLatencyCombineResult(combined, None)
