"""What a call of all_to_all_single after a barrier waits on: every rank's device work (kernels and
copies, with their streams) and the host's time in the call, on one clock, for the intranode
group and the group across (virtual) nodes, as benchmarks/internode.py's isolated method runs it
(L2 flushed, a Gloo barrier, one call). Issue 15's question at 2x4: beside the NVSHMEM hop the node
hop loses 2-3.6x after a barrier and wins back to back; the timeline says which stream waits on
what.

    NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_DISABLE_NCCL=1 \\
    NVSHMEM_DISABLE_NVLS=1 NVSHMEM_SYMMETRIC_SIZE=3G CUDA_MPS_ACTIVE_THREAD_PERCENTAGE=12 \\
        torchrun --nproc-per-node 8 tools/a2a_timeline.py --ranks-per-node 4 [--node-kernel-bytes 0]

Rank 0 prints, per group, the call whose slowest rank is the median of --calls (or every call
with --every-call), each rank's line:
its host span in the call, then each device event as name@stream [start-end], in us from the
first rank's entry into the call. Device and host times are the profiler's (one machine, one
clock).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function

import torch_ep

from profile_common import init_on_local_gpu, kernel_name  # tools/, the script's folder

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo, for benchmarks
from benchmarks import common  # noqa: E402


def calls_of(prof, calls: int):
    """Per call: (host start, host end, [(name, stream, start, end)]) in ns, the device events
    between the call's entry and the next call's (the calls are synchronised, so none spills)."""
    events = prof.profiler.kineto_results.events()
    cuda = torch.autograd.DeviceType.CUDA
    # The host's ranges (the profiler mirrors them on the device as annotations: left out).
    marks = sorted((e.start_ns(), e.end_ns(), int(e.name().split()[1])) for e in events
                   if e.name().startswith("a2a_call ") and e.device_type() != cuda)
    assert len(marks) == calls, f"found {len(marks)} call ranges, expected {calls}"
    device = [(e.start_ns(), e.end_ns(), kernel_name(e.name()), e.device_resource_id()) for e in events
              if e.device_type() == cuda and not e.name().startswith("a2a_call ")]
    out = []
    for i, (start, end, _) in enumerate(marks):
        until = marks[i + 1][0] if i + 1 < len(marks) else float("inf")
        mine = sorted((s, t, name, stream) for s, t, name, stream in device if start <= s < until)
        out.append((start, end, [(name, stream, s, t) for s, t, name, stream in mine]))
    return out


def timeline(name, group, args, sync, flush):
    """Rank 0's lines for one group: the median call (by its slowest rank's end), or every call
    with --every-call, each with every rank's line."""
    numel = args.bytes // 4
    inp = torch.randn(numel, device="cuda")
    out = torch.empty_like(inp)
    for _ in range(3):
        dist.all_to_all_single(out, inp, group=group)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(args.calls):
            flush()
            torch.cuda.synchronize()
            dist.barrier(sync)
            with record_function(f"a2a_call {i}"):
                dist.all_to_all_single(out, inp, group=group)
            torch.cuda.synchronize()
    mine = calls_of(prof, args.calls)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine, group=sync)
    if dist.get_rank() != 0:
        return []
    # Per call: its first entry on any rank, and its span to the last device end on any rank.
    spans = []
    for i in range(args.calls):
        t0 = min(r[i][0] for r in every)
        last = max([r[i][1] for r in every] + [e[3] for r in every for e in r[i][2]])
        spans.append((last - t0, i, t0))
    by_call = sorted(spans, key=lambda x: x[1])
    lines = [f"{name}: calls {', '.join(f'{s / 1e3:.0f}' for s, _, _ in by_call)} us from the first entry to the "
             "last end"]
    for span, i, t0 in by_call if args.every_call else [sorted(spans)[len(spans) // 2]]:
        us = lambda ns: (ns - t0) / 1e3  # noqa: E731
        lines.append(f" call {i}: {span / 1e3:.1f} us")
        for rank, r in enumerate(every):
            start, end, device = r[i]
            parts = [f"{n}@{stream} [{us(s):.0f}-{us(t):.0f}]" for n, stream, s, t in device]
            lines.append(f"  rank {rank}: host [{us(start):.0f}-{us(end):.0f}] | " + ", ".join(parts))
    return lines


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ranks-per-node", type=int, required=True)
    parser.add_argument("--bytes", type=int, default=64 << 20, help="all_to_all_single's bytes per rank")
    parser.add_argument("--calls", type=int, default=7)
    parser.add_argument("--every-call", action="store_true", help="every call's lines, not only the median's")
    parser.add_argument("--across-first", action="store_true",
                        help="time the group across nodes first, so that the intranode group's calls run with "
                             "NVSHMEM (started by the first call across nodes) up too")
    parser.add_argument("--node-kernel-bytes", type=int, default=None,
                        help="Options.all_to_all_kernel_bytes of the group across nodes "
                             "(0: its node hop by the copy engines)")
    args = parser.parse_args()
    init_on_local_gpu()
    world = dist.get_world_size()
    sync = dist.new_group(backend="gloo")
    flush = common.l2_flusher(torch.device("cuda"))  # as benchmarks/internode.py's isolated method
    node_hop = {} if args.node_kernel_bytes is None else {"all_to_all_kernel_bytes": args.node_kernel_bytes}
    groups = {
        "intranode": dist.new_group(backend="ep", pg_options=torch_ep.Options(ranks_per_node=world)),
        f"across {world // args.ranks_per_node}x{args.ranks_per_node}": dist.new_group(
            backend="ep", pg_options=torch_ep.Options(ranks_per_node=args.ranks_per_node, **node_hop)),
    }
    lines = []
    for name, group in reversed(groups.items()) if args.across_first else groups.items():
        lines += timeline(name, group, args, sync, flush)
    if dist.get_rank() == 0:
        print("\n".join(lines), flush=True)
    dist.barrier(sync)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
