"""MoE dispatch/combine bandwidth against the SM budget: `benchmarks/moe.py --sm-sweep 1,2,4,8,16,24,32`.

    torchrun --nproc-per-node 2 benchmarks/moe.py --sm-sweep 1,2,4,8,16,24,32 --out /tmp/sweep

For each budget S, an "ep" group over every rank with torch_ep.Options(num_sms=S) runs dispatch
bf16 and combine bf16 (moe.py's ops and bandwidth, on the first --tokens), checked against
torch_ep.reference, then timed by moe.py's two methods: stream (--stream-calls back to back) and
isolated (--runs, one call each after an L2 flush and a barrier). Rank 0 prints the table and
writes to --out:
  moe_sm_sweep.json  the bandwidths, and `sm_table_entry`: the entry for torch_ep/data/sm_table.json
                     (per op the fewest SMs whose stream bandwidth reaches 95% of the sweep's best;
                     add it to the table's "entries" by hand, see torch_ep/sm_table.py)
  moe_sm_sweep.png   GB/s against SMs, one line per op and method
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import sm_table

from benchmarks import common
from benchmarks.moe import Measurement, check_against_reference, make_inputs

SWEPT = {"dispatch": "dispatch bf16", "combine": "combine bf16"}  # table op -> moe.py op


def parse_budgets(text: str) -> List[int]:
    """'1,2,4' -> [1, 2, 4]: distinct SM budgets >= 1, sorted (argparse type of --sm-sweep)."""
    try:
        budgets = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--sm-sweep {text!r}: expected SM counts separated by commas, e.g. 1,2,4,8") from None
    if not budgets or budgets[0] < 1:
        raise ValueError(f"--sm-sweep {text!r}: expected SM counts >= 1")
    return budgets


def measure_budget(sms: int, inputs, tokens: int, args, device: torch.device, sync_group) -> List[Measurement]:
    """dispatch bf16 and combine bf16 on a group whose kernels may use `sms` SMs."""
    group = dist.new_group(backend=torch_ep.BACKEND_NAME, pg_options=torch_ep.Options(num_sms=sms))
    x, idx, weights, E = inputs.x, inputs.topk_idx, inputs.topk_weights, args.experts
    first = torch_ep.dispatch(x, idx, weights, num_experts=E, group=group)
    ops = {
        "dispatch bf16": lambda: torch_ep.dispatch(x, idx, weights, num_experts=E, group=group),
        "combine bf16": lambda: torch_ep.combine(first.recv_x, first.handle, group=group),
    }
    check_against_reference(ops, inputs, E, sync_group)
    op_bytes = first.recv_x.shape[0] * args.hidden * x.element_size()  # combine: the dispatch it reverses
    rank_bytes: List[Optional[int]] = [None] * dist.get_world_size()
    dist.all_gather_object(rank_bytes, op_bytes, group=sync_group)
    flush = common.l2_flusher(device)

    def start_run():
        flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=sync_group)

    measurements = []
    for op, fn in ops.items():
        isolated = common.time_runs(fn, device=device, runs=args.runs, warmup=args.warmup, barrier=start_run)
        measurements.append(Measurement(f"ep sms={sms}", op, tokens, rank_bytes,
                                        common.slowest_rank(isolated, sync_group)))
        if args.stream_calls > 1:
            start_run()
            stream = common.time_stream(fn, device=device, calls=args.stream_calls)[1:]
            measurements.append(Measurement(f"ep sms={sms}", op, tokens, rank_bytes,
                                            common.slowest_rank(stream, sync_group), method="stream"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=sync_group)
    dist.destroy_process_group(group)
    return measurements


def sweep_gbps(results: Dict[int, List[Measurement]], method: str) -> Dict[str, Dict[int, float]]:
    """{table op: {sms: GB/s}} of one timing method."""
    return {table_op: {sms: m.gbps for sms, ms in results.items() for m in ms if m.op == op and m.method == method}
            for table_op, op in SWEPT.items()}


def run(args, device: torch.device, sync_group) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokens = args.tokens[0]
    inputs = make_inputs(common.shared_seed(sync_group), rank, world_size, tokens, args, device)
    results = {}
    for sms in args.sm_sweep:
        results[sms] = measure_budget(sms, inputs, tokens, args, device, sync_group)
        if rank == 0:
            print(f"measured {sms} SMs", flush=True)
    ranks_per_gpu = common.ranks_per_gpu(device, sync_group) if device.type == "cuda" else 1
    if rank != 0:
        return

    method = "stream" if args.stream_calls > 1 else "isolated"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = {"tokens": tokens, "hidden": args.hidden, "top_k": args.top_k, "experts": args.experts,
             "masked_ratio": args.masked_ratio}
    meta = common.run_metadata(device, device_name=device_name, ranks=world_size, ranks_per_gpu=ranks_per_gpu,
                               sms=args.sm_sweep, runs=args.runs, warmup=args.warmup, stream_calls=args.stream_calls,
                               checked="bit for bit against torch_ep.reference", **shape)
    entry = sm_table.derive_entry(sweep_gbps(results, method), device=device_name, ranks=world_size,
                                  ranks_per_gpu=ranks_per_gpu, measured={
                                      "method": method, **shape, "date": meta["date"], "commit": meta["commit"]})
    rows = [[sms, m.method, m.op, common.format_bytes(int(m.bytes_per_rank)), f"{m.time_s * 1e6:.1f}", f"{m.gbps:.2f}"]
            for sms, ms in results.items() for m in sorted(ms, key=lambda m: (m.method, m.op))]
    table = common.markdown_table(["SMs", "method", "op", "bytes/rank", "us", "GB/s"], rows)
    chosen = ", ".join(f"{op} {entry[op]} SMs" for op in sm_table.OPS)
    print(f"{table}\nsm_table entry ({method}, {sm_table.REACH:.0%} of the best): {chosen}", flush=True)
    if not args.out:
        return
    common.write_json(os.path.join(args.out, "moe_sm_sweep.json"), {
        "benchmark": "moe dispatch/combine against the SM budget (Options.num_sms)",
        "meta": meta,
        "results": [{"sms": sms, "op": m.op, "method": m.method, "tokens": m.tokens, "bytes_per_rank": m.bytes_per_rank,
                     "time_us": m.time_s * 1e6, "GBps": m.gbps, "run_times_us": [t * 1e6 for t in m.run_times_s]}
                    for sms, ms in results.items() for m in ms],
        "sm_table_entry": entry,
    })
    series = {}
    for sms, ms in results.items():
        for m in ms:
            xs, ys = series.setdefault(f"{m.op} ({m.method})", ([], []))
            xs.append(sms)
            ys.append(m.gbps)
    written = common.write_plot(
        os.path.join(args.out, "moe_sm_sweep.png"), series, xtick_label=lambda x: str(int(x)), log_y=False,
        title=f"MoE bandwidth against SMs: {world_size} ranks, {device_name}, {tokens} tokens x {args.hidden}",
        xlabel="SMs (Options.num_sms)", ylabel="GB/s per rank")
    if not written:
        print("moe_sm_sweep.png: not written (no matplotlib)", flush=True)
