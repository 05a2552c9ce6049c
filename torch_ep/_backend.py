"""The creator torch.distributed calls for every group whose backend is "ep"."""
from __future__ import annotations

import os
from collections import Counter
from datetime import timedelta

import torch
import torch.distributed as dist

from . import _C, sm_table
from .options import Options

_GLOO_CONNECT_TIMEOUT = timedelta(minutes=1)

BACKEND_NAME = "ep"


def _ranks_per_gpu(store: dist.Store, rank: int, size: int) -> int:
    """The most ranks of the group that drive one GPU (1 when each has its own; NCCL refuses more)."""
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    store.set(f"ep/gpu/{rank}", uuid)
    uuids = [store.get(f"ep/gpu/{r}").decode() for r in range(size)]
    return max(Counter(uuids).values())


def _launch_local_world_size(group_size: int) -> int:
    """torchrun's LOCAL_WORLD_SIZE (ranks per node of the launch) where this group is the whole
    launch, else 0: a subgroup's ranks are not the launch's blocks."""
    try:
        local, world = int(os.environ["LOCAL_WORLD_SIZE"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        return 0
    return local if world == group_size and local > 0 else 0


def create_backend(dist_opts, pg_options) -> _C.ProcessGroupEP:
    if pg_options is None:
        options = Options()
    elif isinstance(pg_options, Options):
        options = pg_options
    else:
        raise TypeError(f"pg_options for backend 'ep' must be a torch_ep.Options, got {type(pg_options).__name__}")
    store, rank, size = dist_opts.store, dist_opts.group_rank, dist_opts.group_size
    config = options._to_config(dist_opts.timeout)
    config.launch_local_world_size = _launch_local_world_size(size)

    # Gloo connects its pairs within its timeout: a short op timeout (TORCH_EP_TIMEOUT_S=3 in the
    # fault tests) must not fail a group whose ranks start a few seconds apart on a loaded host,
    # so it connects within at least a minute and then takes the op timeout.
    connect = max(config.timeout, _GLOO_CONNECT_TIMEOUT)
    cpu_backend = dist.ProcessGroupGloo(dist.PrefixStore("gloo/", store), rank, size, connect)
    if connect != config.timeout and hasattr(cpu_backend, "_set_default_timeout"):
        cpu_backend._set_default_timeout(config.timeout)
    cuda_backend = None
    if torch.cuda.is_available():
        ranks_per_gpu = _ranks_per_gpu(store, rank, size)
        sm_table.apply(config, options.num_sms, torch.cuda.get_device_name(), size, ranks_per_gpu,
                       copy=options.moe_copy)
        if ranks_per_gpu > 1 or not dist.is_nccl_available():
            cuda_backend = cpu_backend  # Gloo moves CUDA tensors through the host
        else:
            nccl_options = dist.ProcessGroupNCCL.Options()
            nccl_options._timeout = config.timeout
            cuda_backend = dist.ProcessGroupNCCL(dist.PrefixStore("nccl/", store), rank, size, nccl_options)
    backend = _C.ProcessGroupEP(store, rank, size, config, cpu_backend, cuda_backend)
    # No rank leaves the group's creation before every rank's inner backends are connected: a
    # rank that destroyed the group at once (shutdown releases them) would otherwise close the
    # Gloo pairs a slower peer is still connecting.
    store.set(f"ep/created/{rank}", "1")
    store.wait([f"ep/created/{r}" for r in range(size)], config.timeout)
    return backend


def register() -> None:
    if BACKEND_NAME.upper() not in dist.Backend._plugins:
        dist.Backend.register_backend(BACKEND_NAME, create_backend, extended_api=True, devices=["cpu", "cuda"])


def get_backend(group=None) -> _C.ProcessGroupEP:
    """The ProcessGroupEP behind `group` (default: the default group)."""
    group = group or dist.group.WORLD
    if group is None:
        raise RuntimeError("torch_ep: no default process group; call dist.init_process_group(backend='ep') first")
    backend = group._get_backend(torch.device("cpu"))
    if not isinstance(backend, _C.ProcessGroupEP):
        raise ValueError(f"group: expected a group whose backend is 'ep', got {dist.get_backend(group)!r}")
    return backend
