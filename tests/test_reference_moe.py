"""torch_ep.reference's MoE ops (built on all_to_all_single) against a brute-force route
computed from every rank's inputs, gathered with all_gather_object. The real dispatch/combine
ops will be checked against this reference."""
import pytest
import torch
import torch.distributed as dist

from torch_ep import reference
from torch_ep.testing import same_bits


def make_routing(kind, rank, seed, num_tokens, top_k, num_experts):
    g = torch.Generator().manual_seed(seed * 1009 + rank)
    if kind == "one_expert":
        idx = torch.full((num_tokens, top_k), -1, dtype=torch.int64)
        idx[:, 0] = num_experts - 1
        return idx
    # Distinct experts per token (as top-k gives), with -1 in random slots.
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)]) \
        if num_tokens else torch.empty(0, top_k, dtype=torch.int64)
    idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
    return idx


def brute_force(rank, size, num_experts, everyone, expert_alignment):
    """What rank `rank` must receive: every source's tokens that route to one of its experts,
    by source rank then token order."""
    per_rank = num_experts // size
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    rows, idx_rows, w_rows = [], [], []
    for x, idx, w in everyone:
        for n in range(idx.shape[0]):
            mine = (idx[n] >= lo) & (idx[n] < hi)
            if mine.any():
                rows.append(x[n])
                idx_rows.append(torch.where(mine, idx[n] - lo, torch.full_like(idx[n], -1)))
                w_rows.append(torch.where(mine, w[n], torch.zeros_like(w[n])))
    k = everyone[0][1].shape[1]
    h = everyone[0][0].shape[1:]
    recv_x = torch.stack(rows) if rows else torch.empty(0, *h, dtype=everyone[0][0].dtype)
    recv_idx = torch.stack(idx_rows) if idx_rows else torch.empty(0, k, dtype=torch.int64)
    recv_w = torch.stack(w_rows) if w_rows else torch.empty(0, k)
    counts = [int((recv_idx == e).any(dim=1).sum()) for e in range(per_rank)]
    counts = [-(-c // expert_alignment) * expert_alignment for c in counts]
    return recv_x, recv_idx, recv_w, counts


def rank_dispatch_combine(seed, kind, hidden, top_k, experts_per_rank, alignment):
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts = experts_per_rank * size
    g = torch.Generator().manual_seed(seed + 77 * rank)
    num_tokens = 0 if (kind == "empty_rank" and rank == size - 1) else int(torch.randint(1, 24, (), generator=g))
    top_k = min(top_k, num_experts)
    topk_idx = make_routing(kind, rank, seed, num_tokens, top_k, num_experts)
    x = torch.randint(-50, 50, (num_tokens, hidden), generator=g).float()  # integer-valued: exact sums
    w = torch.rand(num_tokens, top_k, generator=g)
    gathered = [None] * size
    dist.all_gather_object(gathered, (reference._pack(x), reference._pack(topk_idx), reference._pack(w)))
    everyone = [tuple(reference._unpack(t) for t in item) for item in gathered]

    result = reference.dispatch(x, topk_idx, w, num_experts=num_experts, expert_alignment=alignment)
    exp_x, exp_idx, exp_w, exp_counts = brute_force(rank, size, num_experts, everyone, alignment)
    assert same_bits(result.recv_x, exp_x)
    assert torch.equal(result.recv_topk_idx, exp_idx)
    assert torch.equal(result.recv_topk_weights, exp_w)
    assert result.num_recv_tokens_per_expert == exp_counts

    layout = reference.get_dispatch_layout(topk_idx, num_experts)
    valid = topk_idx[topk_idx >= 0]
    assert torch.equal(layout.num_tokens_per_expert, torch.bincount(valid, minlength=num_experts).int())
    assert int(layout.num_tokens_per_rank.sum()) == int(layout.is_token_in_rank.sum())

    # Combine: each rank scales what it received by (rank + 1); a token's result is x times the
    # sum of (r + 1) over the ranks it went to.
    combined = reference.combine(result.recv_x * (rank + 1), result.handle, result.recv_topk_weights)
    scale = (layout.is_token_in_rank.float() * torch.arange(1, size + 1).float()).sum(1, keepdim=True)
    assert torch.equal(combined.combined_x, x * scale)
    assert combined.combined_topk_weights.shape == (num_tokens, top_k)

    # The fp8 pair travels as is.
    scales = torch.rand(num_tokens, (hidden + 127) // 128, generator=g)
    fp8 = reference.dispatch((x.to(torch.float8_e4m3fn), scales), topk_idx, num_experts=num_experts)
    assert same_bits(fp8.recv_x[0], exp_x.to(torch.float8_e4m3fn))
    assert fp8.recv_x[1].shape == (exp_x.shape[0], scales.shape[1])


@pytest.mark.parametrize("kind,hidden,top_k,experts_per_rank,alignment", [
    ("random", 7, 4, 2, 1),
    ("random", 1, 1, 1, 1),
    ("random", 130, 9, 3, 4),
    ("one_expert", 16, 2, 2, 1),
    ("empty_rank", 5, 3, 2, 1),
])
def test_reference_dispatch_combine(pool, kind, hidden, top_k, experts_per_rank, alignment):
    pool.run(rank_dispatch_combine, int(torch.randint(0, 2**30, ())), kind, hidden, top_k, experts_per_rank,
             alignment)


def test_num_experts_must_divide():
    with pytest.raises(ValueError, match="num_experts=10 must be divisible by the group size 4"):
        reference._experts_per_rank(10, 4)
