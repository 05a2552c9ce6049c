"""Existing training code runs unchanged on "ep": DDP, new_group (subsets, pg_options),
DeviceMesh, and groups destroyed and re-created.

Expected values are computed locally from every rank's seeded input (DDP: a single-process run
on the concatenated batches; all_to_all: torch_ep.reference, which goes through Gloo).
"""
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import torch_ep
from torch_ep import reference
from torch_ep.testing import poison_, same_bits

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def new_seed() -> int:
    return int(torch.randint(0, 2**30, ()).item())


def creator_pid(name):
    """The pid in a segment name "torch_ep_<hex pid>_<random>_<rank>", or None if it has another form."""
    try:
        return int(name.split("_")[2], 16)
    except (IndexError, ValueError):
        return None


def shm_names(pids):
    """torch_ep_* names in /dev/shm made by one of `pids` (or of an unknown form): other runs on
    this machine may hold their own segments while they set up."""
    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return sorted(n for n in names if n.startswith("torch_ep_") and creator_pid(n) in set(pids) | {None})


def check_uneven_all_to_all(group, seed, dtype=torch.float32, row_shape=(3,)):
    """An uneven all_to_all_single on `group`, compared bit for bit with torch_ep.reference."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    m = torch.randint(0, 5, (size, size), generator=torch.Generator().manual_seed(seed))  # [src, dst] rows
    in_splits, out_splits = m[rank].tolist(), m[:, rank].tolist()
    g = torch.Generator().manual_seed(seed * 17 + rank)
    x = (torch.randn(sum(in_splits), *row_shape, generator=g) * 8).to(dtype)
    y = poison_(torch.empty(sum(out_splits), *row_shape, dtype=dtype))
    dist.all_to_all_single(y, x, out_splits, in_splits, group=group)
    expected = reference.all_to_all_single(y.shape, x, out_splits, in_splits, group=group)
    assert same_bits(y, expected), f"all_to_all_single on a subgroup: rank {rank} got wrong data"


# ----------------------------------------------------------------------------- DDP


def make_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()


def batch(seed, step, rank, rows=5):
    g = torch.Generator().manual_seed(seed * 1000 + step * 10 + rank)
    return torch.randn(rows, 6, generator=g, dtype=torch.float64), torch.randn(rows, 3, generator=g, dtype=torch.float64)


def rank_ddp_training(seed, steps):
    from torch.nn.parallel import DistributedDataParallel as DDP

    rank, size = dist.get_rank(), dist.get_world_size()
    # Every rank starts from different weights: DDP must broadcast rank 0's at construction.
    model = DDP(make_model(seed + rank), bucket_cap_mb=0.0005)  # tiny buckets: several all_reduces per step
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    reference_model = make_model(seed)  # rank 0's initial weights
    ref_opt = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)

    for step in range(steps):
        x, y = batch(seed, step, rank)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        # The same step in one process on every rank's batch: the mean loss over the whole batch
        # has the average of the ranks' gradients as its gradient.
        xs, ys = zip(*(batch(seed, step, r) for r in range(size)))
        ref_opt.zero_grad()
        torch.nn.functional.mse_loss(reference_model(torch.cat(xs)), torch.cat(ys)).backward()
        ref_opt.step()

    params = [p.detach().clone() for p in model.module.parameters()]
    for p, ref in zip(params, reference_model.parameters()):
        torch.testing.assert_close(p, ref.detach(), rtol=1e-10, atol=1e-12)
    # Identical across ranks, bit for bit.
    gathered = [None] * size
    dist.all_gather_object(gathered, params)
    for r in range(size):
        assert all(torch.equal(a, b) for a, b in zip(gathered[r], params)), f"rank {r}'s parameters differ from rank {rank}'s"
    return [p.sum().item() for p in params]


def test_ddp_training_matches_single_process(pool):
    """DDP on "ep" trains like one process on the concatenated batches; every rank ends identical."""
    sums = pool.run(rank_ddp_training, new_seed(), steps=4)
    assert all(s == sums[0] for s in sums)


# ----------------------------------------------------------------------------- new_group


def rank_subgroup_all_to_all(seed, members):
    rank = dist.get_rank()
    group = dist.new_group(members)  # every rank calls new_group, members or not
    try:
        if rank not in members:
            assert group == dist.GroupMember.NON_GROUP_MEMBER
            return None
        assert dist.get_backend(group) == "ep"
        assert dist.get_world_size(group) == len(members) and dist.get_rank(group) == sorted(members).index(rank)  # new_group sorts ranks
        for i in range(3):
            check_uneven_all_to_all(group, seed + i, dtype=(torch.float32, torch.int64, torch.bfloat16)[i])
        # all_to_all_single with default (even) splits, and a delegated op on the same subgroup.
        x = torch.randn(len(members) * 2, 4, generator=torch.Generator().manual_seed(seed + rank))
        y = poison_(torch.empty_like(x))
        dist.all_to_all_single(y, x, group=group)
        assert same_bits(y, reference.all_to_all_single(y.shape, x, group=group))
        t = torch.full((3,), float(rank + 1))
        dist.all_reduce(t, group=group)
        assert torch.equal(t, torch.full((3,), float(sum(m + 1 for m in members))))
        return torch_ep.get_backend(group).host_path
    finally:
        if group != dist.GroupMember.NON_GROUP_MEMBER:
            dist.destroy_process_group(group)


@pytest.mark.parametrize("members", [[0, 2], [1, 2, 3], [3, 0]], ids=str)
def test_new_group_subset_all_to_all(pool4, members):
    """all_to_all_single on dist.new_group(subset) moves data only among the subset, on our transport."""
    paths = pool4.run(rank_subgroup_all_to_all, new_seed(), members)
    assert paths == ["shm" if r in members else None for r in range(4)]


def rank_group_with_options(seed):
    options = torch_ep.Options(host_slot_bytes=128, host_num_slots=2, timeout=timedelta(seconds=30))
    group = dist.new_group(pg_options=options)
    try:
        config = torch_ep.get_backend(group).config
        settings = (config.host_slot_bytes, config.host_num_slots, config.timeout.total_seconds())
        # `config` keeps the ProcessGroupEP's Python wrapper alive; released after destroy it can deadlock
        # (tests/test_torchrun.py::test_releasing_last_backend_reference_does_not_hang), so drop it now.
        del config
        assert settings == (128, 2, 30), "pg_options were not applied"
        # Rows of 3 KiB through 128-byte slots: every message crosses many chunk boundaries.
        check_uneven_all_to_all(group, seed, row_shape=(768,))
        return torch_ep.get_backend(group).host_path
    finally:
        dist.destroy_process_group(group)


def test_new_group_with_pg_options(pool):
    """dist.new_group(pg_options=torch_ep.Options(...)) builds an "ep" group that uses those settings."""
    assert pool.run(rank_group_with_options, new_seed()) == ["shm"] * pool.world_size


def rank_wrong_pg_options():
    try:
        dist.new_group(pg_options=object())
    except TypeError as e:
        return str(e)
    return None


def test_new_group_rejects_foreign_pg_options(pool4):
    """pg_options that are not a torch_ep.Options raise a TypeError naming pg_options."""
    messages = pool4.run(rank_wrong_pg_options)
    assert all(m is not None and "pg_options" in m for m in messages), messages


# ----------------------------------------------------------------------------- DeviceMesh


def rank_device_mesh(seed):
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep"))
    ep_group, dp_group = mesh.get_group("ep"), mesh.get_group("dp")
    assert dist.get_backend(ep_group) == "ep" and dist.get_backend(dp_group) == "ep"
    # Row-major mesh [[0, 1], [2, 3]]: "ep" groups are rows, "dp" groups are columns.
    assert dist.get_process_group_ranks(ep_group) == [rank // 2 * 2, rank // 2 * 2 + 1]
    assert dist.get_process_group_ranks(dp_group) == [rank % 2, rank % 2 + 2]

    check_uneven_all_to_all(ep_group, seed)
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed + rank))
    y = poison_(torch.empty_like(x))
    dist.all_to_all_single(y, x, group=ep_group)
    assert same_bits(y, reference.all_to_all_single(y.shape, x, group=ep_group))

    # A gradient-style all_reduce over "dp": the mean over the column.
    t = torch.full((2,), float(rank))
    dist.all_reduce(t, op=dist.ReduceOp.AVG, group=dp_group)
    assert torch.equal(t, torch.full((2,), float(rank % 2 + 1)))
    return torch_ep.get_backend(ep_group).host_path


def test_device_mesh_ep_dimension(pool4):
    """init_device_mesh("cpu", (2, 2)) on "ep": all_to_all_single over mesh["ep"], all_reduce over mesh["dp"]."""
    assert pool4.run(rank_device_mesh, new_seed()) == ["shm"] * 4


# ----------------------------------------------------------------------------- destroy / re-create


def rank_recreate_groups(seed, rounds):
    pids = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    names = []
    for i in range(rounds):
        group = dist.new_group(pg_options=torch_ep.Options(host_num_slots=1 + i))
        check_uneven_all_to_all(group, seed + i)
        assert torch_ep.get_backend(group).host_path == "shm"
        dist.destroy_process_group(group)
        names.append(shm_names(pids))
    check_uneven_all_to_all(None, seed + rounds)  # the default group is unaffected
    return names


def test_destroy_and_recreate_group(pool):
    """A group created, used and destroyed several times in a row works each time and leaves no segment."""
    per_rank = pool.run(rank_recreate_groups, new_seed(), rounds=4)
    assert per_rank == [[[]] * 4] * pool.world_size, "torch_ep_* shared-memory names left behind"
