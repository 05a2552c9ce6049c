"""Result and handle types of the MoE ops and all_to_all_v (shared by the real ops and torch_ep.reference).

Named fields rather than positional tuples: downstream code keeps and passes handles around.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch

# x as dispatch takes it: [N, H] bf16/fp16/fp32, or (x_fp8 [N, H] float8_e4m3fn,
# scales [N, ceil(H/128)] float32), sent as is.
Payload = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DispatchLayout:
    num_tokens_per_rank: torch.Tensor    # [R] int32: tokens going to each rank (once per rank)
    num_tokens_per_expert: torch.Tensor  # [E] int32: token-expert pairs per global expert
    is_token_in_rank: torch.Tensor       # [N, R] bool
    # The routing table behind these (backend/kernels/moe_meta.hpp): given to dispatch(layout=),
    # it spares dispatch its own layout step. None from torch_ep.reference.
    meta: Optional[torch.Tensor] = None
    # On CUDA, the table's header (the sizes) in pinned host memory, written there by the layout
    # kernel with a ready flag per rank (MetaLayout::host_header_size): dispatch(layout=) reads
    # its sizes there instead of waiting for the stream.
    header: Optional[torch.Tensor] = field(default=None, repr=False)


FP8_BLOCK = 128  # channels per fp8 scale (the fp8 payload's scales are [N, ceil(hidden / FP8_BLOCK)])
MAX_MATRIX_RANKS = 32  # kMaxMatrixRanks of backend/ops/moe_protocol.hpp (tests/test_moe.py checks it)


def send_matrix_size(num_ranks: int) -> int:
    """Entries of the send matrix in a handle's counts (backend/ops/moe_ops.hpp, HandleCounts)."""
    return num_ranks * num_ranks if num_ranks <= MAX_MATRIX_RANKS else 0


@dataclass
class DispatchHandle:
    """A dispatch's route, for combine and for re-dispatching along it (dispatch(handle=...)).

    `meta` is the routing table on the op's device (layout in backend/kernels/moe_meta.hpp);
    `counts` a CPU int64 vector: [dispatch id, num_worst_tokens, rows sent to each rank (R),
    rows received from each rank (R), received tokens per local expert (E/R), and in groups of
    up to 32 ranks the send matrix (R x R: rows rank s sent rank j), which every rank learns from
    the records the dispatch exchanges anyway]; -1 where only the device knows (a CUDA dispatch
    with num_worst_tokens, or the device route across nodes). A dispatch routed across nodes
    appends its relay state (backend/ops/moe_internode.hpp, InternodeRoute).
    """
    group_name: str
    num_ranks: int
    num_experts: int
    num_tokens: int      # N: tokens this rank dispatched
    meta: torch.Tensor
    counts: torch.Tensor
    num_worst_tokens: int = 0  # > 0: the dispatch's outputs had this many rows
    hidden: int = 0            # H of the dispatch's x (combine_buffer's default)

    @property
    def dispatch_id(self) -> int:
        return int(self.counts[0])

    @property
    def send_counts(self) -> List[int]:
        return self.counts[2:2 + self.num_ranks].tolist()

    @property
    def recv_counts(self) -> List[int]:
        r = self.num_ranks
        return self.counts[2 + r:2 + 2 * r].tolist()

    @property
    def _per_expert_start(self) -> int:
        return 2 + 2 * self.num_ranks

    @property
    def _matrix_start(self) -> int:
        return self._per_expert_start + self.num_experts // self.num_ranks

    @property
    def num_recv_tokens_per_expert(self) -> List[int]:
        """Unpadded: tokens received for each local expert."""
        return self.counts[self._per_expert_start:self._matrix_start].tolist()

    @property
    def send_matrix(self) -> Optional[torch.Tensor]:
        """[R, R] int64 CPU: rows rank s sent rank j at [s, j]; None where the handle does not
        hold it (groups of more than 32 ranks, or sizes only the device knows)."""
        r = self.num_ranks
        matrix = self.counts[self._matrix_start:self._matrix_start + send_matrix_size(r)]
        if matrix.numel() == 0 or bool((matrix < 0).any()):
            return None
        return matrix.view(r, r)

    @property
    def internode(self) -> bool:
        """True when the dispatch took the hierarchical route across nodes."""
        return self.counts.numel() > self._matrix_start + send_matrix_size(self.num_ranks)


def pad_counts(counts: List[int], alignment: int) -> List[int]:
    """Each count rounded up to a multiple of `alignment`, -1 (a count only the device knows) left
    as is; branch-free, so that a data-dependent count needs no guard under torch.compile."""
    if alignment == 1:
        return counts
    return [-(-n // alignment) * alignment - torch.sym_max(0, -n) for n in counts]


class DispatchResult:
    """What dispatch returns (and torch_ep.reference's).

    recv_x: [M, H] (or the fp8 pair), by source rank then token order.
    recv_topk_idx: [M, K] int64 local expert ids, -1 for other ranks' experts.
    recv_topk_weights: [M, K] float32, 0 where recv_topk_idx is -1.
    num_recv_tokens_per_expert: [E_local] ints, each padded to expert_alignment (-1 where only
        the device knows: a CUDA dispatch with num_worst_tokens). Given as None, they are
        computed from the handle whenever read: a dispatch traced by torch.compile then makes
        no host list unless the caller asks for one, and in a compiled region they are
        data-dependent ints.
    work: set only with async_op.

    Not a dataclass: the counts are a read-only property over a private attribute that
    __init__ sets directly. torch 2.11's dynamo does not run a property's setter on an object
    made inside the compiled region (it records a plain attribute and reads that back, None,
    instead of calling the getter), so the value must never pass through a setter.
    """

    def __init__(self, recv_x: Payload, recv_topk_idx: Optional[torch.Tensor],
                 recv_topk_weights: Optional[torch.Tensor], num_recv_tokens_per_expert: Optional[List[int]],
                 handle: DispatchHandle, work: Optional[object] = None, expert_alignment: int = 1):
        self.recv_x = recv_x
        self.recv_topk_idx = recv_topk_idx
        self.recv_topk_weights = recv_topk_weights
        self._num_recv_tokens_per_expert = num_recv_tokens_per_expert
        self.handle = handle
        self.work = work
        self.expert_alignment = expert_alignment

    @property
    def num_recv_tokens_per_expert(self) -> List[int]:
        counts = self._num_recv_tokens_per_expert
        if counts is None:
            a = self.expert_alignment
            counts = self.handle.num_recv_tokens_per_expert
            counts = pad_counts(counts, a)
        return counts

    def __repr__(self) -> str:
        return (f"DispatchResult(recv_x={self.recv_x!r}, recv_topk_idx={self.recv_topk_idx!r}, "
                f"recv_topk_weights={self.recv_topk_weights!r}, "
                f"num_recv_tokens_per_expert={self.num_recv_tokens_per_expert!r}, handle={self.handle!r}, "
                f"work={self.work!r}, expert_alignment={self.expert_alignment!r})")


@dataclass
class CombineResult:
    combined_x: torch.Tensor                        # [N, H]: the sum of the rows sent back for each token
    combined_topk_weights: Optional[torch.Tensor]   # [N, K] likewise, when weights were given
    work: Optional[object] = None


@dataclass
class AllToAllVResult:
    """What all_to_all_v returns (and torch_ep.reference's). Rows from rank s sit at
    output[output_offsets[s] : output_offsets[s] + output_splits[s]]: rank order, from row 0."""
    output: torch.Tensor          # [M, *]: the given output (M = its capacity), or exactly the rows received
    output_splits: torch.Tensor   # [R] int64 on input's device: rows received from each rank
    output_offsets: torch.Tensor  # [R] int64 on input's device: exclusive cumulative sum of output_splits
    work: Optional[object] = None  # set only with async_op


# ------------------------------------------------------------------ low-latency dispatch / combine

@dataclass
class LowLatencyHandle:
    """What low_latency_combine needs from a low_latency_dispatch: where each received row came
    from, and where each sent (token, slot) went. Made by torch_ep.low_latency_dispatch and by
    torch_ep.reference's (same fields)."""
    group_name: str
    num_ranks: int
    num_experts: int
    max_tokens_per_rank: int
    num_tokens: int              # N: tokens this rank dispatched
    hidden: int
    src_info: torch.Tensor       # [E_local, R*max] int32: t*K + k at the source rank, per received row
    layout: torch.Tensor         # [E_local, R] int32: rows received for each local expert from each rank
    send_slot: torch.Tensor      # [N, K] int32: row of each (token, slot) among its expert's rows from this rank, -1 unsent
    use_fp8: bool


@dataclass
class LowLatencyDispatchResult:
    """recv_x: [E_local, R*max_tokens_per_rank, H] bf16, or with use_fp8 the pair (float8_e4m3fn
    [E_local, R*max, H], float32 scales [E_local, R*max, H/128]). Expert e's rows are packed
    from row 0, by source rank, as DeepEP's: rank r's at [e, b : b + handle.layout[e, r]] with b
    = handle.layout[e, :r].sum(), in the source's (token, slot) order; rows past recv_count[e]
    are not written. recv_count [E_local] int32: rows per local expert. With
    return_recv_hook the outputs are valid once `hook()` has run (on the current stream)."""
    recv_x: Payload
    recv_count: torch.Tensor
    handle: LowLatencyHandle
    hook: Optional[Callable[[], None]] = None


@dataclass
class LowLatencyCombineResult:
    combined_x: torch.Tensor                    # [N, H] bf16: sum over k of topk_weights[t, k] * row
    hook: Optional[Callable[[], None]] = None   # with return_recv_hook: call it to receive
