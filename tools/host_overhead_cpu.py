"""The Python layers' own host time per MoE call, on CPU (no GPU needed). Run with torchrun:

    torchrun --nproc-per-node 2 tools/host_overhead_cpu.py [--profile] [--calls 2000]

Each sequence (native API and torch_ep.deep_ep.Buffer) is timed per call issued. On CPU the
op itself takes 30-600 us with a wide spread (the ranks' record exchange), which drowns the
10-30 us of Python around it; so the ops' CPU kernels are then swapped for stubs that return
what the real kernel returned for the same inputs (same dispatcher path, constant cost, no
communication), and each sequence is timed next to the same torch.ops.ep calls made directly:
the difference is what moe.py / buffer.py / utils.py spend around the op. Under the direct call (the default)
the pybind entries are stubbed instead, and the floors call them. The "+ counts list"
rows read num_recv_tokens_per_expert (made when read), which the Buffer's dispatch always returns:
the native work that compares with the Buffer's like for like (benchmarks/moe.py reads it too). --profile adds
cProfile's top functions per sequence on the stubs (us per call, own / with callees; the
profiler's own cost inflates Python calls several-fold).
Rank 0 prints: with the real ops the slower rank's numbers (the ranks run in lockstep); the
stubs are timed on rank 0 alone while the others wait.

On a shared machine the times move by tens of percent from run to run. --callgrind counts the
instructions per call on the stubs instead (deterministic; one rank, under valgrind):

    torchrun --nproc-per-node 1 --no-python valgrind --tool=callgrind --instr-atstart=no \
        --callgrind-out-file=/tmp/cg python tools/host_overhead_cpu.py --callgrind /tmp/cg
"""
import argparse
import cProfile
import ctypes
import gc
import glob
import os
import pstats
import subprocess
import tempfile
import time

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import deep_ep


def per_call_us(fn, calls: int, repeats: int = 5) -> float:
    """The least, over `repeats` runs of `calls` calls, of the time per call (both ranks run it)."""
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def least_interleaved(fn, floor, calls: int, blocks: int):
    """Per call: the least over `blocks` blocks of `calls` calls of fn, and of floor, the two
    alternating, in this thread's CPU time (time on the CPU: a busy machine's preemptions do not
    count; no barrier: the stubbed ops do not communicate)."""
    for _ in range(50):
        fn(), floor()
    best = [float("inf"), float("inf")]
    gc.collect()
    gc.disable()  # a collection triggered by one's garbage would land in the other's time
    try:
        for _ in range(blocks):
            for i, f in enumerate((fn, floor)):
                start = time.thread_time_ns()
                for _ in range(calls):
                    f()
                best[i] = min(best[i], (time.thread_time_ns() - start) / calls / 1e3)
    finally:
        gc.enable()
    return best


class Callgrind:
    """Instructions executed per call, counted by callgrind between client requests (a few lines
    of C built here: Python cannot issue them)."""
    SOURCE = """#include <valgrind/callgrind.h>
void on(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void off(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""

    def __init__(self, out_file: str):
        self.out_file, folder = out_file, tempfile.mkdtemp()
        with open(os.path.join(folder, "cg.c"), "w") as f:
            f.write(self.SOURCE)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", os.path.join(folder, "cg.so"),
                        os.path.join(folder, "cg.c")], check=True)
        self.lib = ctypes.CDLL(os.path.join(folder, "cg.so"))

    def per_call(self, fn, calls: int) -> float:
        for _ in range(20):
            fn()
        gc.collect()
        gc.disable()
        try:
            self.lib.on()
            for _ in range(calls):
                fn()
            self.lib.off()
        finally:
            gc.enable()
        newest = max(glob.glob(self.out_file + ".*"), key=lambda p: int(p.rsplit(".", 1)[1]))
        with open(newest) as f:
            totals = [line for line in f if line.startswith(("totals:", "summary:"))]
        return int(totals[-1].split()[1]) / calls


def profile(fn, calls: int, top: int = 14) -> str:
    for _ in range(50):
        fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own s, total s, callers)}
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    return "; ".join(f"{name} ({file.rsplit('/', 1)[-1]}:{line}) {own / calls * 1e6:.1f} / {total / calls * 1e6:.1f}"
                     for (file, line, name), (_, _, own, total, _) in rows)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--stubs-only", action="store_true", help="skip the timing on the real ops")
    parser.add_argument("--callgrind", metavar="OUT_FILE", help="count instructions (see the docstring)")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("ep")
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(rank)
    e, n = args.experts, args.tokens
    idx = torch.rand(n, e, generator=g).topk(args.top_k, dim=1).indices
    w = torch.rand(n, args.top_k, generator=g)
    x = torch.randn(n, args.hidden, generator=g).bfloat16()
    fp8 = (x.float().to(torch.float8_e4m3fn), torch.rand(n, -(-args.hidden // 128), generator=g))
    name = dist.group.WORLD.group_name
    # The entries torch_ep.moe calls: the ops' functions through pybind (the direct call, the
    # default), or the torch ops under TORCH_EP_DIRECT_CALL=0. Looked up at each call, so that the
    # floors below call the stubs once they are in place.
    direct = os.environ.get("TORCH_EP_DIRECT_CALL", "1") != "0"
    torch_ops = torch.ops.ep

    class Entries:
        get_dispatch_layout = staticmethod(lambda *a: torch_ops.get_dispatch_layout(*a))
        dispatch = staticmethod(lambda *a: (torch_ep._C._dispatch_direct if direct else torch_ops.dispatch)(*a))
        combine = staticmethod(lambda *a: (torch_ep._C._combine_direct if direct else torch_ops.combine)(*a))

    ops = Entries

    layout = torch_ep.get_dispatch_layout(idx, e)
    routed = torch_ep.dispatch(x, idx, w, num_experts=e, layout=layout)
    meta, counts = routed.handle.meta, routed.handle.counts
    buffer = deep_ep.Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, e)
    given = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                 topk_idx=idx, topk_weights=w)
    b_recv, _, b_w, _, b_handle, _ = buffer.dispatch(x, **given)

    def native_fresh():
        return torch_ep.dispatch(x, idx, w, num_experts=e, layout=torch_ep.get_dispatch_layout(idx, e))

    def listed(result):  # the per-expert counts read as a list, as DeepEP's dispatch always returns them
        result.num_recv_tokens_per_expert
        return result

    def floor_fresh():
        lay = ops.get_dispatch_layout(idx, e, size, False)
        return ops.dispatch(x, None, idx, w, None, None, e, 0, name, lay[3], None)

    def buffer_fresh():
        r, _, pe, t, _ = buffer.get_dispatch_layout(idx, e)
        return buffer.dispatch(x, num_tokens_per_rank=r, is_token_in_rank=t, num_tokens_per_expert=pe, topk_idx=idx,
                               topk_weights=w)

    # (label, the Python layers' call, the same op calls made directly)
    sequences = [
        ("native layout", lambda: torch_ep.get_dispatch_layout(idx, e),
         lambda: ops.get_dispatch_layout(idx, e, size, False)),
        ("native layout + dispatch (fresh)", native_fresh, floor_fresh),
        ("native dispatch, layout given, bf16", lambda: torch_ep.dispatch(x, idx, w, num_experts=e, layout=layout),
         lambda: ops.dispatch(x, None, idx, w, None, None, e, 0, name, layout.meta, None)),
        ("native dispatch, layout given, fp8", lambda: torch_ep.dispatch(fp8, idx, w, num_experts=e, layout=layout),
         lambda: ops.dispatch(fp8[0], fp8[1], idx, w, None, None, e, 0, name, layout.meta, None)),
        ("native fresh + counts list", lambda: listed(native_fresh()), floor_fresh),
        ("native layout given, bf16 + counts list",
         lambda: listed(torch_ep.dispatch(x, idx, w, num_experts=e, layout=layout)),
         lambda: ops.dispatch(x, None, idx, w, None, None, e, 0, name, layout.meta, None)),
        ("native layout given, fp8 + counts list",
         lambda: listed(torch_ep.dispatch(fp8, idx, w, num_experts=e, layout=layout)),
         lambda: ops.dispatch(fp8[0], fp8[1], idx, w, None, None, e, 0, name, layout.meta, None)),
        ("native dispatch, cached handle", lambda: torch_ep.dispatch(x, handle=routed.handle),
         lambda: ops.dispatch(x, None, None, None, meta, counts, e, 0, name, None, None)),
        ("native combine", lambda: torch_ep.combine(routed.recv_x, routed.handle),
         lambda: ops.combine(routed.recv_x, None, meta, counts, e, name)),
        ("Buffer layout", lambda: buffer.get_dispatch_layout(idx, e),
         lambda: ops.get_dispatch_layout(idx, e, size, False)),
        ("Buffer layout + dispatch (fresh)", buffer_fresh, floor_fresh),
        ("Buffer dispatch, layout given, bf16", lambda: buffer.dispatch(x, **given),
         lambda: ops.dispatch(x, None, idx, w, None, None, e, 0, name, layout.meta, None)),
        ("Buffer dispatch, layout given, fp8", lambda: buffer.dispatch(fp8, **given),
         lambda: ops.dispatch(fp8[0], fp8[1], idx, w, None, None, e, 0, name, layout.meta, None)),
        ("Buffer dispatch, cached handle", lambda: buffer.dispatch(x, handle=b_handle),
         lambda: ops.dispatch(x, None, None, None, meta, counts, e, 0, name, None, None)),
        ("Buffer combine (with weights)", lambda: buffer.combine(b_recv, b_handle, b_w),
         lambda: ops.combine(b_recv, b_w, b_handle.native.meta, b_handle.native.counts, e, name)),
    ]

    def across_ranks(value: float, pick=max) -> float:
        values = [None] * size
        dist.all_gather_object(values, value)
        return pick(values)

    def say(line: str) -> None:
        if rank == 0:
            print(line, flush=True)

    say(f"{size} ranks, {n} tokens, hidden {args.hidden}, {e} experts, top-{args.top_k}")
    real = [] if args.stubs_only or args.callgrind else sequences
    if real:
        say(f"real ops, us per call issued (least of 3 runs of {args.calls // 4}; the op's spread dominates):")
    for label, fn, _ in real:
        whole = across_ranks(per_call_us(fn, args.calls // 4, 3))
        say(f"  {label:40s} {whole:7.1f}")

    # The real kernels' outputs for each kind of call, then stubs that return them.
    recorded = {
        "layout": ops.get_dispatch_layout(idx, e, size, False),
        ("dispatch", torch.bfloat16, False): ops.dispatch(x, None, idx, w, None, None, e, 0, name, layout.meta, None),
        ("dispatch", torch.float8_e4m3fn, False): ops.dispatch(fp8[0], fp8[1], idx, w, None, None, e, 0, name,
                                                               layout.meta, None),
        ("dispatch", torch.bfloat16, True): ops.dispatch(x, None, None, None, meta, counts, e, 0, name, None, None),
        ("combine", False): ops.combine(routed.recv_x, None, meta, counts, e, name),
        ("combine", True): ops.combine(b_recv, b_w, b_handle.native.meta, b_handle.native.counts, e, name),
    }
    lib = torch.library.Library("ep", "IMPL")
    lib.impl("get_dispatch_layout", lambda *a: recorded["layout"], "CPU")
    dispatch_stub = lambda x, s, i, w, hm, *a: recorded["dispatch", x.dtype, hm is not None]  # noqa: E731
    combine_stub = lambda x, w, *a: recorded["combine", w is not None]  # noqa: E731
    if direct:  # the direct entries stand in for the ops: stub them (a Python call, as cheap as pybind's)
        torch_ep._C._dispatch_direct, torch_ep._C._combine_direct = dispatch_stub, combine_stub
    else:
        lib.impl("dispatch", dispatch_stub, "CPU")
        lib.impl("combine", combine_stub, "CPU")
    if args.callgrind:
        counter = Callgrind(args.callgrind)
        say("stubbed kernels, instructions per call (callgrind): whole / op floor / Python layers")
        for label, fn, floor in sequences:
            whole, bare = counter.per_call(fn, 200), counter.per_call(floor, 200)
            say(f"  {label:40s} {whole:9.0f} {bare:9.0f} {whole - bare:9.0f}")
        dist.destroy_process_group()
        return
    say(f"stubbed kernels, us of CPU time per call (least of {args.blocks} blocks of {args.calls // 10}, the sequence's blocks "
        f"interleaved with the floor's): whole / op floor / Python layers")
    # Rank 0 alone (the stubs do not communicate): the other ranks wait, leaving it the machine.
    for label, fn, floor in sequences if rank == 0 else []:
        whole, bare = least_interleaved(fn, floor, args.calls // 10, args.blocks)
        say(f"  {label:40s} {whole:7.1f} {bare:7.1f} {whole - bare:7.1f}")
        if args.profile:
            say(f"    cProfile own / with callees: {profile(fn, args.calls)}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
