"""benchmarks/moe.py's check before timing: every op's outputs against torch_ep.reference's on the
same inputs, bit for bit, on every rank, each after a call whose outputs were poisoned."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

from torch_ep import reference
from torch_ep.testing import same_bits

from benchmarks import common
from benchmarks.moe_graph import GRAPH, WORST

LAYOUT_GIVEN = ", layout given"  # an op timed with its layout computed before the call


def row_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.uint8).reshape(t.shape[0], -1)


def differences(what: str, got, expected) -> List[str]:
    """Where `got` differs from `expected` (tensors bit for bit, tuples item by item, others by ==)."""
    if isinstance(expected, torch.Tensor):
        if not (isinstance(got, torch.Tensor) and got.shape == expected.shape and got.dtype == expected.dtype):
            got_kind = f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            return [f"{what} is {got_kind}, expected {expected.dtype} {tuple(expected.shape)}"]
        if same_bits(got, expected):
            return []
        bad = (row_bytes(got) != row_bytes(expected)).any(dim=1).nonzero().flatten()
        return [f"{what}: {bad.numel()} of {got.shape[0]} rows differ, first row {bad[0].item()}"]
    if isinstance(expected, tuple):
        if not isinstance(got, tuple) or len(got) != len(expected):
            return [f"{what} is not a pair"]
        return [d for i, (g, e) in enumerate(zip(got, expected)) for d in differences(f"{what}[{i}]", g, e)]
    return [] if got == expected else [f"{what} differs: {got} != {expected}"]


def reference_results(inputs, num_experts: int) -> Dict[str, object]:
    """torch_ep.reference's dispatch bf16 and fp8 of `inputs` (benchmarks.moe.Inputs), what
    check_against_reference compares with."""
    return {op: reference.dispatch(payload, inputs.topk_idx, inputs.topk_weights, num_experts=num_experts)
            for op, payload in (("dispatch bf16", inputs.x), ("dispatch fp8", inputs.x_fp8))}


POISON_FIELDS = ("recv_x", "recv_topk_idx", "recv_topk_weights", "combined_x", "combined_topk_weights")


def poison_outputs(result) -> None:
    """Fills a result's output tensors with 0xFF bytes (NaN for floats, -1 for indices), so that the
    allocator hands the next call of the same shapes memory that holds no correct rows: a row the
    checked call fails to write then shows."""
    for field in POISON_FIELDS:
        value = getattr(result, field, None)
        for t in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(t, torch.Tensor) and t.numel() and t.is_contiguous():
                t.view(torch.uint8).fill_(0xFF)


def check_against_reference(ops: Dict[str, Callable[[], object]], inputs, num_experts: int,
                            sync_group, expected: Optional[Dict[str, object]] = None,
                            fields: Optional[Callable[[str, object], object]] = None) -> List[str]:
    """One call of each ep op against torch_ep.reference on the same inputs (`expected`: from
    reference_results, computed here when not given); raises on every rank if any rank got a
    different result. Each checked call follows a call of the same op whose outputs were poisoned
    and freed (poison_outputs), so that memory left over from an earlier call cannot pass for its
    output. `fields(op, result)` names a result's fields as the native API's (deep_ep_fields for
    the DeepEP API's tuples). Returns the ops it checked."""
    expected = expected or reference_results(inputs, num_experts)
    named = (lambda op, r: r) if fields is None else fields

    def call(op):
        poison_outputs(named(op, ops[op]()))
        return named(op, ops[op]())

    found, checked = [], []
    for op, want in expected.items():
        for variant in (op, f"{op}{LAYOUT_GIVEN}"):
            if variant not in ops:
                continue
            got = call(variant)
            checked.append(variant)
            for field in ("recv_x", "recv_topk_idx", "recv_topk_weights", "num_recv_tokens_per_expert"):
                found += differences(f"{variant} {field}", getattr(got, field), getattr(want, field))
    bf16 = expected["dispatch bf16"]
    if "dispatch cached" in ops:
        found += differences("dispatch cached recv_x", call("dispatch cached").recv_x, bf16.recv_x)
        checked.append("dispatch cached")
    combined = reference.combine(bf16.recv_x, bf16.handle).combined_x
    for variant in ("combine bf16", "combine bf16, fresh x"):
        if variant in ops:
            found += differences(f"{variant} combined_x", call(variant).combined_x, combined)
            checked.append(variant)
    problems = common.rank_problems("; ".join(found) or None, sync_group)
    if problems:
        raise RuntimeError(f"ep differs from torch_ep.reference on {inputs.x.shape[0]} tokens per rank, "
                           f"not timing it:\n  " + "\n  ".join(problems))
    return checked


def check_graphs(outputs: Dict[str, object], expected: Dict[str, object], sync_group) -> None:
    """The graph rows' outputs (one eager call with num_worst_tokens, one replay) against
    torch_ep.reference's (`expected`, from reference_results): the received rows, then padding
    that routes nowhere; raises on every rank if any rank's differ."""
    found = []
    bf16 = expected["dispatch bf16"]
    combined = reference.combine(bf16.recv_x, bf16.handle).combined_x
    for kind in (WORST, GRAPH):
        for op, want in expected.items():
            got, name = outputs[op + kind], op + kind
            m = want.recv_topk_idx.shape[0]
            rows = tuple(t[:m] for t in got.recv_x) if isinstance(got.recv_x, tuple) else got.recv_x[:m]
            found += differences(f"{name} recv_x", rows, want.recv_x)
            found += differences(f"{name} recv_topk_idx", got.recv_topk_idx[:m], want.recv_topk_idx)
            found += differences(f"{name} recv_topk_weights", got.recv_topk_weights[:m], want.recv_topk_weights)
            if not bool((got.recv_topk_idx[m:] == -1).all()):
                found.append(f"{name}: a padding row routes somewhere")
        found += differences(f"combine bf16{kind} combined_x", outputs["combine bf16" + kind].combined_x, combined)
    problems = common.rank_problems("; ".join(found) or None, sync_group)
    if problems:
        raise RuntimeError("a graph row differs from torch_ep.reference, not timing it:\n  " + "\n  ".join(problems))
