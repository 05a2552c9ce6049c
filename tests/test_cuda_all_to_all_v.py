"""torch_ep.all_to_all_v on CUDA tensors (GPU machines only), on its device path (the default;
TORCH_EP_ALL_TO_ALL_V_DEVICE=0 falls back to reading the splits on the host): the CPU tests' rank
functions on CUDA, plus what only CUDA has (the caller's stream, CUDA-graph capture).

    TORCH_EP_TEST_WORLD_SIZES=1,2,4 python -m pytest tests/test_cuda_all_to_all_v.py -q
    (or: bash benchmarks/gpu_suite.sh OUT a2av)
"""
import re

import pytest
import torch
import torch.distributed as dist

import test_all_to_all_v as cpu_checks
import test_cuda_all_to_all_chunks as chunk_checks
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from torch_ep import reference
from torch_ep.testing import poison_, same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")

# The device path (splits never on the host), stated although it is the default.
DEVICE_PATH = {"TORCH_EP_ALL_TO_ALL_V_DEVICE": "1"}


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True, env=DEVICE_PATH)


def _seed():
    return int(torch.randint(0, 2**30, ()).item())


def test_given_and_allocated_outputs(cuda_pool):
    paths = cuda_pool.run(cpu_checks.rank_given_and_allocated, seed=_seed(), device="cuda")
    assert paths == ["cuda"] * cuda_pool.world_size  # our transport, not NCCL or Gloo


def test_overflow_refused_and_group_keeps_working(cuda_pool):
    cuda_pool.run(cpu_checks.rank_overflow, seed=_seed(), device="cuda")


def test_bad_input_raises_naming_the_argument(cuda_pool):
    cuda_pool.run(cpu_checks.rank_bad_input, device="cuda")


def test_autograd(cuda_pool):
    cuda_pool.run(cpu_checks.rank_autograd, seed=_seed(), device="cuda")


def test_async_op(cuda_pool):
    cuda_pool.run(cpu_checks.rank_async, seed=_seed(), device="cuda")


def test_torch_compile(cuda_pool):
    cuda_pool.run(cpu_checks.rank_compiled, seed=_seed(), device="cuda")


def rank_side_stream(seed):
    """The op follows the caller's stream: input and splits written on a busy side stream just
    before the call are what is sent, and the output is ready for work queued after it there."""
    rank, size = dist.get_rank(), dist.get_world_size()
    side = torch.cuda.Stream()
    g = torch.Generator(device="cuda").manual_seed(seed + rank)
    rows = 256 * size
    with torch.cuda.stream(side):
        x = torch.empty(rows, 64, device="cuda")
        splits = torch.empty(size, dtype=torch.int64, device="cuda")
        torch.cuda._sleep(20_000_000)  # a missing dependency on this stream would show
        x.normal_(generator=g)
        splits.copy_(torch.bincount(torch.randint(0, size, (rows,), device="cuda", generator=g), minlength=size))
        out = poison_(torch.empty(rows * size, 64, device="cuda"))
        res = torch_ep.all_to_all_v(x, splits, output=out)
        checksum = out.view(torch.int32).long().sum()  # exact and order-independent
    torch.cuda.synchronize()
    expected = reference.all_to_all_v(x, splits, output=poison_(torch.empty_like(out)))
    assert same_bits(out, expected.output) and same_bits(res.output_splits, expected.output_splits)
    assert checksum.item() == expected.output.view(torch.int32).long().sum().item()


def test_side_stream(cuda_pool):
    cuda_pool.run(rank_side_stream, seed=_seed())


def rank_cuda_graph_changing_splits(seed):
    """One capture, replayed with other splits each time (same N per rank, spread differently):
    each replay must deliver exactly the rows the new splits say, offsets included."""
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator(device="cuda").manual_seed(seed + rank)
    rows = 64 * size
    static_in = torch.randn(rows, 33, device="cuda", generator=g)
    static_splits = torch.full((size,), 64, dtype=torch.int64, device="cuda")
    static_out = torch.empty(rows * size, 33, device="cuda")
    torch_ep.all_to_all_v(static_in, static_splits, output=static_out)  # sets the transport up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = torch_ep.all_to_all_v(static_in, static_splits, output=static_out)
    for _ in range(5):
        static_in.normal_(generator=g)
        static_splits.copy_(torch.bincount(torch.randint(0, size, (rows,), device="cuda", generator=g),
                                           minlength=size))
        poison_(static_out)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.all_to_all_v(static_in, static_splits, output=poison_(torch.empty_like(static_out)))
        assert same_bits(static_out, expected.output)
        assert same_bits(res.output_splits, expected.output_splits)
        assert same_bits(res.output_offsets, expected.output_offsets)


def test_cuda_graph_replay_with_changing_splits(cuda_pool):
    cuda_pool.run(rank_cuda_graph_changing_splits, seed=_seed())


# The device protocol's other forms (each read once a process): its flags at system scope, as where
# a peer is another GPU; and its kernels launched in stream order too, as before both defaults.
PROTOCOL_VARIANTS = {"system_scope_in_order": {"TORCH_EP_DEVICE_GPU_SCOPE": "0", "TORCH_EP_EARLY_LAUNCH": "0"},
                     "system_scope": {"TORCH_EP_DEVICE_GPU_SCOPE": "0"}}


def rank_protocol_variant(seed):
    cpu_checks.rank_given_and_allocated(seed, device="cuda")
    rank_many_chunks(seed)
    rank_cuda_graph_changing_splits(seed)


@pytest.mark.parametrize("variant", sorted(PROTOCOL_VARIANTS))
@pytest.mark.parametrize("world_size", cuda_world_sizes())
def test_protocol_variants(world_size, variant):
    """Every split shape, messages of many chunks, and a graph replayed with changing splits stay
    right under each form of the protocol."""
    pool = rank_pool(world_size, cuda=True, env={**DEVICE_PATH, **PROTOCOL_VARIANTS[variant]})
    pool.run(rank_protocol_variant, seed=_seed())


def rank_many_chunks(seed):
    """A 64 KiB buffer: staging slots of a few KiB, so every message crosses many chunks and
    reuses each slot within one call; rows whose size is not a multiple of 16 bytes too."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(cuda_buffer_bytes=64 << 10))
    try:
        for i, (dtype, row_shape) in enumerate([(torch.float32, (4099,)), (torch.bfloat16, (2048,)),
                                                (torch.uint8, (3,))]):
            m = cpu_checks.split_matrix("random", size, seed + i) * 7
            g = torch.Generator().manual_seed(seed * 7 + i * 131 + rank)
            from torch_ep.testing import random_tensor
            inp = random_tensor((int(m[rank].sum()), *row_shape), dtype, g, "cuda")
            splits = m[rank].cuda()
            total = int(m[:, rank].sum())
            expected = reference.all_to_all_v(inp, splits, group=group)
            out = poison_(torch.empty((total + 1, *row_shape), dtype=dtype, device="cuda"))
            res = torch_ep.all_to_all_v(inp, splits, output=out, group=group)
            torch.cuda.synchronize()
            assert same_bits(out[:total], expected.output), f"{dtype} {row_shape}"
            assert same_bits(res.output_splits, expected.output_splits)
            res = torch_ep.all_to_all_v(inp, splits, group=group)
            assert same_bits(res.output, expected.output), f"{dtype} {row_shape}: allocated"
    finally:
        dist.destroy_process_group(group)


def test_messages_larger_than_staging(cuda_pool):
    cuda_pool.run(rank_many_chunks, seed=_seed())


def rank_chunk_edges(seed):
    """Messages about the staged move's chunk sizes (test_cuda_all_to_all_chunks.CHUNK_EDGE_BYTES): every
    pair in both directions, as raw bytes and as 12-byte rows, through the default 128 KiB staging
    slots (one call with a message of many rounds too), 64 KiB and 4 KiB slots; into a given
    output (poisoned, one row to spare that must stay so) and an allocated one. The reference runs
    on CPU copies over the host transport, apart from the kernels under test."""
    rank = dist.get_rank()
    with chunk_checks.chunk_edge_groups() as groups:
        for what, group, dtype, row_shape, rows, g in chunk_checks.chunk_edge_cases(seed, groups):
            inp = chunk_checks.chunk_edge_input(int(rows[rank].sum()), dtype, row_shape, g)
            splits = rows[rank].cuda()
            total = int(rows[:, rank].sum())
            expected = reference.all_to_all_v(inp.cpu(), splits.cpu())
            out = poison_(torch.empty((total + 1, *row_shape), dtype=dtype, device="cuda"))
            res = torch_ep.all_to_all_v(inp, splits, output=out, group=group)
            torch.cuda.synchronize()
            torch_ep.check_errors(group)
            assert same_bits(out[:total], expected.output), f"{what}: given output differs"
            assert same_bits(out[total:], poison_(torch.empty_like(out[total:]))), f"{what}: spare row written"
            assert same_bits(res.output_splits, expected.output_splits), f"{what}: output_splits"
            assert same_bits(res.output_offsets, expected.output_offsets), f"{what}: output_offsets"
            res = torch_ep.all_to_all_v(inp, splits, group=group)
            assert same_bits(res.output, expected.output), f"{what}: allocated output differs"


def test_messages_about_the_chunk_sizes(cuda_pool):
    cuda_pool.run(rank_chunk_edges, seed=_seed(), timeout_s=300)


def rank_chunk_edges_graph(seed):
    """One capture, replayed with each CHUNK_EDGE_BYTES matrix in turn (each rank's fixed input:
    those messages, and what is left to itself): chunk sizes and counts per lane change from one
    replay to the next, so each replay must find every slot flag back where the protocol starts."""
    rank, size = dist.get_rank(), dist.get_world_size()
    n = len(chunk_checks.CHUNK_EDGE_BYTES)
    matrices = [chunk_checks.chunk_edge_matrix(size, call) for call in range(n)]
    rows = max(int(m.sum(1).max()) for m in matrices)
    static_in = torch.ones(rows, dtype=torch.uint8, device="cuda")
    static_splits = torch.zeros(size, dtype=torch.int64, device="cuda")
    static_splits[rank] = rows
    static_out = torch.empty(rows * size, dtype=torch.uint8, device="cuda")
    torch_ep.all_to_all_v(static_in, static_splits, output=static_out)  # sets the transport up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        res = torch_ep.all_to_all_v(static_in, static_splits, output=static_out)
    g = torch.Generator().manual_seed(seed + rank)
    for call in range(n):
        m = matrices[(seed + call) % n].clone()
        m.diagonal().add_(rows - m.sum(1))  # the rest of each rank's input to itself
        static_in.copy_(chunk_checks.chunk_edge_input(rows, torch.uint8, (), g))
        static_splits.copy_(m[rank])
        poison_(static_out)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.all_to_all_v(static_in.cpu(), static_splits.cpu(),
                                          output=poison_(torch.empty(rows * size, dtype=torch.uint8)))
        assert same_bits(static_out, expected.output), f"replay {call}, bytes {m.tolist()}"
        assert same_bits(res.output_splits, expected.output_splits), f"replay {call}: output_splits"
        assert same_bits(res.output_offsets, expected.output_offsets), f"replay {call}: output_offsets"


def test_cuda_graph_replay_across_chunk_sizes(cuda_pool):
    cuda_pool.run(rank_chunk_edges_graph, seed=_seed(), timeout_s=300)


def rank_peer_never_arrives():
    """Rank 1 skips the second call: rank 0's call into a given output returns at once (no host
    wait); its kernels give up after the timeout, and the next call raises naming op, rank and
    peer. The stream does not hang."""
    import time
    from datetime import timedelta

    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=3)))
    x = torch.randn(size * 4, 2, device="cuda")
    splits = torch.full((size,), 4, dtype=torch.int64, device="cuda")
    out = torch.empty_like(x)
    torch_ep.all_to_all_v(x, splits, output=out, group=group)  # sets everything up on every rank
    torch.cuda.synchronize()
    error, elapsed = None, 0.0
    if rank == 0:
        start = time.monotonic()
        torch_ep.all_to_all_v(x, splits, output=out, group=group)
        torch.cuda.synchronize()  # returns: the kernels' waits are bounded
        elapsed = time.monotonic() - start
        time.sleep(0.5)  # the watchdog polls every 50 ms
        try:
            torch_ep.all_to_all_v(x, splits, output=out, group=group)
        except Exception as e:  # noqa: BLE001
            error = (type(e).__name__, str(e))
    dist.barrier()
    dist.destroy_process_group(group)
    return error, elapsed


@pytest.mark.parametrize("world_size", [2])
def test_timeout_names_op_and_peer(world_size):
    pool = rank_pool(world_size, cuda=True, env=DEVICE_PATH)
    (error, elapsed), _ = pool.run(rank_peer_never_arrives)
    assert error is not None and error[0] == "DistBackendError", error
    # The peer as the kernel's error word names it ("peer rank 1") or the watchdog ("peer rank(s) 1").
    assert "all_to_all_v: timed out on rank 0" in error[1] and re.search(r"\brank(\(s\))? 1\b", error[1]), error
    assert 2.5 < elapsed < 20, elapsed


def rank_abort_releases_kernel_wait():
    """Rank 0 aborts the group while its all_to_all_v kernels wait for rank 1 (held up by a
    5-second kernel): rank 0's stream is released at once, not at the timeout, and later calls
    raise. Rank 1 then waits for rank 0 until the (8-second) timeout."""
    from datetime import timedelta

    size = dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=8)))
    x = torch.randn(size * 4, 2, device="cuda")
    splits = torch.full((size,), 4, dtype=torch.int64, device="cuda")
    out = torch.empty_like(x)
    return abort_while_waiting(group, lambda: torch_ep.all_to_all_v(x, splits, output=out, group=group), 1)


def abort_while_waiting(group, call, held_rank):
    """The rank side of an abort test: `call()` on every rank, then again with `held_rank`'s stream
    held up by a 5-second kernel, so that rank 0's kernels wait for it; rank 0 aborts `group` half
    a second in, times how long its stream takes to drain, and calls once more. Returns (those
    seconds, what the last call raised as (type name, message)) on rank 0, (None, None) elsewhere;
    destroys the group."""
    import time

    rank = dist.get_rank()
    call()
    torch.cuda.synchronize()
    if rank == held_rank:
        torch.cuda._sleep(int(5 * torch.cuda.get_device_properties(0).clock_rate * 1e3))  # ~5 s
    call()
    elapsed = later = None
    if rank == 0:
        time.sleep(0.5)
        start = time.monotonic()
        group.abort()
        torch.cuda.synchronize()
        elapsed = time.monotonic() - start
        try:
            call()
        except Exception as e:  # noqa: BLE001
            later = (type(e).__name__, str(e))
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group(group)
    return elapsed, later


@pytest.mark.parametrize("world_size", [2])
def test_abort_releases_a_kernel_wait(world_size):
    pool = rank_pool(world_size, cuda=True, env=DEVICE_PATH)
    (elapsed, later), _ = pool.run(rank_abort_releases_kernel_wait, timeout_s=120)
    assert elapsed < 2, elapsed
    assert later is not None and later[0] == "DistBackendError" and "aborted" in later[1], later


def _next_call(seed):
    """A fresh random call into a poisoned output of its size, after calls that overflowed: (what it
    raised or None, its output, input and splits), synchronised."""
    m, splits, inp, total = cpu_checks._case("random", seed, torch.float32, (3,), "cuda")
    out = poison_(torch.empty(total, 3, device="cuda"))
    error = None
    try:
        torch_ep.all_to_all_v(inp, splits, output=out)
    except RuntimeError as e:
        error = str(e)
    torch.cuda.synchronize()
    return error, out, inp, splits


def rank_overflow_raised_at_next_call(seed):
    """Unchecked, an overflow raises at the rank's next call, after that call is queued: its
    data still moves on every rank, and the call after works everywhere."""
    rank, size = dist.get_rank(), dist.get_world_size()
    m, splits, inp, total = cpu_checks._case("to_one", seed, torch.float32, (3,), "cuda")
    short = rank == size - 1
    out = poison_(torch.empty(total - 1 if short else total + 1, 3, device="cuda"))
    before = out.clone()
    torch_ep.all_to_all_v(inp, splits, output=out)  # returns: nothing waits for the device
    error, out2, inp, splits = _next_call(seed + 1)
    if short:
        assert error is not None and "output has room for" in error and "earlier" in error, error
        assert same_bits(out, before), "an overflowing call wrote its output"
    else:
        assert error is None, error
    assert same_bits(out2, reference.all_to_all_v(inp, splits).output), "the next call's data did not move"
    res = torch_ep.all_to_all_v(inp, splits)
    assert same_bits(res.output, reference.all_to_all_v(inp, splits).output)


def test_overflow_raised_at_next_call(cuda_pool):
    cuda_pool.run(rank_overflow_raised_at_next_call, seed=_seed())


def rank_later_problems_counted(seed):
    """Two overflowing calls run on the device before the host looks (this rank's stream held back
    by a sleep until both are queued): the device keeps the first's report and counts the second,
    so the error raised at the next call names both, and neither output is written."""
    rank, size = dist.get_rank(), dist.get_world_size()
    m, splits, inp, total = cpu_checks._case("to_one", seed, torch.float32, (3,), "cuda")
    short = rank == size - 1
    outs = [poison_(torch.empty(total - 1 if short else total + 1, 3, device="cuda")) for _ in range(2)]
    befores = [out.clone() for out in outs]
    torch_ep.all_to_all_v(inp, splits)  # the group's set-up (collective, slow) before the timed part
    torch.cuda.synchronize()
    torch.cuda._sleep(int(0.2 * torch.cuda.get_device_properties(0).clock_rate * 1e3))  # ~0.2 s: no plan
    # runs before both calls are queued
    for out in outs:
        torch_ep.all_to_all_v(inp, splits, output=out)
    torch.cuda.synchronize()
    error, out3, inp, splits = _next_call(seed + 1)
    if short:
        assert error is not None and "output has room for" in error, error
        assert "a problem in 1 later call(s) too" in error, error
    else:
        assert error is None, error
    for out, before in zip(outs, befores):
        assert same_bits(out, before), "an overflowing call wrote its output"
    assert same_bits(out3, reference.all_to_all_v(inp, splits).output), "the next call's data did not move"


def test_later_problems_counted(cuda_pool):
    cuda_pool.run(rank_later_problems_counted, seed=_seed())


def rank_allocation_fails_after_the_plan(seed):
    """all_to_all_v with output=None, whose output the last rank cannot allocate once the plan has
    sized it (its allocator capped just above what it holds: set_per_process_memory_fraction).
    That rank raises the allocator's error and queues a drain (af64d17), so every other rank's
    call completes with its data, well within the group's (60 s) timeout; the call after works
    everywhere. Outcomes are asserted at the end, once every rank made every call: a rank that
    stopped early would leave the others waiting for it."""
    import time

    from torch_ep.testing import random_tensor

    torch.cuda.empty_cache()  # no large cached block left by earlier tests to serve the output
    rank, size = dist.get_rank(), dist.get_world_size()
    victim, message_rows, row_floats = size - 1, 8192, 1024  # 32 MiB from every rank to the victim
    g = torch.Generator().manual_seed(seed + rank)
    splits = torch.randint(1, 5, (size,), generator=g)
    splits[victim] = message_rows
    inp = random_tensor((int(splits.sum()), row_floats), torch.float32, g, "cuda")
    splits = splits.cuda()
    expected = reference.all_to_all_v(inp, splits)
    torch.cuda.synchronize()
    output_bytes = size * message_rows * row_floats * 4
    cap_bites = True
    if rank == victim:
        torch.cuda.empty_cache()
        device = torch.cuda.current_device()
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + (8 << 20)) / total, device)
        cached = [b["size"] for seg in torch.cuda.memory_snapshot() for b in seg["blocks"] if b["state"] == "inactive"]
        cap_bites = max(cached, default=0) < output_bytes  # else a cached block serves the output
    dist.barrier()
    error, start = None, time.monotonic()
    try:
        res = torch_ep.all_to_all_v(inp, splits)
    except RuntimeError as e:
        error = str(e)
    finally:
        if rank == victim:
            torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.synchronize()
    elapsed = time.monotonic() - start
    next_error, out, next_inp, next_splits = _next_call(seed + 1)
    next_expected = reference.all_to_all_v(next_inp, next_splits).output
    assert cap_bites, "the victim's cap leaves a cached block as large as the output: the test proves nothing"
    if rank == victim:
        assert error is not None and "out of memory" in error.lower(), error
    else:
        assert error is None, error
        assert same_bits(res.output, expected.output), "a peer's call did not complete with its data"
        assert elapsed < 20, f"a peer's call waited {elapsed:.1f} s for the victim's move"
    assert next_error is None, next_error
    assert same_bits(out, next_expected), "the call after did not move"


def test_allocation_fails_after_the_plan(cuda_pool):
    cuda_pool.run(rank_allocation_fails_after_the_plan, seed=_seed())


def rank_interleaved_with_all_to_all_single(seed):
    """all_to_all_single on the device protocol (the comm stream) and all_to_all_v (the caller's
    stream) share the group's kernels and blocks: an async all_to_all_single followed at once by
    all_to_all_v calls, with no wait between, must run in call order on every rank and deliver
    both right. Small messages and many rounds, so that the kernels of consecutive calls would
    overlap if nothing ordered them."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(all_to_all_device=True))
    try:
        g = torch.Generator(device="cuda").manual_seed(seed + rank)
        for i in range(20):
            x = torch.randn(size * 3, 7, device="cuda", generator=g)
            y = poison_(torch.empty_like(x))
            work = dist.all_to_all_single(y, x, group=group, async_op=True)
            rows = 8 * size
            v_in = torch.randn(rows, 5, device="cuda", generator=g)
            splits = torch.bincount(torch.randint(0, size, (rows,), device="cuda", generator=g), minlength=size)
            v_out = poison_(torch.empty(rows * size, 5, device="cuda"))
            res = torch_ep.all_to_all_v(v_in, splits, output=v_out, group=group)
            work.wait()
            torch.cuda.synchronize()
            torch_ep.check_errors(group)
            # References on the default group (the host protocol), not on the one under test.
            assert same_bits(y.cpu(), reference.all_to_all_single(y.shape, x.cpu())), f"call {i}: single"
            expected = reference.all_to_all_v(v_in, splits, output=poison_(torch.empty_like(v_out)))
            assert same_bits(v_out, expected.output) and same_bits(res.output_splits, expected.output_splits), \
                f"call {i}: all_to_all_v"
    finally:
        dist.destroy_process_group(group)


def test_interleaved_with_all_to_all_single(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(rank_interleaved_with_all_to_all_single, seed=_seed())
