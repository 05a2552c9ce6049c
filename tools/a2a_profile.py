"""What the host pays per all_to_all on the device protocol, on a GPU. Run with torchrun:

    torchrun --nproc-per-node 2 tools/a2a_profile.py [--sizes 4096,1048576] [--calls 200]

For each size (bytes each rank sends, split evenly over the ranks, itself included), rank 0
prints, in microseconds per call:
  host   the host time per call issued: N calls back to back, no synchronisation until the
         clock has stopped, divided by N (the median of --repeats such runs), for
           all_to_all_single  dist.all_to_all_single on an "ep" group with
                              Options(all_to_all_device=True) (async_op=False: on the caller's
                              stream)
           async_op=True      the same with async_op=True, then work.wait() (the comm stream's
                              fork and join)
           host protocol      the same on the default group (the host control exchange)
           all_to_all_v       torch_ep.all_to_all_v into a given output, on the device group
           copy_              a plain dst.copy_(src) of the same bytes: what launching one op
                              costs on this host, for reference
  stream the same calls with a synchronisation after the N: the time per call once the device's
         work is counted too
  clock  the host time per call issued again, split by the ops' named phases on their own
         steady clock, without the profiler (phase_clock_line in profile_common.py), and what
         lies outside every phase (Python, c10d, the dispatcher)
  profile torch.profiler's breakdown of N calls of each: the top functions by self CPU time
         (aten and c10d ops, and, with CUDA activity, the CUDA runtime calls), us per call and
         calls per call. The profiler's own cost inflates these; compare them with each other.
         What the host figure holds beyond the ops' sum is Python and work no op records.
Lines are printed as they come, so that a run killed by a time limit still tells.
"""
import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import torch_ep
from torch_ep import reference

from profile_common import init_on_local_gpu, phase_clock_line  # tools/, the script's folder


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="4096,1048576", help="bytes each rank sends, comma-separated")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed run (N)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (the median is printed)")
    parser.add_argument("--top", type=int, default=12, help="functions listed per profile")
    parser.add_argument("--cpu-only", action="store_true",
                        help="profile CPU activity only (no CUPTI: no CUDA runtime calls in the breakdown)")
    return parser.parse_args()


def warm(fn, calls: int = 10):
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    dist.barrier()  # every rank starts the timed calls together: a rank's calls wait on its peers'


def time_us(fn, calls: int, repeats: int, *, with_device: bool) -> float:
    """Time per call over `calls` back-to-back calls, the median of `repeats` runs. with_device
    False: the host time per call issued (the clock stops before the synchronisation); True:
    the time per call once the device's work is counted too (it stops after)."""
    runs = []
    for _ in range(repeats):
        warm(fn)
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if with_device:
            torch.cuda.synchronize()
        runs.append((time.perf_counter() - start) / calls * 1e6)
        torch.cuda.synchronize()
    return statistics.median(runs)


def profile_line(fn, calls: int, top: int, cpu_only: bool) -> str:
    """torch.profiler's top functions by self CPU time over `calls` calls (the final
    synchronisation outside the profile), us per call and how often each runs per call."""
    activities = [ProfilerActivity.CPU] + ([] if cpu_only else [ProfilerActivity.CUDA])
    warm(fn)
    with profile(activities=activities) as prof:
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) / calls
    return f"all functions {total:.1f}; " + "; ".join(
        f"{e.key} {e.self_cpu_time_total / calls:.2f} (x{e.count / calls:g})" for e in events[:top])


def main():
    args = parse_args()
    rank = init_on_local_gpu()
    size = dist.get_world_size()
    device_group = dist.new_group(pg_options=torch_ep.Options(all_to_all_device=True))

    def say(line: str):
        if rank == 0:
            print(line, flush=True)

    say(f"{size} ranks, {torch.cuda.get_device_name()}, {args.calls} calls per run, median of {args.repeats} runs")
    for nbytes in (int(s) for s in args.sizes.split(",")):
        per_peer = nbytes // size
        nbytes = per_peer * size  # an even split
        g = torch.Generator(device="cuda").manual_seed(rank)
        # never 0: a zeroed output then shows any byte that did not arrive
        x = torch.randint(1, 256, (nbytes,), device="cuda", dtype=torch.uint8, generator=g)
        y = torch.empty_like(x)
        splits = torch.full((size,), per_peer, dtype=torch.int64, device="cuda")
        # Each once, checked against the reference before anything is timed.
        dist.all_to_all_single(y, x, group=device_group)
        expected = reference.all_to_all_single(y.shape, x.cpu())
        assert torch.equal(y.cpu(), expected), "all_to_all_single on the device protocol: wrong output"
        y.zero_()
        torch_ep.all_to_all_v(x, splits, output=y, group=device_group)
        assert torch.equal(y.cpu(), expected), "all_to_all_v: wrong output"
        subjects = {
            "all_to_all_single": lambda: dist.all_to_all_single(y, x, group=device_group),
            "async_op=True": lambda: dist.all_to_all_single(y, x, group=device_group, async_op=True).wait(),
            "host protocol": lambda: dist.all_to_all_single(y, x),
            "all_to_all_v": lambda: torch_ep.all_to_all_v(x, splits, output=y, group=device_group),
            "copy_": lambda: y.copy_(x),
        }
        label = f"{nbytes >> 10} KiB per rank" if nbytes >= 1024 else f"{nbytes} B per rank"
        for name, fn in subjects.items():
            say(f"{label}: host {name} {time_us(fn, args.calls, args.repeats, with_device=False):.1f} us per call issued")
        for name, fn in subjects.items():
            say(f"{label}: stream {name} {time_us(fn, args.calls, args.repeats, with_device=True):.1f} us per call")
        for name, fn in subjects.items():
            warm(fn)
            say(f"{label}: clock {name}: {phase_clock_line(fn, args.calls)}")
            torch.cuda.synchronize()
        for name, fn in subjects.items():
            breakdown = profile_line(fn, args.calls, args.top, args.cpu_only)
            say(f"{label}: profile {name}, self CPU us per call: {breakdown}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
