"""all_to_all_v: the all_to_all of rows whose split sizes are a tensor (issue 16's contract).

The work is done by the torch ops ep::all_to_all_v (allocates the output) and
ep::all_to_all_v_into (fills a given one), backend/ops/all_to_all_v_ops.cpp. This module gives
them their Python signature, autograd (the backward sends each gradient row back to where its
row came from), fake kernels for torch.compile, and async_op.
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _C  # noqa: F401  (registers the ep:: ops)
from .moe import _group, _needs_grad, _run
from .types import AllToAllVResult

__all__ = ["all_to_all_v"]


class _AllToAllV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input, input_splits, output, group_name):
        if output is None:
            out, splits, offsets = torch.ops.ep.all_to_all_v(input, input_splits, group_name)
        else:
            splits, offsets = torch.ops.ep.all_to_all_v_into(input, input_splits, output, group_name)
            ctx.mark_dirty(output)
            out = output
        ctx.mark_non_differentiable(splits, offsets)
        ctx.save_for_backward(splits)
        ctx.group_name, ctx.input_shape = group_name, input.shape
        return out, splits, offsets

    @staticmethod
    def backward(ctx, grad_output, _splits, _offsets):
        (output_splits,) = ctx.saved_tensors
        # The reverse exchange: the rows received from rank s go back to s, which receives them
        # in the order it sent them. All N rows of the input come back (its splits sum to N).
        # Rows of a given output past the received ones are not sent (allow_extra_rows).
        grad_input = grad_output.new_empty(ctx.input_shape)
        torch.ops.ep.all_to_all_v_into(grad_output.contiguous(), output_splits, grad_input, ctx.group_name, True)
        return grad_input, None, None, None


def all_to_all_v(input: torch.Tensor, input_splits: torch.Tensor, *, output: Optional[torch.Tensor] = None,
                 group=None, async_op: bool = False) -> AllToAllVResult:
    """Sends input_splits[d] rows of `input` to each rank d, in rank order, and receives the rows
    every rank sends this one.

    input: [N, *] of any dtype. input_splits: [R] int64 on input's device, summing to N.
    Rows from rank s land at output[output_offsets[s] : output_offsets[s] + output_splits[s]],
    output_offsets being the exclusive cumulative sum of output_splits.

    output: [M, *] with input's dtype and trailing shape, or None. Given, its first rows are
    filled and the rest are left as they were; if more than M rows would arrive, none is
    written and this rank raises (naming output, its capacity and the rows that arrived), while
    the group keeps working. None: an output of exactly the received rows is allocated.

    Differentiable in `input`. With async_op=True, result.work.wait() makes the current stream
    wait for the op (CPU calls are complete when they return).

    On CUDA with `output` given the host does not wait for anything: the splits go from rank to
    rank on the device, the call can be captured in a CUDA graph and replayed with other splits,
    and what only the device sees (an output too small, invalid splits) raises at
    torch_ep.check_errors(),
    or at the next call on the group once that call is queued (so that the ranks stay in step;
    its own results are lost with the exception). (Where the ranks span hosts, the splits are
    read on the host and such problems raise at the call.)
    """
    g = _group(group)
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"input: expected a tensor [N, *], got {type(input).__name__}")
    if not isinstance(input_splits, torch.Tensor):
        raise TypeError(f"input_splits: expected an int64 tensor [R] on input's device, got "
                        f"{type(input_splits).__name__}")
    if output is not None and not isinstance(output, torch.Tensor):
        raise TypeError(f"output: expected a tensor [M, *] or None, got {type(output).__name__}")

    if _needs_grad(input):
        def call():
            return _AllToAllV.apply(input, input_splits, output, g.group_name)
    elif output is None:
        def call():
            return torch.ops.ep.all_to_all_v(input, input_splits, g.group_name)
    else:
        def call():
            return (output, *torch.ops.ep.all_to_all_v_into(input, input_splits, output, g.group_name))

    (out, splits, offsets), work = _run(call, [input, input_splits, output], async_op)
    return AllToAllVResult(out, splits, offsets, work)


# ------------------------------------------------------------------------------- fake kernels

def _group_size(group_name: str) -> int:
    import torch.distributed as dist
    return dist.distributed_c10d._resolve_process_group(group_name).size()


@torch.library.register_fake("ep::all_to_all_v")
def _all_to_all_v_fake(input, input_splits, group_name):
    rows = torch.library.get_ctx().new_dynamic_size()  # the rows that arrive: data-dependent
    r = _group_size(group_name)
    return (input.new_empty(rows, *input.shape[1:]), input_splits.new_empty(r), input_splits.new_empty(r))


@torch.library.register_fake("ep::all_to_all_v_into")
def _all_to_all_v_into_fake(input, input_splits, output, group_name, allow_extra_rows=False):
    r = _group_size(group_name)
    return input_splits.new_empty(r), input_splits.new_empty(r)
