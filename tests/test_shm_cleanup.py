"""The shared-memory transport leaves nothing in /dev/shm, even when a rank is SIGKILLed, and a
rank whose peer died gets an error within the group's timeout instead of hanging.

These tests kill ranks, so they use a RankPool of their own (not the shared one), and bound
every wait. Other runs on this machine may hold torch_ep_* names while they set up: a name
counts as ours unless its creator pid (the name is torch_ep_<hex pid>_<random>_<rank>) is a live
process that is not one of our ranks.
"""
import os
import time

import pytest
import torch

from torch_ep.testing import RankPool

WAIT_S = 60  # bound on any single step (process start-up on a busy 2-core machine included)


# ----------------------------------------------------------------------------- /dev/shm


def shm_names():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("torch_ep_")) if os.path.isdir("/dev/shm") else []


def creator_pid(name):
    try:
        return int(name.split("_")[2], 16)
    except (IndexError, ValueError):
        return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def leaked(names, before, our_pids):
    """Names in `names` that were not there `before` and that no live foreign process is setting up."""
    def foreign_and_live(n):
        pid = creator_pid(n)
        return pid is not None and pid not in our_pids and pid_alive(pid)
    return sorted(n for n in names if n not in before and not foreign_and_live(n))


pytestmark = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="needs /dev/shm")


# ----------------------------------------------------------------------------- rank side


def checked_all_to_all(seed):
    """An uneven all_to_all_single, compared with the reference (which runs over Gloo)."""
    import torch.distributed as dist

    from torch_ep import reference
    from torch_ep.testing import poison_, same_bits

    rank, size = dist.get_rank(), dist.get_world_size()
    splits = torch.randint(1, 6, (size, size), generator=torch.Generator().manual_seed(seed))
    in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
    x = torch.randn(sum(in_splits), 16, generator=torch.Generator().manual_seed(seed + rank))
    y = poison_(torch.empty(sum(out_splits), 16))
    dist.all_to_all_single(y, x, out_splits, in_splits)
    assert same_bits(y, reference.all_to_all_single(y.shape, x, out_splits, in_splits))
    return True


def subgroup_round(seed):
    """A second group with its own segments: created, used, destroyed."""
    import torch.distributed as dist

    import torch_ep

    group = dist.new_group(pg_options=torch_ep.Options(host_slot_bytes=256, host_num_slots=2))
    x = torch.randn(dist.get_world_size() * 40, 9, generator=torch.Generator().manual_seed(seed))
    y = torch.empty_like(x)
    dist.all_to_all_single(y, x, group=group)
    assert torch_ep.get_backend(group).host_path == "shm"
    dist.destroy_process_group(group)
    return True


def barrier_then_list_shm():
    import torch.distributed as dist

    dist.barrier()
    return shm_names()


def timed_all_to_all():
    """A plain all_to_all_single (no reference: a peer may be dead); (seconds, error text or None)."""
    import torch.distributed as dist

    size = dist.get_world_size()
    x = torch.randn(size * 4, 8)
    y = torch.empty_like(x)
    start = time.monotonic()
    try:
        dist.all_to_all_single(y, x)
    except Exception as e:  # noqa: BLE001 - the test inspects whatever was raised
        return time.monotonic() - start, f"{type(e).__name__}: {e}"
    return time.monotonic() - start, None


# ----------------------------------------------------------------------------- test side


def start_ranks(world_size, env=None):
    """Ranks of their own (not the shared pool: these tests kill them); every wait is bounded."""
    return RankPool(world_size, env={"OMP_NUM_THREADS": "1", **(env or {})}, timeout_s=WAIT_S)


def run(ranks, name, *args, on=None):
    on = range(ranks.world_size) if on is None else on
    out = ranks.run_on(on, globals()[name], *args, timeout_s=WAIT_S)
    return [out[r] for r in on]


def test_no_segments_left_after_normal_use():
    """After all_to_all_single (default group and a sub-group), names are already gone; after
    destroy_process_group and a clean exit, nothing is left either."""
    before = set(shm_names())
    ranks = start_ranks(3)
    try:
        seed = int(torch.randint(0, 2**30, ()).item())
        assert run(ranks, "checked_all_to_all", seed) == [True] * 3
        assert run(ranks, "subgroup_round", seed) == [True] * 3
        assert run(ranks, "checked_all_to_all", seed + 1) == [True] * 3
        listing = run(ranks, "barrier_then_list_shm")[0]
        assert leaked(listing, before, ranks.pids) == [], "names still linked after set-up finished"
    finally:
        exit_codes = ranks.close()
    assert exit_codes == [0, 0, 0]
    assert leaked(shm_names(), before, ranks.pids) == []


def test_no_segments_left_after_sigkill():
    """A rank SIGKILLed after the transport is set up, then the others SIGKILLed by the test (as a
    job scheduler would): /dev/shm holds no torch_ep_* name of ours."""
    before = set(shm_names())
    ranks = start_ranks(3)
    try:
        seed = int(torch.randint(0, 2**30, ()).item())
        assert run(ranks, "checked_all_to_all", seed) == [True] * 3
        assert run(ranks, "subgroup_round", seed) == [True] * 3
        for r in range(3):
            ranks.kill(r)
    finally:
        ranks.close()
    assert leaked(shm_names(), before, ranks.pids) == []


def check_survivor_errors(outcomes, survivors, timeout_s, dead=1):
    for rank, (elapsed, error) in zip(survivors, outcomes):
        assert error is not None, f"rank {rank}: all_to_all_single succeeded although rank {dead} is dead"
        assert elapsed < timeout_s + 5, f"rank {rank}: the error took {elapsed:.1f} s (timeout {timeout_s} s)"
        assert "all_to_all_single" in error, f"rank {rank}: the error does not name the op: {error}"
        assert f"rank {dead}" in error, f"rank {rank}: the error does not name the dead peer: {error}"


def test_survivor_gets_error_naming_dead_peer():
    """With TORCH_EP_TIMEOUT_S=3, all_to_all_single on a rank whose peer was SIGKILLed raises within
    the timeout (plus slack), naming the op and the dead rank, instead of hanging; later calls fail
    at once, and the survivors can still destroy the group and exit."""
    timeout_s = 3
    survivors = [0, 2]
    ranks = start_ranks(3, env={"TORCH_EP_TIMEOUT_S": str(timeout_s)})
    try:
        seed = int(torch.randint(0, 2**30, ()).item())
        assert run(ranks, "checked_all_to_all", seed) == [True] * 3
        ranks.kill(1)
        check_survivor_errors(run(ranks, "timed_all_to_all", on=survivors), survivors, timeout_s)
        for rank, (elapsed, error) in zip(survivors, run(ranks, "timed_all_to_all", on=survivors)):
            assert error is not None and elapsed < 1.0, f"rank {rank}: second call after the error: {elapsed:.1f} s, {error}"
    finally:
        exit_codes = ranks.close()
    # destroy_process_group returned on the survivors, and they exited cleanly.
    assert exit_codes == [0, -9, 0]


def test_survivor_gets_error_naming_peer_that_died_before_set_up():
    """A peer SIGKILLed before any all_to_all_single: the survivors' first all_to_all_single (which sets
    up the transport) raises within the timeout, naming the op and the dead rank."""
    timeout_s = 3
    survivors = [0, 2]
    before = set(shm_names())
    ranks = start_ranks(3, env={"TORCH_EP_TIMEOUT_S": str(timeout_s)})
    try:
        ranks.kill(1)
        outcomes = run(ranks, "timed_all_to_all", on=survivors)
        assert leaked(shm_names(), before, ranks.pids) == [], "a failed set-up left names behind"
    finally:
        exit_codes = ranks.close()
    assert exit_codes == [0, -9, 0]
    check_survivor_errors(outcomes, survivors, timeout_s)


# ----------------------------------------------------------------------------- the test process dies

# A test process with two ranks that are busy (neither reads its pipe for two minutes).
_BUSY_POOL = """
import time
from torch_ep.testing import RankPool
pool = RankPool(2, env={"OMP_NUM_THREADS": "1"}, timeout_s=60)
pool.start(range(2), time.sleep, 120)
print(*pool.pids, flush=True)
time.sleep(120)
"""


def running(pid):
    """Alive and not a zombie (an orphan's new parent may be slow to reap it, or never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="needs /proc (Linux)")
def test_busy_ranks_die_with_the_test_process():
    """The test process SIGKILLed while its ranks run a task (as `timeout` ends a GPU suite):
    the ranks die with it at once, not after their task, so the next job finds the GPU free."""
    import select
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _BUSY_POOL], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_S + 60)
        assert ready, "the busy pool did not start"
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and all(running(p) for p in pids), pids
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while any(running(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if running(p)], f"ranks {pids} outlived their test process by 10 s"
