"""Where a dispatch / combine across (virtual) nodes spends its time: each kernel's duration
(torch.profiler) per call on the device route, every rank, at DeepEP's normal shape. A kernel
that waits on peers (forward, receive, reduce) counts its wait too.

    NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_DISABLE_NCCL=1 \\
    NVSHMEM_DISABLE_NVLS=1 NVSHMEM_SYMMETRIC_SIZE=3G TORCH_EP_RANKS_PER_NODE=2 \\
        torchrun --nproc-per-node 4 tools/internode_profile.py [--tokens 4096] [--calls 5]
"""
import torch
import torch.distributed as dist

import torch_ep

from profile_common import init_on_local_gpu, kernel_times, make_fp8, make_inputs, shape_parser, top_kernels  # tools/, the script's folder


def main():
    parser = shape_parser(tokens=4096)
    parser.add_argument("--calls", type=int, default=5)
    args = parser.parse_args()
    rank = init_on_local_gpu()
    x, idx, w = make_inputs(args, rank)
    fp8 = make_fp8(x, args)
    kw = dict(num_experts=args.experts)
    layout = torch_ep.get_dispatch_layout(idx, args.experts)
    d = torch_ep.dispatch(x, idx, w, layout=layout, **kw)
    ops = {
        "dispatch bf16": lambda: torch_ep.dispatch(x, idx, w, layout=layout, **kw),
        "dispatch fp8": lambda: torch_ep.dispatch(fp8, idx, layout=layout, **kw),
        "combine bf16": lambda: torch_ep.combine(d.recv_x, d.handle),
        # The zero-copy input: the rows written once into this rank's region (combine_buffer
        # waits for the node's reads of the last combine before handing it out).
        "combine zero copy": lambda: torch_ep.combine(torch_ep.combine_buffer(d.handle), d.handle),
        # x written once into this rank's packed rows (dispatch_buffer waits for the node's reads
        # of the last dispatch): the pack writes the routing fields only.
        "dispatch zero copy": lambda: torch_ep.dispatch(torch_ep.dispatch_buffer(*x.shape), idx, w, layout=layout, **kw),
    }
    # The fills, just before an op's calls (any other dispatch packs its rows over dispatch_buffer's).
    fills = {"combine zero copy": lambda: torch_ep.combine_buffer(d.handle).copy_(d.recv_x),
             "dispatch zero copy": lambda: torch_ep.dispatch_buffer(*x.shape).copy_(x)}
    lines = []
    for name, fn in ops.items():
        if name in fills:
            fills[name]()
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                fn()
            torch.cuda.synchronize()
        top = top_kernels(kernel_times(prof, args.calls), 8, digits=0)
        lines.append(f"rank {rank} {name:18s} kernels us/call: {top}")
        dist.barrier()
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, lines)
    if rank == 0:
        for mine in every:
            for line in mine:
                print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
