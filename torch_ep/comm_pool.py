"""torch_ep.comm_pool: a torch.cuda.MemPool whose memory every rank of the group has mapped.

The issue 16 idea, after torch's symmetric memory (which refuses ranks that share a GPU): tensors
allocated under ``torch.cuda.use_mem_pool(torch_ep.comm_pool(group))`` are reached by the
group's peers directly, so all_to_all_single between them moves every byte once (the sender's
kernel writes straight into the receiver's output), with no handle exchange per call.

The native side is backend/transport/cuda/comm_pool.hpp (the arenas) and
backend/process_group/cuda/comm_pool_path.cpp (the allocator); the one-copy kernels are in
backend/kernels/all_to_all_pool.cuh.
"""
from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from . import _C
from ._backend import get_backend

__all__ = ["comm_pool"]

# One pool per group, dropped with the group object (its arena then goes once no tensor uses it).
_pools: "weakref.WeakKeyDictionary[dist.ProcessGroup, torch.cuda.MemPool]" = weakref.WeakKeyDictionary()


def comm_pool(group=None) -> "torch.cuda.MemPool":
    """The comm pool of `group` (default: the default group): a ``torch.cuda.MemPool`` on the
    current CUDA device whose memory every rank of the group has mapped.

    Usage::

        pool = torch_ep.comm_pool(group)
        with torch.cuda.use_mem_pool(pool):
            out = torch.empty(rows, hidden, device="cuda")   # from the pool
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)  # one copy

    - Collective the first time: every rank of the group must call it, in the same order as the
      group's other collectives. Each rank then reserves an arena of ``Options.comm_pool_bytes``
      (``TORCH_EP_COMM_POOL_BYTES``, default 1 GiB) on its GPU, and maps every peer's arena once
      (CUDA IPC): no handle is exchanged per call. Later calls return the same pool.
    - all_to_all_single on a group with a comm pool always runs on the device protocol (the
      splits are checked by the kernels, as with ``TORCH_EP_ALL_TO_ALL_DEVICE=1``). Its kernels
      move each byte once when every rank that receives bytes has its output in the pool, its
      input anywhere on the GPU; otherwise (some rank's output outside the pool, or not
      contiguous) the same call moves them staged, twice. The choice is made on the device from
      every rank's record, so ranks never disagree on it: a mix stays correct, only slower.
      The call can be captured in a CUDA graph. Other ops are unchanged.
    - Tensors of the pool must fit in the arena, whose segments torch's allocator caches: when
      none fits, torch raises its out-of-memory error, preceded by a warning naming
      ``TORCH_EP_COMM_POOL_BYTES``. ``torch.cuda.empty_cache()`` returns cached segments.
    - One pool per group and device; at most 32 ranks, all on one host (ranks may share a GPU).
    - Lifetime: destroying the group unmaps the peers' arenas at once; this rank's arena is freed
      once the group object is gone and every tensor of the pool has been freed (torch gives
      cached segments back when the pool is dropped, or at ``torch.cuda.empty_cache()``).
      After the group was destroyed the pool serves only segments it already holds: an
      allocation that needs a new one fails.

    Raises RuntimeError without CUDA: CPU tensors need no pool (CPU all_to_all between the ranks
    of a host already moves large messages with one copy, by process_vm_readv).
    """
    group = group or dist.group.WORLD
    if group is None:
        raise RuntimeError("torch_ep.comm_pool: no default process group; call dist.init_process_group(backend='ep') "
                           "first")
    pool = _pools.get(group)
    if pool is not None:
        return pool
    backend = get_backend(group)
    if not _C.has_cuda or not torch.cuda.is_available():
        raise RuntimeError("torch_ep.comm_pool: needs CUDA (a CUDA build of torch_ep and a GPU); a comm pool holds GPU "
                           "memory. CPU tensors need none: CPU all_to_all on one host already moves large messages "
                           "with one copy")
    allocator = backend._comm_pool_allocator(torch.cuda.current_device())
    pool = torch.cuda.MemPool(allocator=allocator)
    _pools[group] = pool
    return pool
