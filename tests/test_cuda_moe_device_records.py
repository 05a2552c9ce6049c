"""MoE dispatch with device records (TORCH_EP_MOE_DEVICE_RECORDS with TORCH_EP_MOE_PUSH,
docs/moe_push.md) on CUDA tensors, GPU machines only: no host exchange, the errors the device
finds, a peer that never comes. The pushing helpers are tests/test_cuda_moe_push.py's.
"""
import os

import pytest
import torch
import torch.distributed as dist

import test_cuda_moe as copy_checks
import test_moe as checks
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from test_cuda_moe import rank_copy_variant
from test_cuda_moe_push import (_seed, assert_still_pushes, check_combine, check_dispatch, in_moe_pool, overlaps,
                                poison_and_free, rank_options_disagree, rank_push_pool)
from torch_ep import reference
from torch_ep.testing import same_bits

pytestmark = copy_checks.pytestmark


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


# ----------------------------------------------------------------------------- device records
# TORCH_EP_MOE_DEVICE_RECORDS=1 (with TORCH_EP_MOE_PUSH=1): a pushing dispatch the host need not
# wait for (a handle, or num_worst_tokens), and every eager combine, exchange their records through
# the device, not the host: no host rendezvous; what the device finds wrong raises at the rank's
# next MoE call or torch_ep.check_errors(). A dispatch that waits for its sizes makes two rounds of
# records (the sizes come back through host-mapped memory) and raises a bad verdict at the call.
RECORDS_ENV = {"TORCH_EP_MOE_PUSH": "1", "TORCH_EP_MOE_DEVICE_RECORDS": "1"}


@pytest.fixture(params=[(n, sms, 0) for n in (2, 4) for sms in (1, 0)] + [(2, 0, 1), (4, 1, 1)],
                ids=lambda v: f"{v[0]}ranks-sms{v[1]}" + ("-one_launch" if v[2] else ""))
def records_pool(request):
    """Device records at 2 and 4 ranks, 1 SM and the automatic budget; and with the dispatch's
    notify step fused into its push kernel (TORCH_EP_MOE_ONE_LAUNCH)."""
    world_size, sms, one_launch = request.param
    return rank_pool(world_size, cuda=True, env={**RECORDS_ENV, "TORCH_EP_NUM_SMS": str(sms),
                                                 "TORCH_EP_MOE_ONE_LAUNCH": str(one_launch)})


def moe_exchanges(group=None):
    return torch_ep.get_backend(group)._moe_exchanges()


def check_along(got, expected, worst=0):
    """A dispatch along a handle against the reference's: rows, no top-k, padding rows after them."""
    m = expected.recv_x[0].shape[0] if isinstance(expected.recv_x, tuple) else expected.recv_x.shape[0]
    pairs = zip(got.recv_x, expected.recv_x) if isinstance(expected.recv_x, tuple) else [(got.recv_x, expected.recv_x)]
    for g, e in pairs:
        assert g.shape[0] == (worst or m)
        assert same_bits(g[:m].cpu(), e), "recv_x (or its scales) differs from the reference"
    assert got.recv_topk_idx is None


def rank_device_records(seed):
    """num_worst_tokens and dispatches along a handle (from a route with sizes, and from one with
    num_worst_tokens; bf16 and the fp8 pair) make no host exchange, and equal torch_ep.reference on
    outputs whose blocks held poison (0x7f bytes) the call before; combine of their rows (device
    records) too. Then the race loop and the pool check."""
    size = dist.get_world_size()
    for i in range(2):
        num_experts, g, x, idx, w = checks.make_inputs(seed + i, "random", 256, 4, 2, torch.bfloat16, "cuda",
                                                       max_tokens=120)
        worst = 120 * size
        first = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
        poisoned = poison_and_free([first.recv_x, first.recv_topk_idx, first.recv_topk_weights])
        del first
        x2 = torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16)
        w2 = torch.rand(tuple(idx.shape), generator=g)
        expected = reference.dispatch(x2, idx.cpu(), w2, num_experts=num_experts)
        x3 = torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16)
        along = reference.dispatch(x3, handle=expected.handle)
        ref_comb = reference.combine(expected.recv_x, expected.handle)
        scales = torch.rand(x.shape[0], (256 + 127) // 128, generator=g)
        fp8 = (x3.float().to(torch.float8_e4m3fn), scales)
        along8 = reference.dispatch(fp8, handle=expected.handle)

        before = moe_exchanges()
        got = torch_ep.dispatch(x2.cuda(), idx, w2.cuda(), num_experts=num_experts, num_worst_tokens=worst)
        outputs = [got.recv_x, got.recv_topk_idx, got.recv_topk_weights]
        assert in_moe_pool(outputs) and all(overlaps(t, poisoned) for t in outputs if t.numel())
        again = torch_ep.dispatch(x3.cuda(), handle=got.handle)  # num_worst_tokens from the handle
        again8 = torch_ep.dispatch(tuple(t.cuda() for t in fp8), handle=got.handle)
        assert moe_exchanges() == before, "a dispatch with num_worst_tokens or a handle exchanged host records"
        check_dispatch(got, expected, worst)
        check_along(again, along, worst)
        check_along(again8, along8, worst)
        comb = torch_ep.combine(got.recv_x, got.handle)
        assert same_bits(comb.combined_x.cpu(), ref_comb.combined_x), "combined_x differs from the reference"

        sized = torch_ep.dispatch(x2.cuda(), idx, w2.cuda(), num_experts=num_experts)  # two rounds: the sizes
        check_dispatch(sized, expected)
        poison_and_free([again.recv_x, *again8.recv_x])  # freed blocks the next outputs may take
        del again, again8
        before = moe_exchanges()
        cached = torch_ep.dispatch(x3.cuda(), handle=sized.handle)
        cached8 = torch_ep.dispatch(tuple(t.cuda() for t in fp8), handle=sized.handle)
        assert moe_exchanges() == before, "a dispatch along a handle exchanged host records"
        assert in_moe_pool([cached.recv_x, *cached8.recv_x])
        check_along(cached, along)
        check_along(cached8, along8)
        comb = torch_ep.combine(cached.recv_x, sized.handle)
        assert same_bits(comb.combined_x.cpu(), reference.combine(along.recv_x, expected.handle).combined_x)
        dist.barrier()
    torch_ep.check_errors()  # nothing was reported


def rank_device_records_race(seed, iterations=24):
    """Back to back with no barrier and no host wait: dispatch with num_worst_tokens, along its
    handle twice, combine (device records every one, no host exchange at all), while one rank's
    GPU sleeps a random while (up to a few ms) before each iteration, so that the other ranks'
    kernels publish the next call's record while the slow one still reads the last, and slots and
    plan are reused at once. The host never waits inside the loop (no .cpu()): every output is kept
    and checked after it against torch_ep.reference (computed first: the reference's collectives
    would line the ranks up)."""
    import random
    rank, size = dist.get_rank(), dist.get_world_size()
    sleeper = random.Random(seed)
    slow_rank = sleeper.randrange(size)
    cases = []
    for i in range(iterations):
        num_experts, g, x, idx, w = checks.make_inputs(seed + i, "random", 64 + 64 * (i % 3), 4, 2, torch.bfloat16,
                                                       "cuda", max_tokens=4 + (37 * i) % 160)
        ex = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
        x2 = torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16)
        ex2 = reference.dispatch(x2, handle=ex.handle)
        comb = reference.combine(ex.recv_x, ex.handle)
        cases.append((num_experts, x, idx, w, x2.cuda(), ex, ex2, comb, 164 * size))
    torch.cuda.synchronize()
    before = moe_exchanges()
    results = []
    for num_experts, x, idx, w, x2, ex, ex2, comb, worst in cases:
        if rank == slow_rank:
            torch.cuda._sleep(sleeper.randrange(0, 6_000_000))  # cycles: up to a few ms on this GPU
        a = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
        b = torch_ep.dispatch(x2, handle=a.handle)
        c = torch_ep.dispatch(x, handle=a.handle)
        d = torch_ep.combine(a.recv_x, a.handle)
        results.append((a, b, c, d))
    assert moe_exchanges() == before, "a call exchanged host records"
    torch.cuda.synchronize()
    for (a, b, c, d), (num_experts, x, idx, w, x2, ex, ex2, comb, worst) in zip(results, cases):
        check_dispatch(a, ex, worst)
        check_along(b, ex2, worst)
        assert same_bits(c.recv_x[:ex.recv_x.shape[0]].cpu(), ex.recv_x)
        assert same_bits(d.combined_x.cpu(), comb.combined_x), "combined_x differs from the reference"
    del results
    torch_ep.check_errors()
    dist.barrier()


def test_device_records(records_pool):
    """Device records at 2 and 4 ranks (1 SM and the automatic budget): the checks above, the
    copy-variant checks (handles, fp8, num_worst_tokens), the pool checks, then that the group
    still pushes."""
    records_pool.run(rank_device_records_all, _seed())


def rank_device_records_all(seed):
    rank_device_records(seed)
    rank_device_records_sized(seed)
    rank_device_records_race(seed)
    if os.environ.get("TORCH_EP_MOE_ONE_LAUNCH") != "1":  # the one-launch settings: the paths it changes
        rank_copy_variant(seed)
        rank_push_pool(seed)
        checks.rank_worst_case(seed, device="cuda")
    assert_still_pushes(seed)


def raises_now_or_next(call, next_call, error, match, op="dispatch"):
    """Runs `call` then `next_call` on every rank (in step whatever raised). What the device found
    in `call` (an `op`) raises there where its kernel ran before the host looked ("this dispatch"),
    else at `next_call` once queued ("an earlier dispatch"); exactly once. Returns call's result
    or None."""
    result = None
    try:
        result = call()
    except error as e:
        assert f"found by the device during this {op}" in str(e) and _matches(match, str(e)), str(e)
    torch.cuda.synchronize()  # the notify kernel ran: its report is there
    try:
        next_call()
    except error as e:
        assert result is not None and f"found by the device during an earlier {op}" in str(e), str(e)
        assert _matches(match, str(e)), str(e)
    else:
        assert result is None, "the device's report did not raise at the next call"
    return result


def _matches(pattern, text):
    import re
    return re.search(pattern, text) is not None


def rank_device_records_mismatch(seed):
    """A hidden size that differs across ranks (rank 0: 64, the others 128), num_worst_tokens: no
    host exchange sees it; every rank's device does, moves nothing (recv_topk_idx all -1), and every
    rank raises a RuntimeError naming the hidden size and both values at its next call, here the
    next dispatch (once queued: it ran, nobody waits). Likewise rank 0 dispatching along the handle
    of another dispatch than its peers'. Then the group works: a dispatch with device
    records, one with host records, combine, against the reference, and check_errors is quiet."""
    rank, size = dist.get_rank(), dist.get_world_size()
    hidden = 64 if rank == 0 else 128
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", hidden, 2, 2, torch.bfloat16, "cuda")
    worst = 24 * size
    good = checks.make_inputs(seed + 1, "random", 32, 2, 2, torch.bfloat16, "cuda")
    before = moe_exchanges()
    out = raises_now_or_next(
        lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst),
        lambda: torch_ep.dispatch(good[2], good[3], good[4], num_experts=good[0], num_worst_tokens=worst),
        RuntimeError, r"which does not wait for it: the ranks disagree on the hidden size: rank 0 has 64, rank 1 has 128")
    assert moe_exchanges() == before, "a dispatch with num_worst_tokens exchanged host records"
    if out is not None:  # nothing moved: every row is padding
        assert bool((out.recv_topk_idx == -1).all()) and bool((out.recv_topk_weights == 0).all())
    # Rank 0 dispatches along the handle of another dispatch than its peers: every rank raises.
    first = torch_ep.dispatch(good[2], good[3], num_experts=good[0])
    second = torch_ep.dispatch(good[2], good[3], num_experts=good[0])
    chosen = first if rank == 0 else second
    before = moe_exchanges()
    raises_now_or_next(lambda: torch_ep.dispatch(good[2], handle=chosen.handle),
                       lambda: torch_ep.dispatch(good[2], handle=second.handle), RuntimeError,
                       r"rank 1 dispatched along the handle of dispatch #\d+ but rank 0 along that of #\d+; every rank "
                       r"must pass the handle of the same dispatch")
    assert moe_exchanges() == before, "a dispatch along a handle exchanged host records"
    dist.barrier()
    torch_ep.check_errors()
    for i in range(2):
        num_experts, g, x, idx, w = checks.make_inputs(seed + 2 + i, "random", 128, 2, 2, torch.bfloat16, "cuda")
        expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
        got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst if i == 0 else 0)
        check_dispatch(got, expected, worst if i == 0 else 0)
        check_combine(got, expected)
    torch.cuda.synchronize()
    torch_ep.check_errors()
    assert_still_pushes(seed)


def rank_device_records_sized(seed):
    """Dispatches whose hosts wait for their sizes (a fresh layout, a given one, fp8), with device
    records: no host exchange; the sizes, num_recv_tokens_per_expert and the handle's send matrix
    come from the device's records (a first round), the outputs from the pool (a second round),
    and everything equals torch_ep.reference on outputs poisoned the call before; a combine and a
    dispatch along the handle too. Back to back with a dispatch with num_worst_tokens in
    between, so that one- and two-round calls share the slots."""
    size = dist.get_world_size()
    for i in range(2):
        num_experts, g, x, idx, w = checks.make_inputs(seed + i, "random", 256, 4, 2, torch.bfloat16, "cuda",
                                                       max_tokens=120)
        expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
        scales = torch.rand(x.shape[0], 2, generator=g)
        fp8 = (x.cpu().float().to(torch.float8_e4m3fn), scales)
        expected8 = reference.dispatch(fp8, idx.cpu(), w.cpu(), num_experts=num_experts)
        first = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
        poisoned = poison_and_free([first.recv_x, first.recv_topk_idx, first.recv_topk_weights])
        del first
        before = moe_exchanges()
        got = torch_ep.dispatch(x, idx, w, num_experts=num_experts)  # a fresh layout
        worst = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=130 * size)
        layout = torch_ep.get_dispatch_layout(idx, num_experts)
        given = torch_ep.dispatch(tuple(t.cuda() for t in fp8), idx, w, num_experts=num_experts, layout=layout)
        along = torch_ep.dispatch(x, handle=got.handle)
        comb = torch_ep.combine(got.recv_x, got.handle)
        assert moe_exchanges() == before, "a dispatch with device records exchanged host records"
        outputs = [got.recv_x, got.recv_topk_idx, got.recv_topk_weights]
        assert in_moe_pool(outputs) and any(overlaps(t, poisoned) for t in outputs if t.numel())
        check_dispatch(got, expected)
        check_dispatch(worst, expected, 130 * size)
        assert list(got.num_recv_tokens_per_expert) == list(expected.num_recv_tokens_per_expert)
        assert same_bits(given.recv_x[0].cpu(), expected8.recv_x[0]) and same_bits(given.recv_x[1].cpu(),
                                                                                     expected8.recv_x[1])
        assert torch.equal(given.recv_topk_idx.cpu(), expected8.recv_topk_idx)
        assert list(given.num_recv_tokens_per_expert) == list(expected8.num_recv_tokens_per_expert)
        rank = dist.get_rank()
        for h in (got.handle, given.handle):  # the sizes and the send matrix, from the device's records
            assert h.recv_counts == expected.handle.recv_counts and h.send_counts == expected.handle.send_counts
            assert h.send_matrix[:, rank].tolist() == h.recv_counts and h.send_matrix[rank].tolist() == h.send_counts
        check_along(along, reference.dispatch(x.cpu(), handle=expected.handle))
        assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
    torch.cuda.synchronize()
    torch_ep.check_errors()
    dist.barrier()


def rank_device_records_waits_disagree(seed):
    """num_worst_tokens on rank 0 only, with device records: rank 0 knows its outputs, the others
    wait for their sizes, and the records say so (kRecWaits). The waiting ranks raise a
    RuntimeError at the call, rank 0 at the call or its next; nothing moves; no rank hangs. (The
    host records' push serves this case with a second exchange.) Then the group works."""
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 64, 2, 2, torch.bfloat16, "cuda")
    worst = 24 * size
    good = checks.make_inputs(seed + 1, "random", 32, 2, 2, torch.bfloat16, "cuda")
    expected = reference.dispatch(good[2].cpu(), good[3].cpu(), good[4].cpu(), num_experts=good[0])
    match = r"the ranks disagree on whether the dispatch waits for its sizes"
    call = lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts,  # noqa: E731
                                     num_worst_tokens=worst if rank == 0 else 0)
    next_call = lambda: torch_ep.dispatch(good[2], good[3], good[4], num_experts=good[0],  # noqa: E731
                                          num_worst_tokens=worst)
    before = moe_exchanges()
    if rank == 0:
        raises_now_or_next(call, next_call, RuntimeError, match)
    else:
        with pytest.raises(RuntimeError, match=match):
            call()
        next_call()
    assert moe_exchanges() == before, "a dispatch with device records exchanged host records"
    dist.barrier()
    torch.cuda.synchronize()
    torch_ep.check_errors()
    check_dispatch(next_call(), expected, worst)
    # Rank 0 combines where the others dispatch without num_worst_tokens, then the other way round
    # (every rank makes one dispatch, so the dispatch counts stay in step). The records' ops differ
    # both times: a dispatching rank raises at the call (its first round), a combining one at a later
    # call or check_errors; nothing moves, and no rank waits for a "done" the others never send.
    got = torch_ep.dispatch(good[2], good[3], good[4], num_experts=good[0])
    match = r"rank \d+ made a (dispatch|combine) but rank 0 a (dispatch|combine); the ranks' calls are out of step"
    raised = []
    for combining_rank_zero in (True, False):
        try:
            if (rank == 0) == combining_rank_zero:
                torch_ep.combine(got.recv_x, got.handle)
            else:
                torch_ep.dispatch(good[2], good[3], good[4], num_experts=good[0])
        except RuntimeError as e:
            raised.append(str(e))
        torch.cuda.synchronize()
    try:
        torch_ep.check_errors()
    except RuntimeError as e:
        raised.append(str(e))
    assert raised and all(_matches(match, m) for m in raised), raised
    assert rank == 0 or len(raised) == 2, raised  # its dispatch at the call, its combine's report later
    dist.barrier()
    torch.cuda.synchronize()
    torch_ep.check_errors()
    check_combine(got, expected)
    torch.cuda.synchronize()
    torch_ep.check_errors()
    assert_still_pushes(seed)


def rank_device_records_overflow(seed):
    """Every rank sends all its tokens to rank 0 (expert 0) with num_worst_tokens = its own tokens:
    rank 0 receives size x more than its outputs hold. Every rank's device sees it (the records
    carry every rank's sends and capacity), the senders drop the rows past rank 0's capacity, rank
    0's first rows (its own tokens, lowest rank first) arrive, and every rank raises a ValueError
    naming rank 0, the rows and the capacity. The group keeps working."""
    rank, size = dist.get_rank(), dist.get_world_size()
    tokens, hidden = 40, 64
    num_experts = 2 * size
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randint(-60, 60, (tokens, hidden), generator=g).to(torch.bfloat16).cuda()
    to_rank0 = torch.zeros(tokens, 1, dtype=torch.long, device="cuda")
    expected = reference.dispatch(x.cpu(), to_rank0.cpu(), num_experts=num_experts)
    match = rf"rank 0 received {tokens * size} rows but its outputs hold {tokens} \(num_worst_tokens\)"
    got = None
    before = moe_exchanges()
    try:
        got = torch_ep.dispatch(x, to_rank0, num_experts=num_experts, num_worst_tokens=tokens)
    except ValueError as e:
        assert "during this dispatch" in str(e) and _matches(match, str(e)), str(e)
    torch.cuda.synchronize()
    assert moe_exchanges() == before, "a dispatch with num_worst_tokens exchanged host records"
    if got is not None:
        if rank == 0:
            assert same_bits(got.recv_x.cpu(), expected.recv_x[:tokens]), "the rows that fit differ"
        with pytest.raises(ValueError, match=match):
            torch_ep.check_errors()
    dist.barrier()
    torch_ep.check_errors()
    checks.rank_worst_case(seed, device="cuda")
    assert_still_pushes(seed)


def rank_device_records_pool_full(seed):
    """Device records, a MoE pool of 2 MiB: rank 0's num_worst_tokens outputs (16 KiB rows by the
    hundred) do not fit, its peers' do. Rank 0 raises a ValueError naming TORCH_EP_MOE_POOL_BYTES
    at the call (after its record went out, so no peer waits); every other rank's device sees
    rank 0's refusal, moves nothing, and raises at the call or the next, naming rank 0. No host
    exchange. Then the group works: device and host records against the reference."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(moe_push=True, moe_device_records=True,
                                                       moe_pool_bytes=2 << 20))
    experts_per_rank, hidden, tokens = 2, 4096, 4
    num_experts = experts_per_rank * size
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randn(tokens, hidden, generator=g).cuda()
    idx = torch.randint(0, num_experts, (tokens, 1), generator=g).cuda()
    worst = 400 if rank == 0 else tokens * size  # rank 0: 400 x 16 KiB > 2 MiB
    small = checks.make_inputs(seed + 1, "random", 16, 2, experts_per_rank, torch.float32, "cuda")
    torch_ep.dispatch(small[2], small[3], num_experts=small[0], group=group)  # the transport and pool set up
    torch.cuda.synchronize()
    before = moe_exchanges(group)
    call = lambda: torch_ep.dispatch(x, idx, num_experts=num_experts, num_worst_tokens=worst, group=group)  # noqa: E731
    next_call = lambda: torch_ep.dispatch(small[2], small[3], num_experts=small[0],  # noqa: E731
                                          num_worst_tokens=16 * size, group=group)
    if rank == 0:
        with pytest.raises(ValueError, match="TORCH_EP_MOE_POOL_BYTES"):
            call()
        torch.cuda.synchronize()
        next_call()  # its device does not report its own refusal again
    else:
        raises_now_or_next(call, next_call, ValueError,
                           r"rank 0 could not allocate its outputs \(400 rows\) in its MoE pool "
                           r"\(TORCH_EP_MOE_POOL_BYTES\); no rank moved rows")
    assert moe_exchanges(group) == before, "a dispatch with num_worst_tokens exchanged host records"
    dist.barrier()
    torch.cuda.synchronize()
    torch_ep.check_errors(group)
    num_experts, g, xs, idx, w = checks.make_inputs(seed + 2, "random", 16, 2, experts_per_rank, torch.float32, "cuda")
    expected = reference.dispatch(xs.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    for worst in (24 * size, 0):  # make_inputs: at most 23 tokens a rank, each sent to a rank once
        got = torch_ep.dispatch(xs, idx, w, num_experts=num_experts, num_worst_tokens=worst, group=group)
        check_dispatch(got, expected, worst)
        check_combine(got, expected, group)
        del got
    torch.cuda.synchronize()
    torch_ep.check_errors(group)
    assert_still_pushes(seed, group)
    dist.destroy_process_group(group)


def rank_device_records_expert_ids(seed):
    """The last rank's topk_idx holds an expert id >= num_experts, with num_worst_tokens: the host
    never looks at the ids; that rank's device refuses in its record, every rank's verdict refuses
    the call (nothing moves: all padding) and every rank raises a ValueError naming the last rank
    and the ids, at the call or the next. No host exchange; then the group works."""
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 64, 2, 2, torch.bfloat16, "cuda")
    if rank == size - 1 and idx.shape[0]:
        idx = idx.clone()
        idx[0, 0] = num_experts + 3
    worst = 24 * size
    good = checks.make_inputs(seed + 1, "random", 32, 2, 2, torch.bfloat16, "cuda")
    torch.cuda.synchronize()
    before = moe_exchanges()
    out = raises_now_or_next(
        lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst),
        lambda: torch_ep.dispatch(good[2], good[3], good[4], num_experts=good[0], num_worst_tokens=worst),
        ValueError, rf"rank {size - 1}'s topk_idx holds expert ids outside \[-1, num_experts\): the smallest is -?\d+, "
                    rf"the largest {num_experts + 3}; no rank moved rows")
    assert moe_exchanges() == before, "a dispatch with num_worst_tokens exchanged host records"
    if out is not None:  # nothing moved: every row is padding
        assert bool((out.recv_topk_idx == -1).all()) and bool((out.recv_topk_weights == 0).all())
    dist.barrier()
    torch.cuda.synchronize()
    torch_ep.check_errors()
    num_experts, g, x, idx, w = checks.make_inputs(seed + 2, "random", 128, 2, 2, torch.bfloat16, "cuda")
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    check_dispatch(torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst), expected, worst)
    # The same without num_worst_tokens: the first round's verdict refuses it, and every rank raises
    # at the call (it waits for its sizes), none allocates; then the group works.
    bad = idx.clone()
    if rank == size - 1 and bad.shape[0]:
        bad[0, 0] = num_experts + 3
    with pytest.raises(ValueError, match=rf"found by the device during this dispatch .*rank {size - 1}'s topk_idx "
                                         rf"holds expert ids outside"):
        torch_ep.dispatch(x, bad, w, num_experts=num_experts)
    check_dispatch(torch_ep.dispatch(x, idx, w, num_experts=num_experts), expected)
    torch.cuda.synchronize()
    torch_ep.check_errors()
    assert_still_pushes(seed)


def test_device_records_errors(records_pool):
    if records_pool.world_size < 2:
        pytest.skip("needs two ranks")
    records_pool.run(rank_device_records_mismatch, _seed())
    records_pool.run(rank_device_records_overflow, _seed())
    records_pool.run(rank_device_records_expert_ids, _seed())
    records_pool.run(rank_device_records_waits_disagree, _seed())


def test_device_records_pool_full(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(rank_device_records_pool_full, _seed())


def device_records_for(rank0):
    return torch_ep.Options(moe_push=True, moe_device_records=rank0)


def rank_device_records_disagree():
    """Ranks that disagree on Options.moe_device_records (rank_options_disagree)."""
    rank_options_disagree(device_records_for, "TORCH_EP_MOE_DEVICE_RECORDS", num_worst_tokens=64)


def test_device_records_ranks_disagree(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(rank_device_records_disagree)


def test_device_records_missing_peer_times_out(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    # The last rank never makes the num_worst_tokens dispatch: every other rank's notify kernel
    # gives up after the group's timeout (its waits are bounded; nothing moves), its push kernel's
    # "done" wait too, and check_errors then raises naming the op and the peer.
    results = cuda_pool.run(copy_checks.rank_missing_peer, {"moe_push": True, "moe_device_records": True},
                            worst_per_rank=24, check_errors=True)
    for result in results[:-1]:
        assert result is not None, "a missing peer raised nothing"
        message, elapsed = result
        assert "dispatch" in message and "timed out" in message, message
        assert elapsed < 30
