"""all_to_all_single bandwidth of the "ep" backend, with references measured in the same run.

    torchrun --nproc-per-node 4 benchmarks/all_to_all.py --out /tmp/all_to_all

Every rank sends the same number of bytes (the size on the x axis), split evenly over all ranks,
itself included. Measured, size by size and one after another:
  ep       the default group, backend "ep"
  gloo     dist.new_group(backend="gloo") over the same ranks and tensors (on CUDA only up to
           --gloo-max-bytes: Gloo stages CUDA tensors through the host)
  nccl     dist.new_group(backend="nccl"), on CUDA when every rank has a GPU of its own
           (NCCL refuses two ranks on one GPU)
  all_to_all_v  torch_ep.all_to_all_v on the "ep" group, the same bytes as uint8 rows, the
           splits an int64 tensor on the device and the output given
  ep_graph on CUDA: the ep_device call captured in a CUDA graph and replayed: the device's time per
           call without the host's (Python, c10d, launches), what a captured model step pays
  ep_default_graph  on CUDA: the default's call (the host protocol) captured and replayed: its
           control exchange runs once, at the capture, and a replay is the one copy alone (the
           direct kernel); timed where every message fits the direct kernel (the group's
           Options.all_to_all_kernel_bytes, 8 MiB by default)
  ep_device  on CUDA: an "ep" group with Options(all_to_all_device=True): all_to_all_single on
           the device protocol (counts checked by the kernels, no host control exchange). Like
           every row but the next, async_op=False: the call runs on the caller's stream
  ep_device_async on CUDA: the ep_device call with async_op=True, then work.wait(): the comm
           stream's fork and join, what async_op=False saves the host
  ep_eager on CUDA, sizes up to ranks x 64 KiB: an "ep" group with Options(all_to_all_device=True,
           all_to_all_eager_bytes=65536): the device protocol's eager path (each message rides with
           the plan's record: one launch, no staging); ep_eager_graph: the same captured and replayed
  ep_pool  on CUDA: an "ep" group with a torch_ep.comm_pool, input and output allocated from it:
           the device protocol's one-copy move (each sender writes into its receivers' outputs)
  roofline on CUDA: the all_to_all bandwidth per rank that GPU memory allows. An all_to_all
           must read and write each byte at least once, so every rank times a plain
           dst.copy_(src) of the same bytes, all at once: the R ranks sharing a GPU split its
           copy_rate (read + write), roofline = copy_rate / (2R), R = 1 with a GPU per rank;
           below a few MiB that copy_ is bound by the host's time per call, as eager calls are
  roofline_graph  on CUDA: the same copy_ captured in a CUDA graph and replayed, the device's
           copy time alone: the reference of the replayed rows (ep_default_graph's share of it
           is the table's last column)
algbw = bytes sent per rank / time; busbw = algbw * (R-1)/R (nccl-tests' convention). A time is
the median over runs of the slowest rank's time in that run. Before timing, each
implementation's output is checked once against fresh random data.

Rank 0 prints the table and writes all_to_all.md, all_to_all.json and all_to_all.png to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

import torch_ep  # registers the "ep" backend

# Run as a script (torchrun), make `benchmarks` importable. After torch_ep's import: the source
# tree's torch_ep has no built extension unless installed editable, so it must not shadow the
# installed one.
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common  # noqa: E402

SUBJECT = "ep"
ALL_TO_ALL_V = "all_to_all_v"  # torch_ep.all_to_all_v on the subject's group
GRAPH = "ep_graph"  # the subject's call captured in a CUDA graph
DEFAULT_GRAPH = "ep_default_graph"  # the default group's call (the host protocol) captured
POOL = "ep_pool"  # input and output from torch_ep.comm_pool of its group
DEVICE_ASYNC = "ep_device_async"  # the device protocol with async_op=True, then wait()
EAGER, EAGER_GRAPH = "ep_eager", "ep_eager_graph"  # the device protocol's eager path, eagerly and replayed
EAGER_BYTES = 64 << 10  # its Options.all_to_all_eager_bytes: timed where every message fits
ROOFLINE = "roofline"
ROOFLINE_GRAPH = "roofline_graph"  # the roofline's copy replayed from a CUDA graph: the reference of the replays
ROOFLINES = (ROOFLINE, ROOFLINE_GRAPH)


@dataclass
class Measurement:
    impl: str
    size: int            # the size asked for: the table's and plot's label
    bytes_per_rank: int  # what each rank sent: `size` rounded down to a multiple of the ranks
    run_times_s: List[float]  # per timed run, the slowest rank's seconds per call

    @property
    def time_s(self) -> float:
        return common.median(self.run_times_s)

    @property
    def algbw_gbps(self) -> float:
        return self.bytes_per_rank / self.time_s / 1e9

    def busbw_gbps(self, world_size: int) -> float:
        return self.algbw_gbps * (world_size - 1) / world_size


def sizes_between(min_bytes: int, max_bytes: int, factor: int) -> List[int]:
    sizes, size = [], min_bytes
    while size <= max_bytes:
        sizes.append(size)
        size *= factor
    return sizes


def pair_data(seed: int, src: int, dst: int, num_bytes: int, device: torch.device) -> torch.Tensor:
    """The bytes rank `src` sends to rank `dst`: random, and reproducible on both ends."""
    generator = torch.Generator().manual_seed(seed + 7919 * src + 104729 * dst)
    return torch.randint(0, 256, (num_bytes,), dtype=torch.uint8, generator=generator).to(device)


def replayed(op):
    """op captured in a CUDA graph: its replay. One eager call first sets up what op needs (the
    group's state, collectively) outside the capture."""
    op()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        op()
    return graph.replay


def make_op(impl: str, group, recv: torch.Tensor, send: torch.Tensor):
    """One call of `impl` from `send` into `recv` (even split). For ep_pool the call runs on
    copies of both from the group's comm pool; `op.output` is its output. An impl's first word
    says what it is ("ep_pool blocks=66": an ep_pool, see benchmarks/all_to_all_sweep.py)."""
    impl = impl.split(" ", 1)[0]
    if impl == POOL:
        with torch.cuda.use_mem_pool(torch_ep.comm_pool(group)):
            pool_send, pool_recv = send.clone(), recv.clone()
        op = lambda: dist.all_to_all_single(pool_recv, pool_send, group=group)  # noqa: E731
        op.output = pool_recv
        return op
    if impl in (GRAPH, EAGER_GRAPH, DEFAULT_GRAPH):
        return replayed(make_op(SUBJECT, group, recv, send))
    if impl == DEVICE_ASYNC:
        return lambda: dist.all_to_all_single(recv, send, group=group, async_op=True).wait()
    if impl == ALL_TO_ALL_V:
        splits = torch.full((dist.get_world_size(),), send.numel() // dist.get_world_size(), dtype=torch.int64,
                            device=send.device)
        return lambda: torch_ep.all_to_all_v(send, splits, output=recv, group=group)
    return lambda: dist.all_to_all_single(recv, send, group=group)


def check_output(impl: str, group, send: torch.Tensor, expected: torch.Tensor, sync_group) -> None:
    """One call into a poisoned output; raises on every rank if any rank got wrong data."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    recv = expected.bitwise_not()  # differs from the expected data in every byte
    op = make_op(impl, group, recv, send)
    op()
    recv = getattr(op, "output", recv)
    problem = None
    if not torch.equal(recv, expected):
        chunk = expected.numel() // world_size
        bad = (recv != expected).nonzero()[0].item()
        problem = f"rank {rank} got wrong bytes from rank {bad // chunk}, first at offset {bad % chunk} of {chunk}"
    problems: List[Optional[str]] = [None] * world_size
    dist.all_gather_object(problems, problem, group=sync_group)
    problems = [p for p in problems if p]
    if problems:
        raise RuntimeError(f"{impl}: {common.format_bytes(send.numel())} per rank gave "
                           f"wrong output, not timing it: " + "; ".join(problems))


def ops_per_run(num_bytes: int, device: torch.device, calls: int = 0) -> int:
    # Back-to-back calls per timed run (nccl-tests times a loop too): ranks leave the barrier
    # up to hundreds of microseconds apart on a loaded machine, and the run's first call waits
    # for the last rank, so a few calls would count that skew as their own time. On CUDA 256
    # calls against 32 took 0.7-2.1 us off a replayed call and 3-7 us off an eager one at 4 KiB-4
    # MiB (H200, 2 ranks, alternating, 92d72d9): up to 1 GiB a run there, 256 MiB on CPU (whose
    # calls take milliseconds). `calls` > 0 (--calls-per-run) fixes the count.
    if calls > 0:
        return calls
    most, bytes_per_run = (256, 1 << 30) if device.type == "cuda" else (32, 256 << 20)
    return max(8, min(most, bytes_per_run // num_bytes))


def measure_size(impls: Dict[str, object], size: int, device: torch.device, sync_group, *, runs: int,
                 warmup: int, calls: int = 0) -> List[Measurement]:
    """Checks, then times the all_to_all of `size` bytes per rank on each group of `impls`.

    `sync_group` (a Gloo group of the same ranks) carries the barriers, checks and reductions.
    """
    rank, world_size = dist.get_rank(), dist.get_world_size()
    seed = common.shared_seed(sync_group)
    chunk = size // world_size  # sizes that R does not divide send R*(size//R) bytes
    send = torch.cat([pair_data(seed, rank, dst, chunk, device) for dst in range(world_size)])
    expected = torch.cat([pair_data(seed, src, rank, chunk, device) for src in range(world_size)])
    recv = torch.empty_like(expected)
    ops = {impl: make_op(impl, group, recv, send) for impl, group in impls.items()}
    for impl, group in impls.items():
        check_output(impl, group, send, expected, sync_group)
        for _ in range(warmup):
            ops[impl]()
    # Runs of the implementations take turns, so that load from outside the benchmark (a shared
    # machine) weighs on each alike and the ratios hold even when absolute times drift.
    run_times = {impl: [] for impl in impls}
    for _ in range(runs):
        for impl, op in ops.items():
            run_times[impl] += common.time_runs(op, device=device, runs=1, warmup=0,
                                                ops_per_run=ops_per_run(send.numel(), device, calls),
                                                barrier=lambda: dist.barrier(group=sync_group))
    return [Measurement(impl, size, send.numel(), common.slowest_rank(times, sync_group))
            for impl, times in run_times.items()]


def measure_roofline(size: int, device: torch.device, ranks_per_gpu: int, sync_group, *, runs: int,
                     warmup: int, replay: bool = False, calls: int = 0) -> Measurement:
    """The copy roofline as an all_to_all time: every rank copies `size` bytes at once.

    An all_to_all must at least read and write each byte once, so on a GPU shared by R ranks it
    is bounded by the time of R concurrent copies: roofline algbw = copy_rate / (2R), with the
    whole GPU's copy rate (read + write), measured under the same sharing (MPS split) as ep.
    `replay`: the copy captured in a CUDA graph and replayed (roofline_graph), as the *_graph rows are.
    """
    src = torch.randint(0, 256, (size,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    op = lambda: dst.copy_(src)  # noqa: E731
    times = common.time_runs(replayed(op) if replay else op, device=device, runs=runs, warmup=warmup,
                             ops_per_run=ops_per_run(size, device, calls), barrier=lambda: dist.barrier(group=sync_group))
    return Measurement(ROOFLINE_GRAPH if replay else ROOFLINE, size, size, common.slowest_rank(times, sync_group))


def results_table(measurements: List[Measurement], world_size: int) -> str:
    """One row per size: time, algbw and busbw of each implementation, then ep's ratio to each."""
    impls = list(dict.fromkeys(m.impl for m in measurements))
    timed = [i for i in impls if i not in ROOFLINES]
    rooflines = [i for i in ROOFLINES if i in impls]
    replay_share = ROOFLINE_GRAPH in impls and DEFAULT_GRAPH in impls
    by_key = {(m.impl, m.size): m for m in measurements}
    headers = ["size/rank"]
    for impl in timed:
        headers += [f"{impl} us", f"{impl} algbw GB/s", f"{impl} busbw GB/s"]
    headers += [f"{impl} algbw GB/s" for impl in rooflines]
    headers += [f"{SUBJECT}/{impl}" for impl in impls if impl != SUBJECT]
    if replay_share:
        headers.append(f"{DEFAULT_GRAPH}/{ROOFLINE_GRAPH}")
    rows = []
    for size in sorted({m.size for m in measurements}):
        row = [common.format_bytes(size)]
        for impl in timed:
            m = by_key.get((impl, size))
            row += ([f"{m.time_s * 1e6:.1f}", f"{m.algbw_gbps:.3f}", f"{m.busbw_gbps(world_size):.3f}"] if m
                    else ["-"] * 3)
        row += [f"{by_key[impl, size].algbw_gbps:.1f}" for impl in rooflines]
        subject = by_key[SUBJECT, size]
        for impl in impls:
            if impl != SUBJECT:
                other = by_key.get((impl, size))
                ratio = subject.algbw_gbps / other.algbw_gbps if other else None
                row.append("-" if ratio is None else f"{ratio:.0%}" if impl in ROOFLINES else f"{ratio:.2f}x")
        if replay_share:
            graph_row = by_key.get((DEFAULT_GRAPH, size))
            row.append(f"{graph_row.algbw_gbps / by_key[ROOFLINE_GRAPH, size].algbw_gbps:.0%}" if graph_row else "-")
        rows.append(row)
    return common.markdown_table(headers, rows)


def write_results(out_dir: str, measurements: List[Measurement], meta: Dict[str, object], table: str) -> None:
    world_size = meta["ranks"]
    common.write_json(os.path.join(out_dir, "all_to_all.json"), {
        "benchmark": "all_to_all_single",
        "meta": meta,
        "results": [{"impl": m.impl, "size": m.size, "bytes_per_rank": m.bytes_per_rank, "time_us": m.time_s * 1e6,
                     "algbw_GBps": m.algbw_gbps, "busbw_GBps": m.busbw_gbps(world_size),
                     "run_times_us": [t * 1e6 for t in m.run_times_s]} for m in measurements],
    })
    header = (f"# all_to_all_single: {world_size} ranks, {meta['device']}\n\n"
              + "\n".join(f"- {key}: {value}" for key, value in meta.items()) + "\n\n")
    common.write_text(os.path.join(out_dir, "all_to_all.md"), header + table)
    series = {}
    for m in measurements:
        xs, ys = series.setdefault(m.impl, ([], []))
        xs.append(m.size)
        ys.append(m.algbw_gbps)
    common.write_plot(os.path.join(out_dir, "all_to_all.png"), series, dashed=list(ROOFLINES),
                      title=f"all_to_all_single, {world_size} ranks, {meta['machine']}",
                      xlabel="bytes sent per rank", ylabel="algbw (GB/s)")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for all_to_all.{md,json,png} (default: print only)")
    parser.add_argument("--min-bytes", type=int, default=4 << 10, help="smallest size sent per rank")
    parser.add_argument("--max-bytes", type=int, default=64 << 20, help="largest size sent per rank")
    parser.add_argument("--factor", type=int, choices=[2, 4], default=4, help="ratio of successive sizes")
    parser.add_argument("--runs", type=int, default=common.MIN_TIMED_RUNS, help="timed runs per size (median)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls before the timed runs")
    parser.add_argument("--calls-per-run", type=int, default=0,
                        help="back-to-back calls per timed run (default 0: on CUDA 256, fewer above 4 MiB per "
                             "rank; on CPU 32, fewer above 8 MiB)")
    parser.add_argument("--descending", action="store_true",
                        help="measure the largest size first: whatever the first size measured pays for the "
                             "process's start then lands on the largest, not on the smallest")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--gloo-max-bytes", type=int, default=None,
                        help="largest size Gloo is timed at (default: all on CPU, 4 MiB on CUDA, where "
                             "Gloo stages through the host and takes seconds per call)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    device = common.pick_device(args.device)
    dist.init_process_group(SUBJECT)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    sync_group = dist.new_group(backend="gloo")
    impls = {SUBJECT: dist.group.WORLD, ALL_TO_ALL_V: dist.group.WORLD, "gloo": sync_group}
    sharing = 1
    if device.type == "cuda":
        sharing = common.ranks_per_gpu(device, sync_group)
        impls["ep_device"] = dist.new_group(backend="ep", pg_options=torch_ep.Options(all_to_all_device=True))
        impls[DEVICE_ASYNC] = impls["ep_device"]
        impls[GRAPH] = impls["ep_device"]
        impls[DEFAULT_GRAPH] = dist.group.WORLD
        impls[EAGER] = dist.new_group(backend="ep", pg_options=torch_ep.Options(
            all_to_all_device=True, all_to_all_eager_bytes=EAGER_BYTES))
        impls[EAGER_GRAPH] = impls[EAGER]
        # Its own group: a group with a comm pool runs every all_to_all_single on the device protocol.
        impls[POOL] = dist.new_group(backend="ep", pg_options=torch_ep.Options(
            comm_pool_bytes=max(1 << 30, 8 * args.max_bytes)))
        if sharing == 1 and dist.is_nccl_available():
            impls["nccl"] = dist.new_group(backend="nccl")

    measurements = []
    gloo_max = args.gloo_max_bytes if args.gloo_max_bytes is not None else (
        4 << 20 if device.type == "cuda" else args.max_bytes)
    sizes = sizes_between(args.min_bytes, args.max_bytes, args.factor)
    direct_kernel_bytes = torch_ep.Options().all_to_all_kernel_bytes  # the default group's largest direct-kernel message
    for size in sizes[::-1] if args.descending else sizes:
        timed = {impl: group for impl, group in impls.items()
                 if (impl != "gloo" or size <= gloo_max)
                 and (impl not in (EAGER, EAGER_GRAPH) or size // world_size <= EAGER_BYTES)
                 and (impl != DEFAULT_GRAPH or size // world_size <= direct_kernel_bytes)}
        measurements += measure_size(timed, size, device, sync_group, runs=args.runs, warmup=args.warmup,
                                     calls=args.calls_per_run)
        if device.type == "cuda":
            for replay in (False, True):
                measurements.append(measure_roofline(size, device, sharing, sync_group, runs=args.runs,
                                                     warmup=args.warmup, replay=replay, calls=args.calls_per_run))
        if rank == 0:
            print(f"measured {common.format_bytes(size)} per rank", flush=True)

    if rank == 0:
        meta = common.run_metadata(device, ranks=world_size, runs=args.runs, warmup=args.warmup,
                                   calls_per_run={common.format_bytes(s): ops_per_run(s, device, args.calls_per_run)
                                                  for s in sizes},
                                   env={k: v for k, v in os.environ.items() if k.startswith("TORCH_EP_")})
        if device.type == "cuda":
            meta["ranks_per_gpu"] = sharing
        table = results_table(measurements, world_size)
        print(table, flush=True)
        if args.out:
            write_results(args.out, measurements, meta, table)
    dist.barrier(group=sync_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
