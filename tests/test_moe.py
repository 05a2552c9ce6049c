"""MoE dispatch / combine (torch_ep.dispatch, torch_ep.combine, torch_ep.get_dispatch_layout)
against torch_ep.reference, on 2 to 4 CPU ranks over the shared-memory transport.

The rank functions take a `device` so that tests/test_cuda_moe.py runs the same checks on CUDA.
Data is integer-valued, so sums are exact and every comparison is bit for bit.
"""
import os

import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import rank_pool
from torch_ep import reference
from torch_ep.testing import same_bits

PAYLOAD_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _seed():
    return int(torch.randint(0, 2**30, ()).item())


def make_routing(kind, g, num_tokens, top_k, num_experts, rank, size):
    """topk_idx [N, K]: distinct experts per token with -1 in random slots, or an extreme."""
    top_k = min(top_k, num_experts) if kind != "repeated" else top_k
    if num_tokens == 0:
        return torch.empty(0, top_k, dtype=torch.int64)
    if kind == "one_expert":  # every token of every rank to the last expert
        idx = torch.full((num_tokens, top_k), -1, dtype=torch.int64)
        idx[:, 0] = num_experts - 1
        return idx
    if kind == "repeated":  # the same expert in several slots of a token: it still travels once
        return torch.randint(0, num_experts, (num_tokens, 1), generator=g).repeat(1, top_k)
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
    if kind == "unrouted":
        idx[: num_tokens // 2] = -1
    return idx


def make_inputs(seed, kind, hidden, top_k, experts_per_rank, dtype, device, max_tokens=24):
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts = experts_per_rank * size
    g = torch.Generator().manual_seed(seed + 7919 * rank)
    num_tokens = 0 if (kind == "empty_rank" and rank == size - 1) else int(torch.randint(1, max_tokens, (),
                                                                                         generator=g))
    idx = make_routing(kind, g, num_tokens, top_k, num_experts, rank, size)
    x = torch.randint(-60, 60, (num_tokens, hidden), generator=g).to(dtype)
    w = torch.randint(1, 9, idx.shape, generator=g).float() / 8  # exact in float32
    return num_experts, g, x.to(device), idx.to(device), w.to(device)


def _poison_cache(device, nbytes):
    """The next allocations reuse poisoned memory: outputs the op forgets to write show up."""
    if device != "cpu":
        torch.full((max(nbytes, 1) // 4 + 1024,), float("nan"), device=device)


def check_result(result, expected, with_topk=True):
    ex, got = expected, result
    if isinstance(ex.recv_x, tuple):
        assert same_bits(got.recv_x[0].cpu(), ex.recv_x[0]) and same_bits(got.recv_x[1].cpu(), ex.recv_x[1])
    else:
        assert same_bits(got.recv_x.cpu(), ex.recv_x), "recv_x differs from the reference"
    if with_topk:
        assert torch.equal(got.recv_topk_idx.cpu(), ex.recv_topk_idx), "recv_topk_idx differs"
        if ex.recv_topk_weights is not None:
            assert torch.equal(got.recv_topk_weights.cpu(), ex.recv_topk_weights), "recv_topk_weights differ"
    assert got.num_recv_tokens_per_expert == ex.num_recv_tokens_per_expert


def rank_dispatch_combine(seed, kind, hidden, top_k, experts_per_rank, dtype, alignment=1, device="cpu"):
    rank = dist.get_rank()
    num_experts, g, x, idx, w = make_inputs(seed, kind, hidden, top_k, experts_per_rank, dtype, device)
    xc, idxc, wc = x.cpu(), idx.cpu(), w.cpu()

    # Layout.
    layout = torch_ep.get_dispatch_layout(idx, num_experts)
    ref_layout = reference.get_dispatch_layout(idxc, num_experts)
    assert torch.equal(layout.num_tokens_per_rank.cpu(), ref_layout.num_tokens_per_rank)
    assert torch.equal(layout.num_tokens_per_expert.cpu(), ref_layout.num_tokens_per_expert)
    assert torch.equal(layout.is_token_in_rank.cpu(), ref_layout.is_token_in_rank)
    # On CUDA the layout kernel writes the sizes to pinned host memory too, each rank's part followed
    # by its ready flag, so that dispatch(layout=) reads them without a stream wait.
    assert (layout.header is not None) == (torch.device(device).type == "cuda")
    if layout.header is not None:
        torch.cuda.synchronize()
        r, size = dist.get_world_size(), len(layout.meta) - 2 * idx.shape[0] * dist.get_world_size()
        assert layout.header.is_pinned() and layout.header.numel() == size + r
        assert torch.equal(layout.header[:size], layout.meta[:size].cpu())
        assert layout.header[size:].tolist() == [1] * r, "every rank's part of the header is flagged ready"
        assert layout.num_tokens_per_rank.untyped_storage().data_ptr() != layout.meta.untyped_storage().data_ptr()

    # Dispatch.
    expected = reference.dispatch(xc, idxc, wc, num_experts=num_experts, expert_alignment=alignment)
    _poison_cache(device, expected.recv_x.numel() * 4)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, expert_alignment=alignment, layout=layout)
    check_result(got, expected)
    assert got.work is None
    # Every rank's sends, as the records carried them (DeepEP's rank_prefix_matrix comes from it).
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, ref_layout.num_tokens_per_rank.tolist())
    sent = got.handle.send_matrix
    assert sent is not None or got.handle.internode, "an intranode handle of a small group holds the send matrix"
    assert sent is None or sent.tolist() == rows, f"send matrix {sent.tolist()} != every rank's sends {rows}"

    # Combine: each rank sends back what it received times (rank + 1).
    back = (got.recv_x.float() * (rank + 1)).to(dtype)
    ref_back = (expected.recv_x.float() * (rank + 1)).to(dtype)
    ref_comb = reference.combine(ref_back, expected.handle, expected.recv_topk_weights)
    _poison_cache(device, x.numel() * 4)
    comb = torch_ep.combine(back, got.handle, got.recv_topk_weights)
    assert same_bits(comb.combined_x.cpu(), ref_comb.combined_x), "combined_x differs from the reference"
    assert torch.equal(comb.combined_topk_weights.cpu(), ref_comb.combined_topk_weights)

    # Re-dispatch of new data along the handle, and the fp8 pair, sent as is.
    x2 = torch.randint(-60, 60, tuple(x.shape), generator=g).to(dtype)
    again = torch_ep.dispatch(x2.to(device), handle=got.handle, expert_alignment=alignment)
    check_result(again, reference.dispatch(x2, handle=expected.handle, expert_alignment=alignment), with_topk=False)
    assert again.recv_topk_idx is None and again.handle is got.handle
    scales = torch.rand(x.shape[0], (hidden + 127) // 128, generator=g)
    fp8 = (x2.float().to(torch.float8_e4m3fn), scales)
    got8 = torch_ep.dispatch(tuple(t.to(device) for t in fp8), idx, num_experts=num_experts)
    check_result(got8, reference.dispatch(fp8, idxc, num_experts=num_experts))
    comb2 = torch_ep.combine(back, got.handle)  # the handle stays valid after other dispatches
    assert same_bits(comb2.combined_x.cpu(), ref_comb.combined_x) and comb2.combined_topk_weights is None
    return got.recv_x.shape[0]


def test_send_matrix_cap_matches_the_extension():
    from torch_ep import _C
    from torch_ep.types import MAX_MATRIX_RANKS
    assert MAX_MATRIX_RANKS == _C.max_matrix_ranks


# Routes and payloads every device is checked on: -1 slots, ranks with no tokens, all tokens to
# one expert, hidden sizes 1 to 7168 (not all multiples of 8), top-k 1 to 9.
ROUTE_CASES = [
    ("random", 7, 4, 2, torch.bfloat16),
    ("random", 1, 1, 1, torch.float32),
    ("random", 130, 9, 3, torch.float16),
    ("random", 7168, 8, 4, torch.bfloat16),
    ("one_expert", 16, 2, 2, torch.bfloat16),
    ("empty_rank", 5, 3, 2, torch.float32),
    ("empty_rank", 4, 1, 1, torch.float32),
    ("unrouted", 24, 3, 2, torch.bfloat16),
    ("repeated", 8, 3, 2, torch.float32),
    # 65 fp8 scales and 40 experts a token: the kernels' paths past 64 scales and 32 experts
    ("random", 8320, 40, 24, torch.bfloat16),
]
CASE_IDS = lambda v: str(v).replace("torch.", "")  # noqa: E731


@pytest.mark.parametrize("kind,hidden,top_k,experts_per_rank,dtype", ROUTE_CASES, ids=CASE_IDS)
def test_dispatch_combine(pool, kind, hidden, top_k, experts_per_rank, dtype):
    pool.run(rank_dispatch_combine, _seed(), kind, hidden, top_k, experts_per_rank, dtype)


def test_cpu_ignores_moe_push():
    """TORCH_EP_MOE_PUSH concerns intranode CUDA dispatch; on CPU tensors a group with it set runs
    the shared-memory path as ever, with the same results."""
    pool = rank_pool(2, env={"TORCH_EP_MOE_PUSH": "1"})
    pool.run(rank_dispatch_combine, _seed(), "random", 130, 4, 2, torch.bfloat16)


def test_expert_alignment(pool4):
    pool4.run(rank_dispatch_combine, _seed(), "random", 12, 3, 3, torch.bfloat16, alignment=4)


def test_many_tokens_beyond_the_ring(pool4):
    """Enough rows that each message streams through the shared-memory ring several times."""
    pool4.run(rank_many_tokens, _seed())


def rank_many_tokens(seed, device="cpu"):
    num_experts, g, x, idx, w = make_inputs(seed, "random", 1024, 8, 8, torch.bfloat16, device, max_tokens=600)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
    check_result(got, expected)
    comb = torch_ep.combine(got.recv_x, got.handle, got.recv_topk_weights)
    ref = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights)
    assert same_bits(comb.combined_x.cpu(), ref.combined_x)


# ----------------------------------------------------------------------------- autograd

def rank_autograd(seed, device="cpu"):
    """dispatch's backward is a combine of the gradients; combine's a dispatch along the handle."""
    num_experts, g, x, idx, w = make_inputs(seed, "random", 10, 3, 2, torch.float32, device)
    x.requires_grad_(True)
    w.requires_grad_(True)
    expected = reference.dispatch(x.detach().cpu(), idx.cpu(), w.detach().cpu(), num_experts=num_experts)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
    grad_rows = torch.randint(-5, 5, got.recv_x.shape, generator=g).float()
    grad_w = torch.randint(-5, 5, got.recv_topk_weights.shape, generator=g).float()
    ((got.recv_x * grad_rows.to(device)).sum() + (got.recv_topk_weights * grad_w.to(device)).sum()).backward()
    # d/dx[t] = the sum of the gradients of t's rows; d/dw[t, k] likewise, only from the rank owning slot k.
    masked = grad_w * (expected.recv_topk_idx >= 0)
    want = reference.combine(grad_rows, expected.handle, masked)
    assert torch.equal(x.grad.cpu(), want.combined_x)
    assert torch.equal(w.grad.cpu(), want.combined_topk_weights)

    rows = got.recv_x.detach().clone().requires_grad_(True)
    rw = got.recv_topk_weights.detach().clone().requires_grad_(True)
    comb = torch_ep.combine(rows, got.handle, rw)
    grad_out = torch.randint(-5, 5, comb.combined_x.shape, generator=g).float()
    grad_cw = torch.randint(-5, 5, comb.combined_topk_weights.shape, generator=g).float()
    ((comb.combined_x * grad_out.to(device)).sum() + (comb.combined_topk_weights * grad_cw.to(device)).sum()).backward()
    assert torch.equal(rows.grad.cpu(), reference.dispatch(grad_out, handle=expected.handle).recv_x)
    assert torch.equal(rw.grad.cpu(), reference.dispatch(grad_cw, handle=expected.handle).recv_x)


def test_autograd(pool):
    pool.run(rank_autograd, _seed())


# ----------------------------------------------------------------------------- torch.compile

def rank_compiled(seed, device="cpu"):
    """A compiled module with dispatch and combine: traced (the ops are in the FX graphs) and
    equal to eager. dispatch's row count depends on the data, as nonzero's does, so dynamo
    traces it when capture_dynamic_output_shape_ops is on (num_worst_tokens needs no flag)."""
    import torch._dynamo

    num_experts, g, x, idx, w = make_inputs(seed, "random", 16, 2, 2, torch.float32, device)

    class Exchange(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.full((16,), 2.0))

        def forward(self, x, idx, w):
            d = torch_ep.dispatch(x * self.scale, idx, w, num_experts=num_experts)
            return torch_ep.combine(d.recv_x + 1, d.handle).combined_x

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    module = Exchange().to(device)
    eager = module(x, idx, w)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        compiled = torch.compile(module, backend=backend)(x, idx, w)
    assert torch.equal(compiled, eager)
    # The ops sit in the graphs of the autograd.Function bodies that dynamo traced.
    targets = {str(n.target) for gm in graphs for sub in gm.modules() if hasattr(sub, "graph")
               for n in sub.graph.nodes}
    assert {"ep.dispatch", "ep.combine"} <= {t.removesuffix(".default") for t in targets}, targets
    # The compiled module also trains: gradients equal eager's.
    module.scale.grad = None
    module(x, idx, w).sum().backward()
    eager_grad = module.scale.grad.clone()
    module.scale.grad = None
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        torch.compile(module, backend="aot_eager")(x, idx, w).sum().backward()
    assert torch.equal(module.scale.grad, eager_grad)


def test_torch_compile(pool):
    pool.run(rank_compiled, _seed())


# ----------------------------------------------------------------------------- async_op

def rank_async(seed, device="cpu"):
    num_experts, g, x, idx, w = make_inputs(seed, "random", 33, 4, 2, torch.bfloat16, device)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, async_op=True)
    got.work.wait()
    check_result(got, expected)
    comb = torch_ep.combine(got.recv_x, got.handle, async_op=True)
    comb.work.wait()
    ref = reference.combine(expected.recv_x, expected.handle)
    assert same_bits(comb.combined_x.cpu(), ref.combined_x)


def test_async_op(pool):
    pool.run(rank_async, _seed())


def rank_worst_case(seed, device="cpu"):
    """num_worst_tokens: fixed-size outputs, real rows first, padding routed nowhere."""
    num_experts, g, x, idx, w = make_inputs(seed, "random", 9, 3, 2, torch.float32, device)
    worst = 24 * dist.get_world_size()
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
    m = expected.recv_x.shape[0]
    assert got.recv_x.shape[0] == worst and got.recv_topk_idx.shape[0] == worst
    assert same_bits(got.recv_x[:m].cpu(), expected.recv_x)
    assert torch.equal(got.recv_topk_idx[:m].cpu(), expected.recv_topk_idx)
    assert bool((got.recv_topk_idx[m:] == -1).all())
    comb = torch_ep.combine(got.recv_x, got.handle)
    assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
    # The raw op along that handle without num_worst_tokens takes the handle's: the same rows.
    h = got.handle
    again = torch.ops.ep.dispatch(x, None, None, None, h.meta, h.counts, num_experts, 0,
                                  dist.group.WORLD.group_name)[0]
    assert again.shape[0] == worst and same_bits(again[:m].cpu(), expected.recv_x)


def test_num_worst_tokens(pool):
    pool.run(rank_worst_case, _seed())


def rank_combine_buffer(seed, device="cpu"):
    """combine_buffer off the device route across nodes (CPU, one node, the host route): a plain
    [M, H] tensor on the handle's device, bfloat16 unless asked (M: the rows received, or
    num_worst_tokens), and a combine from it equals the reference. Bad arguments raise naming
    themselves, and the group goes on."""
    num_experts, g, x, idx, w = make_inputs(seed, "random", 16, 3, 2, torch.bfloat16, device)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    for worst in (0, 24 * dist.get_world_size()):
        d = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
        buf = torch_ep.combine_buffer(d.handle)
        assert tuple(buf.shape) == tuple(d.recv_x.shape) and buf.dtype == torch.bfloat16 and buf.device == x.device
        back = torch.randint(-60, 60, tuple(buf.shape), generator=g).to(torch.bfloat16)
        buf.copy_(back)
        got = torch_ep.combine(buf, d.handle, d.recv_topk_weights)
        m = expected.recv_x.shape[0]
        want = reference.combine(back[:m], expected.handle, expected.recv_topk_weights)
        assert same_bits(got.combined_x.cpu(), want.combined_x)
        assert torch.equal(got.combined_topk_weights.cpu(), want.combined_topk_weights)
    wide = torch_ep.combine_buffer(d.handle, torch.float32, hidden=5)
    assert tuple(wide.shape) == (d.recv_x.shape[0], 5) and wide.dtype == torch.float32
    _raises(lambda: torch_ep.combine_buffer(expected.handle), TypeError, "handle")
    _raises(lambda: torch_ep.combine_buffer(d.handle, torch.int32), TypeError, "dtype")
    _raises(lambda: torch_ep.combine_buffer(d.handle, hidden=0), ValueError, "hidden")
    assert torch_ep.combine(d.recv_x, d.handle).combined_x.shape == x.shape  # the group goes on


def test_combine_buffer(pool):
    pool.run(rank_combine_buffer, _seed())


def rank_dispatch_buffer(seed, device="cpu"):
    """dispatch_buffer: where no zero-copy region serves (CPU, one node, the host route) a plain
    [N, H] tensor of the dtype asked (bfloat16 unless given; for float8_e4m3fn the pair with its
    [N, ceil(H / 128)] float32 scales) on the device asked; on the device route across nodes this
    rank's packed rows. Either way a dispatch from it, and one of the fp8 pair along the handle,
    equal the reference. Bad arguments raise naming themselves, and the group goes on."""
    num_experts, g, x, idx, w = make_inputs(seed, "random", 136, 3, 2, torch.bfloat16, device)
    n, hidden = x.shape
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    buf = torch_ep.dispatch_buffer(n, hidden, device=device)
    assert tuple(buf.shape) == (n, hidden) and buf.dtype == torch.bfloat16 and buf.device == x.device
    _poison_cache(device, expected.recv_x.numel() * 4)
    check_result(torch_ep.dispatch(buf.copy_(x), idx, w, num_experts=num_experts), expected)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
    x8 = torch.randint(-60, 60, (n, hidden), generator=g).float().to(torch.float8_e4m3fn)
    scales = torch.rand(n, 2, generator=g)
    buf8, buf_scales = torch_ep.dispatch_buffer(n, hidden, torch.float8_e4m3fn, device=device)
    assert tuple(buf8.shape) == (n, hidden) and buf8.dtype == torch.float8_e4m3fn and buf8.device == x.device
    assert tuple(buf_scales.shape) == (n, 2) and buf_scales.dtype == torch.float32
    buf8.copy_(x8), buf_scales.copy_(scales)
    again = torch_ep.dispatch((buf8, buf_scales), handle=got.handle)
    check_result(again, reference.dispatch((x8, scales), handle=expected.handle), with_topk=False)
    wide = torch_ep.dispatch_buffer(n, 5, torch.float32, device=device)
    assert tuple(wide.shape) == (n, 5) and wide.dtype == torch.float32
    assert torch_ep.dispatch_buffer(0, hidden, device=device).shape == (0, hidden)
    _raises(lambda: torch_ep.dispatch_buffer(-1, hidden, device=device), ValueError, "num_tokens")
    _raises(lambda: torch_ep.dispatch_buffer(2.5, hidden, device=device), ValueError, "num_tokens")
    _raises(lambda: torch_ep.dispatch_buffer(n, 0, device=device), ValueError, "hidden")
    _raises(lambda: torch_ep.dispatch_buffer(n, hidden, torch.int32, device=device), TypeError, "dtype")
    _raises(lambda: torch_ep.dispatch_buffer(n, hidden, device="meta"), ValueError, "device")
    check_result(torch_ep.dispatch(x, idx, w, num_experts=num_experts), expected)  # the group goes on


def test_dispatch_buffer(pool):
    pool.run(rank_dispatch_buffer, _seed())


def rank_worst_overflow(seed):
    """More rows than num_worst_tokens: on CPU the receiving rank raises at once, naming the
    dispatch, the rows that arrived and num_worst_tokens; torch_ep.check_errors() has nothing
    left to report, and the group keeps working."""
    rank, size = dist.get_rank(), dist.get_world_size()
    x = torch.randn(5, 8) + rank
    idx = torch.full((5, 1), 0, dtype=torch.int64)  # every token to rank 0's expert
    if rank == 0:
        msg = _raises(lambda: torch_ep.dispatch(x, idx, num_experts=2 * size, num_worst_tokens=2), ValueError,
                      f"rank 0 received {5 * size} rows, more than num_worst_tokens=2")
        assert msg.startswith("dispatch #"), msg
    else:
        torch_ep.dispatch(x, idx, num_experts=2 * size, num_worst_tokens=2)
    torch_ep.check_errors()
    rank_worst_case(seed)


def test_num_worst_tokens_overflow(pool):
    pool.run(rank_worst_overflow, _seed())


# ----------------------------------------------------------------------------- bad input

def _raises(fn, exc, text):
    try:
        fn()
    except exc as e:
        assert text in str(e), f"expected {text!r} in: {e}"
        return str(e)
    raise AssertionError(f"expected {exc.__name__} with {text!r}")


def rank_bad_input(device="cpu"):
    """Every bad input raises before any data moves, naming the argument; the group works after."""
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts, g, x, idx, w = make_inputs(_seed_for_all(), "random", 8, 2, 2, torch.float32, device)
    d = lambda **kw: torch_ep.dispatch(**{"x": x, "topk_idx": idx, "topk_weights": w, "num_experts": num_experts,
                                          **kw})
    _raises(lambda: d(num_experts=num_experts + 1), ValueError, "must be divisible by the group size")
    _raises(lambda: d(x=x.int()), TypeError, "x must be bfloat16, float16 or float32")
    _raises(lambda: d(x=x[0]), ValueError, "x must be 2-D")
    _raises(lambda: d(topk_idx=idx.int()), TypeError, "topk_idx must be int64")
    _raises(lambda: d(topk_idx=idx[:-1] if idx.shape[0] else idx.new_zeros(1, 2)), ValueError,
            "topk_idx must have shape")
    _raises(lambda: d(topk_weights=w.double()), TypeError, "topk_weights must be float32")
    _raises(lambda: d(topk_weights=w[:, :1]), ValueError, "topk_weights must have shape")
    _raises(lambda: d(x=(x.to(torch.float8_e4m3fn), torch.ones(x.shape[0], 3))), ValueError, "fp8 scales")
    _raises(lambda: torch_ep.dispatch(x), ValueError, "needs topk_idx and num_experts")
    meta = torch_ep.get_dispatch_layout(idx, num_experts).meta
    raw = lambda *tail: torch.ops.ep.dispatch(x, None, idx, None, None, None, num_experts, 0,  # noqa: E731
                                              dist.group.WORLD.group_name, *tail)
    _raises(lambda: raw(meta, torch.zeros(3, dtype=torch.int32)), ValueError, "layout_header must be the layout's header")
    _raises(lambda: raw(None, torch.zeros(3, dtype=torch.int32)), ValueError, "layout_header comes with layout_meta")

    # Expert ids out of range on one rank: every rank raises, and the group goes on.
    bad = idx.clone()
    if rank == 0:
        bad = torch.full_like(idx, num_experts)
    msg = _raises(lambda: d(topk_idx=bad), ValueError, "expert ids outside [-1, num_experts")
    assert ("rank 0" in msg) if rank != 0 else ("the largest" in msg)

    # Disagreeing ranks (another hidden size on the last rank): all raise, nothing moves.
    if rank == size - 1:
        _raises(lambda: d(x=torch.ones(x.shape[0], 9, device=device)), RuntimeError, "the ranks disagree on the hidden size")
    else:
        _raises(lambda: d(), RuntimeError, "the ranks disagree on the hidden size")

    good = d()
    # Handles: of another layout, of another group, or not a handle at all.
    other = torch.ones(x.shape[0] + 1, 8, device=device)
    _raises(lambda: torch_ep.dispatch(other, handle=good.handle), ValueError, "the handle routes")
    _raises(lambda: torch_ep.combine(good.recv_x[:, :3], "handle"), TypeError, "handle: expected")
    _raises(lambda: torch_ep.combine(torch.ones(good.recv_x.shape[0] + 1, 8, device=device), good.handle), ValueError,
            "x must have one row per row")
    sub = dist.new_group()
    _raises(lambda: torch_ep.combine(good.recv_x, good.handle, group=sub), ValueError, "it was made on group")
    dist.destroy_process_group(sub)

    # After all that, the group still dispatches and combines correctly.
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    check_result(d(), expected)
    comb = torch_ep.combine(good.recv_x, good.handle)
    assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)


_shared_seed = [12345]


def _seed_for_all():
    _shared_seed[0] += 1
    return _shared_seed[0]


def test_bad_input(pool):
    pool.run(rank_bad_input)


def test_handle_of_another_dispatch_raises_everywhere(pool):
    pool.run(rank_mismatched_handles)


def rank_mismatched_handles(device="cpu"):
    """Rank 0 combines with the handle of another dispatch than its peers: all ranks raise."""
    rank = dist.get_rank()
    num_experts, g, x, idx, w = make_inputs(_seed(), "random", 8, 2, 2, torch.float32, device)
    first = torch_ep.dispatch(x, idx, num_experts=num_experts)
    second = torch_ep.dispatch(x, idx, num_experts=num_experts)
    chosen = first if rank == 0 else second
    _raises(lambda: torch_ep.combine(chosen.recv_x, chosen.handle), RuntimeError, "handle of the same dispatch")
    comb = torch_ep.combine(second.recv_x, second.handle)  # the group goes on
    assert comb.combined_x.shape == x.shape


def test_ops_are_registered():
    for name in ("get_dispatch_layout", "dispatch", "combine"):
        assert hasattr(torch.ops.ep, name)


def rank_direct_call(seed, device="cpu", direct=True):
    """Eager dispatch and combine on plain tensors call the pybind entries (the direct call, the
    default), not the torch ops; under TORCH_EP_DIRECT_CALL=0 the torch ops. The other path is
    replaced by stubs that raise. Either way: the same outputs as the reference, fp8 and cached
    dispatches included, and the same errors for bad input; a dispatch that needs a gradient goes
    through autograd."""
    from torch_ep import _C, moe
    assert os.environ.get("TORCH_EP_DIRECT_CALL", "1") == ("1" if direct else "0")

    def refuse(*args):
        raise AssertionError("the path that should not run ran")

    owner, names = (moe, ("_dispatch_op", "_combine_op")) if direct else (_C, ("_dispatch_direct", "_combine_direct"))
    kept = [getattr(owner, n) for n in names]
    for n in names:
        setattr(owner, n, refuse)
    try:
        for case in ROUTE_CASES[:3] + ROUTE_CASES[5:6]:
            rank_dispatch_combine(seed, *case, device=device)
        rank_bad_input(device=device)
        num_experts, g, x, idx, w = make_inputs(seed, "random", 8, 2, 2, torch.float32, device)
        got = torch_ep.dispatch(x.clone().requires_grad_(), idx, w, num_experts=num_experts)
        assert got.recv_x.grad_fn is not None, "a dispatch that needs a gradient left autograd"
        if not direct:
            return
        # The outputs that hold nothing come back as None, not as empty tensors: bf16's scales and
        # a given layout's table; a cached dispatch's ids, weights, table and counts; combine's
        # weights without weights.
        name, layout = dist.group.WORLD.group_name, torch_ep.get_dispatch_layout(idx, num_experts)
        out = _C._dispatch_direct(x, None, idx, w, None, None, num_experts, 0, name, layout.meta, layout.header)
        assert [t is None for t in out] == [False, True, False, False, True, False], out
        handle = torch_ep.dispatch(x, idx, w, num_experts=num_experts).handle
        out = _C._dispatch_direct(x, None, None, None, handle.meta, handle.counts, num_experts, 0, name, None, None)
        assert [t is None for t in out] == [False, True, True, True, True, True], out
        out = _C._combine_direct(out[0], None, handle.meta, handle.counts, num_experts, name)
        assert [t is None for t in out] == [False, True], out
    finally:
        for n, fn in zip(names, kept):
            setattr(owner, n, fn)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_direct_call_steps_aside():
    """The direct call stands in for the ops only on plain eager tensors: not on a tensor
    subclass, under a dispatch or torch function mode, a functorch transform or the jit tracer."""
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch_ep import moe

    class Sub(torch.Tensor):
        pass

    class Passthrough(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    x = torch.randn(3, 4)
    assert moe._direct(x, None, x)
    assert not moe._direct(x, x.as_subclass(Sub))
    with Passthrough():
        assert not moe._direct(x)
    with TorchFunctionMode():
        assert not moe._direct(x)
    seen = []
    torch.func.vmap(lambda t: seen.append(moe._direct(t)) or t)(x)
    torch.func.grad(lambda t: seen.append(moe._direct(t)) or t.sum())(x)
    torch.jit.trace(lambda t: seen.append(moe._direct(t)) or t * 2, (x,), check_trace=False)
    assert seen == [False, False, False]
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        fake = torch.empty(3)
    assert not moe._direct(x, fake)  # a FakeTensor, outside its mode too
    assert not moe._direct(torch.nn.Parameter(x))  # a subclass: autograd.Function's path anyway
    assert moe._direct(x)


def test_direct_call_switch_refuses_other_values(monkeypatch):
    from torch_ep import moe
    monkeypatch.setattr(moe, "_DIRECT", None)
    monkeypatch.setenv("TORCH_EP_DIRECT_CALL", "yes")
    with pytest.raises(ValueError, match="TORCH_EP_DIRECT_CALL='yes': expected 0 or 1"):
        moe._direct(torch.zeros(1))


@pytest.mark.parametrize("direct", [True, False], ids=["direct_call", "torch_ops"])
def test_direct_call(direct):
    rank_pool(2, env={"TORCH_EP_DIRECT_CALL": "1" if direct else "0"}).run(rank_direct_call, _seed(), direct=direct)
