"""Across nodes (issue 6): the topology, and the hierarchical route of dispatch/combine, on
virtual nodes (TORCH_EP_RANKS_PER_NODE / Options.ranks_per_node split one host's ranks into
nodes), on CPU ranks over the shared-memory transport, against torch_ep.reference.

The MoE checks are test_moe.py's rank functions, run on groups that span nodes: the result
contract does not depend on the route. Combine's reference follows the group's nodes (one
rounding to x's dtype per node, as the hierarchical route sums).
"""
import os

import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import assert_nothing_spins, rank_pool
from torch_ep import reference
from torch_ep.testing import poison_, same_bits

import test_moe
from test_moe import ROUTE_CASES, CASE_IDS, _seed

# (world size, ranks per node): 2 nodes of 2, 2 nodes of 4, 3 nodes of 1.
TOPOLOGIES = {"2x2": (4, 2), "2x4": (8, 4), "3x1": (3, 1)}


def virtual_nodes(name):
    world, per_node = TOPOLOGIES[name]
    return rank_pool(world, env={"TORCH_EP_RANKS_PER_NODE": str(per_node)})


@pytest.fixture(params=["2x2"])
def nodes(request):
    return virtual_nodes(request.param)


# ----------------------------------------------------------------------------- topology

def rank_topology(expect_nodes, expect_per_node, expect_source):
    t = torch_ep.get_backend().topology
    rank, size = dist.get_rank(), dist.get_world_size()
    assert (t.rank, t.size, t.num_nodes, t.ranks_per_node) == (rank, size, expect_nodes, expect_per_node), t
    assert (t.node, t.local_rank) == divmod(rank, expect_per_node)
    assert t.source == expect_source and t.problem == ""
    assert t.node_ranks == [t.node * expect_per_node + j for j in range(expect_per_node)]
    assert t.rail_ranks == [n * expect_per_node + t.local_rank for n in range(expect_nodes)]
    return repr(t)


def rank_topology_options():
    """Options.ranks_per_node on a new group; LOCAL_WORLD_SIZE is the launch's (not a subgroup's)."""
    size = dist.get_world_size()
    g = dist.new_group(backend="ep", pg_options=torch_ep.Options(ranks_per_node=1))
    t = torch_ep.get_backend(g).topology
    assert (t.num_nodes, t.ranks_per_node, t.source) == (size, 1, "ranks_per_node override")
    dist.destroy_process_group(g)
    g = dist.new_group(backend="ep", pg_options=torch_ep.Options(ranks_per_node=0))
    assert torch_ep.get_backend(g).num_nodes == 1  # one host, no override: one node
    dist.destroy_process_group(g)
    # Bad overrides raise at creation on every rank, naming the setting; the world group goes on.
    with pytest.raises(ValueError, match="must divide the group size"):
        dist.new_group(backend="ep", pg_options=torch_ep.Options(ranks_per_node=3))
    per_rank = 2 if dist.get_rank() == 0 else 1
    with pytest.raises(ValueError, match="the ranks disagree on ranks_per_node"):
        dist.new_group(backend="ep", pg_options=torch_ep.Options(ranks_per_node=per_rank))
    out = torch.empty(size)
    dist.all_to_all_single(out, torch.arange(size, dtype=torch.float32) + 10 * dist.get_rank())
    assert out.tolist() == [10.0 * r + dist.get_rank() for r in range(size)]


def test_topology_from_override():
    virtual_nodes("2x2").run(rank_topology, 2, 2, "ranks_per_node override")


def test_topology_one_host_is_one_node(pool4):
    pool4.run(rank_topology, 1, 4, "hosts")
    pool4.run(rank_topology_options)


def test_topology_from_launcher():
    """torchrun's LOCAL_WORLD_SIZE (here 2 of WORLD_SIZE 4) makes the nodes when no override is set."""
    pool = rank_pool(4, env={"LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "4"})
    pool.run(rank_topology, 2, 2, "LOCAL_WORLD_SIZE")


# ----------------------------------------------------------------------------- all_to_all_single

def rank_all_to_all_across_nodes(seed, device="cpu", max_rows=40, width=3):
    """all_to_all_single is correct for any split across virtual nodes: on CPU the host path
    (shared memory), on CUDA IPC inside a node and NVSHMEM between nodes."""
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)
    splits = torch.randint(0, max_rows, (size, size), generator=g)
    splits[0, :] = 0  # rank 0 sends nothing; a few empty pairs elsewhere
    splits[torch.rand(size, size, generator=g) < 0.2] = 0
    for dtype in (torch.bfloat16, torch.float32, torch.float8_e4m3fn):
        gen = torch.Generator().manual_seed(seed + rank)
        inp = torch.randn(int(splits[rank].sum()), width, generator=gen).mul(8).to(dtype)
        out = poison_(torch.empty(int(splits[:, rank].sum()), width, dtype=dtype, device=device))
        dist.all_to_all_single(out, inp.to(device), splits[:, rank].tolist(), splits[rank].tolist())
        want = reference.all_to_all_single(out.shape, inp, splits[:, rank].tolist(), splits[rank].tolist())
        assert same_bits(out.cpu(), want), dtype
    backend = torch_ep.get_backend()
    if device == "cpu":
        assert backend.host_path == "shm" and backend.internode_path == "host"
    else:
        assert backend.internode_path == "nvshmem"


def test_all_to_all_across_nodes(nodes):
    nodes.run(rank_all_to_all_across_nodes, _seed())


def rank_nothing_spins_while_idle(seed, device="cpu"):
    """After calls across nodes, no thread of the rank's process busy-waits while the rank is
    idle: with several ranks a host, a spinning thread takes a core from them (NVSHMEM's proxy
    thread did, on CUDA, until torch_ep turned it off where no remote transport needs it)."""
    rank_all_to_all_across_nodes(seed, device=device)
    assert_nothing_spins()


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads /proc/self/task")
def test_nothing_spins_while_idle(nodes):
    nodes.run(rank_nothing_spins_while_idle, _seed())


# ----------------------------------------------------------------------------- dispatch / combine

@pytest.mark.parametrize("kind,hidden,top_k,experts_per_rank,dtype", ROUTE_CASES[:6] + ROUTE_CASES[-1:], ids=CASE_IDS)
def test_dispatch_combine_2x2(kind, hidden, top_k, experts_per_rank, dtype):
    virtual_nodes("2x2").run(test_moe.rank_dispatch_combine, _seed(), kind, hidden, top_k, experts_per_rank, dtype)


def test_one_rank_per_node_3x1():
    """Nodes of one rank: the node hop only moves a rank's rows to itself."""
    pool = virtual_nodes("3x1")
    pool.run(test_moe.rank_dispatch_combine, _seed(), "empty_rank", 5, 3, 2, torch.float32)
    pool.run(test_moe.rank_autograd, _seed())
    pool.run(rank_all_to_all_across_nodes, _seed())


def test_dispatch_combine_2x4():
    pool = virtual_nodes("2x4")
    pool.run(test_moe.rank_dispatch_combine, _seed(), "random", 130, 8, 2, torch.bfloat16)
    pool.run(rank_hop_bytes, _seed())


def test_autograd_across_nodes(nodes):
    nodes.run(test_moe.rank_autograd, _seed())


def test_alignment_async_and_worst_case_across_nodes():
    pool = virtual_nodes("2x2")
    pool.run(test_moe.rank_dispatch_combine, _seed(), "random", 12, 3, 3, torch.bfloat16, alignment=4)
    pool.run(test_moe.rank_async, _seed())
    pool.run(test_moe.rank_worst_case, _seed())
    pool.run(test_moe.rank_many_tokens, _seed())


def test_combine_buffer_across_nodes():
    """CPU groups have no zero-copy region: a plain tensor, and combine from it, across nodes too."""
    virtual_nodes("2x2").run(test_moe.rank_combine_buffer, _seed())


def test_dispatch_buffer_across_nodes():
    """CPU groups have no zero-copy region: a plain tensor (or fp8 pair), and dispatch from it,
    across nodes too."""
    virtual_nodes("2x2").run(test_moe.rank_dispatch_buffer, _seed())


def test_torch_compile_across_nodes():
    virtual_nodes("2x2").run(test_moe.rank_compiled, _seed())


def test_bad_input_across_nodes():
    pool = virtual_nodes("2x2")
    pool.run(test_moe.rank_bad_input)
    pool.run(test_moe.rank_mismatched_handles)


def rank_rounding_per_node(seed):
    """bf16 rows of any value: the route rounds each node's sum to bf16 once, and reference.combine
    with the group's nodes says exactly how, bit for bit (the one-node sum differs)."""
    num_experts, g, x, idx, w = test_moe.make_inputs(seed, "random", 64, 4, 2, torch.bfloat16, "cpu")
    d = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
    back = torch.randn(d.recv_x.shape, generator=g).mul(100).to(torch.bfloat16)
    expected = reference.dispatch(x, idx, w, num_experts=num_experts)
    got = torch_ep.combine(back, d.handle, d.recv_topk_weights)
    want = reference.combine(back, expected.handle, expected.recv_topk_weights)
    assert same_bits(got.combined_x, want.combined_x)
    assert torch.equal(got.combined_topk_weights, want.combined_topk_weights)
    flat = reference.combine(back, expected.handle, ranks_per_node=0).combined_x
    return int((flat != got.combined_x).sum())


def test_combine_rounds_once_per_node():
    differing = virtual_nodes("2x2").run(rank_rounding_per_node, _seed())
    assert sum(differing) > 0  # the data did exercise the per-node rounding


def rank_hop_bytes(seed, device="cpu"):
    """Each token crosses to another node at most once per node: the rail hop's bytes are, per
    token, its target nodes other than this one times the row size."""
    backend = torch_ep.get_backend()
    t = backend.topology
    num_experts, g, x, idx, w = test_moe.make_inputs(seed, "random", 32, 6, 2, torch.bfloat16, device, max_tokens=40)
    layout = reference.get_dispatch_layout(idx.cpu(), num_experts)
    nodes_of_token = layout.is_token_in_rank.view(-1, t.num_nodes, t.ranks_per_node).any(2)
    remote = int(nodes_of_token.sum()) - int(nodes_of_token[:, t.node].sum())
    row = 32 * 2 + idx.shape[1] * (8 + 4)  # x | global ids | weights
    rail0, node0 = backend.rail_bytes, backend.node_bytes
    d = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
    assert backend.rail_bytes - rail0 == remote * row
    assert d.handle.internode
    dist.barrier()
    return backend.node_bytes - node0


def test_hop_bytes():
    virtual_nodes("2x2").run(rank_hop_bytes, _seed())


def rank_one_node_takes_the_intranode_route(seed):
    backend = torch_ep.get_backend()
    num_experts, g, x, idx, w = test_moe.make_inputs(seed, "random", 8, 2, 2, torch.float32, "cpu")
    d = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
    assert not d.handle.internode and backend.rail_bytes == 0 and backend.node_bytes == 0


def test_one_node_takes_the_intranode_route(pool4):
    pool4.run(rank_one_node_takes_the_intranode_route, _seed())
