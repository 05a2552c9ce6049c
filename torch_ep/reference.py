"""Pure-PyTorch references of torch_ep's ops, for tests.

Each reference takes another route than the op it checks: all_to_all_single here is built on
all_gather_object (delegated to the inner backend), so a fault in torch_ep's transport cannot
hide in both.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.distributed as dist


def _splits(rows: int, splits: Optional[Sequence[int]], size: int) -> List[int]:
    if splits is None or len(splits) == 0:
        return [rows // size] * size
    return list(splits)


def all_to_all_single(output_shape, input: torch.Tensor, output_split_sizes=None, input_split_sizes=None,
                      group=None) -> torch.Tensor:
    """What all_to_all_single should leave in an output of `output_shape`, on the CPU."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    in_splits = _splits(input.shape[0], input_split_sizes, size)
    gathered: list = [None] * size
    dist.all_gather_object(gathered, (input.detach().cpu(), in_splits), group=group)
    pieces = []
    for src, (tensor, splits) in enumerate(gathered):
        start = sum(splits[:rank])
        pieces.append(tensor[start:start + splits[rank]])
    out = torch.cat(pieces) if pieces else torch.empty(0)
    return out.reshape(output_shape)


def all_to_all(input_tensor_list: Sequence[torch.Tensor], group=None) -> List[torch.Tensor]:
    """What the list form of all_to_all should leave in each output, on the CPU."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    gathered: list = [None] * size
    dist.all_gather_object(gathered, [t.detach().cpu() for t in input_tensor_list], group=group)
    return [gathered[src][rank] for src in range(size)]
