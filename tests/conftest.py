import os
import shutil
import time

import pytest

from torch_ep.testing import RankPool

_pools = {}  # oldest use first: CUDA pools past the budget below close in that order

# Ranks alive on the GPUs at once. MPS serves a bounded number of clients per GPU (48 on Hopper),
# and each distinct env of a test file starts a pool of its own; past the limit a new rank's
# set_device fails with "busy or unavailable".
MAX_CUDA_RANKS = int(os.environ.get("TORCH_EP_TEST_MAX_CUDA_RANKS", "24"))


def rank_pool(world_size: int, cuda: bool = False, env=None) -> RankPool:
    """A pool of `world_size` ranks on the "ep" backend, shared by the tests of a session that
    ask for the same `env` (extra environment variables of the ranks).
    CUDA pools bind rank r to GPU r % device_count; ranks sharing a GPU split it under MPS."""
    extra = dict(env or {})
    key = (world_size, cuda, tuple(sorted(extra.items())))
    pool = _pools.pop(key, None)
    if pool is not None and pool.broken:
        pool.close()
        pool = None
    if pool is None and cuda:
        _close_oldest_cuda_pools(room_for=world_size)
    if pool is not None:
        _pools[key] = pool  # now the latest used
    else:
        env = {"TORCH_EP_TIMEOUT_S": "60", **extra}
        if cuda:
            import torch

            sharing = -(-world_size // max(torch.cuda.device_count(), 1))
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // sharing)
        pool = _pools[key] = RankPool(world_size, env=env, cuda=cuda)
    return pool


def _close_oldest_cuda_pools(room_for: int) -> None:
    live = [(key, p) for key, p in _pools.items() if key[1]]
    alive = sum(key[0] for key, _ in live)
    for key, p in live:
        if alive + room_for <= MAX_CUDA_RANKS:
            break
        p.close()
        del _pools[key]
        alive -= key[0]


def cuda_world_sizes():
    """GPU test topologies: TORCH_EP_TEST_WORLD_SIZES (the GPU suite sets 1,2,4,8), else 2."""
    return [int(n) for n in os.environ.get("TORCH_EP_TEST_WORLD_SIZES", "2").split(",")]


@pytest.fixture(params=[2, 3, 4], ids=lambda n: f"{n}ranks")
def pool(request):
    return rank_pool(request.param)


@pytest.fixture
def pool4():
    return rank_pool(4)


def pytest_sessionfinish(session, exitstatus):
    for p in _pools.values():
        p.close()
    _pools.clear()


def shm_segments():
    """torch_ep's segments visible in /dev/shm (names exist only during set-up)."""
    if not os.path.isdir("/dev/shm"):
        return []
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("torch_ep_"))


has_nvcc = shutil.which("nvcc") is not None


def assert_nothing_spins(seconds: float = 1.0, share: float = 0.3):
    """Fails if a thread of this process uses more than `share` of a core over `seconds` of idling
    (/proc/self/task's utime + stime; its device work done first where CUDA is up). A rank between
    calls should have none: a thread that spins takes a core from the ranks sharing the host's."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    busy = _busy_threads(seconds, share)
    rank = dist.get_rank() if dist.is_initialized() else 0
    assert not busy, f"rank {rank}: threads busy while the rank idles (CPU seconds in {seconds} s): {busy}"


def _busy_threads(seconds, share):
    def cpu_seconds():
        ticks, found = os.sysconf("SC_CLK_TCK"), {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    stat = f.read()
                with open(f"/proc/self/task/{tid}/comm") as f:
                    name = f.read().strip()
            except OSError:
                continue  # the thread ended meanwhile
            fields = stat[stat.rindex(")") + 2:].split()  # from the state on: utime, stime are 11, 12
            found[tid] = (f"{name} ({tid})", (int(fields[11]) + int(fields[12])) / ticks)
        return found

    before = cpu_seconds()
    time.sleep(seconds)
    after = cpu_seconds()
    return {name: round(used - before[tid][1], 2) for tid, (name, used) in after.items()
            if tid in before and used - before[tid][1] > share * seconds}
