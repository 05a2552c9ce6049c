"""Set-up shared by the profiling tools (moe_profile, ll_profile, internode_profile,
deep_ep_overhead, a2a_profile, a2a_kernels): the shape options, the process group with this rank's
GPU current, the inputs each rank draws, each kernel's name and time from a torch.profiler run,
and the host phases' own clock."""
import argparse
import os
import re
import time
from collections import defaultdict

import torch
import torch.distributed as dist

import torch_ep  # noqa: F401  registers the "ep" backend


def shape_parser(tokens: int) -> argparse.ArgumentParser:
    """--tokens, --hidden, --experts and --top-k; the tools profile different token counts."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=tokens)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--experts", type=int, default=256)
    parser.add_argument("--top-k", type=int, default=8)
    return parser


def init_on_local_gpu() -> int:
    """Joins the "ep" process group (torchrun's environment), makes this rank's GPU current and
    returns the rank."""
    dist.init_process_group("ep")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return dist.get_rank()


def make_inputs(args, rank: int):
    """x [tokens, hidden] bf16, topk_idx (the top-k of random scores) and topk_weights, on the
    GPU, drawn from a generator seeded with the rank."""
    g = torch.Generator(device="cuda").manual_seed(rank)
    idx = torch.rand(args.tokens, args.experts, device="cuda", generator=g).topk(args.top_k, dim=1).indices
    w = torch.rand(args.tokens, args.top_k, device="cuda", generator=g)
    x = torch.randn(args.tokens, args.hidden, device="cuda", generator=g).bfloat16()
    return x, idx, w


def make_fp8(x, args):
    """DeepEP's fp8 pair for x: x cast to float8_e4m3fn and one float32 scale per 128 columns."""
    return x.float().to(torch.float8_e4m3fn), torch.rand(args.tokens, (args.hidden + 127) // 128, device="cuda")


def kernel_name(name: str) -> str:
    """A device event's name as its `*_kernel` function (mangled or not) where it has one, else
    the name's last 40 characters ("Memcpy DtoD (Device -> Device)")."""
    found = re.findall(r"([A-Za-z_]+_kernel)", name)
    return found[-1] if found else name[-40:]


def kernel_times(prof, calls: int):
    """Each CUDA kernel's device time per call (us) in a torch.profiler run of `calls` calls, by
    kernel_name."""
    times = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[kernel_name(e.name)] += e.device_time_total / calls
    return times


def top_kernels(times, count: int, digits: int = 1) -> str:
    """The `count` longest kernels of kernel_times, "name us, ..."."""
    ranked = sorted(times.items(), key=lambda kv: -kv[1])[:count]
    return ", ".join(f"{name} {us:.{digits}f}" for name, us in ranked)


def phase_clock_line(fn, calls: int) -> str:
    """The host time of `calls` calls of fn back to back, without the profiler, split by the ops'
    named phases (ep::<op>/<phase>) as their own steady clock measures them
    (backend/common/phase_clock.hpp): "total T us/call; phase us, ...", the largest first, a phase
    that runs other than once a call with its count per call, and what the calls spent outside
    every phase (Python, the dispatcher, c10d, the op's entry). The profiler's ranges place this
    time too, but inflate whatever encloses a CUDA call."""
    torch_ep._C._take_phase_times()  # whatever earlier calls left
    torch_ep._C._phase_clock(True)
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        total = (time.perf_counter() - start) / calls * 1e6
    finally:
        torch_ep._C._phase_clock(False)
    phases = sorted(torch_ep._C._take_phase_times(), key=lambda t: -t[2])
    parts = [f"{name} {ns / calls / 1e3:.1f}" + ("" if count == calls else f" (x{count / calls:g})")
             for name, count, ns in phases]
    outside = total - sum(ns for _, _, ns in phases) / calls / 1e3
    return f"total {total:.1f} us/call; " + ", ".join(parts + [f"outside the phases {outside:.1f}"])
