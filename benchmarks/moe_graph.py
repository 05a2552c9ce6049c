"""The graph rows of benchmarks/moe.py (--graph): dispatch bf16 and fp8 (layout in the call) and
combine bf16 with num_worst_tokens (no host wait), each called eagerly and captured once in a CUDA
graph and replayed as the op. A replay does none of the op's host work, so the isolated method's
replay row against the eager row of the same op splits issue 18's isolated/stream gap into the
host's part and the device's (caches cold after the flush, the ranks' skew leaving the barrier);
the eager num_worst_tokens row splits the host's part into its launches and its wait for the
received counts.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch

import torch_ep

WORST, GRAPH = ", num_worst_tokens", ", graph replay"
GRAPH_OPS = tuple(op + kind for kind in (WORST, GRAPH) for op in ("dispatch bf16", "dispatch fp8", "combine bf16"))


def graph_ops(inputs, num_experts: int, world_size: int) -> Tuple[Dict[str, Callable[[], object]], Dict[str, object]]:
    """The eager calls and the replays, by op name, and each one's outputs (for the check against
    torch_ep.reference: the first rows are the received ones, then padding)."""
    x, idx, w = inputs.x, inputs.topk_idx, inputs.topk_weights
    worst = x.shape[0] * world_size  # every token of every rank could come here
    dispatch = lambda payload: lambda: torch_ep.dispatch(payload, idx, w, num_experts=num_experts,  # noqa: E731
                                                         num_worst_tokens=worst)
    base = dispatch(x)()  # the route the combine graph reverses
    calls = {"dispatch bf16": dispatch(x), "dispatch fp8": dispatch(inputs.x_fp8),
             "combine bf16": lambda: torch_ep.combine(base.recv_x, base.handle)}
    ops, outputs = {}, {}
    for name, call in calls.items():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph, as torch.cuda.graph asks
            for _ in range(2):
                call()
        torch.cuda.current_stream().wait_stream(side)
        outputs[name + WORST] = call()
        ops[name + WORST] = call
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = call()
        graph.replay()
        torch.cuda.synchronize()
        outputs[name + GRAPH] = out
        ops[name + GRAPH] = lambda graph=graph, out=out, base=base: graph.replay()  # keeps the graph's tensors alive
    return ops, outputs
