"""torch_ep.nn.ExpertParallelMoE on 2 to 4 CPU ranks against a dense single-process MoE with the
same weights: forward, and gradients w.r.t. x, the router and the experts; and the training
example under torchrun."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from test_torchrun import run_process_group  # kills torchrun's whole session on a timeout
from torch_ep.nn import ExpertParallelMoE

EXAMPLE = Path(__file__).parent.parent / "examples" / "moe_train.py"
TOL = {"rtol": 1e-5, "atol": 1e-5}  # float32; the dense sums run in another order


def _seed():
    return int(torch.randint(0, 2**30, ()).item())


def dense_moe(x, router_w, w1, w3, w2, top_k):
    """The MoE written out densely: every expert on every token, weighted by the routing weight
    (0 for experts outside a token's top-k). Written independently of torch_ep.nn."""
    probs = torch.softmax(F.linear(x, router_w).float(), dim=-1)
    top_w, top_i = probs.topk(top_k, dim=-1)
    top_w = top_w / top_w.sum(-1, keepdim=True)
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        weight = (top_w * (top_i == e)).sum(-1, keepdim=True)
        h = x @ w1[e]
        h = F.silu(h) * (x @ w3[e]) if w3 is not None else F.gelu(h)
        out = out + weight * (h @ w2[e])
    return out, top_i


def _gather_cat(t):
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts)


def rank_layer_vs_dense(seed, activation, top_k, experts_per_rank, empty_rank):
    rank, size = dist.get_rank(), dist.get_world_size()
    hidden, ffn = 16, 24
    num_experts = experts_per_rank * size
    # Each rank initialises differently: the router must still end up equal (broadcast from rank 0).
    torch.manual_seed(seed + 1 + rank)
    layer = ExpertParallelMoE(hidden, ffn, num_experts, top_k, activation=activation)
    assert layer.num_local_experts == experts_per_rank and layer.expert_offset == rank * experts_per_rank

    g = torch.Generator().manual_seed(seed + 7919 * rank)
    n = 0 if (empty_rank and rank == size - 1) else int(torch.randint(1, 40, (), generator=g))
    x = torch.randn(n, hidden, generator=g).requires_grad_(True)
    grad_out = torch.randn(n, hidden, generator=g)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    (out * grad_out).sum().backward()
    layer.sync_router_grads()

    # Everything the dense computation needs, from every rank.
    xs, gs = [None] * size, [None] * size
    dist.all_gather_object(xs, x.detach())
    dist.all_gather_object(gs, grad_out)
    routers = [None] * size
    dist.all_gather_object(routers, layer.router.weight.detach())
    assert all(torch.equal(r, routers[0]) for r in routers), "router weights differ between ranks"
    experts = {name: _gather_cat(p) for name, p in (("w1", layer.w1), ("w3", layer.w3), ("w2", layer.w2))
               if p is not None}

    leaves = {name: t.clone().requires_grad_(True) for name, t in experts.items()}
    router_w = routers[0].clone().requires_grad_(True)
    dense_x = [t.clone().requires_grad_(True) for t in xs]
    # One dense call per rank's tokens (the same batch shape as that rank's router saw, so the
    # same top-k); the loss sums all ranks' terms, as the expert gradients do.
    loss, mine = 0, None
    for r in range(size):
        o, top_i = dense_moe(dense_x[r], router_w, leaves["w1"], leaves.get("w3"), leaves["w2"], top_k)
        loss = loss + (o * gs[r]).sum()
        if r == rank:
            mine = o
            assert torch.equal(top_i, layer.gate(x.detach())[0]), "routing differs from the dense router"
    loss.backward()

    torch.testing.assert_close(out.detach(), mine.detach(), **TOL)
    torch.testing.assert_close(x.grad, dense_x[rank].grad, **TOL)
    # Router gradients: each rank's covers its own tokens; their AVG is the dense one / size.
    torch.testing.assert_close(layer.router.weight.grad, router_w.grad / size, **TOL)
    lo, hi = layer.expert_offset, layer.expert_offset + layer.num_local_experts
    for name, p in (("w1", layer.w1), ("w3", layer.w3), ("w2", layer.w2)):
        if p is not None:
            assert p.grad is not None, f"{name} got no gradient"
            torch.testing.assert_close(p.grad, leaves[name].grad[lo:hi], **TOL, msg=lambda m: f"{name}: {m}")
    return n


@pytest.mark.parametrize("activation,top_k,experts_per_rank,empty_rank", [
    ("swiglu", 2, 2, False),
    ("gelu", 3, 3, False),
    ("swiglu", 1, 1, False),
    # top_k=2: with top_k=1 a rank that sends no rows fails inside ep::dispatch (as_bytes of an
    # empty [0, 1] tensor with stride 0) while its peers wait for it until the timeout.
    ("gelu", 2, 1, True),
])
def test_layer_matches_dense_moe(pool, activation, top_k, experts_per_rank, empty_rank):
    """Forward output and the gradients w.r.t. x, the router (after sync_router_grads) and each
    rank's experts equal those of the dense MoE over all ranks' tokens and all experts."""
    counts = pool.run(rank_layer_vs_dense, _seed(), activation, top_k, experts_per_rank, empty_rank)
    assert (counts[-1] == 0) == empty_rank


def test_training_example_under_torchrun():
    """examples/moe_train.py trains on 2 CPU ranks and exits 0 (it asserts the loss went down)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EP_TIMEOUT_S="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", str(EXAMPLE), "--device", "cpu", "--steps", "20"]
    returncode, stdout, stderr = run_process_group(cmd, env, 180)
    log = f"exit code {returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-4000:]}"
    assert returncode == 0, log
    assert "loss went down" in stdout, log
