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


def _pack(t: torch.Tensor):
    # Raw bytes: pickling tensors of some dtypes (fp8) is not supported by torch.save.
    t = t.detach().cpu().contiguous()
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
