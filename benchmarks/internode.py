"""Across nodes: the hierarchical dispatch/combine and all_to_all_single of an "ep" group that
spans nodes, against the intranode path of the same ranks in the same run.

    # one machine acting as 2 nodes (virtual nodes; ranks sharing a GPU need MPS, GPU-NOTES.md):
    NVSHMEM_REMOTE_TRANSPORT=none NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME=lo NVSHMEM_DISABLE_NCCL=1 \\
        NVSHMEM_SYMMETRIC_SIZE=3G torchrun --nproc-per-node 4 benchmarks/internode.py --ranks-per-node 2 --out DIR
    # real nodes (docs/internode.md): nodes from torchrun's LOCAL_WORLD_SIZE
    torchrun --nnodes 2 --nproc-per-node 8 ... benchmarks/internode.py --out DIR

Groups of the same ranks: "intranode" (ranks_per_node = world size: one node, the CUDA IPC
kernels; only where every rank is on one host), "internode" (--ranks-per-node, or the launch's
nodes: the device-driven route, Options.internode_device) and "internode-host" (the same nodes on
the host-driven route: rail hop on NVSHMEM rounds the host queues, node hop on CUDA IPC; kept as
a row while Options.internode_device exists; --no-host-route leaves it out), and
"internode-a2a-rounds" (all_to_all_single only, its NVSHMEM hop in rounds the host queues:
Options.internode_a2a_device=False; the other groups move it in one launch; every chunk
checked first). The device route's
buffer takes (2 x nodes + 2 x ranks) x tokens x ~16.5 KiB per rank of NVSHMEM heap, the zero-copy
combine input included (docs/internode.md):
set NVSHMEM_SYMMETRIC_SIZE to fit it (3G covers 2x4 at the default shape, both internode groups). Ops: dispatch bf16 and fp8 (layout
given), combine bf16 (DeepEP's setting by default: 4096 tokens of hidden 7168, top-8 of 256
experts), on the device route also "combine bf16, zero copy" (its input in torch_ep.combine_buffer:
recv_x is written into it once before timing, a fill the caller's experts would do, not timed; each
timed call takes combine_buffer, whose wait is part of the cost, and combines from it) and
"dispatch bf16, zero copy" / "dispatch fp8, zero copy" (x, and the fp8 pair, in
torch_ep.dispatch_buffer: written once just before the op's runs, not timed; each timed call
takes dispatch_buffer, whose wait is part of the cost, and dispatches from it; checked bit for
bit against the plain dispatch first), and all_to_all_single (--a2a-bytes per rank, even
split). "vs intranode" is the time over the intranode group's for the same op (the plain op for
the zero-copy rows).

Per op and group: time (median over runs of the slowest rank, each run after a barrier, L2
flushed; the ranks' host skew leaving the barrier is on the clock), the stream time (DeepEP's
bench method: --stream-calls calls back to back, L2 flushed once, the mean per call of the slowest
rank, the first dropped), bytes received per rank / time (DeepEP's convention for dispatch/combine; sent for
all_to_all), and for the internode group the bytes each rank sent over the rail hop (to other
nodes: RDMA between real nodes) and over the node hop (to its node's other ranks: NVLink),
read from get_backend(group).rail_bytes / node_bytes, and the rail hop's bandwidth, which is
what DeepEP's internode figures report (H800, CX7 400 Gb/s: 43-58 GB/s RDMA). On virtual nodes
the "RDMA" hop is NVSHMEM over P2P on the same GPU: the figure shows the route's cost, not a
network's. Outputs are checked against torch_ep.reference before timing. Rank 0 prints the
table and writes internode.md and internode.json to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import reference
from torch_ep.testing import same_bits

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

FP8_BLOCK = 128


def make_inputs(args, rank: int, num_experts: int, device):
    g = torch.Generator().manual_seed(args.seed + 7919 * rank)
    scores = torch.rand(args.tokens, num_experts, generator=g)
    idx = scores.topk(args.topk, dim=1).indices
    x = torch.randint(-8, 8, (args.tokens, args.hidden), generator=g).to(torch.bfloat16)
    w = torch.rand(idx.shape, generator=g)
    scales = torch.rand(args.tokens, (args.hidden + FP8_BLOCK - 1) // FP8_BLOCK, generator=g) + 0.5
    return x.to(device), idx.to(device), w.to(device), (x.float().to(torch.float8_e4m3fn).to(device), scales.to(device))


def check(group, x, idx, w, fp8, num_experts):
    """Bit for bit against the reference (integer data: combine's sums are exact)."""
    d = torch_ep.dispatch(x, idx, w, num_experts=num_experts, group=group)
    ref = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts, group=group)
    assert same_bits(d.recv_x.cpu(), ref.recv_x) and torch.equal(d.recv_topk_idx.cpu(), ref.recv_topk_idx)
    c = torch_ep.combine(d.recv_x, d.handle, group=group).combined_x
    assert same_bits(c.cpu(), reference.combine(ref.recv_x, ref.handle, group=group).combined_x)
    if is_region(d.handle):
        buf = torch_ep.combine_buffer(d.handle)
        buf.copy_(d.recv_x)
        zero_copy = torch_ep.combine(buf, d.handle, group=group).combined_x
        assert same_bits(zero_copy.cpu(), c.cpu()), "combine from combine_buffer differs"
    d8 = torch_ep.dispatch(fp8, idx, num_experts=num_experts, group=group)
    ref8 = reference.dispatch(tuple(t.cpu() for t in fp8), idx.cpu(), num_experts=num_experts, group=group)
    assert same_bits(d8.recv_x[0].cpu(), ref8.recv_x[0]) and same_bits(d8.recv_x[1].cpu(), ref8.recv_x[1])
    if is_dispatch_region(group, x):
        z = torch_ep.dispatch(fill_dispatch_buffer(group, x), idx, w, num_experts=num_experts, group=group)
        assert same_bits(z.recv_x.cpu(), d.recv_x.cpu()), "dispatch from dispatch_buffer differs"
        assert torch.equal(z.recv_topk_idx.cpu(), d.recv_topk_idx.cpu())
        z8 = torch_ep.dispatch(fill_dispatch_buffer(group, fp8), idx, num_experts=num_experts, group=group)
        assert same_bits(z8.recv_x[0].cpu(), d8.recv_x[0].cpu()) and same_bits(z8.recv_x[1].cpu(), d8.recv_x[1].cpu()), \
            "fp8 dispatch from dispatch_buffer differs"


def dispatch_buffer_like(group, x):
    """dispatch_buffer for x's shape and dtype (an fp8 pair: the pair)."""
    data = x[0] if isinstance(x, tuple) else x
    return torch_ep.dispatch_buffer(data.shape[0], data.shape[1], data.dtype, group=group)


def fill_dispatch_buffer(group, x):
    """x (or the fp8 pair) written into dispatch_buffer, which it returns."""
    buf = dispatch_buffer_like(group, x)
    for dst, src in zip(buf, x) if isinstance(x, tuple) else ((buf, x),):
        dst.copy_(src)
    return buf


def is_dispatch_region(group, x) -> bool:
    """Whether dispatch_buffer hands out this rank's packed rows (the same address twice)."""
    return dispatch_buffer_like(group, x).data_ptr() == dispatch_buffer_like(group, x).data_ptr()


def is_region(handle) -> bool:
    """Whether combine_buffer hands out the group's zero-copy region (the same address twice), not
    a plain tensor (one node, the host route)."""
    first = torch_ep.combine_buffer(handle)  # held: a plain tensor freed first could come back at its address
    return first.data_ptr() == torch_ep.combine_buffer(handle).data_ptr()


def check_all_to_all(group, a2a_in, a2a_out):
    """all_to_all_single against torch_ep.reference, on the random input the timing then uses."""
    dist.all_to_all_single(a2a_out, a2a_in, group=group)
    expected = reference.all_to_all_single(a2a_out.shape, a2a_in, group=group)
    assert same_bits(a2a_out.cpu(), expected), "all_to_all_single differs from torch_ep.reference"


def measure(name, group, args, device, sync, flush, a2a_only=False) -> List[Dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    num_experts = args.experts
    backend = torch_ep.get_backend(group)
    a2a_in = torch.randn(args.a2a_bytes // 2, dtype=torch.bfloat16, device=device)
    a2a_out = torch.empty_like(a2a_in)
    check_all_to_all(group, a2a_in, a2a_out)
    ops = {"all_to_all_single": (lambda: dist.all_to_all_single(a2a_out, a2a_in, group=group), args.a2a_bytes)}
    fills = {}
    if not a2a_only:
        x, idx, w, fp8 = make_inputs(args, rank, num_experts, device)
        check(group, x, idx, w, fp8, num_experts)
        layout = torch_ep.get_dispatch_layout(idx, num_experts, group=group)
        d = torch_ep.dispatch(x, idx, w, num_experts=num_experts, group=group, layout=layout)
        recv_rows = d.recv_x.shape[0]
        row_bf16 = args.hidden * 2
        row_fp8 = args.hidden + fp8[1].shape[1] * 4
        ops = {
            "dispatch bf16": (lambda: torch_ep.dispatch(x, idx, w, num_experts=num_experts, group=group, layout=layout),
                              recv_rows * row_bf16),
            "dispatch fp8": (lambda: torch_ep.dispatch(fp8, idx, num_experts=num_experts, group=group, layout=layout),
                             recv_rows * row_fp8),
            "combine bf16": (lambda: torch_ep.combine(d.recv_x, d.handle, group=group), recv_rows * row_bf16),
            **ops,
        }
        if is_region(d.handle):
            torch_ep.combine_buffer(d.handle).copy_(d.recv_x)  # the fill: not timed, done once
            ops["combine bf16, zero copy"] = (
                lambda: torch_ep.combine(torch_ep.combine_buffer(d.handle), d.handle, group=group),
                recv_rows * row_bf16)
        if is_dispatch_region(group, x):
            # Each timed call takes dispatch_buffer (its wait) and dispatches from it; the fill is
            # done once, just before the op's runs (any other dispatch packs its rows over it).
            ops["dispatch bf16, zero copy"] = (
                lambda: torch_ep.dispatch(dispatch_buffer_like(group, x), idx, w, num_experts=num_experts,
                                          group=group, layout=layout), recv_rows * row_bf16)
            ops["dispatch fp8, zero copy"] = (
                lambda: torch_ep.dispatch(dispatch_buffer_like(group, fp8), idx, num_experts=num_experts,
                                          group=group, layout=layout), recv_rows * row_fp8)
            fills = {"dispatch bf16, zero copy": lambda: fill_dispatch_buffer(group, x),
                     "dispatch fp8, zero copy": lambda: fill_dispatch_buffer(group, fp8)}
    rows = []
    for op, (fn, nbytes) in ops.items():
        if op in fills:
            fills[op]()
        rail0, node0 = backend.rail_bytes, backend.node_bytes
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rail, node = backend.rail_bytes - rail0, backend.node_bytes - node0
        if op == "all_to_all_single" and backend.num_nodes > 1:  # not counted by the MoE counters
            per_peer = args.a2a_bytes // world
            t = backend.topology
            rail, node = per_peer * (world - t.ranks_per_node), per_peer * (t.ranks_per_node - 1)

        def run():
            flush()
            fn()

        times = common.slowest_rank(common.time_runs(run, device=device, runs=args.runs, barrier=lambda: dist.barrier(sync)),
                                    sync)
        seconds = common.median(times)
        stream_s = None
        if args.stream_calls > 1:  # back to back, no barrier: the ranks' host skew off the clock
            flush()
            dist.barrier(sync)
            calls = common.slowest_rank(common.time_stream(fn, device=device, calls=args.stream_calls)[1:], sync)
            stream_s = sum(calls) / len(calls)
        stats = torch.tensor([nbytes, rail, node], dtype=torch.float64)
        dist.all_reduce(stats, group=sync)
        stats /= world
        rows.append({"group": name, "op": op, "num_nodes": backend.num_nodes, "time_us": seconds * 1e6,
                     "bytes_per_rank": stats[0].item(), "GB/s": stats[0].item() / seconds / 1e9,
                     "rail_bytes_per_rank": stats[1].item(), "node_bytes_per_rank": stats[2].item(),
                     "rail_GB/s": stats[1].item() / seconds / 1e9, "internode_path": backend.internode_path,
                     "stream_us": stream_s * 1e6 if stream_s is not None else None})
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks-per-node", type=int, default=0, help="0: the launch's nodes")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--topk", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--a2a-bytes", type=int, default=64 << 20)
    parser.add_argument("--runs", type=int, default=common.MIN_TIMED_RUNS)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None)
    parser.add_argument("--no-host-route", action="store_true", help="leave out the host-driven route's rows")
    parser.add_argument("--node-kernel-bytes", type=int, default=None,
                        help="Options.all_to_all_kernel_bytes of the groups across nodes only (their node hop's "
                             "kernel line; 0: the copy engines)")
    parser.add_argument("--a2a-only", action="store_true",
                        help="all_to_all_single only, on the intranode and device-route groups (no MoE ops, no rounds row)")
    parser.add_argument("--stream-calls", type=int, default=20,
                        help="calls back to back for the stream columns (DeepEP's bench method); <= 1 skips them")
    args = parser.parse_args()

    device = common.pick_device(args.device)
    dist.init_process_group("ep")
    world = dist.get_world_size()
    sync = dist.new_group(backend="gloo")
    flush = common.l2_flusher(device)
    node_hop = {} if args.node_kernel_bytes is None else {"all_to_all_kernel_bytes": args.node_kernel_bytes}
    across = lambda device_route: torch_ep.Options(  # noqa: E731
        ranks_per_node=args.ranks_per_node, internode_device=device_route, internode_capacity=max(args.tokens, 1),
        **node_hop)
    groups = {"internode": dist.new_group(backend="ep", pg_options=across(True))}
    if not args.no_host_route and not args.a2a_only:
        groups["internode-host"] = dist.new_group(backend="ep", pg_options=across(False))
    if not args.a2a_only:
        # all_to_all_single with its NVSHMEM hop in rounds the host queues (not the default): its row only.
        a2a_rounds = torch_ep.Options(ranks_per_node=args.ranks_per_node, internode_a2a_device=False)
        groups["internode-a2a-rounds"] = dist.new_group(backend="ep", pg_options=a2a_rounds)
    hosts: List[str] = [None] * world
    dist.all_gather_object(hosts, os.uname().nodename, group=sync)
    if len(set(hosts)) == 1:  # the intranode path needs every rank on one host
        groups = {"intranode": dist.new_group(backend="ep", pg_options=torch_ep.Options(ranks_per_node=world)), **groups}
    rows = []
    for name, group in groups.items():
        rows += measure(name, group, args, device, sync, flush, a2a_only=args.a2a_only or name == "internode-a2a-rounds")
    intranode = {r["op"]: r for r in rows if r["group"] == "intranode"}
    for r in rows:  # the zero-copy combine against the intranode route's (plain) combine
        base = intranode.get(r["op"].split(",")[0]) if r["group"] != "intranode" else None
        r["vs_intranode"] = r["time_us"] / base["time_us"] if base else None
        r["stream_vs_intranode"] = r["stream_us"] / base["stream_us"] if base and base["stream_us"] else None
    if dist.get_rank() == 0:
        headers = ["group", "op", "nodes", "time (us)", "vs intranode", "stream us", "stream vs intranode",
                   "recv GB/s", "bytes/rank", "rail (RDMA) bytes/rank", "node (NVLink) bytes/rank", "rail GB/s", "path"]
        table = common.markdown_table(headers, [
            [r["group"], r["op"], r["num_nodes"], f"{r['time_us']:.1f}",
             f"{r['vs_intranode']:.2f}x" if r["vs_intranode"] else "-",
             f"{r['stream_us']:.1f}" if r["stream_us"] is not None else "-",
             f"{r['stream_vs_intranode']:.2f}x" if r["stream_vs_intranode"] else "-", f"{r['GB/s']:.1f}",
             common.format_bytes(int(r["bytes_per_rank"])), common.format_bytes(int(r["rail_bytes_per_rank"])),
             common.format_bytes(int(r["node_bytes_per_rank"])), f"{r['rail_GB/s']:.1f}", r["internode_path"] or "-"]
            for r in rows])
        meta = common.run_metadata(device, world_size=world, args=vars(args))
        print(table)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            common.write_text(os.path.join(args.out, "internode.md"), f"# internode ({meta})\n\n{table}\n")
            common.write_json(os.path.join(args.out, "internode.json"), {"meta": meta, "rows": rows})
    dist.barrier(sync)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
