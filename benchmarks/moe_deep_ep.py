"""DeepEP in benchmarks/moe.py: deep_ep.Buffer itself, the reference measured on the same data
(DeepEP), and torch_ep.deep_ep's Buffer, DeepEP's calls on torch_ep's ops (--api deep_ep|both).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Dict, List, Tuple

import torch
import torch.distributed as dist

from benchmarks import common

if TYPE_CHECKING:
    from benchmarks.moe import Inputs


class DeepEP:
    """DeepEP's intranode Buffer over every rank, or why it cannot be measured (`unavailable`)."""

    def __init__(self, hidden: int, device: torch.device, sharing: int, sync_group):
        self.buffer, self.unavailable = None, None
        if device.type != "cuda":
            self.unavailable = "CPU run"
        elif not dist.is_nccl_available():
            self.unavailable = "no NCCL for its process group"
        elif sharing > 2:
            # Its kernels spin on flags set by peers' kernels; with 4 ranks sharing the H100 under
            # MPS its combine timed out (GPU-NOTES.md): a hang, not a measurement. 2 ranks worked.
            self.unavailable = f"{sharing} ranks share a GPU; DeepEP did not finish beyond 2"
        if self.unavailable:
            return
        problem = None
        try:
            import deep_ep
            self.topk_idx_dtype = getattr(deep_ep, "topk_idx_t", torch.int64)
        except Exception as e:  # noqa: BLE001  any failure to load is reported, not raised
            problem = f"import deep_ep: {type(e).__name__}: {e}"
        self.disable(common.rank_problems(problem, sync_group))
        if self.unavailable:
            return
        # NCCL refuses two ranks on one GPU; DeepEP only exchanges its IPC handles over the group.
        group = dist.new_group(backend="nccl" if sharing == 1 else "gloo")
        problem = None
        try:
            # Buffer size as DeepEP's README sizes it: the larger of its dispatch and combine hints.
            num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden * 2, group.size())
                                for config in (deep_ep.Buffer.get_dispatch_config(group.size()),
                                               deep_ep.Buffer.get_combine_config(group.size())))
            self.buffer = deep_ep.Buffer(group, num_nvl_bytes)
        except Exception as e:  # noqa: BLE001
            problem = f"deep_ep.Buffer: {type(e).__name__}: {e}"
        self.disable(common.rank_problems(problem, sync_group))

    def disable(self, problems: List[str]) -> None:
        if problems:
            self.buffer, self.unavailable = None, "; ".join(problems)

    def ops(self, inputs: Inputs, num_experts: int, recv_rows: int, sync_group) -> Dict[str, Callable[[], object]]:
        """DeepEP's ops on `inputs` (none once unavailable); a first call of each must succeed on
        every rank and receive `recv_rows` rows, as ep did, or DeepEP is dropped from the run."""
        if self.buffer is None:
            return {}
        buffer, x, weights = self.buffer, inputs.x, inputs.topk_weights
        idx = inputs.topk_idx.to(self.topk_idx_dtype)

        def layout_and_dispatch(payload, layout=None):
            per_rank, _, per_expert, in_rank, _ = layout or buffer.get_dispatch_layout(idx, num_experts)
            return buffer.dispatch(payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                   num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights)

        problem, ops = None, {}
        try:
            recv_x, _, _, _, handle, _ = layout_and_dispatch(x)
            layout = buffer.get_dispatch_layout(idx, num_experts)
            ops = {
                "dispatch bf16": lambda: layout_and_dispatch(x),
                "dispatch fp8": lambda: layout_and_dispatch(inputs.x_fp8),
                "dispatch bf16, layout given": lambda: layout_and_dispatch(x, layout),
                "dispatch fp8, layout given": lambda: layout_and_dispatch(inputs.x_fp8, layout),
                "dispatch cached": lambda: buffer.dispatch(x, handle=handle),
                "combine bf16": lambda: buffer.combine(recv_x, handle),
            }
            for op in ops.values():
                op()
            torch.cuda.synchronize()
            if recv_x.shape[0] != recv_rows:
                problem = f"received {recv_x.shape[0]} rows where torch_ep received {recv_rows}"
        except Exception as e:  # noqa: BLE001
            problem = f"{type(e).__name__}: {e}"
        problems = common.rank_problems(problem, sync_group)
        if problems:
            self.disable([f"{inputs.x.shape[0]} tokens: {p}" for p in problems])
            return {}
        return ops


# What each DeepEP-API op returns, by the native result's field names (for the check only: the
# timed calls return DeepEP's tuples as they are, so that no adapter is on the clock).
DEEP_EP_FIELDS = {"recv_x": 0, "recv_topk_idx": 1, "recv_topk_weights": 2, "num_recv_tokens_per_expert": 3,
                  "handle": 4}


def deep_ep_fields(op: str, result) -> object:
    """`result` of `op` through torch_ep.deep_ep's Buffer, its fields named as the native API's."""
    from types import SimpleNamespace
    if op == "combine bf16":
        return SimpleNamespace(combined_x=result[0])
    return SimpleNamespace(**{name: result[i] for name, i in DEEP_EP_FIELDS.items()})


def deep_ep_ops(inputs: Inputs, num_experts: int) -> Tuple[Dict[str, Callable[[], object]], object]:
    """subject_ops through torch_ep.deep_ep's Buffer: each op returns DeepEP's tuple (read it
    with deep_ep_fields). A new route's dispatch returns its per-expert counts as a list, always
    (DeepEP's contract): subject_ops' native dispatches read theirs too, so both do that work."""
    from torch_ep import deep_ep
    buffer = deep_ep.Buffer(dist.group.WORLD)
    x, idx, weights = inputs.x, inputs.topk_idx, inputs.topk_weights

    def dispatch(payload, layout=None):
        per_rank, _, per_expert, in_rank, _ = layout or buffer.get_dispatch_layout(idx, num_experts)
        return buffer.dispatch(payload, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                               num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=weights)

    first, layout = deep_ep_fields("dispatch bf16", dispatch(x)), buffer.get_dispatch_layout(idx, num_experts)
    return {
        "dispatch bf16": lambda: dispatch(x),
        "dispatch fp8": lambda: dispatch(inputs.x_fp8),
        "dispatch bf16, layout given": lambda: dispatch(x, layout),
        "dispatch fp8, layout given": lambda: dispatch(inputs.x_fp8, layout),
        "dispatch cached": lambda: buffer.dispatch(x, handle=first.handle),
        "combine bf16": lambda: buffer.combine(first.recv_x, first.handle),
    }, first
