"""Where an all_to_all's device time goes, kernel by kernel, on every rank. Run with torchrun:

    torchrun --nproc-per-node 2 tools/a2a_kernels.py [--sizes 1048576,67108864] [--calls 200]

For each size (bytes each rank sends, split evenly over the ranks, itself included) and each of
  device staged    dist.all_to_all_single on an "ep" group with Options(all_to_all_device=True):
                   the plan kernel (the byte counts exchanged with the peers), then the move
                   staged through per-peer slots
  device one copy  the same on a group of its own, input and output allocated from
                   torch_ep.comm_pool(group): the plan, then the one-copy move (move_any)
  host protocol    the same on a group with Options(all_to_all_device=False) (the host control
                   exchange, then the copy engines)
  copy_            y.copy_(x) of the same bytes, every rank at once: what memory allows
the output is checked once against torch_ep.reference (fresh random data, a poisoned output),
then --calls calls (N) run back to back under torch.profiler (CUDA activity), CUDA events around
them. Rank 0 prints every rank's lines as each subject ends, in microseconds per call:
  rank R: wall W (unprofiled U), busy B, idle I; calls start S after the earliest rank's (max), end E (max)
      wall: the CUDA events' time over the N calls / N, under the profiler (unprofiled: the same
      loop without it); busy: the union of this rank's kernels and copies on the device / N, idle
      the rest of wall (launch gaps, the host's work between device events). start / end: how
      long after the earliest rank this rank's call i begins (its first device event) and ends
      (its last), mean and max over the calls: the skew between ranks, as far as the ranks'
      profiler clocks (one host's) agree; left out where the events do not split evenly in calls
  rank R kernels: NAME T xC [MIN..MAX; p10 A, p50 B, p90 C], ...
      each kernel or copy, its name shortened (all_to_all_v_plan_kernel: plan): device time per
      call, launches per call, the shortest and the longest launch and the launches' deciles. A
      kernel that waits on its peers (the plan, the move) counts its wait
  rank R gaps: A->B G xC, ...
      between device events consecutive by start: B's start minus A's end, the mean, and how
      often per call. plan->move lies inside a call, move->plan between a call and the next
"""
import argparse
import sys
from collections import defaultdict

import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile

import torch_ep
from torch_ep import reference
from torch_ep.testing import same_bits, where_bits_differ

from profile_common import init_on_local_gpu, kernel_name  # tools/, the script's folder


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=f"{1 << 20},{64 << 20}", help="bytes each rank sends, comma-separated")
    parser.add_argument("--calls", type=int, default=200, help="calls per profiled loop (N)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed calls before each loop")
    return parser.parse_args()


def short_name(name: str) -> str:
    """all_to_all_v_move_any_kernel: move_any; Memcpy DtoD (Device -> Device): Memcpy DtoD."""
    return kernel_name(name).removeprefix("all_to_all_v_").removesuffix("_kernel").split(" (")[0]


def device_spans(prof):
    """This process's kernels, copies and fills in a profile, by start: (short name, start ns, end ns)."""
    spans = [(short_name(e.name()), e.start_ns(), e.end_ns()) for e in prof.profiler.kineto_results.events()
             if e.device_type() == torch.autograd.DeviceType.CUDA
             and not getattr(e, "is_user_annotation", lambda: False)()]
    return sorted(spans, key=lambda span: span[1])


def busy_ns(spans) -> int:
    """The union of the spans' intervals: the time the device ran something of this process."""
    total, reach = 0, None
    for _, start, end in spans:
        if reach is None or start > reach:
            total, reach = total + end - start, end
        elif end > reach:
            total, reach = total + end - reach, end
    return total


def settle(fn, warmup: int, sync_group):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    dist.barrier(group=sync_group)  # every rank starts together: a rank's calls wait on its peers'


def loop_us(fn, calls: int) -> float:
    """The device's time per call over `calls` back-to-back calls (CUDA events around them)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def check(name: str, fn, output, expected, sync_group):
    """One call into a poisoned output; raises on every rank if any rank got wrong bytes."""
    output.copy_(expected.bitwise_not())  # differs from the expected data in every byte
    fn()
    torch.cuda.synchronize()
    problem = None if same_bits(output, expected) else f"rank {dist.get_rank()}: {where_bits_differ(output, expected)}"
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem, group=sync_group)
    if any(problems):
        raise RuntimeError(f"{name}: wrong output, not profiling it: " + "; ".join(p for p in problems if p))


def tile(values, q: float) -> float:
    """The q-quantile of values (the nearest rank): a bimodal kernel shows as p10 far from p90."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summarize(spans, calls: int) -> dict:
    """The device events of `calls` calls (device_spans): busy us per call, each kernel's and each
    gap's line, and each call's start and end (ns) where the events split evenly in calls."""
    per_name, gaps = defaultdict(list), defaultdict(list)
    for name, start, end in spans:
        per_name[name].append((end - start) / 1e3)
    for (before, _, before_end), (after, after_start, _) in zip(spans, spans[1:]):
        gaps[f"{before}->{after}"].append((after_start - before_end) / 1e3)
    kernels = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    per_call = len(spans) // calls if spans and len(spans) % calls == 0 else 0
    calls_ns = [(spans[i][1], max(end for _, _, end in spans[i:i + per_call]))
                for i in range(0, len(spans), per_call)] if per_call else None
    return {
        "busy": busy_ns(spans) / 1e3 / calls, "calls_ns": calls_ns,
        "kernels": ", ".join(f"{name} {sum(us) / calls:.1f} x{len(us) / calls:.3g} [{min(us):.1f}..{max(us):.1f}; "
                             f"p10 {tile(us, 0.1):.1f}, p50 {tile(us, 0.5):.1f}, p90 {tile(us, 0.9):.1f}]"
                             for name, us in kernels) or "none recorded (no CUPTI?)",
        "gaps": ", ".join(f"{pair} {sum(us) / len(us):.1f} x{len(us) / calls:.3g}" for pair, us in gaps.items()) or "none",
    }


def measure(fn, calls: int, warmup: int, sync_group) -> dict:
    """summarize's figures for `calls` calls of fn on this rank, with the wall time per call (us)
    under the profiler and without it."""
    settle(fn, warmup, sync_group)
    unprofiled = loop_us(fn, calls)
    settle(fn, warmup, sync_group)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        dist.barrier(group=sync_group)  # after the profiler's start on every rank; Gloo: nothing on the device
        wall = loop_us(fn, calls)
    return {"wall": wall, "unprofiled": unprofiled, **summarize(device_spans(prof), calls)}


def skew_text(every: list, rank: int) -> str:
    """How long after the earliest rank's this rank's calls start and end, mean and max over the calls."""
    if any(r["calls_ns"] is None for r in every):
        return ""
    lags = [[(mine[edge] - min(r["calls_ns"][i][edge] for r in every)) / 1e3
             for i, mine in enumerate(every[rank]["calls_ns"])] for edge in (0, 1)]
    (starts, ends) = ((sum(x) / len(x), max(x)) for x in lags)
    return (f"; calls start {starts[0]:.1f} after the earliest rank's (max {starts[1]:.1f}), "
            f"end {ends[0]:.1f} (max {ends[1]:.1f})")


def label_of(nbytes: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift and nbytes % (1 << shift) == 0:
            return f"{nbytes >> shift} {unit}"
    return f"{nbytes} B"


def main():
    args = parse_args()
    if not torch.cuda.is_available() or not torch_ep._C.has_cuda:
        sys.exit("a2a_kernels.py profiles CUDA kernels: it needs a GPU and torch_ep built with CUDA "
                 f"(torch.cuda.is_available() {torch.cuda.is_available()}, torch_ep._C.has_cuda {torch_ep._C.has_cuda})")
    sizes = [int(s) for s in args.sizes.split(",")]
    rank = init_on_local_gpu()
    world = dist.get_world_size()
    sync_group = dist.new_group(backend="gloo")  # barriers, checks and the gathers: nothing on the device
    device_group = dist.new_group(pg_options=torch_ep.Options(all_to_all_device=True))
    host_group = dist.new_group(pg_options=torch_ep.Options(all_to_all_device=False))
    # Its own group: a group with a comm pool runs every all_to_all_single on the pool's kernels
    # (move_any, even a staged move), which would change device staged's.
    pool_group = dist.new_group(pg_options=torch_ep.Options(all_to_all_device=True,
                                                            comm_pool_bytes=max(1 << 30, 4 * max(sizes))))
    pool = torch_ep.comm_pool(pool_group)
    if rank == 0:
        print(f"{world} ranks, {torch.cuda.get_device_name()}, {args.calls} calls per loop, us per call", flush=True)
    for nbytes in sizes:
        nbytes = nbytes // world * world  # an even split
        g = torch.Generator(device="cuda").manual_seed(7919 * rank + nbytes)
        x = torch.randint(0, 256, (nbytes,), device="cuda", dtype=torch.uint8, generator=g)
        y = torch.empty_like(x)
        expected = reference.all_to_all_single(y.shape, x.cpu(), group=sync_group).cuda()
        with torch.cuda.use_mem_pool(pool):
            pool_x, pool_y = x.clone(), torch.empty_like(y)
        subjects = {  # name: (one call, its output, what the output must hold)
            "device staged": (lambda: dist.all_to_all_single(y, x, group=device_group), y, expected),
            "device one copy": (lambda: dist.all_to_all_single(pool_y, pool_x, group=pool_group), pool_y, expected),
            "host protocol": (lambda: dist.all_to_all_single(y, x, group=host_group), y, expected),
            "copy_": (lambda: y.copy_(x), y, x),
        }
        for name, (fn, output, want) in subjects.items():
            check(name, fn, output, want, sync_group)
            every = [None] * world
            dist.all_gather_object(every, measure(fn, args.calls, args.warmup, sync_group), group=sync_group)
            if rank == 0:
                print(f"{label_of(nbytes)} per rank, {name}:", flush=True)
                for r, m in enumerate(every):
                    print(f"  rank {r}: wall {m['wall']:.1f} (unprofiled {m['unprofiled']:.1f}), busy {m['busy']:.1f}, "
                          f"idle {m['wall'] - m['busy']:.1f}{skew_text(every, r)}", flush=True)
                    print(f"  rank {r} kernels: {m['kernels']}", flush=True)
                    print(f"  rank {r} gaps: {m['gaps']}", flush=True)
    dist.barrier(group=sync_group)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
