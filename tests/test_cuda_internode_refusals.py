"""Refusals and failures across (virtual) nodes on CUDA: bad input, a capture all_to_all cannot
replay, more rows than num_worst_tokens, the buffer's capacity and row width, a peer that never
arrives. Each raises a clear error on the ranks it names, and the group works afterwards. The
pools, fixtures and topologies are tests/test_cuda_internode.py's."""
import pytest
import torch

import test_cuda_all_to_all as all_to_all_checks
from test_cuda_all_to_all_v import abort_while_waiting
import test_internode as internode
import test_moe as checks
import torch_ep
from test_cuda_internode import CAPACITY, ROW_BYTES, _seed, cuda_nodes, device_route, pytestmark  # noqa: F401


def rank_all_to_all_capture_refused(seed):
    """all_to_all_single across nodes inside a CUDA-graph capture raises ValueError naming the op
    before it queues anything (the NVSHMEM hop numbers chunks on the host, which a replay would
    repeat); the capture stays empty and the group works after."""
    import torch.distributed as dist

    size = dist.get_world_size()
    inp = torch.ones(4 * size, 8, device="cuda")
    out = torch.empty_like(inp)
    dist.all_to_all_single(out, inp)  # the transport, outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with pytest.raises(ValueError, match="inside a CUDA graph capture") as refused:
        with torch.cuda.graph(graph):
            dist.all_to_all_single(out, inp)
    assert "all_to_all_single" in str(refused.value), refused.value
    internode.rank_all_to_all_across_nodes(seed, device="cuda")
    return str(refused.value)


def test_all_to_all_capture_refused(device_route):
    device_route.run(rank_all_to_all_capture_refused, _seed())


def rank_worst_overflow_then_combine(seed):
    """More rows than num_worst_tokens (every token to rank 0, which keeps 2), then a combine along
    that handle, both queued before the device runs the dispatch (so no host has seen the
    overflow): the combine reads no row past its x (16d4970; x's storage holds NaN past its 2 rows,
    which a read past them would carry into the sums), so rank 0's first two rows come back to
    source 0's tokens 0 and 1 and every other token gets zeros. The next calls the hosts wait for
    raise the overflow on every rank together, and the group keeps working."""
    import torch.distributed as dist

    rank, size = dist.get_rank(), dist.get_world_size()
    x = torch.randn(5, 8, device="cuda") + rank
    idx = torch.zeros(5, 1, dtype=torch.int64, device="cuda")  # every token to rank 0's first expert
    # The same calls with room for every row first: they allocate the buffer (collectively) and
    # load every kernel below. CUDA loads a kernel at its first launch (lazy loading), which may
    # wait for the device: behind the sleep, that would let the dispatch run before the combine
    # is queued. (torch_ep's own kernels are loaded at set-up, kernel_preload.hpp; torch's are not.)
    warm = torch_ep.dispatch(x, idx, num_experts=2 * size, num_worst_tokens=5 * size)
    rows = torch.full((5 * size, 8), float("nan"), device="cuda")
    rows[:] = warm.recv_x
    torch_ep.combine(rows, warm.handle)
    torch.cuda._sleep(1000)
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda._sleep(100_000_000)  # about 60 ms of device time: both calls are queued behind it
    d = torch_ep.dispatch(x, idx, num_experts=2 * size, num_worst_tokens=2)
    rows = torch.full((5 * size, 8), float("nan"), device="cuda")
    rows[:2] = d.recv_x
    combined = torch_ep.combine(rows[:2], d.handle).combined_x
    expected = torch.zeros_like(x)
    if rank == 0:
        expected[:2] = x[:2]
    assert torch.equal(combined, expected), (combined, expected)
    said = []
    for _ in range(2):  # the hosts wait for these: the overflow raises on every rank together
        try:
            checks.rank_dispatch_combine(seed, "random", 16, 2, 2, torch.float32, device="cuda")
            break
        except ValueError as e:
            said.append(str(e))
    else:
        raise AssertionError(f"the group did not recover: {said}")
    assert any("num_worst_tokens" in m for m in said), said
    checks.rank_worst_case(seed, device="cuda")


def test_worst_overflow_then_combine(device_route):
    device_route.run(rank_worst_overflow_then_combine, _seed())


def test_bad_input(cuda_nodes):
    cuda_nodes.run(checks.rank_bad_input, device="cuda")
    cuda_nodes.run(checks.rank_mismatched_handles, device="cuda")


def test_remote_peer_never_arrives_raises_in_wait(cuda_nodes):
    """The first rank of node 1 skips a call: rank 0's Work.wait() (blocking waits) raises within
    the timeout, naming the op and a peer of node 1, which only the NVSHMEM hop waits for (that
    rank, or one of its node that waited for it first)."""
    import re

    absent = cuda_nodes.world_size // 2
    error, elapsed = cuda_nodes.run(all_to_all_checks.rank_peer_never_arrives, absent)[0]
    assert error is not None and error[0] == "DistBackendError", error
    named = re.search(r"for rank (\d+)", error[1])
    assert "all_to_all_single" in error[1] and named and int(named.group(1)) >= absent, error
    assert 2.5 < elapsed < 20, elapsed


def rank_over_capacity(seed):
    """One rank dispatches more tokens than Options.internode_capacity: every rank raises
    ValueError naming x and the option, nothing moves, and the group works afterwards."""
    import torch.distributed as dist

    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 8, 2, 2, torch.float32, "cuda")
    if dist.get_rank() == 0:
        big = CAPACITY + 5
        x = torch.randn(big, 8, device="cuda")
        idx = torch.randint(0, num_experts, (big, 2), device="cuda")
        w = torch.ones(big, 2, device="cuda")
    msg = checks._raises(lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts), ValueError,
                         "internode_capacity")
    assert "x has" in msg and ("rank 0" in msg), msg
    checks.rank_dispatch_combine(seed + 1, "random", 16, 2, 2, torch.bfloat16, device="cuda")
    return msg


def test_over_capacity(device_route):
    device_route.run(rank_over_capacity, _seed())


def rank_refused_by_peers_records(seed):
    """Rank 0 refuses a dispatch that no host waits for (num_worst_tokens; more tokens than the
    capacity) and raises at once; its peers learn of it from the device and refuse their next such
    dispatch, raising ValueError naming rank 0. Rank 0's record of that next call was fine, so its
    host had nothing to raise there and its outputs are padding: its call after that raises
    ValueError saying so, once that call is queued (the peers' copy of it completes), and the
    group works afterwards. Returns what each of the two calls raised on this rank (or None)."""
    import torch.distributed as dist

    rank, size = dist.get_rank(), dist.get_world_size()
    worst = 24 * size  # make_inputs' most tokens from every rank
    num_experts, _, x, idx, w = checks.make_inputs(seed, "random", 16, 2, 2, torch.bfloat16, "cuda")
    if rank == 0:
        big = CAPACITY + 5
        refused = (torch.randn(big, 16, device="cuda").bfloat16(), torch.randint(0, num_experts, (big, 2), device="cuda"),
                   torch.ones(big, 2, device="cuda"))
        checks._raises(lambda: torch_ep.dispatch(*refused, num_experts=num_experts, num_worst_tokens=worst),
                       ValueError, "internode_capacity")
    else:
        torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
    torch.cuda.synchronize()  # every notify ran: the peers' hosts hold rank 0's refusal
    dist.barrier()

    def said(call):
        try:
            call()
        except ValueError as e:
            return str(e)
        return None

    padded = said(lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst))
    torch.cuda.synchronize()  # rank 0's notify of that call ran: its host holds the notice
    dist.barrier()
    told = said(lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts))
    torch.cuda.synchronize()
    dist.barrier()
    checks.rank_dispatch_combine(seed + 1, "random", 16, 2, 2, torch.bfloat16, device="cuda")
    return padded, told


def test_refused_by_peers_records(device_route):
    results = device_route.run(rank_refused_by_peers_records, _seed())
    (padded, told) = results[0]
    assert padded is None, padded  # rank 0's record accepted the call: nothing to raise there
    assert told is not None and "refused by its peers" in told and "rank 0's refusal" in told, told
    assert "padding" in told and "dispatch on rank 0" in told, told
    for rank, (padded, told) in enumerate(results[1:], start=1):
        assert padded is not None and "rank 0 refused an earlier" in padded, (rank, padded)
        assert told is None, (rank, told)  # no refusal chain: the peers' next call goes through


def rank_row_too_wide(seed):
    """After a first call has sized the buffer (ROW_BYTES), a dispatch of wider rows: every rank
    raises ValueError naming x and Options.internode_row_bytes with the bytes its rows need,
    nothing moves, and the group works afterwards."""
    checks.rank_dispatch_combine(seed, "random", 16, 2, 2, torch.bfloat16, device="cuda")
    num_experts, g, x, idx, w = checks.make_inputs(seed + 1, "random", ROW_BYTES // 2 + 64, 2, 2, torch.bfloat16, "cuda")
    msg = checks._raises(lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts), ValueError,
                         "internode_row_bytes")
    assert "x's rows take" in msg and f"sized for {ROW_BYTES}" in msg, msg
    checks.rank_dispatch_combine(seed + 2, "random", 16, 2, 2, torch.bfloat16, device="cuda")
    return msg


def test_row_too_wide(device_route):
    device_route.run(rank_row_too_wide, _seed())


def _small_buffers(**options):
    """Options of a group of its own whose buffer across nodes is small: each group's lives in the
    NVSHMEM heap for good (internode_buffer.hpp), and the pool's groups take most of it."""
    return torch_ep.Options(internode_capacity=64, internode_combine_rows=1, **options)


def _worst_dispatch_on(group, seed):
    """A dispatch across nodes on `group` that no host waits for (num_worst_tokens)."""
    import torch.distributed as dist

    num_experts, _, x, idx, w = checks.make_inputs(seed, "random", 16, 2, 2, torch.bfloat16, "cuda")
    worst = 24 * dist.get_world_size()  # make_inputs' most tokens from every rank (capacity 64 each)
    return lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst, group=group)


def rank_queued_calls_after_a_lost_peer(seed):
    """Node 1's first rank skips three dispatches that no host waits for: every other rank's
    three queued calls end within about one timeout, not one each (the first wait that gives up
    ends the later waits at once, IxCtrl::gave_up), and check_errors then raises naming the wait
    across nodes. Returns (error, seconds to drain the three calls), None on the absent rank."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=_small_buffers(timeout=timedelta(seconds=3)))
    call = _worst_dispatch_on(group, seed)
    call()  # the buffer, on every rank
    torch.cuda.synchronize()
    result = None
    if rank != size // 2:
        start = time.monotonic()
        for _ in range(3):
            call()
        torch.cuda.synchronize()
        elapsed = time.monotonic() - start
        error = None
        try:
            torch_ep.check_errors(group)
        except RuntimeError as e:
            error = str(e)
        result = (error, elapsed)
    dist.barrier()
    dist.destroy_process_group(group)
    return result


def test_queued_calls_after_a_lost_peer(device_route):
    results = device_route.run(rank_queued_calls_after_a_lost_peer, _seed(), timeout_s=120)
    for rank, result in enumerate(results):
        if rank == len(results) // 2:
            continue
        error, elapsed = result
        assert error is not None and "across nodes" in error and "past the timeout" in error, (rank, error)
        assert elapsed < 5.4, (rank, elapsed)  # 1.8 timeouts: three calls' waits would take 9 s or more


def rank_abort_releases_waits_across_nodes(seed):
    """Rank 0 aborts the group while its dispatch across nodes (no host wait) waits for node 1's
    first rank, held up by a 5-second kernel: rank 0's stream is released at once, not at the
    (8-second) timeout, and its next call raises naming the abort."""
    from datetime import timedelta

    import torch.distributed as dist

    group = dist.new_group(pg_options=_small_buffers(timeout=timedelta(seconds=8)))
    return abort_while_waiting(group, _worst_dispatch_on(group, seed), held_rank=dist.get_world_size() // 2)


def test_abort_releases_waits_across_nodes(device_route):
    (elapsed, later) = device_route.run(rank_abort_releases_waits_across_nodes, _seed(), timeout_s=120)[0]
    assert elapsed < 2, elapsed
    assert later is not None and later[0] == "DistBackendError" and "aborted" in later[1], later
