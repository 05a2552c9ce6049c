"""Where a low-latency dispatch / combine spends its time: each kernel's duration (torch.profiler)
in a replayed CUDA graph of back-to-back calls, at DeepEP's decoding shape. A receive kernel's
time includes waiting for the peers' sends.

    torchrun --nproc-per-node 2 tools/ll_profile.py [--tokens 128] [--hidden 7168]
"""
import argparse
import os
from collections import defaultdict

import torch
import torch.distributed as dist

import torch_ep


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    dist.init_process_group("ep")
    rank = dist.get_rank()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    g = torch.Generator(device="cuda").manual_seed(rank)
    idx = torch.rand(args.tokens, args.experts, device="cuda", generator=g).topk(args.top_k, dim=1).indices
    w = torch.rand(args.tokens, args.top_k, device="cuda", generator=g)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).bfloat16()
    kw = dict(max_tokens_per_rank=args.tokens, num_experts=args.experts)
    d = torch_ep.low_latency_dispatch(x, idx, use_fp8=False, **kw)
    y = d.recv_x.clone()
    ops = {
        "dispatch fp8": lambda: torch_ep.low_latency_dispatch(x, idx, use_fp8=True, **kw),
        "dispatch bf16": lambda: torch_ep.low_latency_dispatch(x, idx, use_fp8=False, **kw),
        "combine": lambda: torch_ep.low_latency_combine(y, idx, w, d.handle),
    }
    lines = []
    for name, fn in ops.items():
        # Replays of a graph of back-to-back calls, as the benchmark times them: no host in the way.
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(args.calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        kernels = defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                kernels[e.name.split("(")[0].split("::")[-1][-32:]] += e.device_time_total / args.calls
        top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(kernels.items(), key=lambda kv: -kv[1])[:6])
        lines.append(f"rank {rank} {name:14s} kernels us/call: {top}")
        dist.barrier()
    for line in lines:
        print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
