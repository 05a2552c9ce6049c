"""torch_ep: expert-parallel communication for PyTorch.

``import torch_ep`` registers the torch.distributed backend "ep"; then
``dist.init_process_group(backend="ep")`` gives a group whose all_to_all runs on torch_ep's own
transports and whose other collectives delegate to Gloo or NCCL.
"""
import torch
import torch.distributed as dist

from . import _C
from ._backend import BACKEND_NAME, get_backend, register
from .all_to_all import all_to_all_v
from .comm_pool import comm_pool
from .errors import check_errors
from .low_latency import low_latency_combine, low_latency_combine_buffer, low_latency_dispatch
from .moe import MoEWork, combine, combine_buffer, dispatch, dispatch_buffer, get_dispatch_layout
from .options import Options
from .types import (AllToAllVResult, CombineResult, DispatchHandle, DispatchLayout, DispatchResult, LowLatencyCombineResult,
                    LowLatencyDispatchResult, LowLatencyHandle)

register()

__all__ = ["BACKEND_NAME", "Options", "get_backend", "check_errors", "get_dispatch_layout", "dispatch", "combine",
           "combine_buffer", "dispatch_buffer", "MoEWork",
           "DispatchLayout", "DispatchHandle", "DispatchResult", "CombineResult", "low_latency_dispatch",
           "low_latency_combine", "low_latency_combine_buffer", "LowLatencyHandle", "LowLatencyDispatchResult",
           "LowLatencyCombineResult", "all_to_all_v", "AllToAllVResult", "comm_pool"]
