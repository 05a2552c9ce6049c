"""torch_ep.comm_pool on CUDA (GPU machines only): tensors from the pool take the one-copy path
of all_to_all_single and of all_to_all_v into a given output, every other call keeps working on
the same group, and the pool's memory comes and goes with the group.

    TORCH_EP_TEST_WORLD_SIZES=1,2,4 python -m pytest tests/test_cuda_comm_pool.py -q

Every check draws fresh random data, poisons the output and compares with torch_ep.reference;
`_one_copy` asks the device which move the last call took, so a silent fall back to the staged
move (correct, but twice the traffic) fails the test too.
"""
import contextlib
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import test_all_to_all as cpu_checks
import test_all_to_all_v as v_checks
import test_cuda_all_to_all as cuda_checks
import test_cuda_all_to_all_chunks as chunk_checks
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from torch_ep import reference
from torch_ep.testing import poison_, random_tensor, same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")

POOL_BYTES = 256 << 20  # per rank and test group; torch's segments are 2 MiB multiples


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


def _seed():
    return int(torch.randint(0, 2**30, ()).item())


def _pool_group(**options):
    group = dist.new_group(pg_options=torch_ep.Options(**{"comm_pool_bytes": POOL_BYTES, **options}))
    return group, torch_ep.comm_pool(group)


def _one_copy(group) -> bool:
    """Whether the group's last all_to_all_single or all_to_all_v moved its bytes once (waits for
    the device)."""
    return torch_ep.get_backend(group)._comm_pool_stats()[2] == 1


def _allocated(pool, use_pool, shape, dtype):
    with torch.cuda.use_mem_pool(pool) if use_pool else contextlib.nullcontext():
        return torch.empty(shape, dtype=dtype, device="cuda")


def _check(group, pool, dtype, kind, row_shape, seed, *, in_pool=True, out_pool=True, split_lists=True):
    """One all_to_all_single of `kind` (test_all_to_all.split_matrix) on tensors from the pool or
    not; the output must match the reference."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    m = cpu_checks.split_matrix(kind, size, seed)
    in_splits, out_splits = m[rank].tolist(), m[:, rank].tolist()
    g = torch.Generator().manual_seed(seed * 131 + rank)
    inp = _allocated(pool, in_pool, (sum(in_splits), *row_shape), dtype)
    inp.copy_(random_tensor(inp.shape, dtype, g, "cuda"))
    out = poison_(_allocated(pool, out_pool, (sum(out_splits), *row_shape), dtype))
    if split_lists:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        expected = reference.all_to_all_single(out.shape, inp, out_splits, in_splits, group=group)
    else:
        dist.all_to_all_single(out, inp, group=group)
        expected = reference.all_to_all_single(out.shape, inp, group=group)
    assert same_bits(out, expected), f"{dtype} {kind} {row_shape} in_pool={in_pool} out_pool={out_pool}: wrong output"
    return m


DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.bool, torch.int64, torch.complex64]


def rank_one_copy(seed):
    group, pool = _pool_group()
    try:
        assert torch_ep.comm_pool(group) is pool  # one pool per group
        assert isinstance(pool, torch.cuda.MemPool)
        assert torch_ep.get_backend(group).cuda_path == "cuda"
        for i, dtype in enumerate(DTYPES):
            for kind in ("even", "uneven", "zeros", "to_one"):
                _check(group, pool, dtype, kind, (5,), seed + i)
                assert _one_copy(group), f"{dtype} {kind}: not one copy"
        _check(group, pool, torch.float32, "even", (), seed, split_lists=False)  # 1-D, even split
        assert _one_copy(group)
        _check(group, pool, torch.bfloat16, "uneven", (3, 7), seed)  # odd row bytes: unaligned offsets
        assert _one_copy(group)
        # The input may lie anywhere: the sender reads it locally.
        _check(group, pool, torch.float16, "uneven", (33,), seed, in_pool=False)
        assert _one_copy(group)
        # Messages of several MiB: many chunks over every block of the move.
        _check(group, pool, torch.bfloat16, "uneven", (300_000,), seed)
        assert _one_copy(group)
        _check(group, pool, torch.uint8, "even", (1 << 20,), seed)
        assert _one_copy(group)
        stats = torch_ep.get_backend(group)._comm_pool_stats()
        assert stats[0] == POOL_BYTES and 0 < stats[1] <= POOL_BYTES, stats
    finally:
        dist.destroy_process_group(group)


def test_one_copy_dtypes_and_splits(cuda_pool):
    cuda_pool.run(rank_one_copy, seed=_seed(), timeout_s=300)


def _check_pool_call(group, pool, m, seed, options):
    """One all_to_all_single of the byte matrix m (m[s][d]: bytes s sends d) on pool tensors,
    fresh random input, poisoned output, compared bit for bit with the reference."""
    rank = dist.get_rank()
    in_splits, out_splits = m[rank].tolist(), m[:, rank].tolist()
    g = torch.Generator().manual_seed(seed)
    inp = _allocated(pool, True, (sum(in_splits),), torch.uint8)
    inp.copy_(chunk_checks.chunk_edge_input(sum(in_splits), torch.uint8, (), g))
    out = poison_(_allocated(pool, True, (sum(out_splits),), torch.uint8))
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    expected = reference.all_to_all_single(out.shape, inp.cpu(), out_splits, in_splits, group=group)
    assert same_bits(out, expected), f"{options}, bytes {m.tolist()}: wrong output"


def rank_one_copy_knobs(seed):
    """The one-copy move with other grids than the default (Options.all_to_all_pool_blocks: one
    block, a few, more than the call has 64 KiB pieces for) and with its plan and move in one
    launch: every call's pieces cross message edges elsewhere (each rank's messages differ in
    size, none a multiple of 16 bytes but the empty ones), the output poisoned, compared with the
    reference, and it must have been one copy."""
    rank, size = dist.get_rank(), dist.get_world_size()
    n = len(chunk_checks.CHUNK_EDGE_BYTES)
    settings = [dict(all_to_all_pool_blocks=blocks) for blocks in (1, 3, 7, 300)] + [dict(all_to_all_one_launch=True)]
    for options in settings:
        group, pool = _pool_group(**options)
        try:
            for call in range(3):
                m = chunk_checks.chunk_edge_matrix(size, (seed + call * 5) % n, large=call == 2)
                _check_pool_call(group, pool, m, seed * 7 + call * 131 + rank, options)
                assert _one_copy(group), f"{options}, bytes {m.tolist()}: not one copy"
        finally:
            dist.destroy_process_group(group)


def test_one_copy_grids_and_two_launches(cuda_pool):
    cuda_pool.run(rank_one_copy_knobs, seed=_seed(), timeout_s=300)


def rank_pool_eager(seed):
    """Pool tensors on a group with the eager path (Options.all_to_all_eager_bytes): a rank all of
    whose messages fit takes the eager launch alone and keeps every rank of that call off the one
    copy; others stage or copy once what does not fit. CHUNK_EDGE_BYTES calls, two launches and one,
    outputs poisoned and compared with the reference (which move ran is not asserted)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    n = len(chunk_checks.CHUNK_EDGE_BYTES)
    for options in (dict(), dict(all_to_all_one_launch=True)):
        group, pool = _pool_group(all_to_all_eager_bytes=cuda_checks.EAGER_BYTES, **options)
        try:
            for call in range(n + 1):
                m = chunk_checks.chunk_edge_matrix(size, (seed + call) % n, large=call == n)
                if call == n - 1:  # every message fits
                    m = torch.full((size, size), 1000 + 16 * call, dtype=torch.int64)
                _check_pool_call(group, pool, m, seed * 7 + call * 131 + rank, options)
        finally:
            dist.destroy_process_group(group)


def test_pool_with_eager_path(cuda_pool):
    cuda_pool.run(rank_pool_eager, seed=_seed(), timeout_s=300)


def rank_mixed_calls(seed):
    """Calls on and off the pool, interleaved on one group: the plan picks the move on the
    device, so ranks never disagree, even when only some ranks' outputs are in the pool."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group, pool = _pool_group()
    try:
        for round_ in range(3):
            s = seed + 10 * round_
            _check(group, pool, torch.float32, "uneven", (17,), s)
            assert _one_copy(group)
            m = _check(group, pool, torch.float32, "uneven", (17,), s + 1, in_pool=False, out_pool=False)
            # (outputs that receive nothing take either move: with none receiving, it is one copy)
            assert _one_copy(group) == (int(m.sum()) == 0)
            # Only rank 0's output outside the pool: every rank takes the staged move.
            _check(group, pool, torch.bfloat16, "even", (9,), s + 2, out_pool=rank != 0)
            assert not _one_copy(group), "one copy although rank 0's output is outside the pool"
            # A non-contiguous output goes through a contiguous copy, outside the pool.
            with torch.cuda.use_mem_pool(pool):
                inp = torch.randn(size * 4, 6, device="cuda")
                out = poison_(torch.empty(6, size * 4, device="cuda")).t()
            dist.all_to_all_single(out, inp, group=group)
            assert same_bits(out, reference.all_to_all_single(out.shape, inp, group=group))
            # all_to_all_v on the same group, its own kernels, pool tensors or not.
            with torch.cuda.use_mem_pool(pool):
                rows = torch.randn(size * 3, 5, device="cuda")
            splits = torch.full((size,), 3, dtype=torch.int64, device="cuda")
            result = torch_ep.all_to_all_v(rows, splits, group=group)
            expected = reference.all_to_all_single((size * 3, 5), rows, group=group)
            assert same_bits(result.output, expected)
            _check(group, pool, torch.int32, "to_one", (3,), s + 3)
            assert _one_copy(group)
    finally:
        dist.destroy_process_group(group)


def rank_all_to_all_v_one_copy(seed):
    """torch_ep.all_to_all_v into outputs from the pool takes the one copy too, where every
    receiving rank's output lies there: random splits (a rank that sends nothing, one that receives
    nothing), several dtypes and row shapes (odd row bytes, rows of 300 KB), outputs with rows to
    spare, which stay untouched. One rank's output outside the pool, or output=None, takes the
    staged move; an output one row short raises on its rank and writes nothing there, and the
    next call is one copy again."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group, pool = _pool_group()

    def call(m, dtype, row_shape, seed, *, out_pool=True, spare=0):
        total = int(m[:, rank].sum())
        g = torch.Generator().manual_seed(seed * 131 + rank)
        splits = m[rank].cuda()
        with torch.cuda.use_mem_pool(pool) if out_pool else contextlib.nullcontext():
            out = poison_(torch.empty((total + spare, *row_shape), dtype=dtype, device="cuda"))
        with torch.cuda.use_mem_pool(pool):
            inp = random_tensor((int(m[rank].sum()), *row_shape), dtype, g, "cuda")
        untouched = v_checks._bytes_past(out, total)
        res = torch_ep.all_to_all_v(inp, splits, output=out, group=group)
        one_copy = _one_copy(group)  # before the reference's own calls on the group
        expected = reference.all_to_all_v(inp, splits, group=group)
        what = f"{dtype} {row_shape} out_pool={out_pool}"
        assert res.output is out and same_bits(out[:total], expected.output), f"{what}: wrong output"
        assert torch.equal(v_checks._bytes_past(out, total), untouched), f"{what}: rows past the received ones written"
        v_checks._check_result(res, expected, what)
        return one_copy

    try:
        cases = [(torch.float32, (5,)), (torch.bfloat16, (3, 7)), (torch.float8_e4m3fn, (33,)), (torch.int64, ()),
                 (torch.uint8, (300_001,))]
        for i, (dtype, row_shape) in enumerate(cases):
            m = v_checks.split_matrix("random", size, seed + i)
            assert call(m, dtype, row_shape, seed + i, spare=i % 3), f"{dtype} {row_shape}: not one copy"
        m = v_checks.split_matrix("even", size, seed)
        assert not call(m, torch.float32, (6,), seed, out_pool=rank != 0), "one copy although rank 0's output is outside"
        # output=None: allocated after the plan, so outside the pool; staged, and right.
        with torch.cuda.use_mem_pool(pool):
            inp = random_tensor((int(m[rank].sum()), 6), torch.float32, torch.Generator().manual_seed(seed), "cuda")
        res = torch_ep.all_to_all_v(inp, m[rank].cuda(), group=group)
        assert not _one_copy(group), "one copy into an output allocated after the plan"
        assert same_bits(res.output, reference.all_to_all_v(inp, m[rank].cuda(), group=group).output)
        # The last rank's output one row short: it raises, writes nothing; the others' calls complete.
        m = v_checks.split_matrix("to_one", size, seed)
        total = int(m[:, rank].sum())
        short = rank == size - 1
        with torch.cuda.use_mem_pool(pool):
            out = poison_(torch.empty(total - 1 if short else total + 1, 3, device="cuda"))
            inp = random_tensor((int(m[rank].sum()), 3), torch.float32, torch.Generator().manual_seed(seed + rank), "cuda")
        before = out.clone()
        error = None
        try:
            torch_ep.all_to_all_v(inp, m[rank].cuda(), output=out, group=group)
            torch.cuda.synchronize()
            torch_ep.check_errors(group)
        except RuntimeError as e:
            error = str(e)
        expected = reference.all_to_all_v(inp, m[rank].cuda(), group=group)
        if short:
            assert error is not None and f"{total} rows arrived" in error, error
            assert same_bits(out, before), "an overflowing call wrote its output"
        else:
            assert error is None, error
            assert same_bits(out[:total], expected.output) and same_bits(out[total:], before[total:])
        m = v_checks.split_matrix("random", size, seed + 99)
        assert call(m, torch.bfloat16, (9,), seed + 99), "not one copy after an overflow"
    finally:
        dist.destroy_process_group(group)


@pytest.mark.parametrize("world_size", cuda_world_sizes())
def test_all_to_all_v_one_copy(world_size):
    pool = rank_pool(world_size, cuda=True)
    pool.run(rank_all_to_all_v_one_copy, seed=_seed(), timeout_s=300)


def test_mixed_pool_and_other_calls(cuda_pool):
    cuda_pool.run(rank_mixed_calls, seed=_seed(), timeout_s=300)


def rank_many_calls(seed, iterations):
    """Tensors allocated from the pool and freed again, call after call, of random sizes: every
    call correct and one copy, and the arena in use stays bounded."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group, pool = _pool_group()
    shared = torch.Generator().manual_seed(seed)  # the same split matrices on every rank
    g = torch.Generator(device="cuda").manual_seed(seed + rank)
    try:
        for i in range(iterations):
            m = torch.randint(0, 64, (size, size), generator=shared) * int(torch.randint(1, 50, (), generator=shared))
            in_splits, out_splits = m[rank].tolist(), m[:, rank].tolist()
            hidden = int(torch.randint(1, 300, (), generator=shared))
            with torch.cuda.use_mem_pool(pool):
                inp = torch.randn(sum(in_splits), hidden, device="cuda", generator=g)
                out = poison_(torch.empty(sum(out_splits), hidden, device="cuda"))
            dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
            if i % 5 == 0:
                expected = reference.all_to_all_single(out.shape, inp, out_splits, in_splits, group=group)
                assert same_bits(out, expected), f"call {i}: wrong output"
                assert _one_copy(group), f"call {i}: not one copy"
            del inp, out
        torch.cuda.synchronize()
    finally:
        dist.destroy_process_group(group)


def test_reuse_across_many_calls(cuda_pool):
    cuda_pool.run(rank_many_calls, seed=_seed(), iterations=100, timeout_s=600)


def rank_one_copy_shapes(seed):
    """The one copy's work split (the pieces taken in turn from a counter, the default, or a fixed
    piece a block under TORCH_EP_POOL_PIECES=0): the grids and the one launch, all_to_all_v,
    calls in a row and a graph replayed."""
    rank_one_copy_knobs(seed)
    rank_all_to_all_v_one_copy(seed + 1)
    rank_many_calls(seed + 2, iterations=20)
    rank_cuda_graph(seed + 3)


# The pieces in turn at their default, with the next one taken during the copy, and of 192 KiB (a
# message's last piece then mostly partial), both ways; and one fixed piece a block.
ONE_COPY_SHAPES = {
    "pieces_in_turn": {"TORCH_EP_POOL_PIECES": "1"},
    "ticket_ahead": {"TORCH_EP_POOL_PIECES": "1", "TORCH_EP_POOL_TICKET_AHEAD": "1"},
    "pieces_192k": {"TORCH_EP_POOL_PIECES": "1", "TORCH_EP_ALL_TO_ALL_POOL_PIECE_BYTES": str(192 << 10)},
    "pieces_192k_ahead": {"TORCH_EP_POOL_PIECES": "1", "TORCH_EP_ALL_TO_ALL_POOL_PIECE_BYTES": str(192 << 10),
                          "TORCH_EP_POOL_TICKET_AHEAD": "1"},
    "fixed_pieces": {"TORCH_EP_POOL_PIECES": "0"},
    "self_first": {"TORCH_EP_POOL_PIECES": "1", "TORCH_EP_POOL_SELF_FIRST": "1"},
    "self_first_128k_ahead": {"TORCH_EP_POOL_PIECES": "1", "TORCH_EP_POOL_SELF_FIRST": "1",
                              "TORCH_EP_ALL_TO_ALL_POOL_PIECE_BYTES": str(128 << 10), "TORCH_EP_POOL_TICKET_AHEAD": "1"},
}


@pytest.mark.parametrize("env", ONE_COPY_SHAPES.values(), ids=ONE_COPY_SHAPES.keys())
def test_one_copy_shapes(env):
    pool = rank_pool(2, cuda=True, env=env)
    pool.run(rank_one_copy_shapes, seed=_seed(), timeout_s=300)


def rank_disagreeing_splits(own_rows_move=False, options=None):
    """Ranks 0 and 1 disagree (rank 0 expects three rows from rank 1, which sends two): nothing
    moves on any rank, every rank raises at its next synchronising check, and the group keeps
    working with one copy. `own_rows_move` (TORCH_EP_POOL_SELF_FIRST, rows of 512 KiB so that a
    rank's own two pass its 1 MiB floor): a rank whose own rows agree with itself copies them
    before the plan refuses the call (every piece of its own message is taken before any other),
    which shows that the path ran; nothing else moves."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group, pool = _pool_group(timeout=timedelta(seconds=20), **(options or {}))
    try:
        out_splits = [2] * size
        if rank == 0:
            out_splits[1], out_splits[0] = 3, 1
        row = (128 << 10,) if own_rows_move else ()
        with torch.cuda.use_mem_pool(pool):
            x = torch.randn(size * 2, *row, device="cuda")
            y = poison_(torch.empty(sum(out_splits), *row, device="cuda"))
        before = y.clone()
        error = None
        try:
            dist.all_to_all_single(y, x, out_splits, [2] * size, group=group)
            torch.cuda.synchronize()
            torch_ep.check_errors(group)
        except Exception as e:  # noqa: BLE001
            error = str(e)
        torch.cuda.synchronize()
        if own_rows_move and rank != 0:  # rank 0 expects one row from itself and sends two: no self-first
            own = slice(sum(out_splits[:rank]), sum(out_splits[:rank + 1]))
            kept = torch.ones(y.shape[0], dtype=torch.bool, device="cuda")
            kept[own] = False
            assert same_bits(y[kept], before[kept]), "a refused call wrote rows from other ranks"
            assert same_bits(y[own], x[2 * rank:2 * rank + 2]), "self-first: the own rows did not move"
        else:
            assert same_bits(y, before), "a refused call wrote its output"
        _check(group, pool, torch.float32, "uneven", (4,), 7)
        return error, _one_copy(group)
    finally:
        dist.destroy_process_group(group)


def test_disagreeing_splits_raise_on_every_rank(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    for error, one_copy_after in cuda_pool.run(rank_disagreeing_splits, timeout_s=120):
        assert error is not None and "split sizes disagree" in error and "rank 0 expects" in error, error
        assert one_copy_after


def rank_self_first_edges(seed):
    """TORCH_EP_POOL_SELF_FIRST's edges, in both launch shapes and with eager messages on: a refused
    call (its own rows alone move), a call whose plan takes the staged move after the own rows went
    (rank 0's output outside the pool), own messages below the 1 MiB floor, then one copy again."""
    rank = dist.get_rank()
    for options in (dict(), dict(all_to_all_one_launch=True), dict(all_to_all_eager_bytes=4096)):
        error, one_copy_after = rank_disagreeing_splits(own_rows_move=True, options=options)
        assert error is not None and "split sizes disagree" in error, f"{options}: {error}"
        assert one_copy_after
        group, pool = _pool_group(**options)
        try:
            # "even": every rank receives rows, so rank 0's output outside the pool rules one copy
            # out; 3 rows of 600 KB pass the floor, of 74 B do not.
            for i, row_shape in enumerate(((37,), (300_000,))):
                _check(group, pool, torch.bfloat16, "even", row_shape, seed + i, out_pool=rank != 0)
                assert not _one_copy(group), f"{options} {row_shape}: one copy with an output outside the pool"
            # Own messages of 0-6 rows of 1.2 MB: empty, below and above the floor.
            for i, kind in enumerate(("uneven", "even", "to_one", "zeros")):
                _check(group, pool, torch.float32, kind, (300_001,), seed + i)
                assert _one_copy(group), f"{options} {kind}: not one copy"
        finally:
            dist.destroy_process_group(group)


def test_self_first_edges():
    pool = rank_pool(2, cuda=True, env={"TORCH_EP_POOL_SELF_FIRST": "1"})
    pool.run(rank_self_first_edges, seed=_seed(), timeout_s=300)


def rank_cuda_graph(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    group, pool = _pool_group()
    try:
        g = torch.Generator(device="cuda").manual_seed(seed + rank)
        with torch.cuda.use_mem_pool(pool):
            static_in = torch.randn(size * 64, 33, device="cuda", generator=g)
            static_out = torch.empty_like(static_in)

        def one_copy():
            return _one_copy(group)

        cuda_checks.check_replays(static_out, static_in, group, g, replays=5, also=one_copy, name="pool")
    finally:
        dist.destroy_process_group(group)


def test_cuda_graph_capture_and_replay(cuda_pool):
    cuda_pool.run(rank_cuda_graph, seed=_seed(), timeout_s=120)


def rank_lifetime():
    """A tensor of the pool outlives its group; new segments are refused once the group is gone,
    and a pool too small says which setting to raise."""
    size = dist.get_world_size()
    group, pool = _pool_group(comm_pool_bytes=32 << 20)
    with torch.cuda.use_mem_pool(pool):
        x = torch.arange(size * 1000, device="cuda", dtype=torch.float32)
    too_big = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.cuda.use_mem_pool(pool):
                torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        except (torch.OutOfMemoryError, RuntimeError) as e:
            too_big = type(e).__name__
    explained = any("TORCH_EP_COMM_POOL_BYTES" in str(w.message) for w in caught)
    dist.destroy_process_group(group)
    del group
    intact = torch.equal(x.cpu(), torch.arange(size * 1000, dtype=torch.float32))
    after = None
    try:
        with torch.cuda.use_mem_pool(pool):
            torch.empty(8 << 20, dtype=torch.uint8, device="cuda")  # more than the cached segment
    except (torch.OutOfMemoryError, RuntimeError) as e:
        after = type(e).__name__
    del x, pool
    torch.cuda.empty_cache()
    return too_big, explained, intact, after


def test_pool_lifetime_and_size_errors(cuda_pool):
    for too_big, explained, intact, after in cuda_pool.run(rank_lifetime, timeout_s=120):
        assert too_big is not None and explained, (too_big, explained)
        assert intact
        assert after is not None


def test_timeout_names_op_and_peer():
    pool = rank_pool(2, cuda=True)
    (error, elapsed), _ = pool.run(cuda_checks.rank_peer_never_arrives, pooled=True, timeout_s=120)
    assert error is not None and error[0] == "DistBackendError", error
    assert "all_to_all_single" in error[1] and "rank 1" in error[1], error
    assert 2.5 < elapsed < 30, elapsed
