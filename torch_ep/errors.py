"""One check for what the device reported, for every op of a group (torch_ep.check_errors).

CUDA kernels that find a problem after their call returned (a dispatch receiving more rows than
num_worst_tokens, a low-latency call over its capacity, a wait for a peer that gave up) write it
to host-mapped memory; the host raises it at its next call on the group, or here.
"""
from __future__ import annotations

import torch.distributed as dist

from . import _C
from ._backend import get_backend

__all__ = ["check_errors"]


def check_errors(group=None) -> None:
    """Raises what the group's ops reported since the last check, on this rank:

    - DistBackendError (a RuntimeError): the group takes no more calls (a timeout, a dead peer,
      abort), or a kernel gave up waiting for a peer: a CUDA all_to_all_single, all_to_all_v,
      dispatch or combine (once the caller has synchronised, this check finds it at once), or a
      low-latency op (low_latency.check_errors).
    - ValueError: a CUDA all_to_all_single whose ranks' split sizes disagree (the device found it;
      nothing moved on any rank), or an all_to_all_v into a given output that overflowed it.
    - ValueError: a CUDA dispatch received more rows than num_worst_tokens, naming it: "dispatch
      #<call number>: rank <r> received <rows> rows, more than num_worst_tokens=<n>". Its outputs
      hold the first n rows; combines along its handle (and its backward) leave the others out.
      This is the caller's input, not a broken transport: the kernel completed its handshake, no
      memory outside the outputs was touched, and the group stays usable. Without this check the
      error is raised on every rank by the group's next dispatch or combine that finds it (the
      next one after the overflowing kernel finished).
    - A pushing CUDA dispatch with device records (Options.moe_device_records) whose kernels found
      the ranks' calls disagreeing (RuntimeError: a checked field, out-of-step calls, another
      handle) or bad input (ValueError: expert ids out of range, a pool that could not hold a
      rank's outputs, more rows than num_worst_tokens): "... found by the device during an earlier
      dispatch (#<n>), which does not wait for it: ...", on every rank. Without this check it raises
      at the rank's next CUDA dispatch or combine, once that call is queued. These are
      asynchronous like CUDA errors: the first problem is described, later ones until it is raised
      only counted ("<k> later dispatches also went wrong ... the last #<m>"); to tie them to a
      step, call torch.cuda.synchronize() then check_errors() at a fixed point on every rank.
    - The low-latency ops' kernel errors (more rows than the capacity, an expert id out of range),
      as torch_ep.low_latency.check_errors raises them.
    - all_to_all_v into a given output on CUDA: RuntimeError when more rows arrived than the
      output holds (none was written), ValueError when some rank's input_splits were invalid
      (nothing moved). Without this check they raise at the rank's next all_to_all_v, once that
      call is queued.

    It reads what finished kernels wrote: call it after a synchronize, or between replays of a
    CUDA graph (replays run no host code, so nothing else raises). A graph replay reports the call
    number of the captured dispatch. CPU ops raise at once and leave nothing here.
    """
    group = group or dist.group.WORLD
    if group is None:
        raise RuntimeError("torch_ep: no default process group; call dist.init_process_group(backend='ep') first")
    get_backend(group).check_errors()
    _C._ll_check_errors(group.group_name)
