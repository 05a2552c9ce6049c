"""Trains a small expert-parallel MoE model (torch_ep.nn.ExpertParallelMoE) on a synthetic task.

    torchrun --nproc-per-node 4 examples/moe_train.py [--device cpu|cuda] [--steps 50] [--compile]

Model: input projection -> ExpertParallelMoE (2 experts per rank, top-2, residual) -> head.
--compile trains through torch.compile(model, fullgraph=True) (the model is one block; the
default backend, inductor): the MoE layer then takes num_worst_tokens, which gives it static
shapes. --compile-mode reduce-overhead adds inductor's CUDA graphs (GPU).
Task: regression onto a fixed random nonlinear teacher; every rank draws its own inputs. The
dense parameters (projection, head, router) are replicated and their gradients averaged over
the group; each rank's experts are its own. Exits non-zero unless the loss went down.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

import torch_ep  # noqa: F401  registers the "ep" backend
from torch_ep.nn import ExpertParallelMoE


class Model(torch.nn.Module):
    def __init__(self, in_dim, hidden, ffn, out_dim, num_experts, top_k, device, num_worst_tokens=0):
        super().__init__()
        self.proj = torch.nn.Linear(in_dim, hidden, device=device)
        self.moe = ExpertParallelMoE(hidden, ffn, num_experts, top_k, device=device, num_worst_tokens=num_worst_tokens)
        self.head = torch.nn.Linear(hidden, out_dim, device=device)

    def forward(self, x):
        h = F.gelu(self.proj(x))
        return self.head(h + self.moe(h))


def dense_parameters(model):
    """Replicated parameters: everything but this rank's experts."""
    experts = {id(p) for p in model.moe.expert_parameters()}
    return [p for p in model.parameters() if id(p) not in experts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch", type=int, default=128, help="tokens per rank and step")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--compile", action="store_true", help="train through torch.compile(fullgraph=True)")
    parser.add_argument("--compile-mode", choices=["default", "reduce-overhead"], default="default",
                        help="torch.compile's mode with --compile (reduce-overhead: CUDA graphs, GPU only)")
    args = parser.parse_args()

    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        # Ranks share the host's cores: without this each one starts a thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group(backend="ep")
    rank, size = dist.get_rank(), dist.get_world_size()
    in_dim, out_dim = 16, 4

    # Experts differ per rank (their own seed); the layer broadcasts its router from rank 0, and
    # the other dense parameters are broadcast here, so the replicas start equal.
    torch.manual_seed(1000 + rank)
    # Compiled, the layer takes num_worst_tokens: a rank receives at most every rank's tokens.
    model = Model(in_dim, args.hidden, 2 * args.hidden, out_dim, num_experts=2 * size, top_k=2, device=device,
                  num_worst_tokens=args.batch * size if args.compile else 0)
    dense = dense_parameters(model)
    with torch.no_grad():
        for p in dense:
            dist.broadcast(p.data, src=0)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    forward = model
    if args.compile:
        forward = torch.compile(model, fullgraph=True, **({} if args.compile_mode == "default"
                                                          else {"mode": args.compile_mode}))

    # The teacher is the same on every rank (seed 0); the inputs are each rank's own.
    teacher = torch.Generator().manual_seed(0)
    a = torch.randn(in_dim, 32, generator=teacher) / in_dim ** 0.5  # smooth: sin of O(1) arguments
    b = torch.randn(32, out_dim, generator=teacher) / 32 ** 0.5
    data = torch.Generator().manual_seed(1 + rank)

    losses = []
    for step in range(args.steps):
        x = torch.randn(args.batch, in_dim, generator=data)
        y = torch.sin(x @ a) @ b
        x, y = x.to(device), y.to(device)
        loss = F.mse_loss(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            # Dense gradients: the mean over ranks (one all_reduce for all of them).
            flat = torch.cat([p.grad.flatten() for p in dense])
            dist.all_reduce(flat, op=dist.ReduceOp.AVG)
            offset = 0
            for p in dense:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
            # Expert gradients already sum every rank's tokens: scale them to the same mean.
            for p in model.moe.expert_parameters():
                p.grad.div_(size)
        opt.step()

        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
        losses.append(global_loss.item())
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {losses[-1]:.4f}", flush=True)

    # Every rank holds the same (averaged) losses, so all agree on the verdict.
    window = max(1, min(5, args.steps // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    ok = last < 0.8 * first
    if rank == 0:
        how = f", compiled ({args.compile_mode})" if args.compile else ""
        print(f"{size} ranks on {device.type}{how}: loss {first:.4f} -> {last:.4f} "
              f"({'loss went down' if ok else 'LOSS DID NOT GO DOWN'})", flush=True)
    dist.destroy_process_group()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
