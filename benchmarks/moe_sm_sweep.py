"""MoE dispatch/combine bandwidth against the SM budget: `benchmarks/moe.py --sm-sweep 1,2,4,8,16,24,32`.

    torchrun --nproc-per-node 2 benchmarks/moe.py --sm-sweep 1,2,4,8,16,24,32 --copy warp,bulk --out /tmp/sweep

For each budget S and copy variant C (--copy, default warp), an "ep" group over every rank with
torch_ep.Options(num_sms=S, moe_copy=C) runs dispatch bf16 and fp8, each with its layout computed
in the call and with the layout given (DeepEP's convention, and the one issue 18's targets and
DeepEP's tuned figures use), and combine bf16 (moe.py's ops and bandwidth, on the first
--tokens), checked against torch_ep.reference, then
timed by moe.py's two methods: stream (--stream-calls back to back) and isolated (--runs, one
call each after an L2 flush and a barrier). Rank 0 prints the table, then stream GB/s with a row
per budget and a column per op and variant, and writes to --out:
  moe_sm_sweep.json  the bandwidths, and `sm_table_entries`: per variant the entry for
                     torch_ep/data/sm_table.json (per kernel, SWEPT below, the fewest SMs whose
                     stream bandwidth reaches 95% of that variant's best, dispatch from its
                     layout-given rows: the kernel's own curve; `--entries JSON --into TABLE`
                     below puts them in a table, see torch_ep/sm_table.py); `sm_table_entry` is
                     the first variant's
  moe_sm_sweep.png   GB/s per rank against SMs: a subplot per op, a colour per variant, stream
                     solid and isolated dashed; DeepEP's tuned figure dotted where DEEPEP_TUNED
                     has the sweep's setting

Re-plot a sweep's JSON, or derive its table entries again (after a change to the rules), no GPU
needed (torch_ep importable, a CPU build will do; matplotlib for the plot):

    python -m benchmarks.moe_sm_sweep --replot moe_sm_sweep.json moe_sm_sweep.png
    python -m benchmarks.moe_sm_sweep --entries moe_sm_sweep.json
    python -m benchmarks.moe_sm_sweep --entries moe_sm_sweep.json --into torch_ep/data/sm_table.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import sm_table
from torch_ep.options import FALLBACK_MOE_COPY, MOE_COPIES

from benchmarks import common
from benchmarks.moe import FP8_BLOCK, Measurement, make_inputs
from benchmarks.moe_checks import LAYOUT_GIVEN, check_against_reference, reference_results

# Table op -> moe.py op. Dispatch's budget comes from its layout-given rows: a layout computed in
# the call adds a kernel and a host wait for the sizes that no SM budget shortens, which flattens
# the curve and makes few SMs look enough.
SWEPT = {"dispatch": "dispatch bf16" + LAYOUT_GIVEN, "dispatch_fp8": "dispatch fp8" + LAYOUT_GIVEN,
         "combine": "combine bf16"}
OPS = ("dispatch bf16", "dispatch fp8", "dispatch bf16" + LAYOUT_GIVEN, "dispatch fp8" + LAYOUT_GIVEN,
       "combine bf16")  # timed at each budget

# DeepEP v1 (commit 567632d, built from source on the GPU machine), its own intranode test tuned over
# SMs and chunk sizes (best at 24 SMs), with the ranks sharing the GPU under MPS as the sweep's do:
# GB/s per rank, drawn as reference lines on a sweep of the same setting. Its test passes the layout
# computed before the timed dispatch: the reference of the layout-given rows.
# (device, ranks, ranks per GPU, tokens, hidden, top_k, experts) -> {op: GB/s}
DEEPEP_TUNED = {
    ("NVIDIA H200", 2, 2, 4096, 7168, 8, 256): {"dispatch bf16" + LAYOUT_GIVEN: 310.0,
                                                "dispatch fp8" + LAYOUT_GIVEN: 228.0, "combine bf16": 248.0},
    ("NVIDIA H100 80GB HBM3", 2, 2, 4096, 7168, 8, 256): {"dispatch bf16" + LAYOUT_GIVEN: 284.0,
                                                          "dispatch fp8" + LAYOUT_GIVEN: 223.0,
                                                          "combine bf16": 233.0},
}


def parse_budgets(text: str) -> List[int]:
    """'1,2,4' -> [1, 2, 4]: distinct SM budgets >= 1, sorted (argparse type of --sm-sweep)."""
    try:
        budgets = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--sm-sweep {text!r}: expected SM counts separated by commas, e.g. 1,2,4,8") from None
    if not budgets or budgets[0] < 1:
        raise ValueError(f"--sm-sweep {text!r}: expected SM counts >= 1")
    return budgets


def parse_copies(text: str) -> List[str]:
    """'warp,bulk' -> ['warp', 'bulk']: distinct copy variants (Options.moe_copy), in the given order."""
    copies = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [c for c in copies if c not in MOE_COPIES]
    if not copies or unknown:
        raise ValueError(f"--copy {text!r}: expected variants among {', '.join(MOE_COPIES)} separated by commas")
    return copies


def measure_budget(sms: int, copy: str, inputs, expected, tokens: int, args, device: torch.device,
                   sync_group) -> List[Measurement]:
    """OPS on a group whose kernels may use `sms` SMs and move rows with `copy`."""
    group = dist.new_group(backend=torch_ep.BACKEND_NAME, pg_options=torch_ep.Options(num_sms=sms, moe_copy=copy))
    x, idx, weights, E = inputs.x, inputs.topk_idx, inputs.topk_weights, args.experts
    first = torch_ep.dispatch(x, idx, weights, num_experts=E, group=group)
    layout = torch_ep.get_dispatch_layout(idx, E, group=group)
    ops = {
        "dispatch bf16": lambda: torch_ep.dispatch(x, idx, weights, num_experts=E, group=group),
        "dispatch fp8": lambda: torch_ep.dispatch(inputs.x_fp8, idx, weights, num_experts=E, group=group),
        "dispatch bf16" + LAYOUT_GIVEN: lambda: torch_ep.dispatch(x, idx, weights, num_experts=E, layout=layout,
                                                                  group=group),
        "dispatch fp8" + LAYOUT_GIVEN: lambda: torch_ep.dispatch(inputs.x_fp8, idx, weights, num_experts=E,
                                                                 layout=layout, group=group),
        "combine bf16": lambda: torch_ep.combine(first.recv_x, first.handle, group=group),
    }
    assert tuple(ops) == OPS
    unchecked = set(OPS) - set(check_against_reference(ops, inputs, E, sync_group, expected))
    if unchecked:  # a row no check covers is timed blind
        raise RuntimeError(f"the sweep's ops {sorted(unchecked)} have no reference check")
    rows = first.recv_x.shape[0]  # combine: the bytes of the dispatch it reverses
    op_bytes = {op: rows * (args.hidden + 4 * -(-args.hidden // FP8_BLOCK) if "fp8" in op else args.hidden * 2)
                for op in OPS}
    rank_bytes: List[Optional[Dict[str, int]]] = [None] * dist.get_world_size()
    dist.all_gather_object(rank_bytes, op_bytes, group=sync_group)
    flush = common.l2_flusher(device)

    def start_run():
        flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        dist.barrier(group=sync_group)

    measurements = []
    label = f"ep sms={sms} copy={copy}"
    for op, fn in ops.items():
        op_rank_bytes = [b[op] for b in rank_bytes]
        isolated = common.time_runs(fn, device=device, runs=args.runs, warmup=args.warmup, barrier=start_run)
        measurements.append(Measurement(label, op, tokens, op_rank_bytes, common.slowest_rank(isolated, sync_group)))
        if args.stream_calls > 1:
            start_run()
            stream = common.time_stream(fn, device=device, calls=args.stream_calls)[1:]
            measurements.append(Measurement(label, op, tokens, op_rank_bytes,
                                            common.slowest_rank(stream, sync_group), method="stream"))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier(group=sync_group)
    dist.destroy_process_group(group)
    return measurements


Results = Dict[Tuple[int, str], List[Measurement]]  # (sms, copy) -> measurements


def sweep_gbps(rows: List[dict], method: str, copy: str) -> Dict[str, Dict[int, float]]:
    """{table op: {sms: GB/s}} of one timing method and copy variant, from the JSON's result rows."""
    return {table_op: {r["sms"]: r["GBps"] for r in rows
                       if r.get("copy", sm_table.UNNAMED_ENTRY_COPY) == copy and r["op"] == op and r["method"] == method}
            for table_op, op in SWEPT.items()}


def table_entries(data: dict) -> List[dict]:
    """Per copy variant the entry for torch_ep/data/sm_table.json, from a sweep's JSON content
    (its meta and result rows): the stream method's figures where it ran, else the isolated ones."""
    meta, rows = data["meta"], data["results"]
    method = "stream" if meta.get("stream_calls", 2) > 1 else "isolated"
    shape = {k: meta.get(k) for k in ("tokens", "hidden", "top_k", "experts", "masked_ratio")}
    copies = list(dict.fromkeys(r.get("copy", sm_table.UNNAMED_ENTRY_COPY) for r in rows))
    return [sm_table.derive_entry(sweep_gbps(rows, method, copy), device=meta["device_name"], ranks=meta["ranks"],
                                  ranks_per_gpu=meta["ranks_per_gpu"], copy=copy,
                                  measured={"method": method, "ops": dict(SWEPT), **shape, "date": meta["date"],
                                            "commit": meta["commit"]})
            for copy in copies]


def auto_picks(entries: List[dict]) -> str:
    """What Options.moe_copy="auto" takes from these entries (one sweep's): by dispatch's figures,
    and per kernel (where the table says sm_table.PER_KERNEL_KEY)."""
    key = (entries[0]["device"], entries[0]["ranks"], entries[0]["ranks_per_gpu"])
    copies = [e["copy"] for e in entries]
    default = FALLBACK_MOE_COPY if FALLBACK_MOE_COPY in copies else copies[0]
    pick = {op: sm_table.choose_copy(*key, {"entries": entries}, default=default, op=op) for op in sm_table.OPS}
    return f"{pick['dispatch']} (per kernel: {', '.join(f'{op} {copy}' for op, copy in pick.items())})"


def pivot_table(results: Results, method: str, copies: List[str]) -> str:
    """GB/s of `method`: a row per budget, a column per op and copy variant."""
    by_key = {(sms, c, m.op): m for (sms, c), ms in results.items() for m in ms if m.method == method}
    columns = [(op, c) for op in OPS for c in copies]
    rows = [[sms] + [f"{by_key[(sms, c, op)].gbps:.1f}" if (sms, c, op) in by_key else "n/a" for op, c in columns]
            for sms in sorted({sms for sms, _ in results})]
    return common.markdown_table(["SMs"] + [f"{op} {c}" for op, c in columns], rows)


def run(args, device: torch.device, sync_group) -> None:
    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokens = args.tokens[0]
    copies = args.copy or ["warp"]
    inputs = make_inputs(common.shared_seed(sync_group), rank, world_size, tokens, args, device)
    expected = reference_results(inputs, args.experts)
    results: Results = {}
    for sms in args.sm_sweep:
        for copy in copies:
            results[(sms, copy)] = measure_budget(sms, copy, inputs, expected, tokens, args, device, sync_group)
        if rank == 0:  # progress, and what a run cut short still tells
            method = "stream" if args.stream_calls > 1 else "isolated"
            gbps = {(c, m.op): m.gbps for c in copies for m in results[(sms, c)] if m.method == method}
            print(f"{sms} SMs: " + " | ".join(op + "".join(f" {c} {gbps[(c, op)]:.1f}" for c in copies) for op in OPS)
                  + f" GB/s ({method})", flush=True)
    ranks_per_gpu = common.ranks_per_gpu(device, sync_group) if device.type == "cuda" else 1
    if rank != 0:
        return

    method = "stream" if args.stream_calls > 1 else "isolated"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    shape = {"tokens": tokens, "hidden": args.hidden, "top_k": args.top_k, "experts": args.experts,
             "masked_ratio": args.masked_ratio}
    meta = common.run_metadata(device, device_name=device_name, ranks=world_size, ranks_per_gpu=ranks_per_gpu,
                               sms=args.sm_sweep, copies=copies, runs=args.runs, warmup=args.warmup,
                               stream_calls=args.stream_calls, checked="bit for bit against torch_ep.reference",
                               **shape)
    data = {
        "benchmark": "moe dispatch/combine against the SM budget (Options.num_sms) and copy variant (Options.moe_copy)",
        "meta": meta,
        "results": [{"sms": sms, "copy": copy, "op": m.op, "method": m.method, "tokens": m.tokens,
                     "bytes_per_rank": m.bytes_per_rank, "time_us": m.time_s * 1e6, "GBps": m.gbps,
                     "run_times_us": [t * 1e6 for t in m.run_times_s]}
                    for (sms, copy), ms in results.items() for m in ms],
    }
    entries = table_entries(data)
    data.update(sm_table_entry=entries[0], sm_table_entries=entries)
    rows = [[sms, copy, m.method, m.op, common.format_bytes(int(m.bytes_per_rank)), f"{m.time_s * 1e6:.1f}",
             f"{m.gbps:.2f}"]
            for (sms, copy), ms in results.items() for m in sorted(ms, key=lambda m: (m.method, m.op))]
    table = common.markdown_table(["SMs", "copy", "method", "op", "bytes/rank", "us", "GB/s"], rows)
    chosen = "; ".join(f"{e['copy']}: " + ", ".join(f"{op} {e[op]} SMs" for op in sm_table.OPS) for e in entries)
    print(f"{table}\n\n{method} GB/s per rank:\n{pivot_table(results, method, copies)}\n"
          f"sm_table entries ({method}, {sm_table.REACH:.0%} of each variant's best): {chosen}; "
          f"Options.moe_copy='auto' would take {auto_picks(entries)}", flush=True)
    if not args.out:
        return
    common.write_json(os.path.join(args.out, "moe_sm_sweep.json"), data)
    if not plot_sweep(data, os.path.join(args.out, "moe_sm_sweep.png")):
        print("moe_sm_sweep.png: not written (no matplotlib)", flush=True)


def deepep_reference(meta: dict) -> Optional[Dict[str, float]]:
    """DeepEP's tuned GB/s per op for the setting in a sweep's meta, or None where none is known."""
    key = (meta.get("device_name"), meta.get("ranks"), meta.get("ranks_per_gpu"), meta.get("tokens"),
           meta.get("hidden"), meta.get("top_k"), meta.get("experts"))
    return DEEPEP_TUNED.get(key) if not meta.get("masked_ratio") else None


def plot_sweep(data: dict, path: str) -> bool:
    """A sweep's data (moe_sm_sweep.json's content) as a PNG: a subplot per op, a colour per copy
    variant, stream solid and isolated dashed, GB/s per rank against SMs on a log2 axis, and DeepEP's
    tuned figure as a dotted line where deepep_reference knows the setting; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        return False
    meta, results = data["meta"], data["results"]
    copies = list(dict.fromkeys(r.get("copy", "warp") for r in results))  # files before --copy: warp
    methods = {"stream": "-", "isolated": "--"}
    colours = dict(zip(copies, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    reference = deepep_reference(meta) or {}
    budgets = sorted({r["sms"] for r in results})
    fig, axes = plt.subplots(1, len(OPS), figsize=(3.6 * len(OPS), 5), sharey=True)
    for ax, op in zip(axes, OPS):
        for copy in copies:
            for method, style in methods.items():
                points = sorted((r["sms"], r["GBps"]) for r in results
                                if r["op"] == op and r.get("copy", "warp") == copy and r["method"] == method)
                if points:
                    ax.plot(*zip(*points), style, marker="o", markersize=3, color=colours[copy])
        if op in reference:
            ax.axhline(reference[op], color="black", linestyle=":", linewidth=1.5)
            ax.annotate(f"DeepEP tuned: {reference[op]:.0f}", (budgets[0], reference[op]), xytext=(0, 3),
                        textcoords="offset points", fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.minorticks_off()
        ax.set(title=op, xlabel="SMs (Options.num_sms)")
        ax.grid(True, alpha=0.3)
        ax.tick_params(labelleft=True)
    top = max([r["GBps"] for r in results] + list(reference.values()))
    axes[0].set_ylim(0, 1.05 * top)  # shared by every subplot; set once, after every line is drawn
    axes[0].set_ylabel("GB/s per rank")
    handles = [Line2D([], [], color=colours[c], marker="o", markersize=3, label=c) for c in copies]
    handles += [Line2D([], [], color="gray", linestyle=style, label=method) for method, style in methods.items()]
    if reference:
        handles.append(Line2D([], [], color="black", linestyle=":", label="DeepEP, its own test tuned (24 SMs)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    sharing = f"{meta.get('ranks')} ranks" + (f" sharing one {meta.get('device_name')}" if meta.get("ranks_per_gpu") == meta.get("ranks")
                                             else f", {meta.get('ranks_per_gpu')} per {meta.get('device_name')}")
    fig.suptitle(f"MoE bandwidth against the SM budget: {sharing}; {meta.get('tokens')} tokens x {meta.get('hidden')}, "
                 f"top-{meta.get('top_k')} of {meta.get('experts')} experts; {meta.get('date')}, commit {meta.get('commit')}")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def merge_entries(table: dict, entries: List[dict]) -> dict:
    """`table` (sm_table.json's contents) with `entries` in it: each replaces the entry of its GPU
    model, group and copy variant where it stands, or goes last."""
    key = lambda e: (e["device"], e["ranks"], e["ranks_per_gpu"], e.get("copy", sm_table.UNNAMED_ENTRY_COPY))  # noqa: E731
    new = {key(e): e for e in entries}
    merged = [new.pop(key(e), e) for e in table.get("entries", [])]
    return {**table, "entries": merged + list(new.values())}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Re-plot a moe_sm_sweep.json, or derive its table entries again; "
                                                 "the sweep itself runs through benchmarks/moe.py --sm-sweep")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--replot", nargs=2, metavar=("JSON", "PNG"),
                      help="the sweep's moe_sm_sweep.json and the PNG to write")
    what.add_argument("--entries", metavar="JSON",
                      help="print the sm_table.json entries of a sweep's moe_sm_sweep.json, as today's rules derive them")
    parser.add_argument("--into", metavar="TABLE",
                        help="with --entries: write them into this sm_table.json, each in place of the entry of "
                             "its GPU model, group and copy variant")
    args = parser.parse_args(argv)
    if args.into and not args.entries:
        parser.error("--into goes with --entries")
    with open(args.entries or args.replot[0]) as f:
        data = json.load(f)
    if args.entries:
        entries = table_entries(data)
        print(json.dumps(entries, indent=2))
        print(f"Options.moe_copy='auto' would take {auto_picks(entries)}", file=sys.stderr)
        if args.into:
            with open(args.into) as f:
                table = merge_entries(json.load(f), entries)
            with open(args.into, "w") as f:
                f.write(json.dumps(table, indent=2) + "\n")
            print(f"wrote {len(entries)} entries into {args.into}", file=sys.stderr)
        return 0
    if not plot_sweep(data, args.replot[1]):
        print("no matplotlib: pip install matplotlib", file=sys.stderr)
        return 1
    print(f"wrote {args.replot[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
