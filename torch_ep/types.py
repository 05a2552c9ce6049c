"""Result and handle types of the MoE ops (shared by the real ops and torch_ep.reference).

Named fields rather than positional tuples: downstream code keeps and passes handles around.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch

# x as dispatch takes it: [N, H] bf16/fp16/fp32, or (x_fp8 [N, H] float8_e4m3fn,
# scales [N, ceil(H/128)] float32), sent as is.
Payload = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DispatchLayout:
    num_tokens_per_rank: torch.Tensor    # [R] int32: tokens going to each rank (once per rank)
    num_tokens_per_expert: torch.Tensor  # [E] int32: token-expert pairs per global expert
    is_token_in_rank: torch.Tensor       # [N, R] bool


@dataclass
class DispatchHandle:
    """Everything combine (and a re-dispatch) needs to retrace a dispatch's route."""
    group_name: str
    num_experts: int
    num_tokens: int                 # N: tokens this rank dispatched
    send_token_index: torch.Tensor  # [S] int64: token ids this rank sent, grouped by target rank
    send_counts: List[int]          # [R] rows sent to each rank
    recv_counts: List[int]          # [R] rows received from each rank
    is_token_in_rank: torch.Tensor  # [N, R] bool


@dataclass
class DispatchResult:
    recv_x: Payload                          # [M, H] (or the fp8 pair), by source rank then token order
    recv_topk_idx: Optional[torch.Tensor]    # [M, K] int64 local expert ids, -1 for other ranks' experts
    recv_topk_weights: Optional[torch.Tensor]  # [M, K] float32, 0 where recv_topk_idx is -1
    num_recv_tokens_per_expert: List[int]    # [E_local], each padded to expert_alignment
    handle: DispatchHandle
    work: Optional[object] = None            # set only with async_op


@dataclass
class CombineResult:
    combined_x: torch.Tensor                        # [N, H]: the sum of the rows sent back for each token
    combined_topk_weights: Optional[torch.Tensor]   # [N, K] likewise, when weights were given
    work: Optional[object] = None
