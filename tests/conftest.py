import os
import shutil

import pytest

from torch_ep.testing import RankPool

_pools = {}


def rank_pool(world_size: int, cuda: bool = False, env=None) -> RankPool:
    """A pool of `world_size` ranks on the "ep" backend, shared by the tests of a session that
    ask for the same `env` (extra environment variables of the ranks).
    CUDA pools bind rank r to GPU r % device_count; ranks sharing a GPU split it under MPS."""
    extra = dict(env or {})
    key = (world_size, cuda, tuple(sorted(extra.items())))
    pool = _pools.get(key)
    if pool is None or pool.broken:
        if pool is not None:
            pool.close()
        env = {"TORCH_EP_TIMEOUT_S": "60", **extra}
        if cuda:
            import torch

            sharing = -(-world_size // max(torch.cuda.device_count(), 1))
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(100 // sharing)
        pool = _pools[key] = RankPool(world_size, env=env, cuda=cuda)
    return pool


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
