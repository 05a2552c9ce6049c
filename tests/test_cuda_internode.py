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

import test_cuda_all_to_all as all_to_all_checks
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


def test_remote_peer_never_arrives_raises_in_wait(cuda_nodes):
    """The first rank of node 1 skips a call: rank 0's Work.wait() (blocking waits) raises within
    the timeout, naming the op and a peer of node 1, which only the NVSHMEM hop waits for (that
    rank, or one of its node that waited for it first)."""
    import re

    absent = cuda_nodes.world_size // 2
    error, elapsed = cuda_nodes.run(all_to_all_checks.rank_peer_never_arrives, absent)[0]
    assert error is not None and error[0] == "DistBackendError", error
    named = re.search(r"for rank (\d+)", error[1])
    assert "all_to_all_single" in error[1] and named and int(named.group(1)) >= absent, error
    assert 2.5 < elapsed < 20, elapsed
