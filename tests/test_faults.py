"""Faults on CPU: waits that time out, abort(), shutdown(), ranks that disagree, and a rank
SIGKILLed in the middle of a stream of mixed calls.

Each failure must raise on the host, naming the op, the rank, the peer and the time waited,
instead of hanging or corrupting memory; the group then refuses further calls with a clear
message, and destroy_process_group still works. Timeouts are short (2-3 s) on groups made for
the test, so the shared pool's default group stays usable. Where data moved before the fault,
it is checked: all_to_all blocks carry values every rank can compute, and a dispatch followed
by a combine returns x times the number of ranks each token went to.
"""
import gc
import os
import random
import re
import signal
import threading
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import torch_ep
from torch_ep import reference
from torch_ep.testing import RankPool, poison_, same_bits

from conftest import rank_pool
from test_shm_cleanup import leaked, shm_names

needs_cuda = pytest.mark.skipif(not (torch.cuda.is_available() and torch_ep._C.has_cuda),
                                reason="needs CUDA and a CUDA build")
SLACK_S = 10  # on top of the timeout: a busy 2-core CI machine wakes sleepers late


def _error_of(call):
    start = time.monotonic()
    try:
        call()
    except Exception as e:  # noqa: BLE001 - the test inspects whatever was raised
        return time.monotonic() - start, type(e).__name__, str(e)
    return time.monotonic() - start, None, None


def _default_group_still_works(seed):
    rank, size = dist.get_rank(), dist.get_world_size()
    x = torch.randn(size * 3, 5, generator=torch.Generator().manual_seed(seed + rank))
    y = poison_(torch.empty_like(x))
    dist.all_to_all_single(y, x)
    assert same_bits(y, reference.all_to_all_single(y.shape, x))


# ----------------------------------------------------------------------------- checked streams

def _block(call, src, dst, rows, width, device):
    """The block `src` sends `dst` in call `call`: int64 values any rank can compute."""
    base = ((call * 131 + src) * 257 + dst) * 1_000_003
    return (base + torch.arange(rows * width, dtype=torch.int64, device=device)).view(rows, width)


def checked_all_to_all(call, splits, group=None, async_op=False, width=3, device="cpu"):
    """all_to_all_single with `splits` [src, dst] rows; every received block is checked."""
    rank = dist.get_rank(group)
    size = splits.shape[0]
    sends = [_block(call, rank, d, int(splits[rank, d]), width, device) for d in range(size)]
    x = torch.cat(sends)
    out_splits = splits[:, rank].tolist()
    y = poison_(torch.empty(sum(out_splits), width, dtype=torch.int64, device=device))
    work = dist.all_to_all_single(y, x, out_splits, splits[rank].tolist(), group=group, async_op=async_op)
    if async_op:
        work.wait()
    if device == "cuda":
        # The device protocol checks counts and waits for peers in its kernels, like NCCL without
        # blocking waits: what went wrong raises at the next synchronising check.
        torch.cuda.synchronize()
        torch_ep.check_errors(group)
    expected = torch.cat([_block(call, s, rank, int(splits[s, rank]), width, device) for s in range(size)])
    assert torch.equal(y, expected), f"call {call}: all_to_all_single delivered wrong data"


def checked_round_trip(g, group=None, num_tokens=12, hidden=8, experts_per_rank=2, top_k=2, device="cpu"):
    """dispatch then combine of what arrived: each token comes back as x times the number of
    ranks it went to (integer-valued float32: exact)."""
    size = dist.get_world_size(group)
    num_experts = experts_per_rank * size
    idx = torch.empty(0, top_k, dtype=torch.int64)
    if num_tokens:
        idx = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
        idx[torch.rand(idx.shape, generator=g) < 0.25] = -1
    x = torch.randint(-50, 50, (num_tokens, hidden), generator=g).float()
    d = torch_ep.dispatch(x.to(device), idx.to(device), num_experts=num_experts, group=group)
    back = torch_ep.combine(d.recv_x, d.handle, group=group).combined_x
    ranks_per_token = reference.get_dispatch_layout(idx, num_experts, group).is_token_in_rank.sum(1, keepdim=True)
    assert torch.equal(back.cpu(), x * ranks_per_token), "dispatch + combine lost or changed rows"


def rank_mixed_stream(seed, max_calls, victim=-1, device="cpu"):
    """all_to_all_single (random splits, some async) and dispatch + combine, each checked, until
    a call raises (a peer died) or max_calls; returns (calls done, seconds the failing call took,
    its error or None). Rank `victim` SIGKILLs itself at a random moment of a random call."""
    size = dist.get_world_size()
    shared = random.Random(seed)  # the same op sequence and sizes on every rank
    g = torch.Generator().manual_seed(seed + dist.get_rank())
    die_at = shared.randrange(20, 200)
    for call in range(max_calls):
        if call == die_at and dist.get_rank() == victim:
            threading.Timer(random.uniform(0, 0.005), os.kill, (os.getpid(), signal.SIGKILL)).start()
        op = shared.choice(["all_to_all", "all_to_all", "async", "moe"])
        splits = torch.randint(0, 9, (size, size), generator=torch.Generator().manual_seed(shared.randrange(2**31)))
        start = time.monotonic()
        try:
            if op == "moe":
                checked_round_trip(g, device=device)
            else:
                checked_all_to_all(call, splits, async_op=op == "async", device=device)
        except AssertionError:
            raise
        except Exception as e:  # noqa: BLE001
            return call, time.monotonic() - start, f"{type(e).__name__}: {e}"
    return max_calls, 0.0, None


def _names_dead_peer(error, dead):
    # "rank 1", or the CUDA transport's "peer rank(s) 0, 1"
    names = re.search(rf"\brank(\(s\))? (\d+, )*{dead}\b", error) is not None
    return names and any(op in error for op in ("all_to_all_single", "dispatch", "combine"))


def _kill_mid_stream(world_size, victim, device, ranks_per_node=0, extra_env=None):
    """A rank SIGKILLed (by itself, at a random moment of a random call) while the group streams
    mixed, checked all_to_all_single and dispatch/combine calls: every survivor raises within the
    timeout, naming the op and the dead rank, then destroys the group and exits 0; no process
    hangs and /dev/shm keeps nothing. With ranks_per_node the group spans virtual nodes: the
    calls take the route across nodes (NVSHMEM on CUDA). On CPU the host transport sees the dead
    rank's process gone and names it at once."""
    timeout_s = 3
    before = set(shm_names())
    env = {"OMP_NUM_THREADS": "1", "TORCH_EP_TIMEOUT_S": str(timeout_s), **(extra_env or {})}
    if ranks_per_node:
        env["TORCH_EP_RANKS_PER_NODE"] = str(ranks_per_node)
        env.update({"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
                    "NVSHMEM_DISABLE_NCCL": "1", "NVSHMEM_DISABLE_NVLS": "1"})
    if device == "cuda":  # ranks sharing a GPU split it under MPS, as in the GPU suite
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // -(-world_size // torch.cuda.device_count()))
    ranks = RankPool(world_size, env=env, timeout_s=60, cuda=device == "cuda")
    survivors = [r for r in range(world_size) if r != victim]
    seed = random.randrange(2**30)
    try:
        ranks.start(range(world_size), rank_mixed_stream, seed, 10**6, victim, device)
        outcomes = ranks.results(survivors, "rank_mixed_stream after the kill", timeout_s=timeout_s + 60)
    finally:
        exit_codes = ranks.close()
    for r, (calls, elapsed, error) in outcomes.items():
        assert error is not None, f"seed {seed}: rank {r} finished {calls} calls although rank {victim} is dead"
        assert calls >= 20, f"seed {seed}: rank {r} failed before the kill: {error}"
        assert elapsed < timeout_s + SLACK_S, f"seed {seed}: rank {r} raised after {elapsed:.1f} s: {error}"
        assert _names_dead_peer(error, victim), f"seed {seed}: rank {r}: the error names neither op nor peer: {error}"
        if device == "cpu":  # the host transport sees the process gone, with no wait for the timeout
            assert "exited" in error, f"seed {seed}: rank {r}: the dead rank was not seen exiting: {error}"
    assert exit_codes == [-9 if r == victim else 0 for r in range(world_size)], exit_codes
    assert leaked(shm_names(), before, ranks.pids) == []


@pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")
@pytest.mark.parametrize("world_size,victim,ranks_per_node", [(3, 1, 0), (4, 0, 0), (4, 3, 2)],
                         ids=["3ranks", "4ranks", "2x2-nodes"])
def test_rank_killed_mid_stream(world_size, victim, ranks_per_node):
    _kill_mid_stream(world_size, victim, "cpu", ranks_per_node)


@needs_cuda
@pytest.mark.parametrize("world_size,victim,ranks_per_node", [(2, 1, 0), (4, 2, 0), (4, 1, 2)],
                         ids=["2ranks", "4ranks", "2x2-nodes"])
def test_rank_killed_mid_stream_cuda(world_size, victim, ranks_per_node):
    """The same on CUDA tensors: the survivors' kernels and host waits are bounded, the error
    names the dead peer, and every survivor exits cleanly (its IPC mappings of the dead rank's
    memory are released with its context). Across virtual nodes the NVSHMEM hop's waits are
    bounded too."""
    if ranks_per_node and not torch_ep._C.has_nvshmem:
        pytest.skip("the route across nodes on CUDA needs a torch_ep built with NVSHMEM")
    _kill_mid_stream(world_size, victim, "cuda", ranks_per_node)


@needs_cuda
@pytest.mark.parametrize("world_size,victim", [(2, 1), (4, 2)], ids=["2ranks", "4ranks"])
def test_rank_killed_mid_stream_cuda_device_protocol(world_size, victim):
    """The same with all_to_all_single on the device protocol (Options.all_to_all_device): the
    plan kernel's wait for the dead rank's record is bounded, nothing moves, and the survivors'
    check after the call names the op and the dead peer."""
    _kill_mid_stream(world_size, victim, "cuda", extra_env={"TORCH_EP_ALL_TO_ALL_DEVICE": "1"})


def rank_killed_with_async_calls_queued(victim, timeout_s, seed):
    """Every rank makes a first checked all_to_all_single (it sets up the device protocol's state,
    collectively); then rank `victim` SIGKILLs itself while each other rank has three async
    all_to_all_single queued back to back, and waits for each in turn. The group's Work.wait()
    blocks (TORCH_EP_BLOCKING_WAIT): without it a wait only orders the caller's stream and raises
    nothing before the failure. On a survivor returns: whether each call was still pending once
    all three were queued; each wait's (seconds, error type, message); the seconds from queueing
    the first call until the device is idle again; and the errors of two later calls."""
    rank, size = dist.get_rank(), dist.get_world_size()
    config = torch_ep.get_backend().config
    assert config.all_to_all_device and config.blocking_wait, "the ranks' environment did not reach the group"
    assert config.timeout == timedelta(seconds=timeout_s), config.timeout
    splits = torch.randint(1, 4, (size, size), generator=torch.Generator().manual_seed(seed))
    checked_all_to_all(0, splits, device="cuda")
    if rank == victim:
        # After the survivors have queued their calls (milliseconds after the first call ends):
        # it dies while they wait for it, and it never makes them.
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)
    x = torch.arange(size * 4, dtype=torch.float32, device="cuda")
    outputs = [torch.empty_like(x) for _ in range(3)]
    start = time.monotonic()
    works = [dist.all_to_all_single(y, x, async_op=True) for y in outputs]
    pending = [not w.is_completed() for w in works]
    waits = [_error_of(w.wait) for w in works]
    # A wait raises once the transport failed, but the calls queued behind the first still hold
    # the comm stream until their kernels give up: the device is idle only after this.
    torch.cuda.synchronize()
    elapsed = time.monotonic() - start
    later = {
        "all_to_all_single": _error_of(lambda: dist.all_to_all_single(torch.empty_like(x), x)),
        "check_errors": _error_of(torch_ep.check_errors),
    }
    return pending, waits, elapsed, later


@needs_cuda
@pytest.mark.parametrize("world_size,victim", [(2, 1), (4, 2)], ids=["2ranks", "4ranks"])
def test_rank_killed_mid_stream_cuda_device_protocol_async_queued(world_size, victim):
    """A rank SIGKILLed while the survivors have three async all_to_all_single queued on the
    device protocol: the first call's wait for it expires and fails the group's CUDA transport,
    which sets the abort word the kernels poll (68c8875), so the two calls queued behind it give
    up at once instead of each waiting out a timeout of its own. Every survivor's three waits
    raise naming the op and the dead peer, its device is idle again in about one timeout (not
    three), the group then refuses calls, and every survivor exits cleanly."""
    timeout_s = 8
    # The first call ends about timeout_s after it was queued; with the abort word the other two
    # end right after it. Before 68c8875 each queued call started its own timeout when the one
    # before it ended: about 3 x timeout_s in all (24 s). The bound, 1.5 x timeout_s plus a
    # margin (the first error's fault-log lookup, up to 1.5 s, and late wake-ups), is 16 s: well
    # above the one timeout, and below the three it must tell apart (hence not SLACK_S, which with
    # 1.5 x 8 s would pass 22 s).
    bound_s = 1.5 * timeout_s + 4
    assert bound_s < 3 * timeout_s, "the bound would pass the behaviour before 68c8875"
    before = set(shm_names())
    env = {"OMP_NUM_THREADS": "1", "TORCH_EP_TIMEOUT_S": str(timeout_s), "TORCH_EP_ALL_TO_ALL_DEVICE": "1",
           "TORCH_EP_BLOCKING_WAIT": "1",  # each wait raises (see the rank function)
           # ranks sharing a GPU split it under MPS, as in the GPU suite
           "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": str(100 // -(-world_size // torch.cuda.device_count()))}
    ranks = RankPool(world_size, env=env, timeout_s=60, cuda=True)
    survivors = [r for r in range(world_size) if r != victim]
    seed = random.randrange(2**30)
    try:
        ranks.start(range(world_size), rank_killed_with_async_calls_queued, victim, timeout_s, seed)
        # Room for three timeouts and more: a regression fails the bound below, with its numbers.
        outcomes = ranks.results(survivors, "rank_killed_with_async_calls_queued after the kill",
                                 timeout_s=3 * timeout_s + 60)
    finally:
        exit_codes = ranks.close()
    for r, (pending, waits, elapsed, later) in outcomes.items():
        assert pending == [True] * 3, f"seed {seed}: rank {r}: calls done although rank {victim} never made them"
        for call, (waited, kind, error) in enumerate(waits):
            where = f"seed {seed}: rank {r}, wait {call} ({waited:.1f} s)"
            assert kind == "DistBackendError", f"{where}: {kind}: {error}"
            assert _names_dead_peer(error, victim), f"{where}: the error names neither op nor peer: {error}"
        assert elapsed < bound_s, (f"seed {seed}: rank {r}: the queued calls ended {elapsed:.1f} s after the first was "
                                   f"queued, bound {bound_s:.0f} s (timeout {timeout_s} s); waits took "
                                   f"{[round(w[0], 1) for w in waits]} s")
        for op, (waited, kind, error) in later.items():
            # Refused without waiting for a peer (the fault log's store lookups take at most 1.5 s).
            assert kind == "DistBackendError" and waited < 2.0, f"seed {seed}: rank {r}, later {op}: {kind}: {error}"
            assert error.startswith(f"{op} on rank {r}: this 'ep' process group takes no more calls"), error
    assert exit_codes == [-9 if r == victim else 0 for r in range(world_size)], exit_codes
    assert leaked(shm_names(), before, ranks.pids) == []


# ----------------------------------------------------------------------------- timeouts

def rank_timeout(kind, timeout_s, absent, seed, source="option", device="cpu"):
    """On a group with a short timeout, every rank but `absent` makes a call (`kind`) that the
    absent rank never joins. Returns the error, then the errors of later calls on that group.
    The timeout comes from torch_ep.Options, or (`source` "new_group") from new_group's own
    timeout argument when Options leaves it unset. On CUDA tensors (`device`) the later calls
    use them too, so a delegated one (all_reduce, barrier) goes to the inner backend only if the
    failed CUDA transport did not close the group."""
    rank, size = dist.get_rank(), dist.get_world_size()
    if source == "option":
        group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=timeout_s)))
    else:
        group = dist.new_group(timeout=timedelta(seconds=timeout_s), pg_options=torch_ep.Options(timeout=None))
    assert torch_ep.get_backend(group).config.timeout == timedelta(seconds=timeout_s)
    splits = torch.randint(1, 4, (size, size), generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed + rank)
    if kind != "set_up":  # a first call that every rank makes: the transport is up
        checked_all_to_all(0, splits, group=group, device=device)
        checked_round_trip(g, group=group, device=device)
    if kind == "combine":
        num_experts = 2 * size
        idx = torch.randint(0, num_experts, (6, 2), generator=g)
        x = torch.randn(6, 4, generator=g)
        d = torch_ep.dispatch(x.to(device), idx.to(device), num_experts=num_experts, group=group)
    calls = {
        "set_up": lambda: checked_all_to_all(1, splits, group=group, device=device),
        "all_to_all": lambda: checked_all_to_all(1, splits, group=group, device=device),
        "async": lambda: checked_all_to_all(1, splits, group=group, async_op=True, device=device),
        "dispatch": lambda: checked_round_trip(g, group=group, device=device),
        "combine": lambda: torch_ep.combine(d.recv_x, d.handle, group=group),
    }
    first = later = None
    if rank != absent:
        first = _error_of(calls[kind])
        x = torch.ones(size * 2, device=device)
        later = {
            "all_to_all_single": _error_of(lambda: dist.all_to_all_single(torch.empty_like(x), x, group=group)),
            "all_reduce": _error_of(lambda: dist.all_reduce(x, group=group)),
            "barrier": _error_of(lambda: dist.barrier(group=group)),
            "dispatch": _error_of(lambda: checked_round_trip(g, group=group, device=device)),
        }
    dist.barrier()  # the absent rank waits here for the others' errors
    dist.destroy_process_group(group)
    _default_group_still_works(seed)
    return first, later


OPS = {"set_up": "all_to_all_single", "all_to_all": "all_to_all_single", "async": "all_to_all_single",
       "dispatch": "dispatch", "combine": "combine"}
CASES = [(kind, "option") for kind in OPS] + [("all_to_all", "new_group")]


@pytest.fixture
def pool3():
    return rank_pool(3)


def _check_timeouts(results, kind, timeout_s, absent):
    for rank, (first, later) in enumerate(results):
        if rank == absent:
            continue
        elapsed, kind_name, error = first
        assert kind_name == "DistBackendError", f"rank {rank}: {kind_name}: {error}"
        assert issubclass(dist.DistBackendError, RuntimeError)
        assert elapsed < timeout_s + SLACK_S, f"rank {rank}: raised after {elapsed:.1f} s: {error}"
        assert "timed out" in error or "never arrived" in error, f"rank {rank}: {error}"
        assert OPS[kind] in error, f"rank {rank}: the op is not named: {error}"
        assert f"rank {absent}" in error, f"rank {rank}: the missing peer is not named: {error}"
        assert f"rank {rank}" in error and " ms" in error, f"rank {rank}: no rank or time: {error}"
        for op, (elapsed, kind_name, error) in later.items():
            assert kind_name == "DistBackendError" and elapsed < 1.0, f"rank {rank}, later {op}: {kind_name}: {error}"
            assert error.startswith(f"{op} on rank {rank}: this 'ep' process group takes no more calls"), error
            assert "destroy" in error, error


@pytest.mark.parametrize("kind,source", CASES, ids=lambda v: str(v))
def test_timeout_raises_naming_op_rank_peer_and_time(pool3, kind, source):
    """A peer that never joins: within the timeout every other rank raises a DistBackendError
    (a RuntimeError) naming the op, itself, the missing peer and the time waited; later calls on
    that group, delegated ones included, are refused at once with a clear message."""
    timeout_s, absent = 2, pool3.world_size - 1
    results = pool3.run(rank_timeout, kind, timeout_s, absent, random.randrange(2**30), source)
    _check_timeouts(results, kind, timeout_s, absent)


@needs_cuda
@pytest.mark.parametrize("kind", ["all_to_all", "dispatch", "combine"])
def test_timeout_cuda_refuses_every_later_call(kind):
    """The same on CUDA tensors: once the group's CUDA transport has failed, the group refuses
    every later call, delegated collectives included (the transport's failure closes it)."""
    pool = rank_pool(3, cuda=True)
    timeout_s, absent = 2, pool.world_size - 1
    results = pool.run(rank_timeout, kind, timeout_s, absent, random.randrange(2**30), "option", "cuda")
    _check_timeouts(results, kind, timeout_s, absent)


@needs_cuda
@pytest.mark.parametrize("kind", ["all_to_all", "async"])
def test_timeout_cuda_device_protocol(kind):
    """The same with all_to_all_single on the device protocol: the kernel's bounded wait gives
    up, the check after the call raises naming op, rank, peer and time, and the group refuses
    every later call."""
    pool = rank_pool(3, cuda=True, env={"TORCH_EP_ALL_TO_ALL_DEVICE": "1"})
    timeout_s, absent = 2, pool.world_size - 1
    results = pool.run(rank_timeout, kind, timeout_s, absent, random.randrange(2**30), "option", "cuda")
    _check_timeouts(results, kind, timeout_s, absent)


# ----------------------------------------------------------------------------- abort / shutdown

def rank_abort(seed):
    """Rank 0 aborts a group while its own async all_to_all_single and rank 1's call wait for
    a rank that never comes (the group's timeout is long): both raise at once."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=60)))
    splits = torch.randint(1, 4, (size, size), generator=torch.Generator().manual_seed(seed))
    checked_all_to_all(0, splits, group=group)
    x = torch.ones(size * 2)
    first = later = None
    if rank == 0:
        work = dist.all_to_all_single(torch.empty_like(x), x, group=group, async_op=True)
        time.sleep(0.5)
        assert not work.is_completed()
        group.abort()
        first = _error_of(work.wait)
        later = _error_of(lambda: dist.all_to_all_single(torch.empty_like(x), x, group=group))
    elif rank == 1:
        first = _error_of(lambda: dist.all_to_all_single(torch.empty_like(x), x, group=group))
    dist.barrier()
    dist.destroy_process_group(group)  # works on an aborted group
    _default_group_still_works(seed)
    return first, later


def test_abort_ends_waits_here_and_at_peers(pool3):
    results = pool3.run(rank_abort, random.randrange(2**30))
    (elapsed0, kind0, error0), later = results[0]
    assert kind0 == "DistBackendError" and elapsed0 < SLACK_S and "aborted" in error0, (elapsed0, error0)
    elapsed1, kind1, error1 = results[1][0]
    assert kind1 == "DistBackendError" and elapsed1 < SLACK_S, (elapsed1, error1)
    assert "rank 0 aborted its process group" in error1, error1
    assert later[1] == "DistBackendError" and "takes no more calls: it was aborted" in later[2], later


def rank_abort_kernel_wait(seed):
    """Rank 0 aborts a group while its CUDA all_to_all_single waits on the device for rank 1,
    whose stream is held up by a 5-second kernel: rank 0's wait() raises at once (the abort
    releases the wait), not when rank 1 finally comes."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=60), blocking_wait=True))
    splits = torch.randint(1, 4, (size, size), generator=torch.Generator().manual_seed(seed))
    checked_all_to_all(0, splits, group=group, device="cuda")
    x = torch.ones(size * 2, device="cuda")
    y = torch.empty_like(x)
    first = later = None
    if rank == 1:
        torch.cuda._sleep(int(5 * torch.cuda.get_device_properties(0).clock_rate * 1e3))  # ~5 s
    work = dist.all_to_all_single(y, x, group=group, async_op=True)
    if rank == 0:
        time.sleep(0.5)
        assert not work.is_completed(), "rank 0's all_to_all did not wait for rank 1"
        group.abort()
        first = _error_of(work.wait)
        later = _error_of(lambda: dist.all_reduce(x, group=group))
    torch.cuda.synchronize()  # rank 1: its late copies land before rank 0 lets go of `y`
    dist.barrier()
    dist.destroy_process_group(group)
    _default_group_still_works(seed)
    return first, later


@needs_cuda
def test_abort_releases_a_cuda_kernel_wait():
    pool = rank_pool(2, cuda=True)
    (elapsed, kind, error), later = pool.run(rank_abort_kernel_wait, random.randrange(2**30))[0]
    assert kind == "DistBackendError" and elapsed < 2 and "aborted" in error, (elapsed, kind, error)
    assert later[1] == "DistBackendError" and "takes no more calls: it was aborted" in later[2], later


def _thread_names():
    names = []
    for t in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{t}/comm") as f:
                names.append(f.read().strip())
        except FileNotFoundError:  # the thread ended between the listing and the read
            pass
    return sorted(names)


def _count(names, prefix):
    return sum(n.startswith(prefix) for n in names)


def rank_shutdown(seed):
    """shutdown() (what destroy_process_group calls) refuses later calls, and ends the group's
    threads and its inner Gloo backend's even while Python still holds the group (as a module
    that keeps its group does): threads left to a finalizing interpreter died inside a
    destructor and aborted the process ("terminate called without an active exception")."""
    rank, size = dist.get_rank(), dist.get_world_size()
    gc.collect()  # earlier tests' groups held only by garbage end their threads now, not mid-test
    before = _thread_names()
    group = dist.new_group()
    splits = torch.randint(1, 4, (size, size), generator=torch.Generator().manual_seed(seed))
    checked_all_to_all(0, splits, group=group)
    checked_round_trip(torch.Generator().manual_seed(seed + rank), group=group)
    t = torch.full((4,), float(rank))
    dist.all_reduce(t, op=dist.ReduceOp.AVG, group=group)  # emulated on the worker thread
    assert torch.equal(t, torch.full((4,), (size - 1) / 2))
    during = _thread_names()
    group.shutdown()
    x = torch.ones(size * 2)
    errors = {
        "all_to_all_single": _error_of(lambda: dist.all_to_all_single(torch.empty_like(x), x, group=group)),
        "all_reduce": _error_of(lambda: dist.all_reduce(x, group=group)),
        "dispatch": _error_of(lambda: checked_round_trip(torch.Generator(), group=group)),
    }
    dist.destroy_process_group(group)  # after shutdown(): still fine
    # Ended threads leave the task list a moment after their join on a loaded host: wait up to
    # 5 s for the counts to come back down (a leaked thread never does).
    deadline = time.monotonic() + 5
    while True:
        after = _thread_names()
        if time.monotonic() > deadline or all(_count(after, p) <= _count(before, p)
                                              for p in ("torch_ep_worker", "pt_gloo_runloop")):
            break
        time.sleep(0.05)
    _default_group_still_works(seed)
    return before, during, after, errors


def test_shutdown_refuses_calls_and_ends_threads(pool):
    for before, during, after, errors in pool.run(rank_shutdown, random.randrange(2**30)):
        assert _count(during, "torch_ep_worker") == _count(before, "torch_ep_worker") + 1, during
        assert _count(during, "pt_gloo_runloop") > _count(before, "pt_gloo_runloop"), during
        # At most as many as before: the group's own threads ended (another group's may end too;
        # a CI run saw 4 Gloo loops after against 6 before).
        assert _count(after, "torch_ep_worker") <= _count(before, "torch_ep_worker"), after
        assert _count(after, "pt_gloo_runloop") <= _count(before, "pt_gloo_runloop"), after
        for op, (elapsed, kind, error) in errors.items():
            assert kind == "DistBackendError", (op, kind, error)
            assert "takes no more calls: it was shut down" in error, (op, error)


# ----------------------------------------------------------------------------- disagreement

def rank_disagreeing_splits(seed):
    """Rank 0 expects one row more from rank 1 than rank 1 sends: every rank raises in that call
    (none returns data from a call its peers rejected), and later calls are refused."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group()
    x = torch.randn(size * 2, generator=torch.Generator().manual_seed(seed + rank))
    out_splits = [2] * size
    if rank == 0:
        out_splits[1] = 3
    y = poison_(torch.empty(sum(out_splits)))
    err = _error_of(lambda: dist.all_to_all_single(y, x, out_splits, [2] * size, group=group))
    later = _error_of(lambda: dist.all_to_all_single(torch.empty_like(x), x, group=group))
    dist.barrier()
    dist.destroy_process_group(group)
    _default_group_still_works(seed)
    return err, later


def test_disagreeing_splits_raise_on_every_rank(pool):
    for rank, (err, later) in enumerate(pool.run(rank_disagreeing_splits, random.randrange(2**30))):
        elapsed, kind, error = err
        assert kind == "DistBackendError", f"rank {rank}: {kind}: {error}"
        assert "rank 0 expects 12 bytes from rank 1, but rank 1 sends 8 bytes: the ranks' split sizes disagree" \
            in error, f"rank {rank}: {error}"
        assert elapsed < SLACK_S, f"rank {rank}: took {elapsed:.1f} s"
        assert later[1] == "DistBackendError" and "takes no more calls" in later[2], later
