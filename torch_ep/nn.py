"""An expert-parallel MoE layer built on torch_ep.dispatch / torch_ep.combine."""
from __future__ import annotations

import math
from typing import Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .moe import combine, dispatch

__all__ = ["ExpertParallelMoE"]


class ExpertParallelMoE(torch.nn.Module):
    """Top-k MoE whose `num_experts` experts are split evenly over the ranks of `group`.

    Each rank routes its own tokens with a replicated router (softmax, top-k, weights
    renormalised over the top-k), dispatches them to the ranks owning their experts, runs its
    `num_experts // group_size` local experts (2-layer MLPs, SwiGLU or GELU), weights each
    expert's output by the token's routing weight and combines the rows back.

    Parameters: `router` is replicated (broadcast from the group's rank 0 at construction);
    `w1`, `w2` (and `w3`, the SwiGLU gate) are this rank's experts, stacked [E_local, ...].

    Training: every rank must run forward and backward through the layer (both are
    collectives). Router gradients only hold this rank's tokens: all-reduce them, e.g. with
    `sync_router_grads()` (AVG) or DDP over the non-expert parameters. Expert gradients already
    sum the contributions of every rank's tokens; do not all-reduce them (divide them by the
    group size if each rank's loss is a mean over its own tokens and the dense gradients are
    averaged, so that both match the gradient of the mean over ranks).

    `num_worst_tokens` > 0 gives the dispatch fixed-size outputs (that many rows; a rank can
    receive at most tokens-per-rank x group size) and runs every local expert on every received
    row, weighted by the row's gate for it (0 for rows routed elsewhere and for padding): no
    data-dependent shape and no host synchronisation anywhere in the layer, so that
    `torch.compile(layer, fullgraph=True)` traces it as one graph and mode="reduce-overhead"
    replays it as CUDA graphs, at num_local_experts times the expert FLOPs of the default
    (exact-size) path.
    """

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, group=None,
                 expert_alignment: int = 1, dtype: Optional[torch.dtype] = None,
                 device: Optional[torch.device] = None, activation: str = "swiglu", num_worst_tokens: int = 0):
        super().__init__()
        self.group = group or dist.group.WORLD
        if self.group is None:
            raise RuntimeError("ExpertParallelMoE needs a process group: call dist.init_process_group('ep') first")
        size = dist.get_world_size(self.group)
        if num_experts % size:
            raise ValueError(f"num_experts={num_experts} must be divisible by the group size {size}")
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if num_worst_tokens < 0:
            raise ValueError(f"num_worst_tokens must be >= 0, got {num_worst_tokens}")
        if activation not in ("swiglu", "gelu"):
            raise ValueError(f"activation must be 'swiglu' or 'gelu', got {activation!r}")
        self.hidden, self.ffn_hidden = hidden, ffn_hidden
        self.num_experts, self.top_k = num_experts, top_k
        self.num_local_experts = num_experts // size
        self.expert_offset = dist.get_rank(self.group) * self.num_local_experts
        self.expert_alignment, self.activation = expert_alignment, activation
        self.num_worst_tokens = num_worst_tokens

        factory = {"dtype": dtype, "device": device}
        self.router = torch.nn.Linear(hidden, num_experts, bias=False, **factory)
        e = self.num_local_experts
        # Same bounds as nn.Linear's default init (uniform in +-1/sqrt(fan_in)).
        self.w1 = torch.nn.Parameter(_uniform((e, hidden, ffn_hidden), 1 / math.sqrt(hidden), factory))
        self.w3 = (torch.nn.Parameter(_uniform((e, hidden, ffn_hidden), 1 / math.sqrt(hidden), factory))
                   if activation == "swiglu" else None)
        self.w2 = torch.nn.Parameter(_uniform((e, ffn_hidden, hidden), 1 / math.sqrt(ffn_hidden), factory))

        # Every rank must route alike: start from rank 0's router.
        with torch.no_grad():
            for p in self.router_parameters():
                dist.broadcast(p.data, group=self.group, group_src=0)

    def router_parameters(self) -> Iterator[torch.nn.Parameter]:
        """The replicated parameters (their gradients need an all-reduce)."""
        return self.router.parameters()

    def expert_parameters(self) -> List[torch.nn.Parameter]:
        """This rank's expert parameters (not replicated; never all-reduce them)."""
        return [p for p in (self.w1, self.w3, self.w2) if p is not None]

    @torch.no_grad()
    def sync_router_grads(self) -> None:
        """All-reduces (AVG over the group) the router gradients; call after backward."""
        for p in self.router_parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG, group=self.group)

    def gate(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """topk_idx [N, K] int64 global expert ids and topk_weights [N, K] float32 (sum 1 per token)."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, idx = probs.topk(self.top_k, dim=-1)
        return idx, weights / weights.sum(dim=-1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, hidden] (or [..., hidden]) -> the MoE output, same shape."""
        shape = x.shape
        x = x.reshape(-1, self.hidden).contiguous()
        topk_idx, topk_weights = self.gate(x)
        d = dispatch(x, topk_idx, topk_weights, num_experts=self.num_experts, group=self.group,
                     expert_alignment=self.expert_alignment, num_worst_tokens=self.num_worst_tokens)
        if self.num_worst_tokens:
            y = self._run_experts_static(d.recv_x, d.recv_topk_idx, d.recv_topk_weights)
        else:
            y = self._run_experts(d.recv_x, d.recv_topk_idx, d.recv_topk_weights,
                                  d.handle.num_recv_tokens_per_expert)
        # The rows are already weighted: combine's unweighted sum is the MoE output.
        return combine(y, d.handle, group=self.group).combined_x.reshape(shape)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w1[e]
        h = F.silu(h) * (x @ self.w3[e]) if self.w3 is not None else F.gelu(h)
        return h @ self.w2[e]

    def _run_experts(self, recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor,
                     counts: List[int]) -> torch.Tensor:
        """Row m of the result: sum over its slots k with a local expert of recv_w[m, k] * expert(recv_x[m])."""
        local = torch.arange(self.num_local_experts, device=recv_idx.device)
        hit = recv_idx.unsqueeze(0) == local.view(-1, 1, 1)  # [E_local, M, K]
        # A row's weight for expert e sums its slots naming e (routers may repeat an expert).
        gate_w = (recv_w.unsqueeze(0) * hit).sum(-1)  # [E_local, M], differentiable in recv_w
        # (expert, row) pairs ordered by expert: one host sync, then split by the dispatch counts.
        pair_e, pair_row = hit.any(-1).nonzero(as_tuple=True)
        if any(c < 0 for c in counts):  # only the device knew them (num_worst_tokens on CUDA)
            counts = torch.bincount(pair_e, minlength=self.num_local_experts).tolist()
        # Every expert runs, even on no rows, so that its parameters always get a (zero) gradient.
        out = torch.cat([self._expert(e, recv_x[rows].to(self.w1.dtype))
                         for e, rows in enumerate(pair_row.split(counts))])
        weighted = out.float() * gate_w[pair_e, pair_row].unsqueeze(1)
        y = torch.zeros(recv_x.shape[0], self.hidden, dtype=torch.float32, device=recv_x.device)
        return y.index_add(0, pair_row, weighted).to(recv_x.dtype)

    def _run_experts_static(self, recv_x: torch.Tensor, recv_idx: torch.Tensor, recv_w: torch.Tensor) -> torch.Tensor:
        """_run_experts with fixed shapes: every local expert on every row, weighted by its gate
        (recv_idx is -1 in every slot of a padding row, so padding weighs 0)."""
        local = torch.arange(self.num_local_experts, device=recv_idx.device)
        hit = recv_idx.unsqueeze(0) == local.view(-1, 1, 1)  # [E_local, M, K]
        gate_w = (recv_w.unsqueeze(0) * hit).sum(-1)  # [E_local, M]
        # Padding rows hold whatever the buffer held: zero them, or a NaN there would reach the
        # expert gradients through 0 * NaN.
        real = (recv_idx >= 0).any(-1, keepdim=True)
        x = torch.where(real, recv_x.to(self.w1.dtype), 0).unsqueeze(0)  # [1, M, H]
        h = x @ self.w1  # [E_local, M, F]
        h = F.silu(h) * (x @ self.w3) if self.w3 is not None else F.gelu(h)
        out = (h @ self.w2).float() * gate_w.unsqueeze(-1)  # [E_local, M, H]
        return out.sum(0).to(recv_x.dtype)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden}, ffn_hidden={self.ffn_hidden}, num_experts={self.num_experts}, "
                f"local_experts=[{self.expert_offset}, {self.expert_offset + self.num_local_experts}), "
                f"top_k={self.top_k}, activation={self.activation}"
                + (f", num_worst_tokens={self.num_worst_tokens}" if self.num_worst_tokens else ""))


def _uniform(shape, bound: float, factory) -> torch.Tensor:
    return torch.empty(shape, **factory).uniform_(-bound, bound)
