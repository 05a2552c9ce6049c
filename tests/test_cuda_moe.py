"""MoE dispatch / combine on CUDA tensors (GPU machines only).

The CPU tests' rank functions run here on CUDA tensors (same reference, same exact checks), plus
what only CUDA has: CUDA-graph capture with num_worst_tokens, an SM budget, memory that stays
flat, and a peer that never comes raising instead of hanging.
"""
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import test_moe as checks
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from torch_ep import reference
from torch_ep.testing import same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


_seed = checks._seed


@pytest.mark.parametrize("kind,hidden,top_k,experts_per_rank,dtype", checks.ROUTE_CASES, ids=checks.CASE_IDS)
def test_dispatch_combine(cuda_pool, kind, hidden, top_k, experts_per_rank, dtype):
    cuda_pool.run(checks.rank_dispatch_combine, _seed(), kind, hidden, top_k, experts_per_rank, dtype, device="cuda")


def test_expert_alignment_and_many_tokens(cuda_pool):
    cuda_pool.run(checks.rank_dispatch_combine, _seed(), "random", 12, 3, 3, torch.bfloat16, alignment=4,
                  device="cuda")
    cuda_pool.run(checks.rank_many_tokens, _seed(), device="cuda")


def test_autograd(cuda_pool):
    cuda_pool.run(checks.rank_autograd, _seed(), device="cuda")


def test_async_op(cuda_pool):
    cuda_pool.run(checks.rank_async, _seed(), device="cuda")


def test_num_worst_tokens(cuda_pool):
    cuda_pool.run(checks.rank_worst_case, _seed(), device="cuda")


def test_bad_input(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(checks.rank_bad_input, device="cuda")
    cuda_pool.run(checks.rank_mismatched_handles, device="cuda")


def rank_graph(seed):
    """dispatch + combine captured in one CUDA graph (num_worst_tokens: no host sync), replayed
    on new data, each replay checked against the reference."""
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 64, 4, 2, torch.bfloat16, "cuda")
    worst = 24 * dist.get_world_size()
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: the transport is set up here
        torch_ep.dispatch(static_x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch_ep.dispatch(static_x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
        comb = torch_ep.combine(out.recv_x, out.handle)
    for _ in range(3):
        new_x = torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.dispatch(new_x, idx.cpu(), w.cpu(), num_experts=num_experts)
        m = expected.recv_x.shape[0]
        assert same_bits(out.recv_x[:m].cpu(), expected.recv_x)
        assert torch.equal(out.recv_topk_idx[:m].cpu(), expected.recv_topk_idx)
        assert bool((out.recv_topk_idx[m:] == -1).all())
        assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
        dist.barrier()


def test_cuda_graph(cuda_pool):
    cuda_pool.run(rank_graph, _seed())


def rank_sm_budget(seed):
    """Options.num_sms=1: one block per kernel still moves every row."""
    group = dist.new_group(pg_options=torch_ep.Options(num_sms=1))
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 256, 4, 2, torch.bfloat16, "cuda", max_tokens=200)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, group=group)
    checks.check_result(got, expected)
    comb = torch_ep.combine(got.recv_x, got.handle, group=group)
    assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
    dist.destroy_process_group(group)


def test_sm_budget(cuda_pool):
    cuda_pool.run(rank_sm_budget, _seed())


def rank_memory_flat(seed):
    """After warm-up, repeated dispatch/combine allocate nothing new (caching allocator stats)."""
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 512, 8, 4, torch.bfloat16, "cuda", max_tokens=300)

    def step():
        d = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
        torch_ep.combine(d.recv_x, d.handle, d.recv_topk_weights)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocated_bytes.all.current"], torch.cuda.memory_reserved()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()["allocated_bytes.all.current"], torch.cuda.memory_reserved()
    assert after == before, (before, after)


def test_memory_flat(cuda_pool):
    cuda_pool.run(rank_memory_flat, _seed())


def rank_missing_peer():
    """The last rank never calls dispatch: every other rank raises within the timeout, naming the op."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=3)))
    num_experts, g, x, idx, w = checks.make_inputs(_seed_for(rank), "random", 16, 2, 2, torch.float32, "cuda")
    torch_ep.dispatch(x, idx, num_experts=num_experts, group=group)  # every rank sets the transport up
    torch.cuda.synchronize()
    error = None
    if rank != size - 1:
        start = time.monotonic()
        try:
            torch_ep.dispatch(x, idx, num_experts=num_experts, group=group)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001
            error = (str(e), time.monotonic() - start)
    dist.barrier()
    dist.destroy_process_group(group)
    return error


def _seed_for(rank):
    return 4242


def test_missing_peer_times_out(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    results = cuda_pool.run(rank_missing_peer)
    for message, elapsed in results[:-1]:
        assert "dispatch" in message and "timed out" in message, message
        assert elapsed < 30
