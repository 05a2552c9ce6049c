"""Inputs and checks shared by the collective tests (test_collectives.py, test_collective_forms.py).

Every rank draws its input from a seed derived from (test seed, rank), so any rank can rebuild
every other rank's input and compute the expected result locally, with plain torch ops and no
communication.
"""
import torch
import torch.distributed as dist

from torch_ep.testing import random_tensor


def new_seed() -> int:
    return int(torch.randint(0, 2**30, ()).item())


# ----------------------------------------------------------------------------- inputs


def rank_input(seed, rank, shape, dtype, kind="any"):
    """Rank `rank`'s input of a test: the same tensor wherever it is rebuilt.

    kind: "any" (random_tensor: random bits of the dtype, floats ~N(0, 8)), "small" (ints in
    [-1000, 1000], sums cannot overflow), "nonneg" (ints in [0, 1000]), "factor" (ints in
    +-[1, 3], products of 4 cannot overflow).
    """
    g = torch.Generator().manual_seed(seed * 7919 + rank)
    if kind == "any" or dtype.is_floating_point or dtype == torch.bool:
        return random_tensor(shape, dtype, g)
    if kind == "small":
        return torch.randint(-1000, 1001, shape, generator=g).to(dtype)
    if kind == "nonneg":
        return torch.randint(0, 1001, shape, generator=g).to(dtype)
    if kind == "factor":
        magnitude = torch.randint(1, 4, shape, generator=g)
        sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
        return (magnitude * sign).to(dtype)
    raise ValueError(kind)


def every_input(seed, shape, dtype, kind="any", group=None):
    """The inputs of every rank of `group`, indexed by group rank."""
    return [rank_input(seed, r, shape, dtype, kind) for r in range(dist.get_world_size(group))]


def assert_reduced(actual, expected, what, inputs=None):
    """Exact for integers; for floats, within the rounding of a reduction in the dtype itself
    (the order is the backend's: in bf16 a sum of n terms may be off by ~n ulps of the largest)."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    if expected.dtype.is_floating_point:
        eps = torch.finfo(expected.dtype).eps
        scale = max((x.abs().max().item() for x in inputs), default=1.0) if inputs else expected.abs().max().item()
        atol = 2 * eps * scale * (len(inputs) if inputs else 4)
        torch.testing.assert_close(actual, expected, rtol=2 * eps, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(actual, expected), f"{what}: got {actual}, expected {expected}"


def local_reduce(tensors, op, group_size):
    """The reduction of `tensors` (one per rank) computed here, in float64 for floats."""
    dtype = tensors[0].dtype
    stacked = torch.stack([t.double() if dtype.is_floating_point else t for t in tensors])
    if op == dist.ReduceOp.SUM:
        out = stacked.sum(0, dtype=stacked.dtype)
    elif op == dist.ReduceOp.PRODUCT:
        out = stacked.prod(0, dtype=stacked.dtype)
    elif op == dist.ReduceOp.MAX:
        out = stacked.amax(0)
    elif op == dist.ReduceOp.MIN:
        out = stacked.amin(0)
    elif op == dist.ReduceOp.AVG:
        total = stacked.sum(0, dtype=stacked.dtype)
        # Integers: truncation toward zero, as NCCL's ncclAvg (sum, then C integer division).
        out = total / group_size if dtype.is_floating_point else torch.div(total, group_size, rounding_mode="trunc")
    else:
        raise ValueError(op)
    return out.to(dtype)
