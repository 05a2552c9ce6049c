"""Low-latency dispatch / combine across (virtual) nodes: the remote path, forced.

With TORCH_EP_FORCE_REMOTE=1 the ops reach every rank on another node through NVSHMEM's device
API (puts with a signal into the regions remote peers push into), as across real nodes, although
on one machine NVLink or the shared GPU could map them. The same checks as the intranode tests
(test_cuda_low_latency.py), against the same reference: bf16 bit for bit, fp8 with the
reference's arithmetic, combine bit for bit; the receive hook, zero copy, two live results,
CUDA-graph capture and replay, and what only the kernels see. TORCH_EP_INTERNODE_TOPOLOGIES
picks the virtual nodes (e.g. "2x2,2x4"); ranks sharing a GPU need MPS.
"""
import os

import pytest
import torch.distributed as dist

import test_cuda_low_latency as ll
import torch_ep
from conftest import assert_nothing_spins, rank_pool

pytestmark = ll.pytestmark

SINGLE_HOST_NVSHMEM = {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
                       "NVSHMEM_DISABLE_NCCL": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _topologies():
    return [tuple(int(v) for v in t.split("x")) for t in os.environ.get("TORCH_EP_INTERNODE_TOPOLOGIES", "2x2").split(",")]


def _remote_pool(topology, **extra_env):
    nodes, per_node = topology
    env = {name: os.environ.get(name, value) for name, value in SINGLE_HOST_NVSHMEM.items()}
    env.update({"TORCH_EP_RANKS_PER_NODE": str(per_node), "TORCH_EP_FORCE_REMOTE": "1", **extra_env})
    return rank_pool(nodes * per_node, cuda=True, env=env)


@pytest.fixture(params=_topologies(), ids=lambda t: f"{t[0]}x{t[1]}")
def remote_pool(request):
    return _remote_pool(request.param)


@pytest.fixture(params=_topologies(), ids=lambda t: f"{t[0]}x{t[1]}")
def remote_pool_one_block(request):
    return _remote_pool(request.param, TORCH_EP_NUM_SMS="1")


def rank_case_and_remote_ranks(*case, **kwargs):
    """One checked round, then the ranks the kernels pushed to: every rank of the other nodes."""
    ll.run_case(*case, **kwargs)
    per_node = int(os.environ["TORCH_EP_RANKS_PER_NODE"])
    node = dist.get_rank() // per_node
    return torch_ep.low_latency.remote_ranks() == [r for r in range(dist.get_world_size()) if r // per_node != node]


@pytest.mark.parametrize("case", ll.CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_dispatch_combine(remote_pool, case):
    assert all(remote_pool.run(rank_case_and_remote_ranks, ll._seed(), *case)), "the remote path was not taken"


# The send's pushes at the decoding shape's proportions: many experts per rank, so that tokens go
# to several remote ranks each (one put per owner) and the last numbering warp of an owner sums
# many counts; hidden sizes of several chunk batches, one with a partial chunk. (Experts per rank
# stay at most 32: the buffers grow to the largest of every size the pool has seen, and more would
# pass the default 2 GiB NVSHMEM heap at 2x4; the benchmark checks 64 and 32 at its shape.)
PUSH_CASES = [("random", 64, 7168, 8, 24, True, False, 64), ("random", 64, 1664, 8, 24, False, False, 64),
              ("random", 33, 640, 6, 17, True, True, 40)]


@pytest.mark.parametrize("case", PUSH_CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_pushes_many_experts_and_owners(remote_pool, case):
    assert all(remote_pool.run(rank_case_and_remote_ranks, ll._seed(), *case)), "the remote path was not taken"
    remote_pool.run(ll.run_case, ll._seed() + 1, *case, hook=True, zero_copy=True)


@pytest.mark.parametrize("topology", _topologies(), ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("puts", ["token", "block"])
def test_remote_puts_modes(topology, puts):
    """The send's remote puts chosen by name: `token` (a put with its signal per token and owner,
    the default where a NIC reaches the peers; the other tests here run `block`, the default on
    P2P) and `block` named (no signal a put; every block signals its remote owners once at the
    send's end). The same rows as the reference, with many owners per token, a hook and the
    zero-copy combine, and over several calls on both buffer halves."""
    pool = _remote_pool(topology, TORCH_EP_LL_REMOTE_PUTS=puts)
    assert all(pool.run(rank_case_and_remote_ranks, ll._seed(), *PUSH_CASES[0])), "the remote path was not taken"
    pool.run(ll.run_case, ll._seed() + 1, *PUSH_CASES[2], hook=True, zero_copy=True)
    pool.run(ll.rank_two_live_and_repeated, ll._seed() + 2)


def test_one_block_many_steps(remote_pool_one_block):
    """One block a kernel (TORCH_EP_NUM_SMS=1): the send's block casts every token, a step of its
    warps at a time, and shares each step's puts among them; three steps of tokens (the owners of
    step 2 reuse step 0's shared slots), the last one with experts to number too."""
    case = ("random", 41, 640, 6, 17, True, True, 48)
    checked = remote_pool_one_block.run(rank_case_and_remote_ranks, ll._seed(), *case)
    assert all(checked), "the remote path was not taken"


def rank_idle_after_a_round(seed):
    """After a round with the remote path, no thread of the rank's process spins while it idles
    (torch_ep.low_latency defaults NVSHMEM_DISABLE_LOCAL_ONLY_PROXY=1 on one host)."""
    ll.run_case(seed, *ll.CASES[0])
    assert_nothing_spins()


def test_nothing_spins_while_idle(remote_pool):
    remote_pool.run(rank_idle_after_a_round, ll._seed())


def test_hook_and_zero_copy(remote_pool):
    seed = ll._seed()
    remote_pool.run(ll.run_case, seed, "random", 8, 256, 3, 2, True, False, 8, hook=True)
    remote_pool.run(ll.run_case, seed + 1, "random", 8, 256, 3, 2, False, False, 8, hook=True, zero_copy=True)
    remote_pool.run(ll.run_case, seed + 2, *ll.CASES[3], zero_copy=True)
    remote_pool.run(ll.run_case, seed + 3, *ll.CASES[6], zero_copy=True)


def test_two_live_results_and_repeated_calls(remote_pool):
    remote_pool.run(ll.rank_two_live_and_repeated, ll._seed())


@pytest.mark.parametrize("use_fp8,zero_copy", [(False, False), (True, False), (False, True)],
                         ids=["bf16", "fp8", "bf16-zero-copy"])
def test_cuda_graph(remote_pool, use_fp8, zero_copy):
    remote_pool.run(ll.rank_graph, ll._seed(), use_fp8, zero_copy)


def test_errors_the_kernels_see(remote_pool):
    remote_pool.run(ll.rank_errors_the_kernels_see, ll._seed())


def test_remote_peer_never_sends():
    """A rank of the other node that never makes the call: the receive gives up after the group's
    timeout, naming the op, this rank and the missing peer; later calls raise."""
    timeout_s, absent = 5, 2
    env = dict(SINGLE_HOST_NVSHMEM, TORCH_EP_RANKS_PER_NODE="2", TORCH_EP_FORCE_REMOTE="1",
               TORCH_EP_TIMEOUT_S=str(timeout_s))
    pool = rank_pool(4, cuda=True, env=env)
    waited, first, later = pool.run(ll.rank_peer_never_sends, absent)[0]
    assert timeout_s - 0.5 <= waited <= timeout_s + 10, waited
    assert f"rank 0: a low_latency_dispatch receive waited past the timeout ({timeout_s}" in first, first
    assert f"for rank {absent} to send" in first, first
    assert "low_latency_combine" in later and "every later call raises" in later, later


def test_remote_queued_calls_after_a_lost_peer():
    """As test_queued_calls_after_a_lost_peer, the lost rank on the other node: the remote
    path's waits end on gave_up too."""
    timeout_s, absent = 4, 2
    env = dict(SINGLE_HOST_NVSHMEM, TORCH_EP_RANKS_PER_NODE="2", TORCH_EP_FORCE_REMOTE="1",
               TORCH_EP_TIMEOUT_S=str(timeout_s))
    pool = rank_pool(4, cuda=True, env=env)
    waited, error, zeros, no_rows = pool.run(ll.rank_queued_calls_after_a_lost_peer, absent)[0]
    assert timeout_s - 0.5 <= waited < 1.8 * timeout_s, waited
    assert f"for rank {absent} to send" in error, error
    assert zeros and no_rows, (zeros, no_rows)
