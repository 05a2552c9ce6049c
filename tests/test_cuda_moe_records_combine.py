"""MoE combine with device records (TORCH_EP_MOE_DEVICE_RECORDS with TORCH_EP_MOE_PUSH,
docs/moe_push.md section 5) on CUDA tensors, GPU machines only: every kind of x (in the MoE pool,
outside it, unaligned in it, torch_ep.combine_buffer), the errors the device finds, a pool too
full for the copy of x. The fixtures and helpers are tests/test_cuda_moe_device_records.py's.
"""
import pytest
import torch
import torch.distributed as dist

import test_cuda_moe as copy_checks
import test_cuda_moe_device_records as device_records
import test_moe as checks
import torch_ep
from conftest import rank_pool
from test_cuda_moe_device_records import moe_exchanges, raises_now_or_next
from test_cuda_moe_push import _seed, assert_still_pushes, check_combine, in_moe_pool
from torch_ep import reference
from torch_ep.testing import same_bits

pytestmark = copy_checks.pytestmark
cuda_pool = device_records.cuda_pool  # the fixture, found here by name


@pytest.fixture(params=[(n, sms) for n in (2, 4) for sms in (1, 0)], ids=lambda v: f"{v[0]}ranks-sms{v[1]}")
def combine_pool(request):
    """Device records at 2 and 4 ranks, 1 SM and the automatic budget (TORCH_EP_MOE_ONE_LAUNCH
    leaves combine's launches alone)."""
    world_size, sms = request.param
    return rank_pool(world_size, cuda=True, env={**device_records.RECORDS_ENV, "TORCH_EP_NUM_SMS": str(sms)})


def rank_device_records_combine(seed):
    """Every eager combine makes no host exchange and equals torch_ep.reference bit for bit, on
    outputs whose blocks held poison the call before, whatever x each rank gives (ranks differ):
    recv_x itself and torch_ep.combine_buffer (in the MoE pool: read where they lie), a copy
    outside the pool, a view of the pool that is not 16-byte aligned (both copied into the pool on
    the stream first); with topk_weights (outside the pool) and without; bf16 along a handle with
    sizes, float32 along one with num_worst_tokens (rows past the received ones never read)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    hidden = 256
    for i, (dtype, worst_rows) in enumerate([(torch.bfloat16, 0), (torch.float32, 130)]):
        num_experts, g, x, idx, w = checks.make_inputs(seed + i, "random", hidden, 4, 2, dtype, "cuda",
                                                       max_tokens=120)
        expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
        got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst_rows * size)
        m, rows = expected.recv_x.shape[0], got.recv_x.shape[0]
        for kind in range(4):
            # Expert outputs: fresh random rows and weights, each rank another kind of x per round.
            y = torch.randint(-60, 60, (rows, hidden), generator=g).to(dtype)
            yw = torch.randint(1, 9, (rows, idx.shape[1]), generator=g).float() / 8  # sums exact in float32
            weights = yw.cuda() if kind % 2 == 0 else None
            ref = reference.combine(y[:m], expected.handle, yw[:m] if weights is not None else None)
            mine = (kind + rank) % 4
            if mine == 0:  # recv_x itself, in the pool
                xs = got.recv_x
                xs.copy_(y)
            elif mine == 1:  # outside the pool
                xs = y.cuda()
            elif mine == 2:  # in the pool, 16-byte unaligned: one element past a combine_buffer's start
                big = torch_ep.combine_buffer(got.handle, dtype, hidden=hidden + 8)
                assert in_moe_pool([big])
                xs = big.view(-1)[1:1 + rows * hidden].view(rows, hidden)
                xs.copy_(y)
                assert rows == 0 or xs.data_ptr() % 16
            else:  # torch_ep.combine_buffer: in the pool
                xs = torch_ep.combine_buffer(got.handle, dtype)
                assert in_moe_pool([xs]) and xs.shape == (rows, hidden)
                xs.copy_(y)
            poison = torch.empty(x.shape[0], hidden, dtype=dtype, device="cuda")
            poison.view(torch.uint8).fill_(0x7F)
            del poison  # the combined rows' block, likely
            before = moe_exchanges()
            comb = torch_ep.combine(xs, got.handle, weights)
            assert moe_exchanges() == before, "a combine exchanged host records"
            assert same_bits(comb.combined_x.cpu(), ref.combined_x), f"combined_x differs (x of kind {mine})"
            if weights is not None:
                assert torch.equal(comb.combined_topk_weights.cpu(), ref.combined_topk_weights)
        del got
    torch.cuda.synchronize()
    torch_ep.check_errors()
    dist.barrier()


def rank_device_records_combine_errors(seed):
    """Combines the device finds wrong, with no host exchange: rank 0 combines along the handle of
    another dispatch than its peers' (same counts); then only rank 0 gives topk_weights. Each
    moves nothing (the combined rows are zeros) and every rank raises a RuntimeError naming the
    problem at the call or the next combine. Then the group works, against the reference."""
    rank = dist.get_rank()
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 64, 2, 2, torch.bfloat16, "cuda")
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    ref = reference.combine(expected.recv_x, expected.handle)
    first = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
    second = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
    chosen = first if rank == 0 else second
    torch.cuda.synchronize()
    before = moe_exchanges()
    out = raises_now_or_next(lambda: torch_ep.combine(chosen.recv_x, chosen.handle),
                             lambda: torch_ep.combine(second.recv_x, second.handle), RuntimeError,
                             r"rank 1 combined along the handle of dispatch #\d+ but rank 0 along that of #\d+; every "
                             r"rank must pass the handle of the same dispatch; no rank moved rows", op="combine")
    if out is not None:
        assert bool((out.combined_x == 0).all()), "a combine the device refused moved rows"
    weights = torch.rand(second.recv_x.shape[0], idx.shape[1], device="cuda") if rank == 0 else None
    raises_now_or_next(lambda: torch_ep.combine(second.recv_x, second.handle, weights),
                       lambda: torch_ep.combine(second.recv_x, second.handle), RuntimeError,
                       r"the ranks disagree on the number of top-k slots", op="combine")
    assert moe_exchanges() == before, "a combine exchanged host records"
    dist.barrier()
    torch.cuda.synchronize()
    torch_ep.check_errors()
    comb = torch_ep.combine(second.recv_x, second.handle)
    assert same_bits(comb.combined_x.cpu(), ref.combined_x), "combined_x differs from the reference"
    torch.cuda.synchronize()
    torch_ep.check_errors()
    assert_still_pushes(seed)


def rank_device_records_combine_pool_full(seed):
    """Device records, a MoE pool of 2 MiB that the small outputs' segment fills: rank 0's combine
    x (outside the pool, over 1 MiB) cannot be copied into it, its peers' small ones can. Rank 0
    raises a ValueError naming TORCH_EP_MOE_POOL_BYTES at the call (after its record went out);
    every other rank's device sees rank 0's refusal, moves nothing, and raises at the call or the
    next combine, naming rank 0. Then the group works."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(moe_push=True, moe_device_records=True,
                                                       moe_pool_bytes=2 << 20))
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 16, 2, 2, torch.float32, "cuda")
    keep = min(idx.shape[0], 2)  # at most 2 tokens of 2 experts each: at most 4 x size rows reach a rank
    x, idx = x[:keep], idx[:keep]
    worst = 400 if rank == 0 else 4 * size
    got = torch_ep.dispatch(x, idx, num_experts=num_experts, num_worst_tokens=worst, group=group)
    hidden = 1024  # rank 0: 400 rows of 4 KiB, a large allocation; the others 16 KiB x size at most
    ys = torch.randn(worst, hidden, generator=g).cuda()
    torch.cuda.synchronize()
    before = moe_exchanges(group)
    call = lambda: torch_ep.combine(ys, got.handle, group=group)  # noqa: E731
    if rank == 0:
        with pytest.raises(ValueError, match=r"cannot hold a copy of x \(400 rows\).*TORCH_EP_MOE_POOL_BYTES"):
            call()
        torch.cuda.synchronize()
        torch_ep.combine(got.recv_x, got.handle, group=group)  # its device does not report its own refusal again
    else:
        raises_now_or_next(call, lambda: torch_ep.combine(got.recv_x, got.handle, group=group), ValueError,
                           r"rank 0 could not allocate a copy of its x \(400 rows\) in its MoE pool "
                           r"\(TORCH_EP_MOE_POOL_BYTES\); no rank moved rows", op="combine")
    assert moe_exchanges(group) == before, "a combine exchanged host records"
    dist.barrier()
    torch.cuda.synchronize()
    torch_ep.check_errors(group)
    expected = reference.dispatch(x.cpu(), idx.cpu(), num_experts=num_experts)
    check_combine(got, expected, group)
    torch.cuda.synchronize()
    torch_ep.check_errors(group)
    dist.destroy_process_group(group)


def test_combine_records(combine_pool):
    combine_pool.run(rank_device_records_combine, _seed())


def test_combine_records_errors(combine_pool):
    combine_pool.run(rank_device_records_combine_errors, _seed())


def test_combine_records_pool_full(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(rank_device_records_combine_pool_full, _seed())
