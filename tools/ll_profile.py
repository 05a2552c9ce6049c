"""Where a low-latency dispatch / combine spends its time: each kernel's duration (torch.profiler)
in a replayed CUDA graph of back-to-back calls, at DeepEP's decoding shape. A receive kernel's
time includes waiting for the peers' sends.

With TORCH_EP_LL_TRACE=1 the kernels also stamp the global timer at their phase boundaries
(backend/kernels/low_latency_*.cu, `stamp`), and rank 0 prints the last call of each graph as one
timeline of every rank's kernels (ranks on one GPU share its timer): when each kernel starts,
and when its blocks pass each phase (median and last block), in microseconds from the call's
first kernel start.

    [TORCH_EP_LL_TRACE=1] torchrun --nproc-per-node 2 tools/ll_profile.py [--tokens 128] [--hidden 7168]
"""

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import _C

from profile_common import init_on_local_gpu, kernel_times, make_inputs, shape_parser, top_kernels  # tools/, the script's folder

# Phases each kernel stamps, in order (point 0 is the block's start). A point is stamped by the
# block's thread 0 when its warp gets there; "flags out" follows a barrier of the block, so it is
# when the whole block is done (across nodes: its pushes issued as well).
PHASES = {
    "dispatch send": ["start", "credits", "numbered + cast", "flags out"],
    "dispatch recv": ["start", "flags", "copied", "credits out"],
    "combine send": ["start", "credits", "copied in", "flags out"],
    "combine recv": ["start", "flags", "reduced", "credits out"],
}
TRACE_BLOCKS, TRACE_POINTS = 256, 8  # kernels::ll::kTraceBlocks, kTracePoints


def trace_timeline(words, kernels):
    """Per kernel (of `kernels`, trace order): phase -> (median, last) over the blocks, in ns."""
    trace = torch.tensor(words, dtype=torch.int64).view(4, TRACE_BLOCKS, TRACE_POINTS)
    out = {}
    for k, name in enumerate(PHASES):
        if name not in kernels:
            continue
        blocks = trace[k][trace[k][:, 0] > 0]
        phases = {}
        for p, phase in enumerate(PHASES[name]):
            t = blocks[:, p][blocks[:, p] > 0]
            if len(t):
                phases[phase] = (int(t.median()), int(t.max()) if p else int(t.min()))
        out[name] = phases
    return out


def print_trace(op, timelines):
    """timelines[rank][kernel][phase] = (median, last) ns: one table, times from the first start."""
    t0 = min(ph["start"][1] for tl in timelines for ph in tl.values() if "start" in ph)
    print(f"trace {op}: us from the first kernel start (median block / last block)")
    for rank, tl in enumerate(timelines):
        for kernel, phases in tl.items():
            cells = [f"{ph} {(m - t0) / 1e3:.1f}/{(last - t0) / 1e3:.1f}" for ph, (m, last) in phases.items()]
            print(f"  rank {rank} {kernel:13s} " + ", ".join(cells), flush=True)


def main():
    parser = shape_parser(tokens=128)
    parser.add_argument("--calls", type=int, default=10)
    args = parser.parse_args()
    rank = init_on_local_gpu()
    x, idx, w = make_inputs(args, rank)
    kw = dict(max_tokens_per_rank=args.tokens, num_experts=args.experts)
    d = torch_ep.low_latency_dispatch(x, idx, use_fp8=False, **kw)
    y = d.recv_x.clone()
    ops = {
        "dispatch fp8": lambda: torch_ep.low_latency_dispatch(x, idx, use_fp8=True, **kw),
        "dispatch bf16": lambda: torch_ep.low_latency_dispatch(x, idx, use_fp8=False, **kw),
        "combine": lambda: torch_ep.low_latency_combine(y, idx, w, d.handle),
    }
    tracing = bool(_C._ll_trace(dist.group.WORLD.group_name))
    sync = dist.new_group(backend="gloo")
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
        top = top_kernels(kernel_times(prof, args.calls), 6)
        lines.append(f"rank {rank} {name:14s} kernels us/call: {top}")
        dist.barrier()
        if tracing:  # three more replays, each the last call's trace after a barrier
            for _ in range(3):
                dist.barrier()
                graph.replay()
                kernels = ["combine send", "combine recv"] if name == "combine" else ["dispatch send", "dispatch recv"]
                mine = trace_timeline(_C._ll_trace(dist.group.WORLD.group_name), kernels)
                every = [None] * dist.get_world_size()
                dist.all_gather_object(every, mine, group=sync)
                if rank == 0:
                    print_trace(name, every)
    for line in lines:
        print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
