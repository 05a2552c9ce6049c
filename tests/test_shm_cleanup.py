"""The shared-memory transport leaves nothing in /dev/shm, even when a rank is SIGKILLed, and a
rank whose peer died gets an error within the group's timeout instead of hanging.

These tests kill ranks, so they use their own processes (not the shared RankPool), and bound
every wait. Other runs on this machine may hold torch_ep_* names while they set up: a name
counts as ours unless its creator pid (the name is torch_ep_<hex pid>_<random>_<rank>) is a live
process that is not one of our ranks.
"""
import multiprocessing as mp
import os
import queue
import signal
import time
import traceback
from datetime import timedelta

import pytest
import torch

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


def rank_main(rank, world_size, init_file, env, commands, results):
    os.environ.update(env)
    try:
        import torch.distributed as dist

        import torch_ep  # noqa: F401  registers "ep"

        torch.set_num_threads(1)
        dist.init_process_group("ep", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=WAIT_S))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, "ready"))
    while True:
        command = commands.get()
        if command is None:
            dist.destroy_process_group()
            results.put((rank, True, "destroyed"))
            return
        name, args = command
        try:
            results.put((rank, True, globals()[name](*args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))


# ----------------------------------------------------------------------------- test side


class Ranks:
    """`world_size` spawned ranks in one "ep" group, driven by commands; every wait is bounded."""

    def __init__(self, world_size, tmp_path, env=None):
        ctx = mp.get_context("spawn")
        self.world_size = world_size
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world_size)]
        env = {"OMP_NUM_THREADS": "1", **(env or {})}
        self.procs = [ctx.Process(target=rank_main, daemon=True,
                                  args=(r, world_size, str(tmp_path / "init"), env, self.commands[r], self.results))
                      for r in range(world_size)]
        for p in self.procs:
            p.start()
        self.pids = {p.pid for p in self.procs}
        self.collect(range(world_size), "process group initialisation")

    def collect(self, ranks, what):
        ranks = list(ranks)
        out, errors = {}, {}
        deadline = time.monotonic() + WAIT_S
        while len(out) + len(errors) < len(ranks):
            try:
                rank, ok, value = self.results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"{what}: no answer within {WAIT_S} s from ranks "
                                     f"{sorted(set(ranks) - set(out) - set(errors))}") from None
            (out if ok else errors)[rank] = value
        assert not errors, f"{what} failed:\n" + "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in errors.items())
        return [out[r] for r in ranks]

    def run(self, name, *args, ranks=None):
        ranks = range(self.world_size) if ranks is None else ranks
        for r in ranks:
            self.commands[r].put((name, args))
        return self.collect(ranks, name)

    def destroy_and_join(self):
        for q in self.commands:
            q.put(None)
        self.collect(range(self.world_size), "destroy_process_group")
        for p in self.procs:
            p.join(timeout=WAIT_S)
        return [p.exitcode for p in self.procs]

    def sigkill(self, rank):
        os.kill(self.procs[rank].pid, signal.SIGKILL)
        self.procs[rank].join(timeout=WAIT_S)
        assert self.procs[rank].exitcode == -signal.SIGKILL

    def kill_all(self):
        for p in self.procs:
            if p.is_alive():
                p.kill()
        for p in self.procs:
            p.join(timeout=WAIT_S)


def test_no_segments_left_after_normal_use(tmp_path):
    """After all_to_all_single (default group and a sub-group), names are already gone; after
    destroy_process_group and a clean exit, nothing is left either."""
    before = set(shm_names())
    ranks = Ranks(3, tmp_path)
    try:
        seed = int(torch.randint(0, 2**30, ()).item())
        assert ranks.run("checked_all_to_all", seed) == [True] * 3
        assert ranks.run("subgroup_round", seed) == [True] * 3
        assert ranks.run("checked_all_to_all", seed + 1) == [True] * 3
        listing = ranks.run("barrier_then_list_shm")[0]
        assert leaked(listing, before, ranks.pids) == [], "names still linked after set-up finished"
        assert ranks.destroy_and_join() == [0, 0, 0]
    finally:
        ranks.kill_all()
    assert leaked(shm_names(), before, ranks.pids) == []


def test_no_segments_left_after_sigkill(tmp_path):
    """A rank SIGKILLed after the transport is set up, then the others SIGKILLed by the test (as a
    job scheduler would): /dev/shm holds no torch_ep_* name of ours."""
    before = set(shm_names())
    ranks = Ranks(3, tmp_path)
    try:
        seed = int(torch.randint(0, 2**30, ()).item())
        assert ranks.run("checked_all_to_all", seed) == [True] * 3
        assert ranks.run("subgroup_round", seed) == [True] * 3
        ranks.sigkill(1)
    finally:
        ranks.kill_all()
    assert leaked(shm_names(), before, ranks.pids) == []


def check_survivor_errors(outcomes, survivors, timeout_s, dead=1):
    for rank, (elapsed, error) in zip(survivors, outcomes):
        assert error is not None, f"rank {rank}: all_to_all_single succeeded although rank {dead} is dead"
        assert elapsed < timeout_s + 5, f"rank {rank}: the error took {elapsed:.1f} s (timeout {timeout_s} s)"
        assert "all_to_all_single" in error, f"rank {rank}: the error does not name the op: {error}"
        assert f"rank {dead}" in error, f"rank {rank}: the error does not name the dead peer: {error}"


def finish_survivors(ranks, survivors):
    """destroy_process_group on the survivors returns, and they exit cleanly."""
    for r in survivors:
        ranks.commands[r].put(None)
    assert ranks.collect(survivors, "destroy_process_group after a peer died") == ["destroyed"] * len(survivors)
    for r in survivors:
        ranks.procs[r].join(timeout=WAIT_S)
    assert [ranks.procs[r].exitcode for r in survivors] == [0] * len(survivors)


def test_survivor_gets_error_naming_dead_peer(tmp_path):
    """With TORCH_EP_TIMEOUT_S=3, all_to_all_single on a rank whose peer was SIGKILLed raises within
    the timeout (plus slack), naming the op and the dead rank, instead of hanging; later calls fail
    at once, and the survivors can still destroy the group and exit."""
    timeout_s = 3
    survivors = [0, 2]
    ranks = Ranks(3, tmp_path, env={"TORCH_EP_TIMEOUT_S": str(timeout_s)})
    try:
        seed = int(torch.randint(0, 2**30, ()).item())
        assert ranks.run("checked_all_to_all", seed) == [True] * 3
        ranks.sigkill(1)
        check_survivor_errors(ranks.run("timed_all_to_all", ranks=survivors), survivors, timeout_s)
        for rank, (elapsed, error) in zip(survivors, ranks.run("timed_all_to_all", ranks=survivors)):
            assert error is not None and elapsed < 1.0, f"rank {rank}: second call after the error: {elapsed:.1f} s, {error}"
        finish_survivors(ranks, survivors)
    finally:
        ranks.kill_all()


def test_survivor_gets_error_naming_peer_that_died_before_set_up(tmp_path):
    """A peer SIGKILLed before any all_to_all_single: the survivors' first all_to_all_single (which sets
    up the transport) raises within the timeout, naming the op and the dead rank."""
    timeout_s = 3
    survivors = [0, 2]
    before = set(shm_names())
    ranks = Ranks(3, tmp_path, env={"TORCH_EP_TIMEOUT_S": str(timeout_s)})
    try:
        ranks.sigkill(1)
        outcomes = ranks.run("timed_all_to_all", ranks=survivors)
        assert leaked(shm_names(), before, ranks.pids) == [], "a failed set-up left names behind"
        finish_survivors(ranks, survivors)
        check_survivor_errors(outcomes, survivors, timeout_s)
    finally:
        ranks.kill_all()
