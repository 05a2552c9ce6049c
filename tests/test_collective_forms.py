"""The other calling forms an "ep" group delegates to its inner backend (Gloo for CPU tensors):
point to point, barrier, coalesced, object and functional collectives, and async_op.

Inputs as in test_collectives.py (collective_inputs.py): every rank rebuilds every other rank's
input from the seed; outputs are poisoned before each call, so an op that writes nothing fails.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fcol

import torch_ep
from collective_inputs import assert_reduced, every_input, local_reduce, new_seed, rank_input
from torch_ep import reference
from torch_ep.testing import poison_, same_bits

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")  # torch deprecates some of the old names


# ----------------------------------------------------------------------------- point to point


def rank_send_recv(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    # Every pair exchanges once, in one global order: the lower rank sends first. No cycles, no deadlock.
    for a in range(size):
        for b in range(a + 1, size):
            if rank not in (a, b):
                continue
            peer = b if rank == a else a
            mine = rank_input(seed + 101 * a + b, rank, (5, 2), torch.float32)
            theirs = rank_input(seed + 101 * a + b, peer, (5, 2), torch.float32)
            got = poison_(torch.empty(5, 2))
            if rank == a:
                dist.send(mine, dst=peer, tag=7)
                dist.recv(got, src=peer, tag=7)
            else:
                dist.recv(got, src=peer, tag=7)
                dist.send(mine, dst=peer, tag=7)
            assert same_bits(got, theirs), f"recv on rank {rank} from {peer}: wrong data"
    # Receive from any source: rank 0 learns each sender's rank from recv's return value.
    if rank == 0:
        seen = {}
        for _ in range(size - 1):
            got = poison_(torch.empty(4, dtype=torch.int64))
            src = dist.recv(got)
            seen[src] = got
        assert sorted(seen) == list(range(1, size))
        for src, got in seen.items():
            assert same_bits(got, rank_input(seed, src, (4,), torch.int64)), f"any-source recv from {src}"
    else:
        dist.send(rank_input(seed, rank, (4,), torch.int64), dst=0)


def test_send_recv(pool):
    """Blocking send/recv between every pair of ranks, with tags, and recv from any source."""
    pool.run(rank_send_recv, new_seed())


def rank_isend_irecv(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    msg = lambda src, dst: rank_input(seed + 31 * dst, src, (3, 3), torch.bfloat16)  # noqa: E731
    received = {p: poison_(torch.empty(3, 3, dtype=torch.bfloat16)) for p in range(size) if p != rank}
    works = [dist.irecv(t, src=p) for p, t in received.items()]
    works += [dist.isend(msg(rank, p), dst=p) for p in range(size) if p != rank]
    for w in works:
        w.wait()
    for p, t in received.items():
        assert same_bits(t, msg(p, rank)), f"irecv on rank {rank} from {p}: wrong data"
    # batch_isend_irecv around a ring.
    nxt, prv = (rank + 1) % size, (rank - 1) % size
    ring_in = poison_(torch.empty(6))
    ops = [dist.P2POp(dist.isend, rank_input(seed + 5, rank, (6,), torch.float32), nxt),
           dist.P2POp(dist.irecv, ring_in, prv)]
    for w in dist.batch_isend_irecv(ops):
        w.wait()
    assert same_bits(ring_in, rank_input(seed + 5, prv, (6,), torch.float32)), "batch_isend_irecv ring"


def test_isend_irecv(pool):
    """isend/irecv to and from every peer at once, and batch_isend_irecv around a ring."""
    pool.run(rank_isend_irecv, new_seed())


# ----------------------------------------------------------------------------- barrier


def rank_barrier(directory, round_id, async_op):
    rank, size = dist.get_rank(), dist.get_world_size()
    if rank == size - 1:
        time.sleep(0.3)  # the last rank arrives late: a barrier that does not wait lets the others through
    open(os.path.join(directory, f"{round_id}_{rank}"), "w").close()
    if async_op:
        work = dist.barrier(async_op=True)
        work.wait()
    else:
        dist.barrier()
    missing = [r for r in range(size) if not os.path.exists(os.path.join(directory, f"{round_id}_{r}"))]
    assert not missing, f"rank {rank} left the barrier before ranks {missing} reached it"


@pytest.mark.parametrize("async_op", [False, True], ids=["sync", "async"])
def test_barrier(pool, tmp_path, async_op):
    """No rank leaves barrier() until every rank has entered it (the last one arrives late)."""
    pool.run(rank_barrier, str(tmp_path), "r0", async_op)


# ----------------------------------------------------------------------------- coalesced forms


def rank_all_reduce_coalesced(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    shapes = [(3,), (2, 5), (7,)]
    inputs = [every_input(seed + i, s, torch.float32) for i, s in enumerate(shapes)]
    tensors = [x[rank].clone() for x in inputs]
    dist.all_reduce_coalesced(tensors, op=dist.ReduceOp.SUM)
    for i, t in enumerate(tensors):
        assert_reduced(t, local_reduce(inputs[i], dist.ReduceOp.SUM, size), f"all_reduce_coalesced tensor {i}")
    tensors = [x[rank].clone() for x in inputs]
    dist.all_reduce_coalesced(tensors, op=dist.ReduceOp.MAX)
    for i, t in enumerate(tensors):
        assert_reduced(t, local_reduce(inputs[i], dist.ReduceOp.MAX, size), f"all_reduce_coalesced MAX {i}")


def test_all_reduce_coalesced(pool):
    """all_reduce_coalesced reduces each tensor of the list as all_reduce would (SUM and MAX)."""
    pool.run(rank_all_reduce_coalesced, new_seed())


def rank_all_gather_coalesced(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    shapes = [(2,), (3, 2)]
    inputs = [every_input(seed + i, s, torch.float32) for i, s in enumerate(shapes)]
    outputs = [[poison_(torch.empty(s)) for s in shapes] for _ in range(size)]
    dist.all_gather_coalesced(outputs, [x[rank] for x in inputs])
    for r in range(size):
        for i in range(len(shapes)):
            assert same_bits(outputs[r][i], inputs[i][r]), f"all_gather_coalesced: rank {r} tensor {i}"


def test_all_gather_coalesced(pool):
    """all_gather_coalesced gathers several tensors of different shapes at once."""
    pool.run(rank_all_gather_coalesced, new_seed())


def rank_coalescing_manager(seed, async_ops):
    rank, size = dist.get_rank(), dist.get_world_size()
    shapes = [(size * 2,), (size, 3)]
    inputs = [every_input(seed + i, s, torch.float32) for i, s in enumerate(shapes)]

    # all_reduce, AVG included (batched into one allreduce_coalesced)
    for op in (dist.ReduceOp.SUM, dist.ReduceOp.AVG):
        tensors = [x[rank].clone() for x in inputs]
        with dist._coalescing_manager(async_ops=async_ops) as cm:
            for t in tensors:
                dist.all_reduce(t, op=op)
        if async_ops:
            cm.wait()
        for i, t in enumerate(tensors):
            assert_reduced(t, local_reduce(inputs[i], op, size), f"coalesced all_reduce {op} tensor {i}")

    # all_gather_into_tensor (allgather_into_tensor_coalesced)
    outputs = [poison_(torch.empty(size * s[0], *s[1:])) for s in shapes]
    with dist._coalescing_manager(async_ops=async_ops) as cm:
        for o, x in zip(outputs, inputs):
            dist.all_gather_into_tensor(o, x[rank])
    if async_ops:
        cm.wait()
    for i, o in enumerate(outputs):
        assert same_bits(o, torch.cat(inputs[i])), f"coalesced all_gather_into_tensor tensor {i}"

    # reduce_scatter_tensor (reduce_scatter_tensor_coalesced)
    outputs = [poison_(torch.empty(s[0] // size, *s[1:])) for s in shapes]
    with dist._coalescing_manager(async_ops=async_ops) as cm:
        for o, x in zip(outputs, inputs):
            dist.reduce_scatter_tensor(o, x[rank].clone())
    if async_ops:
        cm.wait()
    for i, o in enumerate(outputs):
        expected = local_reduce([x.chunk(size)[rank] for x in inputs[i]], dist.ReduceOp.SUM, size)
        assert_reduced(o, expected, f"coalesced reduce_scatter_tensor tensor {i}")


@pytest.mark.parametrize("async_ops", [False, True], ids=["sync", "async"])
def test_coalescing_manager(pool, async_ops):
    """dist._coalescing_manager batches all_reduce, all_gather_into_tensor and reduce_scatter_tensor."""
    pool.run(rank_coalescing_manager, new_seed(), async_ops)


# ----------------------------------------------------------------------------- object collectives


def random_object(seed, rank):
    g = torch.Generator().manual_seed(seed * 31 + rank)
    return {"rank": rank, "name": f"r{rank}-{seed}", "tensor": torch.randn(3, generator=g),
            "nested": [rank, (int(torch.randint(0, 10**9, (), generator=g)),)]}


def same_object(a, b):
    return (a.keys() == b.keys() and torch.equal(a["tensor"], b["tensor"])
            and all(a[k] == b[k] for k in a if k != "tensor"))


def rank_object_collectives(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    objects = [random_object(seed, r) for r in range(size)]

    gathered = [None] * size
    dist.all_gather_object(gathered, objects[rank])
    assert all(same_object(gathered[r], objects[r]) for r in range(size)), "all_gather_object"

    src = size - 1
    box = [objects[rank], "padding"] if rank == src else [None, None]
    dist.broadcast_object_list(box, src=src)
    assert same_object(box[0], objects[src]) and box[1] == "padding", "broadcast_object_list"

    dst = 1 % size
    out = [None] * size if rank == dst else None
    dist.gather_object(objects[rank], out, dst=dst)
    if rank == dst:
        assert all(same_object(out[r], objects[r]) for r in range(size)), "gather_object"

    src = 0
    recv = [None]
    per_rank = [random_object(seed + 1, r) for r in range(size)]
    dist.scatter_object_list(recv, per_rank if rank == src else None, src=src)
    assert same_object(recv[0], per_rank[rank]), "scatter_object_list"


def test_object_collectives(pool):
    """all_gather_object, broadcast_object_list, gather_object and scatter_object_list round-trip objects."""
    pool.run(rank_object_collectives, new_seed())


# ----------------------------------------------------------------------------- functional collectives


def rank_functional_collectives(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    # A fresh group: its transport is chosen on its first all_to_all, which here is the functional one.
    group = dist.new_group()
    try:
        g = torch.Generator().manual_seed(seed)
        splits = torch.randint(0, 4, (size, size), generator=g)  # [src, dst] rows
        in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
        x = rank_input(seed, rank, (sum(in_splits), 3), torch.float32)
        y = fcol.all_to_all_single(x, out_splits, in_splits, group)
        y = fcol.wait_tensor(y)
        expected = reference.all_to_all_single((sum(out_splits), 3), x, out_splits, in_splits, group=group)
        assert same_bits(y, expected), "functional all_to_all_single (uneven)"
        assert torch_ep.get_backend(group).host_path == "shm", "functional all_to_all did not reach our transport"

        x = rank_input(seed + 1, rank, (size * 2, 2), torch.int64)
        y = fcol.wait_tensor(fcol.all_to_all_single(x, None, None, group))
        assert same_bits(y, reference.all_to_all_single(y.shape, x, group=group)), "functional all_to_all (even)"

        inputs = every_input(seed + 2, (4, 3), torch.float32)
        for op_name, op in (("sum", dist.ReduceOp.SUM), ("avg", dist.ReduceOp.AVG), ("max", dist.ReduceOp.MAX)):
            out = fcol.wait_tensor(fcol.all_reduce(inputs[rank], op_name, group))
            assert_reduced(out, local_reduce(inputs, op, size), f"functional all_reduce {op_name}")
        assert torch.equal(inputs[rank], rank_input(seed + 2, rank, (4, 3), torch.float32)), \
            "functional all_reduce modified its input"

        out = fcol.wait_tensor(fcol.all_gather_tensor(inputs[rank], 0, group))
        assert same_bits(out, torch.cat(inputs)), "functional all_gather_tensor"

        big = every_input(seed + 3, (size * 2, 3), torch.float32)
        out = fcol.wait_tensor(fcol.reduce_scatter_tensor(big[rank], "sum", 0, group))
        assert_reduced(out, local_reduce([b.chunk(size)[rank] for b in big], dist.ReduceOp.SUM, size),
                       "functional reduce_scatter_tensor")
    finally:
        dist.destroy_process_group(group)


def test_functional_collectives(pool):
    """torch.distributed._functional_collectives (through the c10d dispatcher) run on the "ep" group."""
    pool.run(rank_functional_collectives, new_seed())


# ----------------------------------------------------------------------------- async_op


def rank_async_op(seed, name):
    rank, size = dist.get_rank(), dist.get_world_size()
    inputs = every_input(seed, (size * 2, 3), torch.float32)
    mine = inputs[rank].clone()
    if name == "all_reduce":
        out = mine
        work = dist.all_reduce(out, async_op=True)
        expected = local_reduce(inputs, dist.ReduceOp.SUM, size)
    elif name == "all_reduce_avg":
        out = mine
        work = dist.all_reduce(out, op=dist.ReduceOp.AVG, async_op=True)
        expected = local_reduce(inputs, dist.ReduceOp.AVG, size)
    elif name == "broadcast":
        out = mine if rank == 0 else poison_(torch.empty_like(mine))
        work = dist.broadcast(out, src=0, async_op=True)
        expected = inputs[0]
    elif name == "all_gather_into_tensor":
        out = poison_(torch.empty(size * size * 2, 3))
        work = dist.all_gather_into_tensor(out, mine, async_op=True)
        expected = torch.cat(inputs)
    elif name == "all_to_all_single":
        out = poison_(torch.empty_like(mine))
        work = dist.all_to_all_single(out, mine, async_op=True)
        expected = torch.cat([x.chunk(size)[rank] for x in inputs])
    elif name == "reduce_scatter_tensor":
        out = poison_(torch.empty(2, 3))
        work = dist.reduce_scatter_tensor(out, mine, async_op=True)
        expected = local_reduce([x.chunk(size)[rank] for x in inputs], dist.ReduceOp.SUM, size)
    elif name == "reduce_scatter":
        out = poison_(torch.empty(2, 3))
        work = dist.reduce_scatter(out, list(mine.chunk(size)), async_op=True)
        expected = local_reduce([x.chunk(size)[rank] for x in inputs], dist.ReduceOp.SUM, size)
    else:
        raise ValueError(name)
    future = work.get_future()
    assert work.wait() is True
    value = future.wait()
    assert future.done() and work.is_completed()
    assert_reduced(out, expected, f"async {name}")
    return type(value).__name__


@pytest.mark.parametrize("name", [
    "all_reduce", "all_reduce_avg", "broadcast", "all_gather_into_tensor", "all_to_all_single",
    "reduce_scatter_tensor",
    "reduce_scatter",
])
def test_async_op_wait_and_future(pool, name):
    """async_op=True returns a Work whose wait() and get_future().wait() both complete with the right data."""
    pool.run(rank_async_op, new_seed(), name)


def rank_many_async_in_flight(seed):
    """Several async ops of different kinds in flight at once, waited in reverse order."""
    rank, size = dist.get_rank(), dist.get_world_size()
    a = every_input(seed, (8,), torch.float32)
    b = every_input(seed + 1, (size * 4,), torch.int64)
    t_a, t_avg = a[rank].clone(), a[rank].clone()
    gathered = poison_(torch.empty(size * 8))
    t_b_out = poison_(torch.empty(size * 4, dtype=torch.int64))
    t_b_out2 = poison_(torch.empty(size * 4, dtype=torch.int64))
    works = [dist.all_reduce(t_a, async_op=True),
             dist.all_to_all_single(t_b_out, b[rank], async_op=True),
             dist.all_reduce(t_avg, op=dist.ReduceOp.AVG, async_op=True),  # emulated: finished on our worker
             dist.all_gather_into_tensor(gathered, a[rank], async_op=True),
             dist.all_to_all_single(t_b_out2, b[rank], async_op=True)]
    for w in reversed(works):
        w.wait()
    assert_reduced(t_a, local_reduce(a, dist.ReduceOp.SUM, size), "async all_reduce")
    assert_reduced(t_avg, local_reduce(a, dist.ReduceOp.AVG, size), "async all_reduce AVG")
    assert same_bits(t_b_out2, t_b_out), "second async all_to_all_single"
    assert same_bits(gathered, torch.cat(a)), "async all_gather_into_tensor"
    assert same_bits(t_b_out, torch.cat([x.chunk(size)[rank] for x in b])), "async all_to_all_single"


def test_many_async_ops_in_flight(pool):
    """Delegated and shared-memory ops in flight together complete correctly, whatever the wait order."""
    pool.run(rank_many_async_in_flight, new_seed())
