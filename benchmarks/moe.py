"""MoE dispatch / combine bandwidth of torch_ep, with references measured in the same run.

    torchrun --nproc-per-node 8 benchmarks/moe.py --out benchmarks/results/moe
    torchrun --nproc-per-node 2 benchmarks/moe.py --impl reference --tokens 256 --hidden 512 --out /tmp/moe_bench

DeepEP's setting by default: every rank dispatches 4096 tokens of hidden 7168, each to its top 8
of 256 experts, drawn as DeepEP's tests draw them (top-k of random scores: 8 distinct experts,
uniformly at random); --masked-ratio sets that share of the slots to -1 (not routed). --tokens
takes several counts for a sweep. Ops, timed one after another:
  dispatch bf16    dispatch(x, topk_idx, topk_weights, num_experts=E), layout included
  ..., layout given  the same with layout=get_dispatch_layout(...) computed once before (DeepEP's
                   convention: its published figures pass a precomputed layout)
  dispatch fp8     the same with x cast to float8_e4m3fn per 128-channel block, float32 scales
  dispatch cached  dispatch(x, handle=handle), the handle of a bf16 dispatch (where --impl has it)
  combine bf16     combine(recv_x, handle): the reverse of a bf16 dispatch
  ..., fresh x     the same with a copy of recv_x made once before, as expert outputs are (under
                   push with device records it lies outside the MoE pool: copied in per call)
Each dispatch on a new route (all but cached) reads its num_recv_tokens_per_expert as a list,
as DeepEP's dispatch always returns it (a MoE layer sizes its expert GEMMs with it). --graph adds
dispatch bf16 / fp8 and combine bf16 with num_worst_tokens: called eagerly (", num_worst_tokens":
no host wait) and captured in a CUDA graph and replayed (", graph replay": no host work of the
op's on the clock) (benchmarks/moe_graph.py).
--impl picks what is measured: torch_ep's ops ("ep") or torch_ep.reference's (to develop the
benchmark before the ops exist). --api deep_ep measures the same ops through torch_ep.deep_ep's
Buffer (DeepEP's calls: get_dispatch_layout then dispatch, the handle tuples, the comm stream),
labelled "ep/deep_ep"; --api both times the native API and the DeepEP API in the same run, turn
about, and reports the wrapper's time against the native API's. References in the same run:
  roofline  every rank copies as many bytes as the op moves to it (dst.copy_(src)), all ranks at
            once: the bandwidth that memory allows an op that writes each received byte once,
            under the same sharing of the device as the op
  DeepEP    deep_ep.Buffer (intranode) on the same data, when deep_ep imports and every rank has
            a GPU of its own: get_dispatch_layout + dispatch (what a DeepEP user runs for one of
            our dispatches), dispatch(handle=), combine
Bandwidth = bytes received per rank / time, DeepEP's convention: dispatch counts received rows x
row bytes (fp8 rows count their scales), combine the bytes of the bf16 dispatch that it reverses.
bytes/rank is the mean over ranks. Two timing methods, each for every implementation:
  isolated  one call per run: L2 flushed (256 MiB written), a barrier, then the call between two
            events; the time is the median over runs of the slowest rank's. Every host-side
            microsecond of the call (and the ranks' skew leaving the barrier) is on the clock.
  stream    DeepEP's bench: L2 flushed once, then --stream-calls calls back to back, each between
            two events, no barrier; the time is the mean over calls (the first dropped) of the
            slowest rank's, the median over --stream-rounds such rounds (the ops take turns). The
            host prepares a call while the GPU still runs the previous one, as in a model's
            forward pass; DeepEP's published figures are measured this way. The table's last
            column gives the host's time to issue a call (the slowest rank's, the rounds'
            median); "(host-bound)" where it reaches HOST_BOUND of the call's device time: the
            device then waits for the host at times, and the figure is partly the host's. A
            dispatch that computes its layout waits for the counts on the host, so its host time
            holds the device's: "(waits for the counts)", never host-bound.
Before timing, ep's outputs are checked bit for bit against torch_ep.reference's on the
same inputs (integer-valued x, so that combine's sums are exact); a mismatch aborts the run.

Rank 0 prints the table and writes moe.md and moe.json to --out.

--layer also|only adds (or runs only) the layer rows: torch_ep.nn.ExpertParallelMoE with
num_worst_tokens (bf16, --layer-hidden/--layer-ffn/--layer-experts/--layer-top-k, the first
--tokens per rank), one inference call per timed run, eager against
torch.compile(layer, mode="reduce-overhead", fullgraph=True) (inductor's CUDA graphs; the default
mode on the CPU). Same isolated and stream methods; time per layer call. Rank 0 writes
moe_layer.md and moe_layer.json.

--sm-sweep 1,2,4,8,16,24,32 runs instead the sweep over the SM budget (Options.num_sms) of
benchmarks/moe_sm_sweep.py: moe_sm_sweep.{json,png} and the entry for torch_ep/data/sm_table.json;
--copy warp,bulk sweeps each budget with each copy variant (Options.moe_copy) in the same run.

DeepEP's side of the run (deep_ep.Buffer as the reference, torch_ep.deep_ep's Buffer for --api)
is in benchmarks/moe_deep_ep.py.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
from dataclasses import dataclass, field as dataclass_field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import reference

# Run as a script (torchrun), make `benchmarks` importable. After torch_ep's import: the source
# tree's torch_ep has no built extension unless installed editable, so it must not shadow the
# installed one.
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402
from benchmarks.moe_deep_ep import DeepEP, deep_ep_fields, deep_ep_ops  # noqa: E402
from benchmarks.moe_checks import LAYOUT_GIVEN, check_against_reference, check_graphs, reference_results  # noqa: E402
from benchmarks.moe_graph import GRAPH_OPS, graph_ops  # noqa: E402

ROOFLINE = "roofline"
DEEPEP = "DeepEP"
OPS = ("dispatch bf16", "dispatch fp8", "dispatch bf16" + LAYOUT_GIVEN, "dispatch fp8" + LAYOUT_GIVEN,
       "dispatch cached", "combine bf16", "combine bf16, fresh x")
ALL_OPS = OPS + GRAPH_OPS  # the table's order
# Stream: a call whose host time reaches this share of its device time leaves the device waiting
# between calls, at times (the host's time per call varies from call to call more than the device's).
HOST_BOUND = 0.8
# Dispatches that compute their layout: the host waits for the receive counts to allocate recv_x
# (as DeepEP's does), so their host time holds the device's by design and is not flagged.
WAITS_FOR_COUNTS = ("dispatch bf16", "dispatch fp8")
FP8_BLOCK = 128  # channels per fp8 scale


@dataclass
class Measurement:
    impl: str
    op: str
    tokens: int                # tokens dispatched per rank
    rank_bytes: List[int]      # bytes each rank received (combine: in the dispatch it reverses)
    run_times_s: List[float]   # per timed run (isolated) or call (stream), the slowest rank's seconds
    method: str = "isolated"   # or "stream" (see the module's docstring)
    stream_round_calls: int = 0  # stream: calls per round (run_times_s holds the rounds one after another)
    host_s: List[float] = dataclass_field(default_factory=list)  # stream: per round, the slowest rank's host seconds per call

    @property
    def host_bound(self) -> bool:
        """Stream: the host took at least HOST_BOUND of the device's time per call to issue a call,
        so the device waited for it (the figure is then partly the host's speed, not the op's)."""
        return (bool(self.host_s) and self.op not in WAITS_FOR_COUNTS
                and common.median(self.host_s) >= HOST_BOUND * self.time_s)

    @property
    def bytes_per_rank(self) -> float:
        return sum(self.rank_bytes) / len(self.rank_bytes)

    @property
    def time_s(self) -> float:
        if self.method == "stream":  # DeepEP's bench reports the mean; the median of the rounds' means
            n = self.stream_round_calls or len(self.run_times_s)
            rounds = [self.run_times_s[i:i + n] for i in range(0, len(self.run_times_s), n)]
            return common.median([sum(r) / len(r) for r in rounds])
        return common.median(self.run_times_s)

    @property
    def gbps(self) -> float:
        return self.bytes_per_rank / self.time_s / 1e9


@dataclass
class Inputs:
    x: torch.Tensor                               # [N, H] bf16, integer-valued
    x_fp8: Tuple[torch.Tensor, torch.Tensor]      # x cast per 128-channel block, with its scales
    topk_idx: torch.Tensor                        # [N, K] int64, -1 = not routed
    topk_weights: torch.Tensor                    # [N, K] float32


def cast_to_fp8(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x_fp8 [N, H] float8_e4m3fn, scales [N, ceil(H/128)] float32), x ~ x_fp8 * scale of its
    block: DeepEP's per_token_cast_to_fp8, with a last partial block padded with zeros."""
    n, h = x.shape
    blocks = -(-h // FP8_BLOCK)
    padded = torch.nn.functional.pad(x.float(), (0, blocks * FP8_BLOCK - h)).view(n, blocks, FP8_BLOCK)
    amax = padded.abs().amax(dim=2).clamp(min=1e-4)
    x_fp8 = (padded * (448.0 / amax).unsqueeze(2)).view(n, -1)[:, :h].to(torch.float8_e4m3fn)
    return x_fp8, amax / 448.0


def make_inputs(seed: int, rank: int, world_size: int, tokens: int, args, device: torch.device) -> Inputs:
    generator = torch.Generator().manual_seed(seed + 7919 * rank)
    scores = torch.randn(tokens, args.experts, generator=generator).abs() + 1
    topk_idx = scores.topk(args.top_k, dim=-1, sorted=False).indices
    topk_idx[torch.rand(topk_idx.shape, generator=generator) < args.masked_ratio] = -1
    topk_weights = torch.rand(topk_idx.shape, generator=generator)
    # A combined row sums up to one row per rank: with |x| <= 256 / R every partial sum is an
    # integer that bf16 holds exactly, so any summation order gives the reference's bits.
    bound = max(1, 256 // world_size)
    x = torch.randint(-bound, bound + 1, (tokens, args.hidden), generator=generator).to(torch.bfloat16)
    x = x.to(device)
    return Inputs(x, cast_to_fp8(x), topk_idx.to(device), topk_weights.to(device))


def subject_ops(impl: str, inputs: Inputs, num_experts: int,
                api: str = "native") -> Tuple[Dict[str, Callable[[], object]], object]:
    """The ops of `impl` on `inputs`, and the bf16 dispatch whose handle and output they reuse.
    A dispatch on a new route reads its num_recv_tokens_per_expert, the list DeepEP's dispatch
    always returns (and a MoE layer sizes its expert GEMMs with): the native result makes it only
    when read, so an op that skipped it would leave that host work out of the native rows alone."""
    if api == "deep_ep":
        return deep_ep_ops(inputs, num_experts)
    if impl == "reference":
        dispatch, combine = reference.dispatch, reference.combine
    else:
        dispatch, combine = torch_ep.dispatch, torch_ep.combine

    def routed(*args, **kwargs):  # a dispatch on a new route, with its per-expert counts as a list
        result = dispatch(*args, **kwargs)
        result.num_recv_tokens_per_expert  # made when read (a property): read, as DeepEP's dispatch returns it
        return result

    x, idx, weights = inputs.x, inputs.topk_idx, inputs.topk_weights
    first = dispatch(x, idx, weights, num_experts=num_experts)
    # An x that no dispatch made, as expert outputs are: outside the MoE pool under push (device
    # records copy it in first), exported under pull as recv_x is.
    fresh = first.recv_x.clone()
    ops = {
        "dispatch bf16": lambda: routed(x, idx, weights, num_experts=num_experts),
        "dispatch fp8": lambda: routed(inputs.x_fp8, idx, weights, num_experts=num_experts),
        "combine bf16": lambda: combine(first.recv_x, first.handle),
        "combine bf16, fresh x": lambda: combine(fresh, first.handle),
    }
    if "handle" in inspect.signature(dispatch).parameters:  # a re-dispatch along the handle's route
        ops["dispatch cached"] = lambda: dispatch(x, handle=first.handle)
    if impl != "reference":  # DeepEP's convention: the layout computed once, before the timed call
        layout = torch_ep.get_dispatch_layout(idx, num_experts)
        ops["dispatch bf16, layout given"] = lambda: routed(x, idx, weights, num_experts=num_experts, layout=layout)
        ops["dispatch fp8, layout given"] = lambda: routed(inputs.x_fp8, idx, weights, num_experts=num_experts,
                                                           layout=layout)
    return ops, first


def copy_op(num_bytes: int, device: torch.device) -> Callable[[], object]:
    src = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def measure_tokens(tokens: int, args, device: torch.device, deepep: DeepEP, sync_group) -> List[Measurement]:
    """Checks, then times every op of the subject, DeepEP and the roofline on `tokens` tokens per rank."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    inputs = make_inputs(common.shared_seed(sync_group), rank, world_size, tokens, args, device)
    ops, first = subject_ops(args.impl, inputs, args.experts, "native" if args.api == "both" else args.api)
    wrapped = deep_ep_ops(inputs, args.experts)[0] if args.api == "both" else {}
    if args.impl == "ep":
        expected = reference_results(inputs, args.experts)  # once, for every check below
        check_against_reference(ops, inputs, args.experts, sync_group, expected,
                                fields=deep_ep_fields if args.api == "deep_ep" else None)
        if wrapped:
            check_against_reference(wrapped, inputs, args.experts, sync_group, expected, fields=deep_ep_fields)

    names = OPS
    if args.graph:  # impl "ep" (parse_args)
        graphs, outputs = graph_ops(inputs, args.experts, world_size)
        check_graphs(outputs, expected, sync_group)
        ops.update(graphs)
        names = ALL_OPS

    recv_rows = first.recv_x.shape[0]
    row_bytes = {"bf16": args.hidden * 2, "fp8": args.hidden + 4 * -(-args.hidden // FP8_BLOCK)}
    op_bytes = {op: recv_rows * row_bytes["fp8" if "fp8" in op else "bf16"] for op in names}
    rank_bytes: List[Optional[Dict[str, int]]] = [None] * world_size
    dist.all_gather_object(rank_bytes, op_bytes, group=sync_group)

    timed = {(subject_name(args), op): fn for op, fn in ops.items()}
    timed.update({(WRAPPER, op): fn for op, fn in wrapped.items()})
    timed.update({(DEEPEP, op): fn for op, fn in deepep.ops(inputs, args.experts, recv_rows, sync_group).items()})
    copies = {num_bytes: copy_op(num_bytes, device) for num_bytes in set(op_bytes.values())}
    timed.update({(ROOFLINE, op): copies[op_bytes[op]] for op in names})
    for fn in timed.values():
        for _ in range(args.warmup):
            fn()
    flush = common.l2_flusher(device)

    def start_run():
        flush()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the flush ends before the ranks start together
        dist.barrier(group=sync_group)

    # One call per timed run, each after a flush (DeepEP's bench does the same); the calls are
    # long enough (hundreds of microseconds and up) that the ranks' skew leaving the barrier is
    # small against them. Runs of the implementations take turns, so that outside load weighs
    # on each alike.
    run_times: Dict[Tuple[str, str], List[float]] = {key: [] for key in timed}
    for _ in range(args.runs):
        for key, fn in timed.items():
            run_times[key] += common.time_runs(fn, device=device, runs=1, warmup=0, barrier=start_run)
    measurements = [Measurement(impl, op, tokens, [b[op] for b in rank_bytes], common.slowest_rank(times, sync_group))
                    for (impl, op), times in run_times.items()]
    if args.stream_calls > 1:
        # Rounds taking turns, as the isolated runs: a host hiccup in one op's block of calls (the
        # ranks share this machine's few cores) weighs on one round's mean, not on the median.
        stream_times: Dict[Tuple[str, str], List[float]] = {key: [] for key in timed}
        stream_host: Dict[Tuple[str, str], List[float]] = {key: [] for key in timed}
        for _ in range(args.stream_rounds):
            for key, fn in timed.items():
                start_run()
                host: List[float] = []
                times = common.time_stream(fn, device=device, calls=args.stream_calls, host_s=host)[1:]
                slowest = common.slowest_rank(times + host, sync_group)  # one collective for both
                stream_times[key] += slowest[:len(times)]
                stream_host[key] += slowest[len(times):]
        measurements += [Measurement(impl, op, tokens, [b[op] for b in rank_bytes], times, method="stream",
                                     stream_round_calls=args.stream_calls - 1, host_s=stream_host[(impl, op)])
                         for (impl, op), times in stream_times.items()]
    return measurements


WRAPPER = "ep/deep_ep"  # --api both: the DeepEP-API rows beside the native API's


def subject_name(args) -> str:
    return WRAPPER if args.api == "deep_ep" else args.impl


def results_table(measurements: List[Measurement], subject: str) -> str:
    """One row per token count, timing method and op: the subject's time and bandwidth, the roofline's and
    DeepEP's bandwidth, and the subject's ratio to each ("n/a" where one was not measured)."""
    by_key = {(m.impl, m.op, m.tokens, m.method): m for m in measurements}
    wrapped = subject != WRAPPER and any(m.impl == WRAPPER for m in measurements)
    headers = ["tokens", "method", "op", "bytes/rank", f"{subject} us", f"{subject} GB/s", "roofline GB/s",
               f"{subject}/roofline", f"{DEEPEP} us", f"{DEEPEP} GB/s", f"{subject}/{DEEPEP}"]
    headers += [f"{WRAPPER} us", f"{WRAPPER} time/{subject}"] if wrapped else []
    headers.append(f"{subject} host us/call")
    rows = []
    for tokens, method, op in sorted({(m.tokens, m.method, m.op) for m in measurements},
                                 key=lambda k: (k[0], k[1], ALL_OPS.index(k[2]))):
        subject_m, roofline, deepep = (by_key.get((impl, op, tokens, method))
                                       for impl in (subject, ROOFLINE, DEEPEP))
        row = [tokens, method, op, common.format_bytes(int(roofline.bytes_per_rank))]
        row += [f"{subject_m.time_s * 1e6:.1f}", f"{subject_m.gbps:.2f}"] if subject_m else ["n/a"] * 2
        row += [f"{roofline.gbps:.2f}", f"{subject_m.gbps / roofline.gbps:.0%}" if subject_m else "n/a"]
        row += [f"{deepep.time_s * 1e6:.1f}", f"{deepep.gbps:.2f}"] if deepep else ["n/a"] * 2
        row.append(f"{subject_m.gbps / deepep.gbps:.2f}x" if subject_m and deepep else "n/a")
        if wrapped:  # the DeepEP API's cost over the native API: 1.03x is 3% slower
            wrapper_m = by_key.get((WRAPPER, op, tokens, method))
            row += ([f"{wrapper_m.time_s * 1e6:.1f}", f"{wrapper_m.time_s / subject_m.time_s:.3f}x"]
                    if wrapper_m and subject_m else ["n/a"] * 2)
        host = subject_m.host_s if subject_m else []  # stream rows only
        note = (" (host-bound)" if subject_m.host_bound
                else " (waits for the counts)" if op in WAITS_FOR_COUNTS else "")
        row.append(f"{common.median(host) * 1e6:.1f}{note}" if host else "-")
        rows.append(row)
    return common.markdown_table(headers, rows)


def write_results(out_dir: str, measurements: List[Measurement], meta: Dict[str, object], table: str) -> None:
    common.write_json(os.path.join(out_dir, "moe.json"), {
        "benchmark": "moe dispatch/combine",
        "meta": meta,
        "results": [{"impl": m.impl, "op": m.op, "tokens": m.tokens, "method": m.method, "bytes_per_rank": m.bytes_per_rank,
                     "rank_bytes": m.rank_bytes, "time_us": m.time_s * 1e6, "GBps": m.gbps,
                     "run_times_us": [t * 1e6 for t in m.run_times_s],
                     "host_us_per_call": [t * 1e6 for t in m.host_s], "host_bound": m.host_bound}
                    for m in measurements],
    })
    header = (f"# MoE dispatch/combine: {meta['ranks']} ranks, {meta['device']}\n\n"
              + "\n".join(f"- {key}: {value}" for key, value in meta.items()) + "\n\n")
    common.write_text(os.path.join(out_dir, "moe.md"), header + table)


def measure_layer(args, device: torch.device, sync_group) -> None:
    """The layer rows (--layer): ExpertParallelMoE(num_worst_tokens=) per call, eager against
    torch.compile(mode="reduce-overhead", fullgraph=True); checked against eager first."""
    from torch_ep.nn import ExpertParallelMoE

    rank, world_size = dist.get_rank(), dist.get_world_size()
    tokens = args.tokens[0]
    torch.manual_seed(1000 + rank)
    layer = ExpertParallelMoE(args.layer_hidden, args.layer_ffn, args.layer_experts, args.layer_top_k,
                              dtype=torch.bfloat16, device=device, num_worst_tokens=tokens * world_size)
    mode = "reduce-overhead" if device.type == "cuda" else "default"
    compiled = torch.compile(layer, mode=mode, fullgraph=True)
    x = torch.randn(tokens, args.layer_hidden, dtype=torch.bfloat16, device=device)
    results = {}
    with torch.no_grad():
        for _ in range(3):  # compiles, records the CUDA graphs, replays
            got = compiled(x).clone()
        expected = layer(x)
        worst = ((got.float() - expected.float()).abs().max() / expected.float().abs().max().clamp_min(1e-6)).item()
        if worst > 2e-2:
            raise RuntimeError(f"the compiled layer differs from eager by {worst:.3g} (relative to the largest output)")
        barrier = lambda: dist.barrier(group=sync_group)  # noqa: E731
        for name, fn in (("eager", lambda: layer(x)), (f"compiled ({mode})", lambda: compiled(x))):
            isolated = common.time_runs(fn, device=device, runs=args.runs, warmup=args.warmup, barrier=barrier)
            barrier()
            stream = common.time_stream(fn, device=device, calls=max(args.stream_calls, 2))[1:]
            results[name] = {"isolated": common.median(common.slowest_rank(isolated, sync_group)),
                             "stream": sum(common.slowest_rank(stream, sync_group)) / len(stream)}
    if rank != 0:
        return
    eager = results["eager"]
    rows = [[tokens, method, name, f"{r[method] * 1e6:.1f}", f"{eager[method] / r[method]:.2f}x"]
            for method in ("isolated", "stream") for name, r in results.items()]
    table = common.markdown_table(["tokens", "method", "layer", "us per call", "vs eager"], rows)
    from torch._dynamo.utils import counters
    config = (f"ExpertParallelMoE hidden {args.layer_hidden}, ffn {args.layer_ffn}, {args.layer_experts} experts, "
              f"top-{args.layer_top_k}, bf16, num_worst_tokens {tokens * world_size}, inference; compiled matches "
              f"eager within {worst:.2g} (relative); inductor counters {dict(counters['inductor'])}")
    print(f"{config}\n{table}", flush=True)
    if args.out:
        meta = common.run_metadata(device, ranks=world_size, layer=config, runs=args.runs, warmup=args.warmup,
                                   stream_calls=args.stream_calls)
        common.write_json(os.path.join(args.out, "moe_layer.json"), {
            "benchmark": "moe layer, compiled vs eager", "meta": meta,
            "results": [{"layer": name, "tokens": tokens, **{f"{m}_us": t * 1e6 for m, t in r.items()}}
                        for name, r in results.items()]})
        common.write_text(os.path.join(args.out, "moe_layer.md"), f"# {config}\n\n{table}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for moe.{md,json} (default: print only)")
    parser.add_argument("--impl", choices=["ep", "reference"], default="ep",
                        help="what is measured: torch_ep's ops, or torch_ep.reference's")
    parser.add_argument("--api", choices=["native", "deep_ep", "both"], default="native",
                        help="torch_ep's own API, the same ops through torch_ep.deep_ep's Buffer, or both "
                             "in the same run (the wrapper's time against the native API's)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096], help="tokens per rank (one row set each)")
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--experts", type=int, default=256, help="experts in all, split evenly over the ranks")
    parser.add_argument("--masked-ratio", type=float, default=0.0, help="share of top-k slots set to -1")
    parser.add_argument("--runs", type=int, default=common.MIN_TIMED_RUNS, help="timed runs per op (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls of each op before the timed runs")
    parser.add_argument("--stream-calls", type=int, default=50,
                        help="back-to-back calls per op for the stream method (DeepEP's bench: 50); <= 1 skips it")
    parser.add_argument("--stream-rounds", type=int, default=3,
                        help="stream method: rounds of --stream-calls calls per op, the ops taking turns; "
                             "the time is the median of the rounds' means")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--graph", action="store_true",
                        help="also dispatch bf16 / fp8 and combine with num_worst_tokens, eager and replayed from CUDA "
                             "graphs (CUDA; benchmarks/moe_graph.py)")
    parser.add_argument("--layer", choices=["no", "also", "only"], default="no",
                        help="the compiled-layer rows: also, or only them (see the module's docstring)")
    parser.add_argument("--layer-hidden", type=int, default=2048)
    parser.add_argument("--layer-ffn", type=int, default=1024)
    parser.add_argument("--layer-experts", type=int, default=8)
    parser.add_argument("--layer-top-k", type=int, default=2)
    parser.add_argument("--sm-sweep", default=None, metavar="S,S,...",
                        help="instead of the table: time dispatch bf16 and fp8 (layout in the call and given) and combine "
                             "bf16 at each SM budget (Options.num_sms), "
                             "e.g. 1,2,4,8,16,24,32; writes moe_sm_sweep.{json,png} with the torch_ep/data/sm_table.json "
                             "entry (benchmarks/moe_sm_sweep.py)")
    parser.add_argument("--copy", default=None, metavar="C,C,...",
                        help="with --sm-sweep: the copy variants (Options.moe_copy: warp, unroll, bulk) each budget "
                             "is measured with, e.g. warp,bulk (default warp)")
    args = parser.parse_args()
    if args.copy is not None and args.sm_sweep is None:
        parser.error("--copy goes with --sm-sweep")
    if args.sm_sweep is not None:
        from benchmarks.moe_sm_sweep import parse_budgets, parse_copies
        try:
            args.sm_sweep = parse_budgets(args.sm_sweep)
            args.copy = parse_copies(args.copy or "warp")
        except ValueError as e:
            parser.error(str(e))
        if args.impl != "ep" or args.api != "native" or args.layer != "no":
            parser.error("--sm-sweep measures torch_ep's native ops (no --impl, --api or --layer)")
    if not 0 < args.top_k <= args.experts:
        parser.error(f"--top-k {args.top_k} must be in 1..--experts ({args.experts})")
    if args.graph and (args.impl != "ep" or args.api != "native" or args.device == "cpu"):
        parser.error("--graph replays torch_ep's native ops on CUDA (no --impl reference, --api or --device cpu)")
    if args.api != "native" and args.impl != "ep":
        parser.error(f"--api {args.api} measures torch_ep's ops (--impl ep)")
    if not 0.0 <= args.masked_ratio <= 1.0:
        parser.error("--masked-ratio must be in [0, 1]")
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if args.experts % world_size:
        parser.error(f"--experts {args.experts} must be divisible by the number of ranks ({world_size})")
    if args.impl == "ep" and not all(hasattr(torch_ep, name) for name in ("dispatch", "combine")):
        parser.error("this torch_ep has no dispatch/combine yet; --impl reference measures the reference")
    return args


def kernel_settings() -> str:
    """The copy variant and SM budget each of the default group's kernels ran with, as the group
    resolved them (Options.moe_copy "auto" and num_sms 0 take torch_ep/data/sm_table.json's)."""
    from torch_ep import sm_table

    config = torch_ep.get_backend().config
    parts = []
    for op, (copy, measured) in sm_table.settings(config).items():
        sms = config.num_sms or measured  # a set num_sms overrides the table's budget
        parts.append(f"{op.replace('_', ' ')} {copy}, " + (f"{sms} SMs" if sms else "every SM"))
    return "; ".join(parts)


def main() -> None:
    args = parse_args()
    device = common.pick_device(args.device)
    dist.init_process_group(torch_ep.BACKEND_NAME)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sync_group = dist.new_group(backend="gloo")
    if args.sm_sweep:
        from benchmarks import moe_sm_sweep
        moe_sm_sweep.run(args, device, sync_group)
        dist.barrier(group=sync_group)
        dist.destroy_process_group()
        return
    sharing = common.ranks_per_gpu(device, sync_group) if device.type == "cuda" else 1
    deepep = DeepEP(args.hidden, device, sharing, sync_group)

    measurements = []
    if args.layer != "no":
        measure_layer(args, device, sync_group)
    for tokens in args.tokens if args.layer != "only" else []:
        measurements += measure_tokens(tokens, args, device, deepep, sync_group)
        if rank == 0:
            print(f"measured {tokens} tokens per rank", flush=True)

    if rank == 0 and measurements:
        meta = common.run_metadata(
            device, ranks=world_size, impl=args.impl, api=args.api, hidden=args.hidden, top_k=args.top_k,
            experts=args.experts,
            masked_ratio=args.masked_ratio, runs=args.runs, warmup=args.warmup, stream_calls=args.stream_calls,
            stream_rounds=args.stream_rounds,
            checked=("bit for bit against torch_ep.reference" if args.impl == "ep" else "no (--impl reference)"),
            deepep="measured" if deepep.buffer is not None else f"n/a: {deepep.unavailable}",
            env={k: v for k, v in os.environ.items() if k.startswith("TORCH_EP_")})
        if device.type == "cuda":
            meta["ranks_per_gpu"] = sharing
            meta["kernels"] = kernel_settings()
        table = results_table(measurements, subject_name(args))
        print(table, flush=True)
        print(f"DeepEP: {meta['deepep']}", flush=True)
        if args.out:
            write_results(args.out, measurements, meta, table)
    dist.barrier(group=sync_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
