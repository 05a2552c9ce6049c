"""Across nodes on CUDA (GPU machines with NVSHMEM only): virtual nodes on the GPU(s) of one
machine, 4 ranks as 2 nodes of 2 and 8 ranks as 2 nodes of 4 (TORCH_EP_INTERNODE_TOPOLOGIES
picks them, e.g. "2x2,2x4"). all_to_all_single goes by CUDA IPC inside a node and by NVSHMEM
puts between nodes; dispatch/combine take the hierarchical route (rail hop on NVSHMEM, node hop
on IPC). Same checks as the CPU tests (test_internode.py, test_moe.py), same reference.

Ranks sharing a GPU need MPS (NVSHMEM's full multi-process-per-GPU mode; GPU-NOTES.md). The
ranks get NVSHMEM's single-host settings unless the environment already sets them.
"""
import os

import pytest
import torch

import test_internode as internode
import test_moe as checks
import torch_ep
from conftest import rank_pool

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not torch_ep._C.has_cuda or not torch_ep._C.has_nvshmem,
    reason="needs CUDA and a torch_ep build with NVSHMEM")

SINGLE_HOST_NVSHMEM = {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
                       "NVSHMEM_DISABLE_NCCL": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def topologies():
    return os.environ.get("TORCH_EP_INTERNODE_TOPOLOGIES", "2x2,2x4").split(",")


@pytest.fixture(params=topologies())
def cuda_nodes(request):
    world, per_node = internode.TOPOLOGIES[request.param]
    env = {name: os.environ.get(name, value) for name, value in SINGLE_HOST_NVSHMEM.items()}
    # A small registered budget: messages stream through the NVSHMEM slots in many chunks.
    env.update({"TORCH_EP_RANKS_PER_NODE": str(per_node), "TORCH_EP_CUDA_BUFFER_BYTES": str(1 << 20)})
    return rank_pool(world, cuda=True, env=env)


_seed = checks._seed


def test_all_to_all_across_nodes(cuda_nodes):
    cuda_nodes.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda")
    # Messages of several chunks each (128 KiB slots): slots are reused, credits flow back.
    cuda_nodes.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda", max_rows=3000, width=64)


@pytest.mark.parametrize("kind,hidden,top_k,experts_per_rank,dtype", checks.ROUTE_CASES, ids=checks.CASE_IDS)
def test_dispatch_combine(cuda_nodes, kind, hidden, top_k, experts_per_rank, dtype):
    cuda_nodes.run(checks.rank_dispatch_combine, _seed(), kind, hidden, top_k, experts_per_rank, dtype, device="cuda")


def test_many_tokens_autograd_async_worst_case(cuda_nodes):
    cuda_nodes.run(checks.rank_many_tokens, _seed(), device="cuda")
    cuda_nodes.run(checks.rank_autograd, _seed(), device="cuda")
    cuda_nodes.run(checks.rank_async, _seed(), device="cuda")
    cuda_nodes.run(checks.rank_worst_case, _seed(), device="cuda")


def test_hop_bytes(cuda_nodes):
    cuda_nodes.run(internode.rank_hop_bytes, _seed(), device="cuda")


def test_bad_input(cuda_nodes):
    cuda_nodes.run(checks.rank_bad_input, device="cuda")
    cuda_nodes.run(checks.rank_mismatched_handles, device="cuda")


def rank_remote_peer_never_arrives():
    """The first rank of node 1 skips a call: rank 0's Work.wait() (blocking waits) raises within
    the timeout, naming the op and that peer, which only the NVSHMEM hop waits for."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    rank, size = dist.get_rank(), dist.get_world_size()
    absent = int(os.environ["TORCH_EP_RANKS_PER_NODE"])
    group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=3), blocking_wait=True))
    x = torch.randn(size * 4, device="cuda")
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x, group=group)  # sets the transports up on every rank
    torch.cuda.synchronize()
    error, elapsed = None, 0.0
    if rank != absent:
        start = time.monotonic()
        try:
            dist.all_to_all_single(y, x, group=group)
        except Exception as e:  # noqa: BLE001
            error = (type(e).__name__, str(e))
        elapsed = time.monotonic() - start
        torch.cuda.synchronize()  # returns: the waits are bounded
    dist.barrier()
    dist.destroy_process_group(group)
    return error, elapsed, absent


def test_remote_peer_never_arrives_raises_in_wait(cuda_nodes):
    (error, elapsed, absent) = cuda_nodes.run(rank_remote_peer_never_arrives)[0]
    assert error is not None and error[0] == "DistBackendError", error
    assert "all_to_all_single" in error[1] and f"for rank {absent}" in error[1], error
    assert 2.5 < elapsed < 20, elapsed
