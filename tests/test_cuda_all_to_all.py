"""all_to_all on CUDA tensors over torch_ep's own transport (GPU machines only).

Ranks beyond the GPU count share GPUs (under MPS in the GPU suite). The checks are the CPU
tests' own rank functions run on CUDA tensors, plus what only CUDA has: stream semantics,
CUDA-graph capture, memory that stays flat, and timeouts that raise instead of hanging.
"""
import contextlib
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import test_all_to_all as cpu_checks
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from torch_ep import reference
from torch_ep.testing import poison_, same_bits, where_bits_differ

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")


# Both protocols of all_to_all_single: the host control exchange (the default, one copy) and the
# device protocol (Options.all_to_all_device: counts checked by the kernels, staged); and the device
# protocol with its eager path (Options.all_to_all_eager_bytes: messages of up to 64 KiB ride with
# the plan's records; test_cuda_all_to_all_chunks.py's CHUNK_EDGE_BYTES mixes messages under and
# over it in one call, so some ranks take the eager launch alone while others stage the larger).
EAGER_BYTES = 64 << 10
PROTOCOLS = {"host": {"TORCH_EP_ALL_TO_ALL_DEVICE": "0"}, "device": {"TORCH_EP_ALL_TO_ALL_DEVICE": "1"},
             "eager": {"TORCH_EP_ALL_TO_ALL_DEVICE": "1", "TORCH_EP_ALL_TO_ALL_EAGER_BYTES": str(EAGER_BYTES)}}


@pytest.fixture(params=[(n, p) for n in cuda_world_sizes() for p in PROTOCOLS], ids=lambda v: f"{v[0]}ranks-{v[1]}")
def cuda_pool(request):
    world_size, protocol = request.param
    return rank_pool(world_size, cuda=True, env=PROTOCOLS[protocol])


def _seed():
    return int(torch.randint(0, 2**30, ()).item())


def test_all_dtypes_and_splits(cuda_pool):
    paths = cuda_pool.run(cpu_checks.rank_all_dtypes, seed=_seed(), device="cuda")
    assert paths == ["cuda"] * cuda_pool.world_size  # our transport, not NCCL or Gloo


def rank_disagreeing_splits():
    """Ranks 0 and 1 disagree (rank 0 expects three rows from rank 1, which sends two).
    - host protocol: both raise before queueing anything; the other ranks, which queued work
      with them, are released by their watchdogs after the (short) timeout.
    - device protocol: the kernel checks every receiver's counts against its senders': nothing
      moves on any rank, every output stays as it was, and every rank raises at the next
      synchronising check (torch_ep.check_errors, a blocking wait, or its next call). The group
      keeps working."""
    rank, size = dist.get_rank(), dist.get_world_size()
    device_protocol = torch_ep.Options().all_to_all_device
    group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=4)))
    x = torch.randn(size * 2, device="cuda")
    out_splits = [2] * size
    if rank == 0:
        out_splits[1], out_splits[0] = 3, 1
    y = poison_(torch.empty(sum(out_splits), device="cuda"))
    before = y.clone()
    error = None
    try:
        dist.all_to_all_single(y, x, out_splits, [2] * size, group=group)
        torch.cuda.synchronize()
        torch_ep.check_errors(group)
    except Exception as e:  # noqa: BLE001
        error = (type(e).__name__, str(e))
    torch.cuda.synchronize()
    if not device_protocol:
        dist.barrier()
        dist.destroy_process_group(group)
        return error, None
    assert same_bits(y, before), "a refused call wrote its output"
    # The group keeps working: a correct call afterwards.
    x = torch.randn(size * 2, device="cuda")
    y = poison_(torch.empty(size * 2, device="cuda"))
    dist.all_to_all_single(y, x, group=group)
    expected = reference.all_to_all_single(y.shape, x.cpu(), group=group)
    ok_after = same_bits(y.cpu(), expected)
    dist.barrier()
    dist.destroy_process_group(group)
    return error, ok_after


def test_disagreeing_splits_raise(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    results = cuda_pool.run(rank_disagreeing_splits, timeout_s=120)
    device_protocol = results[0][1] is not None
    for rank, (error, ok_after) in enumerate(results):
        if not device_protocol:  # the pair that disagrees raises at the call
            if rank in (0, 1):
                assert error is not None and "split sizes disagree" in error[1], results
            continue
        assert error is not None and "split sizes disagree" in error[1] and "rank 0 expects" in error[1], results
        assert ok_after, f"rank {rank}: the call after the refused one went wrong"


def test_async_op_and_future(cuda_pool):
    cuda_pool.run(cpu_checks.rank_async_and_ordering, seed=_seed(), device="cuda")


def _uneven_splits(shared, size, rank):
    """One call's split sizes, alike on every rank (`shared` is seeded alike): rows[src][dst]."""
    rows = torch.randint(1, 300, (size, size), generator=shared)
    return rows[:, rank].tolist(), rows[rank].tolist()  # output_split_sizes, input_split_sizes


def rank_sync_op_on_caller_stream(seed):
    """async_op=False runs on the caller's current stream, as ProcessGroupNCCL's asyncOp=False does:
    work queued on that stream right after the call, with no wait or other sync, sees the whole
    output, also when the stream was busy before the call. Calls in a row on different streams, and
    async_op=True ones between them, stay in order (they share the transport's flags and slots)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator(device="cuda").manual_seed(seed + rank)
    shared = torch.Generator().manual_seed(seed)
    a, b, c = torch.cuda.Stream(), torch.cuda.Stream(), torch.cuda.Stream()
    checks = []  # (what was read on the op's stream, input, output splits, input splits)

    def call(stream, busy=False, async_op=False):
        out_splits, in_splits = _uneven_splits(shared, size, rank)
        with torch.cuda.stream(stream):
            if busy:
                torch.cuda._sleep(20_000_000)  # a missing dependency on the stream would show
            x = torch.empty(sum(in_splits), 5, device="cuda").normal_(generator=g)
            y = poison_(torch.empty(sum(out_splits), 5, device="cuda"))
            work = dist.all_to_all_single(y, x, out_splits, in_splits, async_op=async_op)
            assert (work is None) == (not async_op)
            if async_op:
                work.wait()
            checks.append((y.clone(), x, out_splits, in_splits))

    call(a, busy=True)
    call(b)  # right away on another stream: after the call still held up on `a`
    call(b, async_op=True)
    call(a, busy=True)
    call(torch.cuda.current_stream())

    # The Work of an async_op=False call (what dist.all_to_all_single waits on and drops): wait()
    # from another stream orders that stream after the op; its future and completion work too.
    out_splits, in_splits = _uneven_splits(shared, size, rank)
    with torch.cuda.stream(a):
        torch.cuda._sleep(20_000_000)
        x = torch.empty(sum(in_splits), 5, device="cuda").normal_(generator=g)
        y = poison_(torch.empty(sum(out_splits), 5, device="cuda"))
        opts = dist.AllToAllOptions()
        opts.asyncOp = False
        world = dist.group.WORLD
        work = getattr(world, "all_to_all_single", world.alltoall_base)(y, x, out_splits, in_splits, opts)
    with torch.cuda.stream(c):
        work.wait()
        checks.append((y.clone(), x, out_splits, in_splits))
    torch.cuda.synchronize()
    assert work.is_completed()
    assert same_bits(work.get_future().wait()[0], y)

    # The list form (the host protocol's all_to_all) on a busy side stream.
    rows = torch.randint(0, 40, (size, size), generator=shared)
    with torch.cuda.stream(a):
        torch.cuda._sleep(20_000_000)
        inputs = [torch.empty(int(rows[rank][d]), 3, device="cuda").normal_(generator=g) for d in range(size)]
        outputs = [poison_(torch.empty(int(rows[s][rank]), 3, device="cuda")) for s in range(size)]
        dist.all_to_all(outputs, inputs)
        seen = [o.clone() for o in outputs]
    torch.cuda.synchronize()

    for read, x, out_splits, in_splits in checks:
        assert same_bits(read, reference.all_to_all_single(read.shape, x, out_splits, in_splits))
    for read, expected in zip(seen, reference.all_to_all(inputs)):
        assert same_bits(read, expected)


def test_sync_op_on_caller_stream(cuda_pool):
    cuda_pool.run(rank_sync_op_on_caller_stream, seed=_seed())


def test_non_contiguous(cuda_pool):
    cuda_pool.run(cpu_checks.rank_non_contiguous, seed=_seed(), device="cuda")


def test_list_form(cuda_pool):
    cuda_pool.run(cpu_checks.rank_list_form, seed=_seed(), device="cuda")


def rank_larger_than_buffers(seed):
    # A 64 KiB registered block: 4 KiB chunks, so every message crosses many chunk boundaries
    # and reuses each slot many times within one call.
    group = dist.new_group(pg_options=torch_ep.Options(cuda_buffer_bytes=64 << 10))
    try:
        for i, kind in enumerate(("even", "uneven", "to_one")):
            cpu_checks.check_single(torch.float32, kind, (4099,), seed + i, group=group, device="cuda")
    finally:
        dist.destroy_process_group(group)
    # The default block: messages of tens of MiB.
    cpu_checks.check_single(torch.bfloat16, "uneven", (2_000_000,), seed, device="cuda")


def rank_sm_budget(seed):
    """The direct kernel cuts each message into 64 KiB slices (at most 256, larger past 16 MiB)
    that its blocks share: one block serves every (peer, slice) in turn; with a budget of three the
    grid shrinks until it shares no factor with the peers (two at 4 ranks), so that every block
    serves every peer; messages of one slice, of a few slices with
    rows that are no multiple of 16 bytes (slice edges then fall inside rows), and of more than
    256 slices; every split shape, so some peers get several slices and others none."""
    shapes = ((torch.bfloat16, (257,)), (torch.float32, (8191,)), (torch.float32, (16388,)),
              (torch.uint8, ((16 << 20) // 5 + 7,)))
    for i, num_sms in enumerate((1, 3)):
        group = dist.new_group(pg_options=torch_ep.Options(num_sms=num_sms, all_to_all_kernel_bytes=64 << 20))
        try:
            for j, (dtype, row_shape) in enumerate(shapes):
                for k, kind in enumerate(("even", "uneven", "to_one")):
                    cpu_checks.check_single(dtype, kind, row_shape, seed + 100 * i + 10 * j + k, group=group,
                                            device="cuda")
        finally:
            dist.destroy_process_group(group)


def test_sm_budget(cuda_pool):
    cuda_pool.run(rank_sm_budget, seed=_seed())


def rank_kernel_bytes(seed):
    """Options.all_to_all_kernel_bytes moves the host protocol's line between its two direct
    paths: 0 sends even small messages by the copy engines (a rank that only receives still
    takes the kernel), 64 MiB sends messages of several MiB with the one kernel. Each rank decides
    for itself (its largest message), and every split shape stays right either way."""
    for i, kernel_bytes in enumerate((0, 64 << 20)):
        group = dist.new_group(pg_options=torch_ep.Options(all_to_all_kernel_bytes=kernel_bytes))
        try:
            for j, kind in enumerate(("even", "uneven", "to_one")):
                cpu_checks.check_single(torch.bfloat16, kind, (257,), seed + 3 * i + j, group=group, device="cuda")
            cpu_checks.check_single(torch.float32, "uneven", (1_000_003,), seed + 3 * i, group=group, device="cuda")
            # Rows of 4 MB, a rank's own message as large as the peers' together at 2 ranks: by the
            # copy engines (line 0) its self copy runs on a stream of its own.
            cpu_checks.check_single(torch.float32, "even", (1_000_003,), seed + 3 * i, group=group, device="cuda")
        finally:
            dist.destroy_process_group(group)


def test_kernel_bytes(cuda_pool):
    cuda_pool.run(rank_kernel_bytes, seed=_seed())


@pytest.mark.parametrize("world_size", cuda_world_sizes())
def test_self_copy_in_line(world_size):
    """The what-if TORCH_EP_WHATIF_SELF_COPY_IN_LINE=1 (read once a process): the host protocol
    copies a rank's own message ahead of the peers' traffic on the call's stream, also where they
    go by the copy engines and it is 1 MiB or more and as large as theirs together (by default it
    runs on a stream of its own then, as test_kernel_bytes's line of 0 takes at 2 ranks); every
    split shape stays right."""
    pool = rank_pool(world_size, cuda=True, env={**PROTOCOLS["host"], "TORCH_EP_WHATIF_SELF_COPY_IN_LINE": "1"})
    pool.run(rank_kernel_bytes, seed=_seed())


def rank_direct_kernel(seed):
    cpu_checks.rank_all_dtypes(seed, device="cuda")
    rank_kernel_bytes(seed)
    rank_sm_budget(seed)  # a block serves several slices of a message


DIRECT_KERNEL_VARIANTS = {"system_scope": {"TORCH_EP_DIRECT_GPU_SCOPE": "0"},
                          "in_stream_order": {"TORCH_EP_EARLY_LAUNCH": "0"},
                          "self_copy_apart": {"TORCH_EP_WHATIF_SELF_COPY_APART": "1"}}


@pytest.mark.parametrize("variant", sorted(DIRECT_KERNEL_VARIANTS))
@pytest.mark.parametrize("world_size", cuda_world_sizes())
def test_direct_kernel_variants(world_size, variant):
    """The direct kernel's other forms (each read once a process): its flags and fences at system
    scope, as where a peer is another GPU (the ranks share one here, where GPU scope is the
    default); launched in plain stream order (not early); the rank's own message by a copy of its
    own (a what-if), as before the kernel took it in slices after the peers'. Every dtype and split
    shape stays right, by the kernel and by the copy engines (a line of 0 and of 64 MiB), also
    where a block serves several slices (SM budgets of 1 and 3)."""
    pool = rank_pool(world_size, cuda=True, env={**PROTOCOLS["host"], **DIRECT_KERNEL_VARIANTS[variant]})
    pool.run(rank_direct_kernel, seed=_seed())


HOST_PROTOCOL_PHASES = ("checks", "export", "exchange", "self_copy", "launch", "track")


def rank_host_protocol_phases(seed):
    """The host protocol's phases on the phase clock (tools/a2a_profile.py's clock lines): each once
    a call while the clock is on, none while it is off; the calls stay right."""
    C = torch_ep._C
    C._take_phase_times()
    C._phase_clock(True)
    try:
        for i in range(3):
            cpu_checks.check_single(torch.float32, "uneven", (33,), seed + i, device="cuda")
    finally:
        C._phase_clock(False)
    times = {name: calls for name, calls, _ in C._take_phase_times()}
    for phase in HOST_PROTOCOL_PHASES:
        assert times.get(f"ep::host_protocol/{phase}") == 3, times
    cpu_checks.check_single(torch.float32, "even", (33,), seed, device="cuda")
    assert not any(name.startswith("ep::host_protocol/") for name, _, _ in C._take_phase_times())


def test_host_protocol_phases():
    rank_pool(2, cuda=True, env=PROTOCOLS["host"]).run(rank_host_protocol_phases, seed=_seed())


def rank_export_once(seed):
    cpu_checks.rank_all_dtypes(seed, device="cuda")
    cpu_checks.rank_list_form(seed, device="cuda")  # outputs in separate tensors: one lookup each
    cpu_checks.rank_non_contiguous(seed, device="cuda")


@pytest.mark.parametrize("world_size", cuda_world_sizes())
def test_receive_spans_share_one_export(world_size):
    """The host protocol looks an output's allocation up once a call and reuses it for every
    receive span inside it (CudaTransport::Export); every dtype and split shape, the list form
    (one lookup per output tensor), strided tensors."""
    pool = rank_pool(world_size, cuda=True, env=PROTOCOLS["host"])
    pool.run(rank_export_once, seed=_seed())


def test_messages_larger_than_buffers(cuda_pool):
    cuda_pool.run(rank_larger_than_buffers, seed=_seed())


def rank_stream_semantics(seed):
    """The op follows the caller's stream: inputs written on a side stream just before the call
    are what gets sent, and wait() orders later work on that stream after the op."""
    rank, size = dist.get_rank(), dist.get_world_size()
    side = torch.cuda.Stream()
    g = torch.Generator(device="cuda").manual_seed(seed + rank)
    with torch.cuda.stream(side):
        x = torch.empty(size * 1024, 256, device="cuda")
        torch.cuda._sleep(20_000_000)  # keep the stream busy so a missing dependency would show
        x.normal_(generator=g)
        y = poison_(torch.empty_like(x))
        work = dist.all_to_all_single(y, x, async_op=True)
        work.wait()
        # Queued on `side` after wait(): must see the whole output. An integer sum of the bit
        # patterns is exact and order-independent, so it compares across devices.
        checksum = y.view(torch.int32).long().sum()
    torch.cuda.synchronize()
    expected = reference.all_to_all_single(y.shape, x)
    assert same_bits(y, expected)
    assert checksum.item() == expected.view(torch.int32).long().sum().item()
    fut = dist.all_to_all_single(y, x, async_op=True).get_future()
    assert same_bits(fut.wait()[0], expected)


def test_stream_semantics(cuda_pool):
    cuda_pool.run(rank_stream_semantics, seed=_seed())


def check_replays(static_out, static_in, group, generator, replays, also=None, name=""):
    """dist.all_to_all_single(static_out, static_in) captured in a CUDA graph (after one eager
    call: the group's state is made outside the capture), then replayed `replays` times, each on
    fresh inputs into a poisoned output, checked against torch_ep.reference; `also()`, where
    given, must hold after each replay."""
    dist.all_to_all_single(static_out, static_in, group=group)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        dist.all_to_all_single(static_out, static_in, group=group)
    for _ in range(replays):
        static_in.normal_(generator=generator)
        poison_(static_out)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.all_to_all_single(static_out.shape, static_in, group=group)
        assert same_bits(static_out, expected), f"{name}: a replay's output differs"
        assert also is None or also(), f"{name}: {also.__name__} does not hold after a replay"
    del graph


def rank_cuda_graph(seed):
    """A call captured and replayed on fresh inputs into poisoned outputs: on the default group,
    and where the host protocol runs, on a group whose messages all go by the copy engines
    (all_to_all_kernel_bytes=0: the captured copies and stream flag operations) and one whose
    messages of several MiB all go by the direct kernel."""
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator(device="cuda").manual_seed(seed + rank)
    groups = {"default": None}
    if not torch_ep.Options().all_to_all_device:
        for kernel_bytes in (0, 64 << 20):
            groups[f"kernel_bytes={kernel_bytes}"] = dist.new_group(
                pg_options=torch_ep.Options(all_to_all_kernel_bytes=kernel_bytes))
    try:
        for name, group in groups.items():
            rows = size * 64 if group is None else size * (1 << 20) // 33 + 5  # about 4 MiB a message
            static_in = torch.randn(rows - rows % size, 33, device="cuda", generator=g)
            check_replays(torch.empty_like(static_in), static_in, group, g, replays=3, name=name)
    finally:
        for group in groups.values():
            if group is not None:
                dist.destroy_process_group(group)


def test_cuda_graph_capture_and_replay(cuda_pool):
    cuda_pool.run(rank_cuda_graph, seed=_seed())


def rank_cuda_graph_sync_and_async(seed):
    """One graph holds an async_op=False call with uneven splits (it runs on the capturing stream),
    an async_op=True call with its wait() (the comm stream joins the capture), and an async call
    left in flight while a plain call is queued, then waited on: the two share the transport's
    flags and slots, so the capture must order them although neither stream does. Each replay,
    on a side stream, on fresh inputs into poisoned outputs, leaves every output right, readable
    on the replay stream with no other sync."""
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator(device="cuda").manual_seed(seed + rank)
    out_splits, in_splits = _uneven_splits(torch.Generator().manual_seed(seed), size, rank)
    calls = []  # (input, output, output splits, input splits)
    for rows_out, rows_in, width in ((out_splits, in_splits, 7), ([32] * size, [32] * size, 3),
                                     ([48] * size, [48] * size, 5), (out_splits, in_splits, 9)):
        calls.append((torch.randn(sum(rows_in), width, device="cuda", generator=g),
                      torch.empty(sum(rows_out), width, device="cuda"), rows_out, rows_in))

    def run(i, **kwargs):
        inp, out, rows_out, rows_in = calls[i]
        return dist.all_to_all_single(out, inp, rows_out, rows_in, **kwargs)

    def all_calls():
        run(0)
        run(1, async_op=True).wait()
        in_flight = run(2, async_op=True)
        run(3)
        in_flight.wait()

    all_calls()  # warm-up: the transports and the comm stream exist before the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        all_calls()
    replay = torch.cuda.Stream()
    for _ in range(4):
        for inp, out, _, _ in calls:
            inp.normal_(generator=g)
            poison_(out)
        replay.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(replay):
            torch.cuda._sleep(10_000_000)
            graph.replay()
            reads = [out.clone() for _, out, _, _ in calls]
        torch.cuda.synchronize()
        for i, ((inp, out, rows_out, rows_in), read) in enumerate(zip(calls, reads)):
            expected = reference.all_to_all_single(out.shape, inp, rows_out, rows_in)
            assert same_bits(read, expected), f"call {i}: {where_bits_differ(read, expected, rows_out)}"


def test_cuda_graph_sync_and_async_ops(cuda_pool):
    cuda_pool.run(rank_cuda_graph_sync_and_async, seed=_seed())


def rank_memory_stays_flat(seed, iterations):
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator(device="cuda").manual_seed(seed + rank)
    shared = torch.Generator().manual_seed(seed)

    def one_call():
        n = int(torch.randint(1, 2000, (), generator=shared))
        x = torch.randn(size * n, 64, device="cuda", generator=g)
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x)

    for _ in range(20):
        one_call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(iterations):
        one_call()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() - before


def test_repeated_calls_leak_nothing(cuda_pool):
    growth = cuda_pool.run(rank_memory_stays_flat, seed=_seed(), iterations=300)
    assert growth == [0] * cuda_pool.world_size


def rank_wrong_device():
    x = torch.randn(dist.get_world_size() * 2, device="cuda")
    try:
        dist.all_to_all_single(torch.empty(x.shape), x)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__, str(e).split("\n")[0]
    return None


def test_wrong_device_raises(cuda_pool):
    for err in cuda_pool.run(rank_wrong_device):
        assert err is not None and "input is on cuda" in err[1] and "output is on cpu" in err[1], err


def rank_peer_never_arrives(absent=1, pooled=False):
    """Rank `absent` skips the second call: every other rank must raise within the timeout (a
    blocking wait), naming the op and the peer, and its stream must not hang. `pooled`: the
    tensors come from the group's torch_ep.comm_pool (the one-copy path)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    options = dict(timeout=timedelta(seconds=3), blocking_wait=True)
    if pooled:
        options["comm_pool_bytes"] = 64 << 20
    group = dist.new_group(pg_options=torch_ep.Options(**options))
    with torch.cuda.use_mem_pool(torch_ep.comm_pool(group)) if pooled else contextlib.nullcontext():
        x = torch.randn(size * 4, device="cuda")
        y = torch.empty_like(x)
    dist.all_to_all_single(y, x, group=group)  # sets the transport up on every rank
    torch.cuda.synchronize()
    error, elapsed = None, 0.0
    if rank != absent:
        start = time.monotonic()
        try:
            dist.all_to_all_single(y, x, group=group)
        except Exception as e:  # noqa: BLE001
            error = (type(e).__name__, str(e))
        elapsed = time.monotonic() - start
        torch.cuda.synchronize()  # returns: the watchdog released the stuck stream
    dist.barrier()
    dist.destroy_process_group(group)
    return error, elapsed


@pytest.mark.parametrize("world_size", [2])
def test_timeout_names_op_and_peer(world_size):
    pool = rank_pool(world_size, cuda=True)
    (error, elapsed), _ = pool.run(rank_peer_never_arrives)
    assert error is not None and error[0] == "DistBackendError", error
    assert "all_to_all_single: timed out on rank 0" in error[1] and "rank 1" in error[1], error
    assert 2.5 < elapsed < 20, elapsed
