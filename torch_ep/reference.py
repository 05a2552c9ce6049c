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
    size, rank = dist.get_world_size(group), dist.get_rank(group)
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
            group=None) -> CombineResult:
    """The reverse route of dispatch: each token's rows from every rank it went to, summed in
    float32 (unweighted), in the dtype of `x`."""
    back = _exchange_rows(x, handle.recv_counts, handle.send_counts, group)
    combined = torch.zeros((handle.num_tokens, *x.shape[1:]), dtype=torch.float32, device=x.device)
    combined.index_add_(0, handle.send_token_index, back.float())
    combined_w = None
    if topk_weights is not None:
        back_w = _exchange_rows(topk_weights.float(), handle.recv_counts, handle.send_counts, group)
        combined_w = torch.zeros((handle.num_tokens, topk_weights.shape[1]), dtype=torch.float32, device=x.device)
        combined_w.index_add_(0, handle.send_token_index, back_w)
    return CombineResult(combined.to(x.dtype), combined_w)
