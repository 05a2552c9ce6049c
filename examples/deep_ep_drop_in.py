"""An MoE layer written the way DeepEP's callers write it, running on torch_ep through one import.

    torchrun --nproc-per-node 4 examples/deep_ep_drop_in.py [--device cpu|cuda] [--steps 30]

The code below is DeepEP client code (a Buffer sized from its configs' hints, get_dispatch_layout
then dispatch on the communication stream with previous_event / async_finish, dispatch and
combine wrapped in autograd.Functions whose backwards are a combine and a cached dispatch); only
the import differs: `from torch_ep import deep_ep` where it had `import deep_ep`. The process
group is the caller's own (Gloo on CPU or where ranks share a GPU, NCCL otherwise): the Buffer
runs on an "ep" group over the same ranks by itself.

1. Training (high-throughput path): the first step's forward output and gradients (of x, the
   router and the experts) are checked against a dense computation of the same layer on every
   rank's gathered weights; then the layer is trained on a regression task and the loss must go
   down.
2. Decoding (low-latency path, where CUDA and NVSHMEM are present): low_latency_dispatch with a
   receive hook, the experts run on DeepEP's [local experts, ranks * max tokens, hidden] layout,
   written straight into get_next_low_latency_combine_buffer, low_latency_combine with zero_copy;
   checked against the dense computation.
Exits non-zero on any mismatch or if the loss did not go down.
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from torch_ep import deep_ep  # was: import deep_ep

_buffer = None


def get_buffer(group: dist.ProcessGroup, hidden_bytes: int) -> deep_ep.Buffer:
    """One Buffer, made again only if a larger one is needed (DeepEP's README pattern)."""
    global _buffer
    configs = (deep_ep.Buffer.get_dispatch_config(group.size()), deep_ep.Buffer.get_combine_config(group.size()))
    num_nvl_bytes = max(config.get_nvl_buffer_size_hint(hidden_bytes, group.size()) for config in configs)
    if _buffer is None or _buffer.group != group or _buffer.num_nvl_bytes < num_nvl_bytes:
        _buffer = deep_ep.Buffer(group, num_nvl_bytes, 0)
    return _buffer


class Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weights, num_experts):
        buffer = _buffer
        previous = deep_ep.Buffer.capture()
        num_tokens_per_rank, num_tokens_per_rdma_rank, num_tokens_per_expert, is_token_in_rank, event = \
            buffer.get_dispatch_layout(topk_idx, num_experts, previous_event=previous, async_finish=True,
                                       allocate_on_comm_stream=True)
        recv_x, recv_topk_idx, recv_topk_weights, num_recv_tokens_per_expert_list, handle, event = buffer.dispatch(
            x, topk_idx=topk_idx, topk_weights=topk_weights, num_tokens_per_rank=num_tokens_per_rank,
            num_tokens_per_rdma_rank=num_tokens_per_rdma_rank, is_token_in_rank=is_token_in_rank,
            num_tokens_per_expert=num_tokens_per_expert, previous_event=event, async_finish=True,
            allocate_on_comm_stream=True)
        event.current_stream_wait()
        ctx.handle = handle
        ctx.mark_non_differentiable(recv_topk_idx)
        return recv_x, recv_topk_idx, recv_topk_weights, handle

    @staticmethod
    def backward(ctx, grad_recv_x, grad_recv_topk_idx, grad_recv_topk_weights, grad_handle):
        # The gradients go back along the route: a combine (sums over the ranks a token went to).
        grad_x, grad_topk_weights, event = _buffer.combine(
            grad_recv_x.contiguous(), ctx.handle, topk_weights=grad_recv_topk_weights,
            previous_event=deep_ep.Buffer.capture(), async_finish=True, allocate_on_comm_stream=True)
        event.current_stream_wait()
        return grad_x, None, grad_topk_weights, None


class Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle):
        combined_x, _, event = _buffer.combine(x, handle, previous_event=deep_ep.Buffer.capture(), async_finish=True,
                                               allocate_on_comm_stream=True)
        event.current_stream_wait()
        ctx.handle = handle
        return combined_x

    @staticmethod
    def backward(ctx, grad_combined_x):
        # A cached dispatch: the same route as the forward's, no layout.
        grad_x, _, _, _, _, event = _buffer.dispatch(grad_combined_x.contiguous(), handle=ctx.handle,
                                                     previous_event=deep_ep.Buffer.capture(), async_finish=True,
                                                     allocate_on_comm_stream=True)
        event.current_stream_wait()
        return grad_x, None


class Experts(torch.nn.Module):
    """This rank's experts: two-layer MLPs, one per local expert."""

    def __init__(self, num_local, hidden, ffn, device):
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.randn(num_local, hidden, ffn, device=device) / hidden ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(num_local, ffn, hidden, device=device) / ffn ** 0.5)

    def forward(self, recv_x, recv_topk_idx, recv_topk_weights):
        """Each received row times its weight for every local expert it chose, summed."""
        out = torch.zeros_like(recv_x)
        for e in range(self.w1.shape[0]):
            chosen = recv_topk_idx == e
            rows = chosen.any(dim=1).nonzero().flatten()
            weight = (recv_topk_weights * chosen).sum(dim=1)[rows].unsqueeze(1)
            out = out.index_add(0, rows, weight * (F.gelu(recv_x[rows] @ self.w1[e]) @ self.w2[e]))
        return out


class MoE(torch.nn.Module):
    def __init__(self, hidden, ffn, num_experts, top_k, group, device):
        super().__init__()
        self.num_experts, self.top_k, self.group = num_experts, top_k, group
        self.router = torch.nn.Linear(hidden, num_experts, bias=False, device=device)
        self.experts = Experts(num_experts // group.size(), hidden, ffn, device)

    def route(self, x):
        weights, topk_idx = torch.softmax(self.router(x), dim=-1).topk(self.top_k, dim=-1)
        return topk_idx, weights

    def forward(self, x):
        get_buffer(self.group, x.shape[1] * x.element_size())
        topk_idx, topk_weights = self.route(x)
        recv_x, recv_topk_idx, recv_topk_weights, handle = Dispatch.apply(x, topk_idx, topk_weights, self.num_experts)
        return Combine.apply(self.experts(recv_x, recv_topk_idx, recv_topk_weights), handle)


def dense_moe(x, topk_idx, topk_weights, w1, w2):
    """The same layer without communication: every expert's weights at hand (gathered)."""
    out = torch.zeros_like(x)
    for k in range(topk_idx.shape[1]):
        h = F.gelu(torch.einsum("nh,nhf->nf", x, w1[topk_idx[:, k]]))
        out = out + topk_weights[:, k:k + 1] * torch.einsum("nf,nfh->nh", h, w2[topk_idx[:, k]])
    return out


def gather_experts(model, group):
    size = group.size()
    w1 = [torch.empty_like(model.experts.w1) for _ in range(size)]
    w2 = [torch.empty_like(model.experts.w2) for _ in range(size)]
    dist.all_gather(w1, model.experts.w1.detach().contiguous(), group=group)
    dist.all_gather(w2, model.experts.w2.detach().contiguous(), group=group)
    return torch.cat(w1), torch.cat(w2)


def check_first_step(model, x, group):
    """Forward and backward against the dense layer on gathered weights (float32)."""
    w1, w2 = gather_experts(model, group)
    x = x.clone().requires_grad_(True)
    upstream = torch.randn_like(x)
    (model(x) * upstream).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    router_ref = model.router.weight.detach().clone().requires_grad_(True)
    w1_ref, w2_ref = w1.clone().requires_grad_(True), w2.clone().requires_grad_(True)
    weights, topk_idx = torch.softmax(x_ref @ router_ref.t(), dim=-1).topk(model.top_k, dim=-1)
    out_ref = dense_moe(x_ref, topk_idx, weights, w1_ref, w2_ref)
    (out_ref * upstream).sum().backward()
    # Expert gradients: the dense layer's are per global expert, summed over every rank's tokens.
    dist.all_reduce(w1_ref.grad, group=group)
    dist.all_reduce(w2_ref.grad, group=group)
    rank, local = group.rank(), model.experts.w1.shape[0]
    mine = slice(rank * local, (rank + 1) * local)
    checks = {"x.grad": (x.grad, x_ref.grad), "router.grad": (model.router.weight.grad, router_ref.grad),
              "w1.grad": (model.experts.w1.grad, w1_ref.grad[mine]),
              "w2.grad": (model.experts.w2.grad, w2_ref.grad[mine])}
    bad = [name for name, (got, want) in checks.items() if not torch.allclose(got, want, rtol=1e-4, atol=1e-5)]
    model.zero_grad(set_to_none=True)
    return bad


def decode_check(model, group, device, rank):
    """The low-latency path on a batch of decode tokens, against the dense layer."""
    hidden, size = model.router.in_features, group.size()
    buffer = deep_ep.Buffer(group, num_rdma_bytes=deep_ep.Buffer.get_low_latency_rdma_size_hint(
        16, hidden, size, model.num_experts), low_latency_mode=True, num_qps_per_rank=model.num_experts // size)
    max_tokens = 16
    x = torch.randn(11, hidden, generator=torch.Generator().manual_seed(50 + rank)).to(device, torch.bfloat16)
    with torch.no_grad():
        topk_idx, topk_weights = model.route(x.float())
        recv_x, recv_count, handle, _, hook = buffer.low_latency_dispatch(
            x, topk_idx, max_tokens, model.num_experts, use_fp8=False, return_recv_hook=True)
        hook()  # the data arrives here: work could overlap the transfer before this call
        w1, w2 = model.experts.w1.to(torch.bfloat16), model.experts.w2.to(torch.bfloat16)
        out = buffer.get_next_low_latency_combine_buffer(handle)  # the experts write where peers read
        torch.bmm(F.gelu(torch.bmm(recv_x, w1)), w2, out=out)
        combined, _, _ = buffer.low_latency_combine(out, topk_idx, topk_weights, handle, zero_copy=True)
        gw1, gw2 = gather_experts(model, group)
        want = dense_moe(x.float(), topk_idx, topk_weights, gw1, gw2)
    return torch.allclose(combined.float(), want, rtol=5e-2, atol=5e-2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64, help="tokens per rank and step")
    parser.add_argument("--hidden", type=int, default=128)
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        backend = "nccl" if torch.cuda.device_count() >= world else "gloo"  # NCCL refuses ranks sharing a GPU
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group(backend=backend)  # the caller's group: the Buffer makes its "ep" group itself
    group, rank, size = dist.group.WORLD, dist.get_rank(), dist.get_world_size()

    torch.manual_seed(1000 + rank)  # experts differ per rank; the router is broadcast from rank 0
    model = MoE(args.hidden, 2 * args.hidden, num_experts=2 * size, top_k=2, group=group, device=device)
    dist.broadcast(model.router.weight.data, src=0)
    teacher = torch.Generator().manual_seed(0)
    a = torch.randn(args.hidden, args.hidden, generator=teacher).to(device) / args.hidden ** 0.5
    data = torch.Generator().manual_seed(1 + rank)

    failures = [f"first step: {name} differs from the dense layer's"
                for name in check_first_step(model, torch.randn(args.batch, args.hidden, generator=data).to(device),
                                             group)]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(args.steps):
        x = torch.randn(args.batch, args.hidden, generator=data).to(device)
        loss = F.mse_loss(model(x), torch.tanh(x @ a))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        # The replicated router: the mean of the ranks' gradients (a sum, then a division: not every
        # torch's Gloo has AVG).
        dist.all_reduce(model.router.weight.grad)
        model.router.weight.grad.div_(size)
        for p in model.experts.parameters():
            p.grad.div_(size)  # already a sum over every rank's tokens
        opt.step()
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        losses.append(global_loss.item() / size)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {losses[-1]:.4f}", flush=True)
    window = max(1, min(5, args.steps // 4))
    first, last = sum(losses[:window]) / window, sum(losses[-window:]) / window
    if not last < 0.9 * first:
        failures.append(f"loss did not go down: {first:.4f} -> {last:.4f}")

    decode = "skipped (needs CUDA, and torch_ep built with NVSHMEM)"
    if device.type == "cuda" and deep_ep.Buffer.is_sm90_compiled():
        from torch_ep import _C
        if _C.has_nvshmem:
            ok = decode_check(model, group, device, rank)
            decode = "matches the dense layer" if ok else "DIFFERS from the dense layer"
            failures += [] if ok else ["low-latency decode differs from the dense layer"]
    everyone = [None] * size
    dist.all_gather_object(everyone, failures)
    if rank == 0:
        print(f"{size} ranks on {device.type} ({backend} group): loss {first:.4f} -> {last:.4f}; "
              f"low-latency decode: {decode}", flush=True)
        for r, fails in enumerate(everyone):
            for f in fails:
                print(f"rank {r}: {f}", flush=True)
    dist.destroy_process_group()
    sys.exit(1 if any(everyone) else 0)


if __name__ == "__main__":
    main()
