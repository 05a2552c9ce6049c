import os
import shutil

import pytest

from torch_ep.testing import RankPool

_pools = {}


def rank_pool(world_size: int) -> RankPool:
    """A pool of `world_size` ranks on the "ep" backend, shared by the tests of a session."""
    pool = _pools.get(world_size)
    if pool is None or pool.broken:
        if pool is not None:
            pool.close()
        pool = _pools[world_size] = RankPool(world_size, env={"TORCH_EP_TIMEOUT_S": "60"})
    return pool


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
