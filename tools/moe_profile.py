"""Where a dispatch / combine spends its time: kernel durations (torch.profiler) next to the
wall time per call, at DeepEP's benchmark shape; then the host time per call of the main ops
without the profiler (ROUNDS: the ops in turn, the median of 7 rounds, beside two floors of the host:
one launch, and an allocation the size of recv_x with a launch), split by the ops' phases
on their own clock (CLOCK), and under the profiler (HOST, SELF: it places time but inflates
whatever encloses a CUDA call). Run with torchrun on a GPU machine:

    torchrun --nproc-per-node 2 tools/moe_profile.py [--hidden 7168] [--tokens 4096]
"""
import time

import torch
import torch.distributed as dist

import torch_ep

from profile_common import (init_on_local_gpu, kernel_times, make_fp8, make_inputs, phase_clock_line,  # tools/
                            shape_parser, top_kernels)


def main():
    args = shape_parser(tokens=4096).parse_args()
    rank = init_on_local_gpu()
    x, idx, w = make_inputs(args, rank)
    fp8 = make_fp8(x, args)
    d = torch_ep.dispatch(x, idx, w, num_experts=args.experts)
    layout = torch_ep.get_dispatch_layout(idx, args.experts)
    fresh = d.recv_x.clone()
    worst = args.tokens * dist.get_world_size()
    group_name = dist.group.WORLD.group_name  # the lambdas read it when called: no loop may rebind it
    ops = {
        "dispatch bf16, layout given": lambda: torch_ep.dispatch(x, idx, w, num_experts=args.experts, layout=layout),
        "dispatch fp8, layout given": lambda: torch_ep.dispatch(fp8, idx, w, num_experts=args.experts, layout=layout),
        "layout": lambda: torch_ep.get_dispatch_layout(idx, args.experts),
        "dispatch bf16": lambda: torch_ep.dispatch(x, idx, w, num_experts=args.experts),
        "dispatch fp8": lambda: torch_ep.dispatch(fp8, idx, w, num_experts=args.experts),
        "dispatch cached": lambda: torch_ep.dispatch(x, handle=d.handle),
        "combine bf16": lambda: torch_ep.combine(d.recv_x, d.handle),
        # An x no dispatch made, as expert outputs are (device records copy it into the MoE pool).
        "combine bf16, fresh x": lambda: torch_ep.combine(fresh, d.handle),
        "dispatch bf16, num_worst_tokens": lambda: torch_ep.dispatch(x, idx, w, num_experts=args.experts,
                                                                     num_worst_tokens=worst),
        "raw op dispatch": lambda: torch.ops.ep.dispatch(x, None, idx, w, None, None, args.experts, 0, group_name),
        # The direct call alone (what torch_ep.dispatch calls on plain eager tensors), without the
        # Python layers: where fp8 costs more host time than bf16, whether the C++ side pays it.
        "direct dispatch bf16, layout given": lambda: torch_ep._C._dispatch_direct(
            x, None, idx, w, None, None, args.experts, 0, group_name, layout.meta, layout.header),
        "direct dispatch fp8, layout given": lambda: torch_ep._C._dispatch_direct(
            fp8[0], fp8[1], idx, w, None, None, args.experts, 0, group_name, layout.meta, layout.header),
    }
    # The same calls through torch_ep.deep_ep's Buffer (DeepEP's API), whose cost over the native
    # API's is the wrapper's.
    from torch_ep import deep_ep
    buffer = deep_ep.Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, args.experts)
    wrapped = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                   topk_idx=idx, topk_weights=w)
    recv_x, *_, handle, _ = buffer.dispatch(x, **wrapped)
    ops.update({
        "deep_ep dispatch bf16, layout given": lambda: buffer.dispatch(x, **wrapped),
        "deep_ep dispatch fp8, layout given": lambda: buffer.dispatch(fp8, **wrapped),
        "deep_ep dispatch cached": lambda: buffer.dispatch(x, handle=handle),
        "deep_ep combine bf16": lambda: buffer.combine(recv_x, handle),
    })
    # TORCH_EP_OUTPUTS_TOGETHER=0 (a dispatch's small outputs each in an allocation of its own) as
    # ops of their own, taken in turn with the others: the host's speed drifts between runs by more
    # than the switch changes, so its A/B is made within one run.
    APART = ", outputs apart"
    for name in ("dispatch bf16, layout given", "dispatch fp8, layout given"):
        ops[name + APART] = ops[name]

    def select(name):  # before a batch of `name`'s calls: the outputs together or apart
        torch_ep._C._set_outputs_together(not name.endswith(APART))

    lines = []
    for name, fn in ops.items():
        select(name)
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        dist.barrier()
        n = 30
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            start = time.perf_counter()
            for _ in range(n):
                fn()
            torch.cuda.synchronize()
            wall = (time.perf_counter() - start) / n
        top = top_kernels(kernel_times(prof, n), 5)
        lines.append(f"rank {rank} {name:36s} wall {wall * 1e6:7.1f} us/call | kernels us/call: {top}")
        dist.barrier()
    host_ops = ("dispatch bf16, layout given", "dispatch fp8, layout given", "dispatch cached", "combine bf16",
                "deep_ep dispatch bf16, layout given", "deep_ep dispatch cached",
                "dispatch bf16, layout given" + APART, "dispatch fp8, layout given" + APART,
                "direct dispatch bf16, layout given", "direct dispatch fp8, layout given")
    # This host's floors, timed in the same rounds: what torch itself pays for one kernel launch and
    # for the allocation a dispatch must make (recv_x's size, freed when the next call drops it), so
    # that a host time reads as a count of launches on hosts of different speed.
    one, other = torch.ones(1, device=x.device), torch.empty(1, device=x.device)
    floors = {
        "floor: one torch op, a launch": lambda: torch.add(one, 1, out=other),
        "floor: recv_x's allocation and a launch": lambda: torch.empty_like(d.recv_x).view(-1)[:1].copy_(one),
    }
    ops.update(floors)
    # The host time per call without the profiler, the ops taken in turn over several rounds, so
    # that no op owes its figure to its place in the order (the median and the range of the rounds).
    rounds = {name: [] for name in host_ops + tuple(floors)}
    for _ in range(7):
        for name in rounds:
            select(name)
            torch.cuda.synchronize()
            dist.barrier()
            start = time.perf_counter()
            for _ in range(30):
                ops[name]()
            rounds[name].append((time.perf_counter() - start) / 30 * 1e6)
    torch.cuda.synchronize()
    for name, times in rounds.items():
        times.sort()
        lines.append(f"rank {rank} ROUNDS {name}: median {times[len(times) // 2]:.1f} us/call on the host "
                     f"(7 rounds in turn with the other ops, {times[0]:.1f}-{times[-1]:.1f})")
    # The host side, back to back as in the benchmark's stream method: the op's phases
    # (ep::<op>/<phase> ranges of backend/ops/cuda/moe_cuda.cpp) in microseconds per call.
    for name in host_ops:
        select(name)
        calls = 30
        torch.cuda.synchronize()
        dist.barrier()
        # The phases on their own clock, without the profiler (its ranges and event records cost
        # host time of their own).
        clocked = phase_clock_line(ops[name], calls)
        torch.cuda.synchronize()
        dist.barrier()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                ops[name]()
            host = (time.perf_counter() - start) / calls
        torch.cuda.synchronize()  # outside the profile: the queue's drain is no call's host time
        phases = {e.key: e.cpu_time_total / calls for e in prof.key_averages()
                  if e.key.startswith(("ep::", "aten::", "cuda"))}
        top = ", ".join(f"{k} {v:.1f}" for k, v in sorted(phases.items(), key=lambda kv: -kv[1])[:12])
        bare = rounds[name][len(rounds[name]) // 2]  # sorted above: the rounds' median
        lines.append(f"rank {rank} HOST {name}: {bare:.1f} us/call on the host without the profiler (ROUNDS), "
                     f"{host * 1e6:.1f} under it | {top}")
        # Where the op's own time goes outside its named phases: each range's self time (driver
        # calls, "cu*", included), the largest first.
        selves = sorted(((e.key, e.self_cpu_time_total / calls) for e in prof.key_averages()), key=lambda kv: -kv[1])
        lines.append(f"rank {rank} SELF {name}: " + ", ".join(f"{k} {v:.1f}" for k, v in selves[:10]))
        lines.append(f"rank {rank} CLOCK {name}: {clocked}")
    select("")
    # The same protocol on CPU tensors (host exchange + shared-memory rows), tiny payload.
    xc, idxc = torch.randn(64, 8), idx[:64].cpu()
    dc = torch_ep.dispatch(xc, idxc, num_experts=args.experts)
    for _ in range(5):
        torch_ep.dispatch(xc, handle=dc.handle)
    start = time.perf_counter()
    for _ in range(50):
        torch_ep.dispatch(xc, handle=dc.handle)
    lines.append(f"rank {rank} CPU cached dispatch (64 x 8 fp32): {(time.perf_counter() - start) / 50 * 1e6:.1f} us/call")
    for line in lines:
        print(line, flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
