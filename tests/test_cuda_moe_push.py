"""MoE dispatch pushing (TORCH_EP_MOE_PUSH, docs/moe_push.md) on CUDA tensors, with host records,
GPU machines only: the copy variants' checks of tests/test_cuda_moe.py on pools that push, and the
MoE pool itself. Device records (TORCH_EP_MOE_DEVICE_RECORDS): tests/test_cuda_moe_device_records.py.
"""
import os
import random
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import test_cuda_moe as copy_checks
import test_moe as checks
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from test_cuda_moe import _seed_for, copy_world_sizes, rank_copy_variant, rank_many_sources
from torch_ep import reference
from torch_ep.testing import same_bits

pytestmark = copy_checks.pytestmark


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


_seed = checks._seed


# TORCH_EP_MOE_PUSH=1: each rank writes its own rows into the receivers' outputs, which dispatch
# allocates from the group's MoE pool (every rank maps it). The copy variants' checks (bf16, fp8
# with scales, layout given and computed inside, along a handle, num_worst_tokens padding,
# weights, combine of recv_x and of other tensors) on pools that push, at small SM budgets and the
# automatic one; then the pool itself: outputs in it, poisoned pool memory (bf16 and fp8, a new
# route and along its handle), a full pool.
PUSH_SMS = (1, 8, 0)


@pytest.fixture(params=[(n, sms) for n in copy_world_sizes() for sms in PUSH_SMS],
                ids=lambda v: f"{v[0]}ranks-sms{v[1]}")
def push_pool(request):
    world_size, sms = request.param
    return rank_pool(world_size, cuda=True, env={"TORCH_EP_MOE_PUSH": "1", "TORCH_EP_NUM_SMS": str(sms)})


def in_moe_pool(tensors, group=None):
    backend = torch_ep.get_backend(group)
    return all(t.numel() == 0 or backend._moe_pool_offset(t.data_ptr(), t.numel() * t.element_size()) >= 0
               for t in tensors)


def poison_and_free(tensors):
    """Fills `tensors` with 0x7f bytes (bf16 and float32 near their largest, float8_e4m3fn NaN,
    int64 ids far out of range); returns their [start, end) byte ranges. The caller frees them:
    their blocks go back to the MoE pool, where the next outputs of the same shapes land."""
    ranges = []
    for t in tensors:
        if t.numel():
            t.view(torch.uint8).fill_(0x7F)
            ranges.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    return ranges


def overlaps(t, ranges):
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    return any(start < e and s < end for s, e in ranges)


def result_tensors(result):
    """A dispatch result's outputs: recv_x (both tensors of the fp8 pair), and recv_topk_idx and
    recv_topk_weights where it has them (a new route with weights)."""
    xs = list(result.recv_x) if isinstance(result.recv_x, tuple) else [result.recv_x]
    return xs + [t for t in (result.recv_topk_idx, result.recv_topk_weights) if t is not None]


def check_combine(got, expected, group=None):
    """combine(got.recv_x, got.handle) against the reference's combine of expected's rows, bit for bit."""
    comb = torch_ep.combine(got.recv_x, got.handle, group=group)
    assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)


def check_dispatch(got, expected, worst=0):
    """got against the reference: recv_x (or the fp8 pair: payload and scales), and for a new
    route recv_topk_idx, recv_topk_weights and the counts; the real rows, and with num_worst_tokens
    the padding after them (ids -1, weights 0; recv_x's padding is unspecified on CUDA)."""
    pairs = zip(got.recv_x, expected.recv_x) if isinstance(expected.recv_x, tuple) else [(got.recv_x, expected.recv_x)]
    for g, e in pairs:
        m = e.shape[0]
        assert g.shape[0] == (worst or m)
        assert same_bits(g[:m].cpu(), e), "recv_x (or its fp8 scales) differs from the reference"
    if expected.recv_topk_idx is None:  # along a handle: no top-k outputs
        assert got.recv_topk_idx is None
        return
    m = expected.recv_topk_idx.shape[0]
    assert torch.equal(got.recv_topk_idx[:m].cpu(), expected.recv_topk_idx), "recv_topk_idx differs"
    assert torch.equal(got.recv_topk_weights[:m].cpu(), expected.recv_topk_weights), "recv_topk_weights differ"
    assert bool((got.recv_topk_idx[m:] == -1).all()) and bool((got.recv_topk_weights[m:] == 0).all())
    if not worst:
        assert got.num_recv_tokens_per_expert == expected.num_recv_tokens_per_expert


def as_payload(x, g, fp8):
    """Integer-valued bf16 rows x (CPU) as dispatch takes them: x itself, or with fp8 the pair
    (x as float8_e4m3fn, float32 scales [N, ceil(H / 128)] drawn from g)."""
    if not fp8:
        return x
    return x.float().to(torch.float8_e4m3fn), torch.rand(x.shape[0], (x.shape[1] + 127) // 128, generator=g)


def to_cuda(payload):
    return tuple(t.cuda() for t in payload) if isinstance(payload, tuple) else payload.cuda()


def dispatch_on_poison(dispatch_one, stale, fresh):
    """dispatch_one(stale)'s outputs (in the MoE pool) poisoned with poison_and_free and freed, then
    dispatch_one(fresh), same shapes: its outputs lie in the pool on the poisoned blocks. Returns
    that second result, for the caller to check against the reference."""
    first = dispatch_one(stale)
    outputs = result_tensors(first)
    assert in_moe_pool(outputs), "a pushing dispatch's outputs lie in the MoE pool"
    poisoned = poison_and_free(outputs)
    del first, outputs
    got = dispatch_one(fresh)
    outputs = result_tensors(got)
    assert in_moe_pool(outputs)
    # Same shapes on the same stream, nothing else allocated from the pool in between: it hands
    # the poisoned blocks out again, so the caller's checks see any row the kernel left unwritten.
    assert all(overlaps(t, poisoned) for t in outputs if t.numel()), "the poisoned blocks were not reused"
    return got


def assert_still_pushes(seed, group=None):
    """A push rank function's last check: a dispatch (num_worst_tokens, so that every rank gets
    outputs) right against the reference, its outputs in the MoE pool: the group pushed, it did
    not quietly pull."""
    size = dist.get_world_size()
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 64, 2, 2, torch.bfloat16, "cuda")
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    worst = 24 * size
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst, group=group)
    check_dispatch(got, expected, worst)
    outputs = [got.recv_x, got.recv_topk_idx, got.recv_topk_weights]
    assert all(t.numel() for t in outputs) and in_moe_pool(outputs, group), "this group did not push"
    assert torch_ep.get_backend(group)._moe_pool_stats()[1] > 0


def rank_push_pool(seed):
    """Outputs lie in the MoE pool. An earlier call's outputs, filled with 0x7f bytes
    (poison_and_free) and freed, give their blocks back to the pool; the next call of the same
    shapes on fresh data takes them and must overwrite every real row (and, with num_worst_tokens,
    pad the rows after them: ids -1, weights 0): bf16 and the fp8 pair (payload and scales), with
    sizes and with num_worst_tokens, for a new route and then along its handle, each against
    torch_ep.reference bit for bit. Then combine of the bf16 recv_x itself (in the pool, reached by
    arena offset) on even ranks and of a copy (exported) on odd ones, against the reference."""
    rank, size = dist.get_rank(), dist.get_world_size()
    for i, (worst, fp8) in enumerate([(0, False), (0, True), (160 * size, False), (160 * size, True)]):
        num_experts, g, x, idx, w = checks.make_inputs(seed + i, "random", 512, 4, 2, torch.bfloat16, "cuda",
                                                       max_tokens=150)
        rows = [x.cpu()] + [torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16) for _ in range(2)]
        stale, fresh, along = (as_payload(r, g, fp8) for r in rows)
        w2 = torch.rand(tuple(idx.shape), generator=g)
        expected = reference.dispatch(fresh, idx.cpu(), w2, num_experts=num_experts)
        expected_along = reference.dispatch(along, handle=expected.handle)
        got = dispatch_on_poison(lambda p: torch_ep.dispatch(to_cuda(p), idx, w2.cuda(), num_experts=num_experts,
                                                             num_worst_tokens=worst), stale, fresh)
        stats = torch_ep.get_backend()._moe_pool_stats()
        assert len(stats) == 2 and stats[1] > 0 and stats[1] <= stats[0]
        check_dispatch(got, expected, worst)
        handle = got.handle
        again = dispatch_on_poison(lambda p: torch_ep.dispatch(to_cuda(p), handle=handle), fresh, along)
        check_dispatch(again, expected_along, worst)
        if not fp8:
            back = got.recv_x if rank % 2 == 0 else got.recv_x.clone()
            ref = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights)
            weights = None if worst else got.recv_topk_weights  # in the pool too: reached by arena offset
            comb = torch_ep.combine(back, got.handle, weights)
            assert same_bits(comb.combined_x.cpu(), ref.combined_x), "combined_x differs from the reference"
            if weights is not None:
                assert torch.equal(comb.combined_topk_weights.cpu(), ref.combined_topk_weights)
        del got, again
        dist.barrier()


def rank_push_variant(seed):
    rank_copy_variant(seed)
    rank_push_pool(seed)
    checks.rank_worst_case(seed, device="cuda")
    rank_push_worst_on_one_rank(seed)
    rank_push_race(seed)
    assert_still_pushes(seed)


def rank_push_worst_on_one_rank(seed):
    """num_worst_tokens on rank 0 only (with its layout, so its records carry its rows): rank 0
    sizes its outputs before the records, the others after them, and every rank still takes part
    in the second exchange of targets (it is decided from the records, alike on every rank).
    Twice: the first call's outputs poisoned and freed, the second checked against the reference
    on blocks that reuse them."""
    if os.environ.get("TORCH_EP_MOE_DEVICE_RECORDS") == "1":
        return  # rank 0 would wait for device records, the others in the host exchange (docs/moe_push.md, 4)
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 256, 4, 2, torch.bfloat16, "cuda", max_tokens=90)
    worst = 90 * size if rank == 0 else 0
    kwargs = {"num_worst_tokens": worst, "layout": torch_ep.get_dispatch_layout(idx, num_experts)} if worst else {}
    first = torch_ep.dispatch(x, idx, w, num_experts=num_experts, **kwargs)
    outputs = [first.recv_x, first.recv_topk_idx, first.recv_topk_weights]
    assert in_moe_pool(outputs)
    poisoned = poison_and_free(outputs)
    del first, outputs
    x2 = torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16)
    w2 = torch.rand(tuple(idx.shape), generator=g)
    expected = reference.dispatch(x2, idx.cpu(), w2, num_experts=num_experts)
    got = torch_ep.dispatch(x2.cuda(), idx, w2.cuda(), num_experts=num_experts, **kwargs)
    outputs = [got.recv_x, got.recv_topk_idx, got.recv_topk_weights]
    assert in_moe_pool(outputs)
    assert all(overlaps(t, poisoned) for t in outputs if t.numel()), "the poisoned blocks were not reused"
    check_dispatch(got, expected, worst)
    ref = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights)
    comb = torch_ep.combine(got.recv_x, got.handle)
    assert same_bits(comb.combined_x.cpu(), ref.combined_x), "combined_x differs from the reference"
    dist.barrier()


def copied_out(result):
    """A new route's outputs copied out of the MoE pool on the stream (no host wait), as a
    stand-in for `result` in check_dispatch; once `result` is dropped its pool blocks are free for
    the next outputs."""
    return SimpleNamespace(recv_x=result.recv_x.clone(), recv_topk_idx=result.recv_topk_idx.clone(),
                           recv_topk_weights=result.recv_topk_weights.clone(),
                           num_recv_tokens_per_expert=result.num_recv_tokens_per_expert)


def rank_push_race(seed, iterations=24):
    """Host records, back to back with no barrier and no host wait but those push makes itself.
    Each iteration, sizes changing every time: a new route without num_worst_tokens (the host
    waits for its sizes, then a second small exchange of targets), combine of its recv_x and
    weights in place (peers pull them by arena offset), its outputs copied out and freed (the pool
    hands their blocks to the next outputs at once), a new route with num_worst_tokens (with sizes
    every third iteration) and one along its handle. One rank's GPU sleeps a random while (up to a
    few ms) after the first dispatch (whose host waited for the sizes: a sleep before it would
    hold the host back too), so that its host and the other ranks queue the next calls, and
    allocate and publish their outputs, while its GPU is still on the last ones. The host never
    reads a result inside the loop (no .cpu()): every result is kept (the first dispatch's as its
    copy) and checked after a final synchronize against torch_ep.reference (computed first: the
    reference's collectives would line the ranks up)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    sleeper = random.Random(seed)
    slow_rank = sleeper.randrange(size)
    cases = []
    for i in range(iterations):
        first = checks.make_inputs(seed + 2 * i, "random", 128 + 64 * (i % 3), 4, 2, torch.bfloat16, "cuda",
                                   max_tokens=4 + (37 * i) % 160)
        second = checks.make_inputs(seed + 2 * i + 1, "random", 64, 2, 2, torch.bfloat16, "cuda",
                                    max_tokens=4 + (53 * i + 90) % 160)
        ex1 = reference.dispatch(first[2].cpu(), first[3].cpu(), first[4].cpu(), num_experts=first[0])
        comb1 = reference.combine(ex1.recv_x, ex1.handle, ex1.recv_topk_weights)
        ex2 = reference.dispatch(second[2].cpu(), second[3].cpu(), second[4].cpu(), num_experts=second[0])
        x3 = torch.randint(-60, 60, tuple(second[2].shape), generator=second[1]).to(torch.bfloat16)
        ex3 = reference.dispatch(x3, handle=ex2.handle)
        worst = 164 * size if i % 3 else 0  # above any rank's received rows (< 160 tokens from each rank)
        cases.append((first, ex1, comb1, second, ex2, x3.cuda(), ex3, worst))
    torch.cuda.synchronize()
    results = []
    for first, ex1, comb1, second, ex2, x3, ex3, worst in cases:
        a = torch_ep.dispatch(first[2], first[3], first[4], num_experts=first[0])
        assert in_moe_pool(result_tensors(a))
        if rank == slow_rank:
            torch.cuda._sleep(sleeper.randrange(0, 6_000_000))  # cycles: up to a few ms on this GPU
        c = torch_ep.combine(a.recv_x, a.handle, a.recv_topk_weights)
        a = copied_out(a)
        b = torch_ep.dispatch(second[2], second[3], second[4], num_experts=second[0], num_worst_tokens=worst)
        h = torch_ep.dispatch(x3, handle=b.handle)
        results.append((a, c, b, h))
    torch.cuda.synchronize()
    for (a, c, b, h), (first, ex1, comb1, second, ex2, x3, ex3, worst) in zip(results, cases):
        check_dispatch(a, ex1)
        assert same_bits(c.combined_x.cpu(), comb1.combined_x), "combined_x differs from the reference"
        assert torch.equal(c.combined_topk_weights.cpu(), comb1.combined_topk_weights)
        check_dispatch(b, ex2, worst)
        check_dispatch(h, ex3, worst)
        assert in_moe_pool(result_tensors(b) + result_tensors(h))
    del results
    torch_ep.check_errors()
    dist.barrier()


def test_push_variant(push_pool):
    """Every copy-variant check and the pool checks above on a pool whose default group pushes
    (TORCH_EP_MOE_PUSH=1) with TORCH_EP_NUM_SMS blocks, bit for bit against torch_ep.reference."""
    push_pool.run(rank_push_variant, _seed())


@pytest.mark.parametrize("sms", [1, 8])
def test_push_many_sources(sms):
    """Push with 4 ranks: rows of three lower ranks before a sender's own on each receiver."""
    pool = rank_pool(4, cuda=True, env={"TORCH_EP_MOE_PUSH": "1", "TORCH_EP_NUM_SMS": str(sms)})
    pool.run(rank_push_many_sources, _seed())


def rank_push_many_sources(seed):
    rank_many_sources(seed)
    rank_push_worst_on_one_rank(seed)
    rank_push_race(seed, iterations=12)
    assert_still_pushes(seed)


def rank_push_pool_full(seed):
    """A MoE pool of 2 MiB (Options.moe_pool_bytes) cannot hold 16 KiB rows by the hundred: every
    rank raises a ValueError naming TORCH_EP_MOE_POOL_BYTES before any kernel starts, whether the
    outputs were sized before the records (num_worst_tokens) or after them (the second exchange,
    only rank 0 receiving, so the others raise for it), and the group keeps working."""
    size = dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(moe_push=True, moe_pool_bytes=2 << 20))
    experts_per_rank, hidden, tokens = 2, 4096, 200
    num_experts = experts_per_rank * size
    x = torch.randn(tokens, hidden, device="cuda")
    to_rank0 = torch.zeros(tokens, 1, dtype=torch.long, device="cuda")  # expert 0: rank 0's
    for kwargs in ({"num_worst_tokens": tokens * size}, {}):
        with pytest.raises(ValueError, match="TORCH_EP_MOE_POOL_BYTES"):
            torch_ep.dispatch(x, to_rank0, num_experts=num_experts, group=group, **kwargs)
    num_experts, g, xs, idx, w = checks.make_inputs(seed, "random", 16, 2, experts_per_rank, torch.float32, "cuda")
    expected = reference.dispatch(xs.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    got = torch_ep.dispatch(xs, idx, w, num_experts=num_experts, group=group)
    checks.check_result(got, expected)
    assert in_moe_pool([got.recv_x, got.recv_topk_idx, got.recv_topk_weights], group)
    comb = torch_ep.combine(got.recv_x, got.handle, got.recv_topk_weights, group=group)
    ref = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights)
    assert same_bits(comb.combined_x.cpu(), ref.combined_x)
    del got, comb
    assert_still_pushes(seed, group)
    dist.destroy_process_group(group)


def test_push_pool_full(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(rank_push_pool_full, _seed())


def rank_options_disagree(options, match, num_worst_tokens=0):
    """Ranks whose Options differ (rank 0 with `options(True)`, the others with `options(False)`)
    all raise a ValueError matching `match` at the group's first CUDA dispatch, instead of waiting
    for peers that take another path; again at the next call; other groups are untouched."""
    rank = dist.get_rank()
    group = dist.new_group(pg_options=options(rank == 0))
    num_experts, g, x, idx, w = checks.make_inputs(_seed_for(0) + rank, "random", 64, 2, 2, torch.float32, "cuda")
    for _ in range(2):
        with pytest.raises(ValueError, match=match):
            torch_ep.dispatch(x, idx, w, num_experts=num_experts, group=group, num_worst_tokens=num_worst_tokens)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    checks.check_result(torch_ep.dispatch(x, idx, w, num_experts=num_experts), expected)
    dist.destroy_process_group(group)


def push_for(rank0):
    return torch_ep.Options(moe_push=rank0)


def rank_push_disagree():
    """Ranks that disagree on Options.moe_push (where the MoE pool would be made)."""
    rank_options_disagree(push_for, "TORCH_EP_MOE_PUSH")


def test_push_ranks_disagree(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(rank_push_disagree)
