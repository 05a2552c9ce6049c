"""all_to_all_single on the device protocol against its settings (torch_ep.Options.all_to_all_*),
with the copy roofline measured in the same run.

    torchrun --nproc-per-node 2 benchmarks/all_to_all_sweep.py --out /tmp/sweep \\
        --staged "lanes=16,slot=1M;lanes=32,slot=128K" --pool "blocks=66;blocks=132,launches=2"

A staged setting (lanes, slot, launches) makes a group with Options(all_to_all_device=True, ...),
timed eagerly (ep_device) and replayed from a CUDA graph (ep_graph); a pool setting (blocks,
launches) makes a group with a comm pool, its tensors from the pool (ep_pool: the one-copy move).
Every setting's output is checked first; times as benchmarks/all_to_all.py takes them (the median
over runs of the slowest rank), the settings in turns. Prints (and writes to --out as
all_to_all_sweep.{md,json}) one table: a row per setting, a column per size, us per call and the
share of the roofline.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List

import torch.distributed as dist

import torch_ep

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.all_to_all import (GRAPH, POOL, ROOFLINE, measure_roofline, measure_size,  # noqa: E402
                                   sizes_between)

KEYS = {"lanes": "all_to_all_lanes", "slot": "all_to_all_slot_bytes", "blocks": "all_to_all_pool_blocks",
        "launches": "all_to_all_one_launch"}


def parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def parse_setting(spec: str) -> Dict[str, object]:
    """"lanes=32,slot=128K,launches=2" -> Options keyword arguments."""
    options: Dict[str, object] = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=")
        if key not in KEYS:
            raise SystemExit(f"setting {spec!r}: unknown key {key!r} (expected one of {', '.join(KEYS)})")
        options[KEYS[key]] = parse_bytes(value) != 2 if key == "launches" else parse_bytes(value)
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None)
    parser.add_argument("--staged", default="", help="staged settings, ';'-separated")
    parser.add_argument("--pool", default="", help="one-copy settings, ';'-separated")
    parser.add_argument("--min-bytes", type=int, default=1 << 20)
    parser.add_argument("--max-bytes", type=int, default=64 << 20)
    parser.add_argument("--factor", type=int, choices=[2, 4], default=4)
    parser.add_argument("--runs", type=int, default=common.MIN_TIMED_RUNS)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args()

    device = common.pick_device("cuda")
    dist.init_process_group("ep")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sync_group = dist.new_group(backend="gloo")
    sharing = common.ranks_per_gpu(device, sync_group)
    impls = {}
    for spec in filter(None, args.staged.split(";")):
        group = dist.new_group(backend="ep", pg_options=torch_ep.Options(all_to_all_device=True,
                                                                          **parse_setting(spec)))
        impls[f"ep_device {spec}"] = group
        impls[f"{GRAPH} {spec}"] = group
    for spec in filter(None, args.pool.split(";")):
        impls[f"{POOL} {spec}"] = dist.new_group(backend="ep", pg_options=torch_ep.Options(
            comm_pool_bytes=max(1 << 30, 8 * args.max_bytes), **parse_setting(spec)))

    measurements = []
    sizes = sizes_between(args.min_bytes, args.max_bytes, args.factor)
    for size in sizes:
        measurements += measure_size(impls, size, device, sync_group, runs=args.runs, warmup=args.warmup)
        measurements.append(measure_roofline(size, device, sharing, sync_group, runs=args.runs, warmup=args.warmup))
        if rank == 0:
            print(f"measured {common.format_bytes(size)} per rank", flush=True)

    if rank == 0:
        by_key = {(m.impl, m.size): m for m in measurements}
        headers = ["setting"] + [common.format_bytes(size) for size in sizes]
        rows: List[List[str]] = [[ROOFLINE] + [f"{by_key[ROOFLINE, s].time_s * 1e6:.1f} us" for s in sizes]]
        for impl in impls:
            rows.append([impl] + [f"{by_key[impl, s].time_s * 1e6:.1f} us "
                                  f"({by_key[impl, s].algbw_gbps / by_key[ROOFLINE, s].algbw_gbps:.0%})"
                                  for s in sizes])
        table = common.markdown_table(headers, rows)
        print(table, flush=True)
        if args.out:
            meta = common.run_metadata(device, ranks=world_size, runs=args.runs, warmup=args.warmup,
                                       env={k: v for k, v in os.environ.items() if k.startswith("TORCH_EP_")})
            meta["ranks_per_gpu"] = sharing
            common.write_text(os.path.join(args.out, "all_to_all_sweep.md"),
                              f"# all_to_all_single device protocol settings: {world_size} ranks\n\n"
                              + "\n".join(f"- {k}: {v}" for k, v in meta.items()) + "\n\n" + table)
            common.write_json(os.path.join(args.out, "all_to_all_sweep.json"), {
                "benchmark": "all_to_all_single device protocol settings", "meta": meta,
                "results": [{"impl": m.impl, "size": m.size, "time_us": m.time_s * 1e6, "algbw_GBps": m.algbw_gbps,
                             "run_times_us": [t * 1e6 for t in m.run_times_s]} for m in measurements]})
    dist.barrier(group=sync_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
