"""The collectives an "ep" group delegates to its inner backend (Gloo for CPU tensors).

Every rank draws its input from a seed derived from (test seed, rank), so any rank can rebuild
every other rank's input and compute the expected result locally, with plain torch ops and no
communication. Outputs are poisoned before each call, so an op that writes nothing fails.
"""
import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fcol

import torch_ep
from collective_inputs import assert_reduced, every_input, local_reduce, new_seed, rank_input
from torch_ep.testing import poison_, same_bits

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates some of the old names


# ----------------------------------------------------------------------------- backend name


def rank_backend_names():
    return dist.get_backend(), dist.get_backend(dist.group.WORLD), type(torch_ep.get_backend()).__name__


def test_default_group_backend_is_ep(pool):
    """dist.get_backend() reports "ep" and the group's CPU backend is our ProcessGroupEP."""
    assert pool.run(rank_backend_names) == [("ep", "ep", "ProcessGroupEP")] * pool.world_size


# ----------------------------------------------------------------------------- all_reduce

ALL_REDUCE_CASES = [
    # (op name, dtype, input kind)
    ("SUM", torch.float32, "any"),
    ("SUM", torch.float64, "any"),
    ("SUM", torch.bfloat16, "any"),
    ("SUM", torch.int64, "small"),
    ("SUM", torch.int32, "small"),
    ("MAX", torch.float32, "any"),
    ("MAX", torch.int64, "any"),
    ("MIN", torch.float32, "any"),
    ("MIN", torch.int32, "any"),
    ("PRODUCT", torch.int64, "factor"),
    ("PRODUCT", torch.int32, "factor"),
    ("PRODUCT", torch.float32, "factor"),
    ("AVG", torch.float32, "any"),
    ("AVG", torch.float64, "any"),
    ("AVG", torch.bfloat16, "any"),
    ("AVG", torch.int64, "small"),  # negative sums not divisible by the group size: trunc, not floor
    ("AVG", torch.int32, "small"),
    ("AVG", torch.int64, "nonneg"),
]


def rank_all_reduce(seed, op_name, dtype, kind):
    rank, size = dist.get_rank(), dist.get_world_size()
    op = getattr(dist.ReduceOp, op_name)
    inputs = every_input(seed, (7, 5), dtype, kind)
    t = inputs[rank].clone()
    dist.all_reduce(t, op=op)
    assert_reduced(t, local_reduce(inputs, op, size), f"all_reduce {op_name} {dtype}", inputs)


@pytest.mark.parametrize("op_name,dtype,kind", ALL_REDUCE_CASES,
                         ids=[f"{o}-{str(d).removeprefix('torch.')}" for o, d, _ in ALL_REDUCE_CASES])
def test_all_reduce(pool, op_name, dtype, kind):
    """all_reduce gives every rank the reduction of all inputs, for each op and dtype."""
    pool.run(rank_all_reduce, new_seed(), op_name, dtype, kind)


def rank_all_reduce_premul_sum(seed, tensor_factor):
    rank, size = dist.get_rank(), dist.get_world_size()
    inputs = every_input(seed, (6, 4), torch.float64)
    factors = [0.5 + r for r in range(size)]  # per-rank factors: each scales its own input
    factor = torch.tensor([factors[rank]], dtype=torch.float64) if tensor_factor else factors[rank]
    t = inputs[rank].clone()
    dist.all_reduce(t, op=dist._make_nccl_premul_sum(factor))
    expected = sum(x * f for x, f in zip(inputs, factors))
    torch.testing.assert_close(t, expected)


@pytest.mark.parametrize("tensor_factor", [False, True], ids=["float_factor", "tensor_factor"])
def test_all_reduce_premul_sum(pool, tensor_factor):
    """PREMUL_SUM scales each rank's input by that rank's factor, then sums (NCCL's semantics)."""
    pool.run(rank_all_reduce_premul_sum, new_seed(), tensor_factor)


# ----------------------------------------------------------------------------- broadcast, all_gather

DATA_DTYPES = [torch.float32, torch.bfloat16, torch.int64, torch.uint8]


def rank_broadcast(seed, dtype):
    rank, size = dist.get_rank(), dist.get_world_size()
    for src in range(size):
        inputs = every_input(seed + src, (4, 3), dtype)
        t = inputs[rank].clone() if rank == src else poison_(torch.empty(4, 3, dtype=dtype))
        dist.broadcast(t, src=src)
        assert same_bits(t, inputs[src]), f"broadcast from {src}: wrong data on rank {rank}"


@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=str)
def test_broadcast(pool, dtype):
    """broadcast from every source rank copies the source's tensor to every rank, bit for bit."""
    pool.run(rank_broadcast, new_seed(), dtype)


def rank_all_gather(seed, dtype):
    rank, size = dist.get_rank(), dist.get_world_size()
    inputs = every_input(seed, (3, 5), dtype)
    outputs = [poison_(torch.empty(3, 5, dtype=dtype)) for _ in range(size)]
    dist.all_gather(outputs, inputs[rank])
    for r in range(size):
        assert same_bits(outputs[r], inputs[r]), f"all_gather: block {r} wrong on rank {rank}"


@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=str)
def test_all_gather(pool, dtype):
    """all_gather fills output r with rank r's input on every rank."""
    pool.run(rank_all_gather, new_seed(), dtype)


def rank_all_gather_into_tensor(seed, dtype):
    rank, size = dist.get_rank(), dist.get_world_size()
    inputs = every_input(seed, (3, 5), dtype)
    out = poison_(torch.empty(3 * size, 5, dtype=dtype))
    dist.all_gather_into_tensor(out, inputs[rank])
    assert same_bits(out, torch.cat(inputs)), f"all_gather_into_tensor: wrong output on rank {rank}"


@pytest.mark.parametrize("dtype", DATA_DTYPES, ids=str)
def test_all_gather_into_tensor(pool, dtype):
    """all_gather_into_tensor concatenates every rank's input along dim 0, in rank order."""
    pool.run(rank_all_gather_into_tensor, new_seed(), dtype)


# ----------------------------------------------------------------------------- reduce_scatter


def rank_reduce_scatter_tensor(seed, op_name, dtype, kind):
    rank, size = dist.get_rank(), dist.get_world_size()
    op = getattr(dist.ReduceOp, op_name)
    inputs = every_input(seed, (size * 3, 4), dtype, kind)
    inp = inputs[rank].clone()
    out = poison_(torch.empty(3, 4, dtype=dtype))
    dist.reduce_scatter_tensor(out, inp, op=op)
    assert same_bits(inp, inputs[rank]), "reduce_scatter_tensor modified its input"
    expected = local_reduce([x.chunk(size)[rank] for x in inputs], op, size)
    assert_reduced(out, expected, f"reduce_scatter_tensor {op_name} {dtype} on rank {rank}")


@pytest.mark.parametrize("op_name,dtype,kind", [
    ("SUM", torch.float32, "any"),
    ("SUM", torch.int64, "small"),
    ("MAX", torch.float64, "any"),
    ("AVG", torch.float32, "any"),
    ("AVG", torch.int64, "small"),
], ids=["SUM-float32", "SUM-int64", "MAX-float64", "AVG-float32", "AVG-int64"])
def test_reduce_scatter_tensor(pool, op_name, dtype, kind):
    """reduce_scatter_tensor leaves rank r the reduction of every input's chunk r; the input is untouched."""
    pool.run(rank_reduce_scatter_tensor, new_seed(), op_name, dtype, kind)


def rank_reduce_scatter_tensor_premul_sum(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    inputs = every_input(seed, (size * 2, 3), torch.float64)
    factors = [1.5 + r for r in range(size)]
    inp = inputs[rank].clone()
    out = poison_(torch.empty(2, 3, dtype=torch.float64))
    dist.reduce_scatter_tensor(out, inp, op=dist._make_nccl_premul_sum(factors[rank]))
    assert same_bits(inp, inputs[rank]), "reduce_scatter_tensor PREMUL_SUM modified its input"
    torch.testing.assert_close(out, sum(x.chunk(size)[rank] * f for x, f in zip(inputs, factors)))


def test_reduce_scatter_tensor_premul_sum(pool):
    """reduce_scatter_tensor with PREMUL_SUM scales a copy of each input by its rank's factor."""
    pool.run(rank_reduce_scatter_tensor_premul_sum, new_seed())


def rank_reduce_scatter_list(seed, op_name, dtype, kind):
    rank, size = dist.get_rank(), dist.get_world_size()
    op = getattr(dist.ReduceOp, op_name)
    # Rank r's input list: one [2, 3] tensor per destination rank.
    lists = [[rank_input(seed + 1000 * dst, r, (2, 3), dtype, kind) for dst in range(size)] for r in range(size)]
    out = poison_(torch.empty(2, 3, dtype=dtype))
    dist.reduce_scatter(out, [t.clone() for t in lists[rank]], op=op)
    expected = local_reduce([lists[r][rank] for r in range(size)], op, size)
    assert_reduced(out, expected, f"reduce_scatter {op_name} {dtype} on rank {rank}")


@pytest.mark.parametrize("op_name,dtype,kind", [
    ("SUM", torch.float32, "any"),
    ("SUM", torch.int64, "small"),
    ("AVG", torch.float32, "any"),
    ("AVG", torch.int64, "small"),
], ids=["SUM-float32", "SUM-int64", "AVG-float32", "AVG-int64"])
def test_reduce_scatter_list(pool, op_name, dtype, kind):
    """reduce_scatter (list form) leaves rank r the reduction of every rank's r-th input."""
    pool.run(rank_reduce_scatter_list, new_seed(), op_name, dtype, kind)


# ----------------------------------------------------------------------------- integer AVG everywhere


def rank_integer_avg(seed, form):
    """Integer AVG through `form`; every form must agree with all_reduce's integer division."""
    rank, size = dist.get_rank(), dist.get_world_size()
    inputs = every_input(seed, (size * 2,), torch.int64, "small")
    expected = local_reduce(inputs, dist.ReduceOp.AVG, size)
    t = inputs[rank].clone()
    if form == "all_reduce":
        dist.all_reduce(t, op=dist.ReduceOp.AVG)
    elif form == "functional_all_reduce":
        t = fcol.all_reduce(t, "avg", dist.group.WORLD)
    elif form == "reduce":
        dist.reduce(t, dst=0, op=dist.ReduceOp.AVG)
        if rank != 0:
            return
    elif form == "all_reduce_coalesced":
        dist.all_reduce_coalesced([t], op=dist.ReduceOp.AVG)
    elif form == "reduce_scatter":
        out = poison_(torch.empty(2, dtype=torch.int64))
        dist.reduce_scatter(out, list(t.chunk(size)), op=dist.ReduceOp.AVG)
        t, expected = out, expected.chunk(size)[rank]
    else:
        raise ValueError(form)
    assert_reduced(t, expected, f"integer AVG via {form}")


@pytest.mark.parametrize("form", ["all_reduce", "functional_all_reduce", "reduce", "all_reduce_coalesced",
                                  "reduce_scatter"])
def test_integer_avg_in_every_reducing_collective(pool, form):
    """ReduceOp.AVG on int64 works, with the same integer division (trunc), in every reducing collective."""
    pool.run(rank_integer_avg, new_seed(), form)


def rank_premul_sum_form(seed, form):
    rank, size = dist.get_rank(), dist.get_world_size()
    inputs = every_input(seed, (size,), torch.float64)
    factors = [0.25 + r for r in range(size)]
    expected = sum(x * f for x, f in zip(inputs, factors))
    op = dist._make_nccl_premul_sum(factors[rank])
    t = inputs[rank].clone()
    if form == "reduce":
        dist.reduce(t, dst=0, op=op)
        if rank != 0:
            return
    elif form == "all_reduce_coalesced":
        dist.all_reduce_coalesced([t], op=op)
    elif form == "reduce_scatter":
        pieces = [p.clone() for p in t.chunk(size)]
        out = poison_(torch.empty(1, dtype=torch.float64))
        dist.reduce_scatter(out, pieces, op=op)
        assert all(torch.equal(p, q) for p, q in zip(pieces, t.chunk(size))), "reduce_scatter PREMUL_SUM modified its input"
        t, expected = out, expected.chunk(size)[rank]
    else:
        raise ValueError(form)
    torch.testing.assert_close(t, expected)


@pytest.mark.parametrize("form", ["reduce", "all_reduce_coalesced", "reduce_scatter"])
def test_premul_sum_in_other_reducing_collectives(pool, form):
    """PREMUL_SUM, which NCCL supports in every reduction, also works in reduce, all_reduce_coalesced and
    reduce_scatter (list form)."""
    pool.run(rank_premul_sum_form, new_seed(), form)


# ----------------------------------------------------------------------------- reduce, gather, scatter


def rank_reduce(seed, op_name, dtype, kind):
    rank, size = dist.get_rank(), dist.get_world_size()
    op = getattr(dist.ReduceOp, op_name)
    for dst in range(size):
        inputs = every_input(seed + dst, (4, 4), dtype, kind)
        t = inputs[rank].clone()
        dist.reduce(t, dst=dst, op=op)
        if rank == dst:
            assert_reduced(t, local_reduce(inputs, op, size), f"reduce {op_name} to {dst}")


@pytest.mark.parametrize("op_name,dtype,kind", [
    ("SUM", torch.float32, "any"),
    ("MAX", torch.int64, "any"),
    ("PRODUCT", torch.int64, "factor"),
], ids=["SUM-float32", "MAX-int64", "PRODUCT-int64"])
def test_reduce(pool, op_name, dtype, kind):
    """reduce to every destination rank in turn leaves the reduction on that rank."""
    pool.run(rank_reduce, new_seed(), op_name, dtype, kind)


def rank_gather(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    for dst in range(size):
        inputs = every_input(seed + dst, (2, 3), torch.float32)
        outputs = [poison_(torch.empty(2, 3)) for _ in range(size)] if rank == dst else None
        dist.gather(inputs[rank], outputs, dst=dst)
        if rank == dst:
            for r in range(size):
                assert same_bits(outputs[r], inputs[r]), f"gather to {dst}: block {r} wrong"


def test_gather(pool):
    """gather to every destination collects each rank's tensor in rank order."""
    pool.run(rank_gather, new_seed())


def rank_scatter(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    for src in range(size):
        pieces = every_input(seed + src, (3,), torch.int64)  # pieces[r]: what src sends to r
        out = poison_(torch.empty(3, dtype=torch.int64))
        dist.scatter(out, [p.clone() for p in pieces] if rank == src else None, src=src)
        assert same_bits(out, pieces[rank]), f"scatter from {src}: rank {rank} got the wrong piece"


def test_scatter(pool):
    """scatter from every source gives rank r the source's r-th tensor."""
    pool.run(rank_scatter, new_seed())
