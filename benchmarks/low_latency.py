"""Low-latency dispatch / combine latency of torch_ep, with the HBM copy roofline of the same bytes
measured in the same run.

    torchrun --nproc-per-node 2 benchmarks/low_latency.py --out benchmarks/results/low_latency_h100_2ranks

The decoding setting of DeepEP's low-latency figures by default: every rank dispatches 128 tokens
of hidden 7168, each to its top 8 of 256 experts (top-k of random scores, as DeepEP's tests draw
them). Ops, each timed as CUDA-graph replays of --reps back-to-back calls (no host overhead; the
time is per call, including the wait for the slowest peer):
  dispatch fp8 / bf16   low_latency_dispatch(x, topk_idx, max_tokens_per_rank=128, ...)
  combine               low_latency_combine(expert outputs, topk_idx, topk_weights, handle)
  combine zero-copy     the same with the expert outputs in low_latency_combine_buffer(handle):
                        the peers read them there (one copy instead of two)
  ... send / ... recv   the hook split: a graph of the send alone, then one of the hook alone,
                        timed one call at a time (recv includes waiting for the peers' sends)
Bytes per rank, DeepEP's convention: rows received x row bytes (fp8 rows count their scales);
combine: the rows sent back, bf16. A time is the median over --runs runs of the slowest rank's
time. Every run starts with the L2 cache flushed and a barrier, then one untimed call of the same
op (a full call, replayed from a graph of its own) before the timed region: that synchronising
call ends on a rank only once every peer has sent to it, and every rank's host has already queued
the timed graph behind it, so the timed region starts in step on every rank's device. The ranks
leave the Gloo barrier milliseconds apart (8 ranks sharing a GPU), and without that call the first
timed call would wait out that skew. The synchronising call reads the op's inputs, so they are in
L2 when the timed calls start, as they are for all but the first of the back-to-back calls anyway.
A sleep kernel ahead of the synchronising call holds the stream while the host queues the rest,
so no timed region includes the host's time to launch a graph.
Roofline: every rank copies as many bytes as the op moves to it (dst.copy_(src)), timed the same
way, after the same synchronising call, so that all ranks copy at once and share the HBM as the
op does; the ratio op time / roofline time is what the issue's 8-rank target bounds (<= 2x).
HBM bound: the same bytes read once and written once by every rank on the GPU, at --hbm-rate (the
GPU's best copy rate, all SMs; the copy roofline above runs under each rank's MPS share of SMs).
Before timing, the outputs are checked against torch_ep.reference (bf16 dispatch and combine bit
for bit on integer-valued data; fp8 scales bit for bit).

Across nodes: --remote-ranks-per-node L also times every op on a second group of the same
ranks split into nodes of L with Options.force_remote, so that ranks on other (virtual) nodes
are reached through NVSHMEM's device API (puts), as across real nodes; rows "... (remote)"
give their time against the intranode op of the same run ("vs intranode").

Rank 0 prints the table and writes low_latency.md and low_latency.json to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import reference
from torch_ep.testing import same_bits

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

FP8_BLOCK = 128
# Published EP8 figures (not measured here): DeepEP on H800 (RDMA + NVLink), pplx-kernels on H100 (NVLink).
PUBLISHED_US = {"DeepEP dispatch": 77.0, "DeepEP combine": 114.0, "pplx dispatch": 83.6, "pplx combine": 102.3}
TARGETS_2_RANKS_US = {"dispatch": 30.0, "combine": 40.0}


def make_inputs(seed: int, args, device):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed + 7919 * rank)
    scores = torch.randn(args.tokens, args.experts, generator=g).abs() + 1
    idx = scores.topk(args.top_k, dim=-1, sorted=False).indices
    weights = torch.randint(1, 9, idx.shape, generator=g).float() / 8
    bound = max(1, 64 // args.top_k)  # combine's weighted sums stay integers bf16 holds exactly
    x = torch.randint(-bound, bound + 1, (args.tokens, args.hidden), generator=g).to(torch.bfloat16)
    return x.to(device), idx.to(device), weights.to(device)


def expert_outputs(recv_x: torch.Tensor) -> torch.Tensor:
    return recv_x  # bf16 rows sent back as they came: combine's bytes, not an expert's work


def check(x, idx, w, args, sync_group, group=None) -> None:
    problems = []
    for fp8 in (False, True):
        got = torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=args.tokens, num_experts=args.experts,
                                            use_fp8=fp8, group=group)
        want = reference.low_latency_dispatch(x.cpu(), idx.cpu(), max_tokens_per_rank=args.tokens,
                                              num_experts=args.experts, use_fp8=fp8)
        # each expert's rows packed from row 0
        valid = torch.arange(want.recv_x[0].shape[1] if fp8 else want.recv_x.shape[1]).view(1, -1) < \
            want.recv_count.view(-1, 1)
        if not torch.equal(got.handle.layout.cpu(), want.handle.layout):
            problems.append(f"{'fp8' if fp8 else 'bf16'} dispatch: counts differ")
            continue
        if fp8:
            if not same_bits(got.recv_x[1].cpu()[valid], want.recv_x[1][valid]):
                problems.append("fp8 dispatch: scales differ")
        else:
            if not same_bits(got.recv_x.cpu()[valid], want.recv_x[valid]):
                problems.append("bf16 dispatch: rows differ")
            comb = torch_ep.low_latency_combine(expert_outputs(got.recv_x), idx, w, got.handle)
            ref = reference.low_latency_combine(expert_outputs(want.recv_x), idx.cpu(), w.cpu(), want.handle)
            if not same_bits(comb.combined_x.cpu(), ref.combined_x):
                problems.append("combine: output differs")
            buf = torch_ep.low_latency_combine_buffer(got.handle)
            buf.copy_(expert_outputs(got.recv_x))
            comb = torch_ep.low_latency_combine(buf, idx, w, got.handle)
            if not same_bits(comb.combined_x.cpu(), ref.combined_x):
                problems.append("combine (zero copy): output differs")
    torch.cuda.synchronize()
    gathered: List = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, problems, group=sync_group)
    found = [f"rank {r}: {p}" for r, ps in enumerate(gathered) for p in ps]
    if found:
        raise RuntimeError("low-latency ops differ from torch_ep.reference, not timing them:\n  " + "\n  ".join(found))


def hold_stream() -> None:
    """Keeps the stream busy (about half a millisecond) while the host queues what follows, so
    that no timed region includes the host's time to launch a graph: an event runs as soon as
    the stream reaches it, and a graph launched after it would start later by that much."""
    torch.cuda._sleep(1_000_000)


def capture(fn: Callable[[], object], reps: int, pool=None) -> torch.cuda.CUDAGraph:
    fn()  # outside the graph: buffers and NVSHMEM are set up here
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        for _ in range(reps):
            fn()
    torch.cuda.synchronize()
    return graph


def capture_synced(fn: Callable[[], object], reps: int) -> Tuple[torch.cuda.CUDAGraph, torch.cuda.CUDAGraph]:
    """The timed graph of `reps` calls and the graph of one call to replay before it (see
    time_graphs). One memory pool: the one call's outputs (hundreds of MiB for a dispatch) are
    freed by the end of its capture, and the timed graph reuses them; captured in replay order."""
    sync = capture(fn, 1)
    return capture(fn, reps, pool=sync.pool()), sync


def time_graphs(graphs: List[Tuple[torch.cuda.CUDAGraph, Optional[torch.cuda.CUDAGraph]]], reps: int, args, device,
                sync_group) -> List[List[float]]:
    """Per run, the seconds per call of each (timed graph, synchronising graph or None) in turn,
    as the slowest rank saw them. Each timed replay follows its own flush, barrier and
    synchronising replay: that one call of the op ends only once every peer has sent, and the
    host queues the timed replay right behind it, so the timed region starts in step on every
    rank instead of as each leaves the barrier."""
    flush = common.l2_flusher(device)
    times: List[List[float]] = [[] for _ in graphs]
    for _ in range(args.warmup):
        for g, sync in graphs:
            if sync is not None:
                sync.replay()
            g.replay()
    for _ in range(args.runs):
        for i, (g, sync) in enumerate(graphs):
            flush()
            torch.cuda.synchronize(device)
            dist.barrier(group=sync_group)
            hold_stream()
            if sync is not None:
                sync.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            g.replay()
            end.record()
            end.synchronize()
            times[i].append(start.elapsed_time(end) / 1e3 / reps)
    return [common.slowest_rank(t, sync_group) for t in times]


def time_split(send: Callable[[], object], sync: Callable[[], object], args, device, sync_group):
    """The hook split: one send then its hook, each captured on its own, timed per call.
    `sync` is one full call of the same op (no hook), replayed before the send as in time_graphs,
    so that recv measures the receive, not the ranks' skew leaving the barrier."""
    state = {}

    def do_send():
        state["result"] = send()

    g_sync = capture(sync, 1)
    do_send()
    state["result"].hook()
    torch.cuda.synchronize()
    g_send, g_recv = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    # one pool for the three, captured in replay order (the send's outputs stay live for the hook)
    with torch.cuda.graph(g_send, pool=g_sync.pool()):
        do_send()
    hook = state["result"].hook
    with torch.cuda.graph(g_recv, pool=g_sync.pool()):
        hook()
    flush = common.l2_flusher(device)
    send_t, recv_t = [], []
    for run in range(args.warmup + args.runs):
        flush()
        torch.cuda.synchronize(device)
        dist.barrier(group=sync_group)
        hold_stream()
        g_sync.replay()
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        events[0].record()
        g_send.replay()
        events[1].record()
        g_recv.replay()
        events[2].record()
        events[2].synchronize()
        if run >= args.warmup:
            send_t.append(events[0].elapsed_time(events[1]) / 1e3)
            recv_t.append(events[1].elapsed_time(events[2]) / 1e3)
    return common.slowest_rank(send_t, sync_group), common.slowest_rank(recv_t, sync_group)


def make_ops(x, idx, w, args, group):
    """The timed ops on `group`, their bytes per rank, and (send with hook, full call) of the split."""
    kw = dict(max_tokens_per_rank=args.tokens, num_experts=args.experts, group=group)
    bf16 = torch_ep.low_latency_dispatch(x, idx, use_fp8=False, **kw)
    torch.cuda.synchronize()
    y = expert_outputs(bf16.recv_x).clone()
    rows = int(bf16.recv_count.sum())
    row_bytes = {"fp8": args.hidden + args.hidden // FP8_BLOCK * 4, "bf16": 2 * args.hidden}
    op_bytes = {"dispatch fp8": rows * row_bytes["fp8"], "dispatch bf16": rows * row_bytes["bf16"],
                "combine": rows * row_bytes["bf16"], "combine zero-copy": rows * row_bytes["bf16"]}
    for _ in range(2):  # both halves' combine buffers hold the expert outputs
        torch_ep.low_latency_combine(torch_ep.low_latency_combine_buffer(bf16.handle).copy_(y), idx, w, bf16.handle)
    ops: Dict[str, Callable[[], object]] = {
        "dispatch fp8": lambda: torch_ep.low_latency_dispatch(x, idx, use_fp8=True, **kw),
        "dispatch bf16": lambda: torch_ep.low_latency_dispatch(x, idx, use_fp8=False, **kw),
        "combine": lambda: torch_ep.low_latency_combine(y, idx, w, bf16.handle),
        # the experts wrote into the combine buffer (once, above): the combine moves each row once
        "combine zero-copy": lambda: torch_ep.low_latency_combine(torch_ep.low_latency_combine_buffer(bf16.handle), idx,
                                                                  w, bf16.handle),
    }
    split = {
        "dispatch fp8": (lambda: torch_ep.low_latency_dispatch(x, idx, use_fp8=True, return_recv_hook=True, **kw),
                         ops["dispatch fp8"]),
        "combine": (lambda: torch_ep.low_latency_combine(y, idx, w, bf16.handle, return_recv_hook=True),
                    ops["combine"]),
    }
    return ops, op_bytes, split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per rank (= max_tokens_per_rank)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--runs", type=int, default=common.MIN_TIMED_RUNS)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=10, help="calls per timed graph replay")
    parser.add_argument("--hbm-rate", type=float, default=3.0e12,
                        help="bytes/s (read + written) of the GPU's best device copy, for the HBM bound column; "
                             "3.0e12: a 1 GiB copy on the H100 (GPU-NOTES.md)")
    parser.add_argument("--remote-ranks-per-node", type=int, default=0,
                        help="also time the ops with ranks on other virtual nodes of this size reached by NVSHMEM puts")
    args = parser.parse_args()

    device = common.pick_device("cuda")
    dist.init_process_group(torch_ep.BACKEND_NAME)
    rank, size = dist.get_rank(), dist.get_world_size()
    sync_group = dist.new_group(backend="gloo")
    sharing = common.ranks_per_gpu(device, sync_group)
    x, idx, w = make_inputs(common.shared_seed(sync_group), args, device)
    groups = {"": None}
    if args.remote_ranks_per_node:
        groups[" (remote)"] = dist.new_group(
            pg_options=torch_ep.Options(ranks_per_node=args.remote_ranks_per_node, force_remote=True))
    ops: Dict[str, Callable[[], object]] = {}
    op_bytes: Dict[str, int] = {}
    split_ops: Dict[str, Tuple[Callable[[], object], Callable[[], object]]] = {}
    # The remote group first: the first call sizes NVSHMEM's heap, and its buffers are the larger.
    for group in reversed(list(groups.values())):
        check(x, idx, w, args, sync_group, group)
    for suffix, group in groups.items():
        group_ops, group_bytes, group_split = make_ops(x, idx, w, args, group)
        ops.update({op + suffix: fn for op, fn in group_ops.items()})
        op_bytes.update({op + suffix: n for op, n in group_bytes.items()})
        split_ops.update({op + suffix: fns for op, fns in group_split.items()})
    copies = {}
    for op, nbytes in op_bytes.items():
        src = torch.randint(0, 256, (max(nbytes, 1),), dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        copies[op] = (lambda d, s: (lambda: d.copy_(s)))(dst, src)
    names = list(ops)
    op_graphs = [capture_synced(ops[n], args.reps) for n in names]
    # The copies start after the op's synchronising call too, so that every rank copies at once
    # (the roofline is the HBM shared by all ranks, as the op shares it).
    roofline_graphs = [(capture(copies[n], args.reps), sync) for n, (_, sync) in zip(names, op_graphs)]
    timed = time_graphs(op_graphs + roofline_graphs, args.reps, args, device, sync_group)
    split = {op: time_split(send, ops[op], args, device, sync_group) for op, (send, _) in split_ops.items()}
    all_bytes: List = [None] * size
    dist.all_gather_object(all_bytes, op_bytes, group=sync_group)

    if rank == 0:
        results, table_rows = [], []
        for i, op in enumerate(names):
            t, roof = common.median(timed[i]), common.median(timed[len(names) + i])
            nbytes = sum(b[op] for b in all_bytes) / size
            bound = nbytes * sharing * 2 / args.hbm_rate  # each byte read once and written once, per GPU
            entry = {"op": op, "bytes_per_rank": nbytes, "time_us": t * 1e6, "GBps": nbytes / t / 1e9,
                     "roofline_us": roof * 1e6, "ratio_to_roofline": t / roof,
                     "hbm_bound_us": bound * 1e6, "ratio_to_hbm_bound": t / bound,
                     "run_times_us": [v * 1e6 for v in timed[i]]}
            if op in split:
                entry["send_us"] = common.median(split[op][0]) * 1e6
                entry["recv_us"] = common.median(split[op][1]) * 1e6
            kind = "dispatch" if op.startswith("dispatch") else "combine"
            entry["target_us_2_ranks"] = TARGETS_2_RANKS_US[kind] if size == 2 else None
            if op.endswith(" (remote)"):
                entry["ratio_to_intranode"] = entry["time_us"] / results[names.index(op[:-len(" (remote)")])]["time_us"]
            results.append(entry)
            table_rows.append([op, common.format_bytes(int(nbytes)), f"{entry['time_us']:.1f}", f"{entry['GBps']:.1f}",
                               f"{entry['roofline_us']:.1f}", f"{entry['ratio_to_roofline']:.2f}x",
                               f"{entry['hbm_bound_us']:.1f}", f"{entry['ratio_to_hbm_bound']:.2f}x",
                               f"{entry['send_us']:.1f}" if "send_us" in entry else "-",
                               f"{entry['recv_us']:.1f}" if "recv_us" in entry else "-",
                               f"{entry['target_us_2_ranks']:.0f}" if entry["target_us_2_ranks"] else "-",
                               f"{entry['ratio_to_intranode']:.2f}x" if "ratio_to_intranode" in entry else "-"])
        table = common.markdown_table(["op", "bytes/rank", "us", "GB/s", "roofline us", "vs roofline", "HBM bound us",
                                       "vs bound", "send us", "recv us", "target us (R=2)", "vs intranode"], table_rows)
        meta = common.run_metadata(device, ranks=size, ranks_per_gpu=sharing, tokens=args.tokens, hidden=args.hidden,
                                   top_k=args.top_k, experts=args.experts, runs=args.runs, reps=args.reps,
                                   hbm_rate_Bps=args.hbm_rate,
                                   published_ep8_us=PUBLISHED_US, checked="against torch_ep.reference",
                                   env={k: v for k, v in os.environ.items()
                                        if k.startswith(("TORCH_EP_", "NVSHMEM_", "CUDA_MPS"))})
        print(table, flush=True)
        if args.out:
            common.write_json(os.path.join(args.out, "low_latency.json"),
                              {"benchmark": "low-latency dispatch/combine", "meta": meta, "results": results})
            header = (f"# Low-latency dispatch/combine: {size} ranks, {meta['machine']}\n\n"
                      + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n")
            common.write_text(os.path.join(args.out, "low_latency.md"), header + table)
    dist.barrier(group=sync_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
