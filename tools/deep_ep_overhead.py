"""Where torch_ep.deep_ep's dispatch spends time beyond the native API's, on a GPU. Run with
torchrun:

    torchrun --nproc-per-node 2 tools/deep_ep_overhead.py [--tokens 4096]

The same layout-given dispatch (bf16 and fp8) through the native API, through the Buffer, and
through the Buffer with one part of its own work swapped out, timed back to back (the stream
method: calls queued one after another, one synchronisation at the end); then the host time of
each part of the Buffer's work alone. Rank 0 prints microseconds per call.
"""
import time

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import deep_ep
from torch_ep.deep_ep import buffer as buffer_module
from torch_ep.deep_ep.utils import _HostCounts

from profile_common import init_on_local_gpu, make_fp8, make_inputs, shape_parser  # tools/, the script's folder


def per_call_us(fn, calls: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main():
    args = shape_parser(tokens=4096).parse_args()
    rank = init_on_local_gpu()
    x, idx, w = make_inputs(args, rank)
    fp8 = make_fp8(x, args)
    layout = torch_ep.get_dispatch_layout(idx, args.experts)
    buffer = deep_ep.Buffer(dist.group.WORLD)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, args.experts)
    given = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
                 topk_idx=idx, topk_weights=w)
    real_matrix = buffer_module.Buffer._rank_prefix_matrix

    def old_matrix(self, native, host, num_tokens_per_rank, device):  # made at once, copied behind the dispatch
        return native.send_matrix.cumsum(0).to(torch.int32).pin_memory().to(device, non_blocking=True)

    variants = {
        "Buffer, prefix matrix made when read (not read)": real_matrix,
        "Buffer, prefix matrix made at once": old_matrix,
        "Buffer, prefix matrix on the host only": lambda self, native, host, n, device: native.send_matrix.cumsum(0),
        "Buffer, no prefix matrix": lambda self, native, host, n, device: None,
    }
    class Lines(list):  # rank 0 prints each line as it comes, so that a killed run still tells
        def append(self, line):
            super().append(line)
            if rank == 0:
                print(line, flush=True)
    lines = Lines()
    for name, payload in (("bf16", x), ("fp8", fp8)):
        lines.append(f"dispatch {name}, layout given: native API "
                     f"{per_call_us(lambda: torch_ep.dispatch(payload, idx, w, num_experts=args.experts, layout=layout)):.1f} us")
        # The same with its per-expert counts read as the list the Buffer's dispatch always returns
        # (made when read): the native work that compares with the Buffer's like for like.
        lines.append(f"dispatch {name}, layout given: native API + counts list "
                     f"{per_call_us(lambda: torch_ep.dispatch(payload, idx, w, num_experts=args.experts, layout=layout).num_recv_tokens_per_expert):.1f} us")
        for label, matrix in variants.items():
            buffer_module.Buffer._rank_prefix_matrix = matrix
            lines.append(f"dispatch {name}, layout given: {label} {per_call_us(lambda: buffer.dispatch(payload, **given)):.1f} us")
        buffer_module.Buffer._rank_prefix_matrix = real_matrix
        lines.append(f"dispatch {name}, layout given: Buffer, handle[0] read after each call "
                     f"{per_call_us(lambda: buffer.dispatch(payload, **given)[4][0]):.1f} us")

    # A fresh route: the native API's one call, its two (layout, then dispatch), and the Buffer's two.
    def native_two():
        return torch_ep.dispatch(x, idx, w, num_experts=args.experts, layout=torch_ep.get_dispatch_layout(idx, args.experts))

    def buffer_two():
        r, _, e, t, _ = buffer.get_dispatch_layout(idx, args.experts)
        return buffer.dispatch(x, num_tokens_per_rank=r, is_token_in_rank=t, num_tokens_per_expert=e, topk_idx=idx,
                               topk_weights=w)
    lines.append(f"dispatch bf16, fresh: native API, one call {per_call_us(lambda: torch_ep.dispatch(x, idx, w, num_experts=args.experts)):.1f} us")
    lines.append(f"dispatch bf16, fresh: native API, layout then dispatch {per_call_us(native_two):.1f} us")
    lines.append(f"dispatch bf16, fresh: Buffer, layout then dispatch {per_call_us(buffer_two):.1f} us")
    lines.append(f"get_dispatch_layout alone: native {per_call_us(lambda: torch_ep.get_dispatch_layout(idx, args.experts)):.1f} us, "
                 f"Buffer {per_call_us(lambda: buffer.get_dispatch_layout(idx, args.experts)):.1f} us")

    # Host time of issuing the fresh route's calls (no wait at the end), then where it goes (cProfile).
    def host_us(fn, calls: int = 20) -> float:
        per_call_us(fn, 5)
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        spent = (time.perf_counter() - start) / calls * 1e6
        torch.cuda.synchronize()
        return spent
    routed = torch_ep.dispatch(x, idx, w, num_experts=args.experts, layout=layout)
    for label, fn in (("native layout given, bf16", lambda: torch_ep.dispatch(x, idx, w, num_experts=args.experts,
                                                                               layout=layout)),
                      ("native layout given, fp8", lambda: torch_ep.dispatch(fp8, idx, w, num_experts=args.experts,
                                                                              layout=layout)),
                      ("native combine", lambda: torch_ep.combine(routed.recv_x, routed.handle)),
                      ("native one call", lambda: torch_ep.dispatch(x, idx, w, num_experts=args.experts)),
                      ("native layout", lambda: torch_ep.get_dispatch_layout(idx, args.experts)),
                      ("native layout then dispatch", native_two),
                      ("Buffer layout", lambda: buffer.get_dispatch_layout(idx, args.experts)),
                      ("Buffer layout then dispatch", buffer_two)):
        lines.append(f"host: {label} {host_us(fn):.1f} us per call issued")
    # Where the fresh route's host time goes: cProfile's own time per function, in microseconds
    # per call of the route (pstats prints seconds to 3 decimals, too coarse here).
    import cProfile
    import pstats
    calls = 50
    for label, fn in (("native layout then dispatch", native_two), ("Buffer layout then dispatch", buffer_two),
                      ("Buffer dispatch, layout given, fp8", lambda: buffer.dispatch(fp8, **given))):
        per_call_us(fn, 5)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        profiler.disable()
        stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, primitive, own s, total s, callers)}
        top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:12]
        lines.append(f"cProfile, {label}, us per call (own / with callees): " + "; ".join(
            f"{name} ({file.rsplit('/', 1)[-1]}:{line}) {own / calls * 1e6:.1f} / {total / calls * 1e6:.1f}"
            for (file, line, name), (_, _, own, total, _) in top))

    # The host work of each part alone, on one dispatch's handle (no communication).
    d = torch_ep.dispatch(x, idx, w, num_experts=args.experts, layout=layout)
    parts = {
        "send_matrix": lambda: d.handle.send_matrix,
        "num_recv_tokens_per_expert": lambda: d.num_recv_tokens_per_expert,
        "the handle's counts read once (_HostCounts)": lambda: _HostCounts(d.handle),
        "prefix matrix, deferred": lambda: real_matrix(buffer, d.handle, _HostCounts(d.handle), per_rank, x.device),
        "prefix matrix, made at once": lambda: old_matrix(buffer, d.handle, None, per_rank, x.device),
        "Buffer._make_handle": lambda: buffer._make_handle(d.handle, _HostCounts(d.handle), in_rank, per_rank, x.device),
    }
    for label, fn in parts.items():
        for _ in range(50):
            fn()
        start = time.perf_counter()
        for _ in range(1000):
            fn()
        lines.append(f"host: {label} {(time.perf_counter() - start) * 1e3:.2f} us")
        torch.cuda.synchronize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
