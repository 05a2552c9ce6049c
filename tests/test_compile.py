"""torch.compile with fullgraph=True and the default backend (inductor), forward and backward:
dispatch, combine and get_dispatch_layout (exact sizes with capture_dynamic_output_shape_ops,
num_worst_tokens with no flag and no unbacked size), funcol.all_to_all_single_autograd on an
"ep" group, and ExpertParallelMoE; compiled against eager, bit for bit where the arithmetic
allows (integer-valued data through the ops; the layer's float MLP within a tolerance).

The rank functions take a `device`: tests/test_cuda_compile.py runs them on CUDA, with
mode="reduce-overhead" and the low-latency ops.
"""
import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import rank_pool
from test_moe import _seed, make_inputs


def _reset():
    import torch._dynamo

    torch._dynamo.reset()


def inductor_recording(graphs):
    """The default backend (inductor), keeping each dynamo graph for inspection."""
    from torch._inductor.compile_fx import compile_fx

    def backend(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)
    return backend


def unbacked_symbols(graphs):
    from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

    found = set()
    for gm in graphs:
        for node in gm.graph.nodes:
            value = node.meta.get("example_value", node.meta.get("val"))
            if value is not None:
                found |= free_unbacked_symbols(value)
    return found


def ops_in(graphs):
    """The ops of the graphs, those inside the autograd.Function bodies dynamo traced included."""
    nodes = [n for gm in graphs for sub in gm.modules() if hasattr(sub, "graph") for n in sub.graph.nodes]
    # An op that mutates an argument sits in an auto_functionalized node, as its first argument.
    return {str(n.args[0] if "auto_functionalized" in str(n.target) else n.target).removesuffix(".default")
            for n in nodes}


def _grads(tensors):
    grads = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    return grads


# ------------------------------------------------------------------------ the ops, one graph

def rank_ops(seed, mode, device="cpu"):
    """get_dispatch_layout + dispatch(layout=) + a re-dispatch along the handle + combine with
    weights, forward and backward, as one fullgraph inductor graph; equal to eager bit for bit.
    mode "exact": data-dependent row counts (capture_dynamic_output_shape_ops); "worst":
    num_worst_tokens, no flag, and no unbacked symbol in the graph."""
    _reset()
    num_experts, g, x, idx, w = make_inputs(seed, "random", 16, 3, 2, torch.float32, device)
    size = dist.get_world_size()
    worst = 24 * size if mode == "worst" else 0  # make_inputs draws at most 23 tokens per rank
    x2 = torch.randint(-60, 60, x.shape, generator=g).float().to(device)
    scale = torch.randint(1, 4, (16,), generator=g).float().to(device)
    gx = torch.randint(-4, 5, x.shape, generator=g).float().to(device)
    gw = torch.randint(-4, 5, w.shape, generator=g).float().to(device)

    def f(x, idx, w, x2):
        layout = torch_ep.get_dispatch_layout(idx, num_experts)
        d = torch_ep.dispatch(x * scale, idx, w, num_experts=num_experts, layout=layout, num_worst_tokens=worst)
        again = torch_ep.dispatch(x2, handle=d.handle)
        y = d.recv_x * 2 + again.recv_x * d.recv_topk_weights.sum(1, keepdim=True)
        c = torch_ep.combine(y, d.handle, d.recv_topk_weights * 3)
        return c.combined_x, c.combined_topk_weights, layout.num_tokens_per_rank, layout.is_token_in_rank

    def run(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w, x2)]
        out = fn(leaves[0], idx, leaves[1], leaves[2])
        ((out[0] * gx).sum() + (out[1] * gw).sum()).backward()
        return [o.detach() for o in out] + _grads(leaves)

    graphs = []
    compiled = torch.compile(f, fullgraph=True, backend=inductor_recording(graphs))
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=(mode == "exact")):
        got = run(compiled)
        got_again = run(compiled)  # the cached graph, no recompilation
    expected = run(f)
    names = ["combined_x", "combined_topk_weights", "num_tokens_per_rank", "is_token_in_rank", "grad x", "grad w",
             "grad x2"]
    for name, a, b, c in zip(names, got, got_again, expected):
        assert torch.equal(a, c), f"{mode}: {name} differs from eager"
        assert torch.equal(b, c), f"{mode}: {name} differs from eager on the second call"
    assert len(graphs) == 1, f"{len(graphs)} graphs"
    assert {"ep.dispatch", "ep.combine", "ep.get_dispatch_layout"} <= ops_in(graphs)
    if mode == "worst":
        assert not unbacked_symbols(graphs), unbacked_symbols(graphs)

    # A compiled region may read the padded counts itself (data-dependent ints: no guard, no graph
    # break), train through the dispatch, and hand its result and handle back (the counts then
    # read outside the graph, when asked for). torch 2.11's dynamo runs no property setter: the
    # counts must be readable without one.
    def dispatch_only(x, idx, w):
        d = torch_ep.dispatch(x, idx, w, num_experts=num_experts, num_worst_tokens=worst, expert_alignment=4)
        total = x.new_full((1,), sum(d.num_recv_tokens_per_expert))
        c = torch_ep.combine(d.recv_x * d.recv_topk_weights.sum(1, keepdim=True), d.handle)
        return d, total, c.combined_x

    def run_dispatch_only(fn):
        leaves = [t.clone().requires_grad_() for t in (x, w)]
        d, total, out = fn(leaves[0], idx, leaves[1])
        (out * gx).sum().backward()
        return [d, total, out.detach()] + _grads(leaves)

    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=(mode == "exact"), capture_scalar_outputs=True):
        got, *got_tensors = run_dispatch_only(torch.compile(dispatch_only, fullgraph=True))
    expected, *expected_tensors = run_dispatch_only(dispatch_only)
    # Every rank combines before any asserts, so that a mismatch on one rank cannot leave the
    # other waiting in the collective.
    combined = [torch_ep.combine(d.recv_x.detach(), d.handle).combined_x for d in (got, expected)]
    # With num_worst_tokens the rows past the received ones are padding: routed nowhere (expert
    # -1), their recv_x unspecified on CUDA (as DeepEP's). A received row has a local expert.
    real = (expected.recv_topk_idx >= 0).any(1)
    assert torch.equal(got.recv_x[real], expected.recv_x[real]), f"{mode}: dispatch_only's recv_x differs"
    assert torch.equal(got.recv_topk_idx, expected.recv_topk_idx), f"{mode}: dispatch_only's recv_topk_idx differs"
    assert got.num_recv_tokens_per_expert == expected.num_recv_tokens_per_expert
    for name, a, b in zip(["sum of the counts", "combined_x", "grad x", "grad w"], got_tensors, expected_tensors):
        assert torch.equal(a, b), f"{mode}: dispatch_only's {name} differs from eager"
    assert torch.equal(*combined), f"{mode}: combine along the compiled dispatch's handle differs"


@pytest.mark.parametrize("mode", ["exact", "worst"])
def test_ops_fullgraph(mode):
    rank_pool(2).run(rank_ops, _seed(), mode)


# ------------------------------------------------------------------------ functional collectives

def rank_funcol(seed, device="cpu"):
    """funcol.all_to_all_single_autograd inside a fullgraph-compiled function (the torchtitan
    pattern), forward and backward, equal to eager."""
    import torch.distributed._functional_collectives as funcol

    _reset()
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)  # the same split matrix on every rank
    splits = torch.randint(0, 6, (size, size), generator=g)
    send, recv = splits[rank].tolist(), splits[:, rank].tolist()
    g.manual_seed(seed + 1 + rank)
    x = torch.randint(-50, 50, (sum(send), 8), generator=g).float().to(device)
    grad = torch.randint(-50, 50, (sum(recv), 8), generator=g).float().to(device)
    group = dist.group.WORLD

    def f(x):
        out = funcol.all_to_all_single_autograd(x * 2, recv, send, group)
        return out + 1

    def run(fn):
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        (out * grad).sum().backward()
        return out.detach(), leaf.grad

    got = run(torch.compile(f, fullgraph=True))
    expected = run(f)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # And against all_to_all_single itself.
    direct = torch.empty(sum(recv), 8, device=device)
    dist.all_to_all_single(direct, x * 2, recv, send)
    assert torch.equal(got[0], direct + 1)


def test_funcol_all_to_all_single_autograd():
    rank_pool(2).run(rank_funcol, _seed())


# ------------------------------------------------------------------------ the MoE layer

def make_layer(seed, device, num_tokens, hidden=16, experts_per_rank=2, dtype=torch.float32):
    from torch_ep.nn import ExpertParallelMoE

    size = dist.get_world_size()
    torch.manual_seed(seed + dist.get_rank())
    layer = ExpertParallelMoE(hidden, 2 * hidden, experts_per_rank * size, 2, device=device, dtype=dtype,
                              num_worst_tokens=num_tokens * size)
    g = torch.Generator().manual_seed(seed + 31 * dist.get_rank())
    x = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
    grad = torch.randn(num_tokens, hidden, generator=g).to(device, dtype)
    return layer, x, grad


def layer_step(layer, x, grad):
    leaf = x.clone().requires_grad_()
    out = layer(leaf)
    (out * grad).sum().backward()
    params = [leaf] + list(layer.parameters())
    return [out.detach()] + _grads(params)


def rank_layer(seed, device="cpu"):
    """ExpertParallelMoE with num_worst_tokens under torch.compile(fullgraph=True): one graph,
    no unbacked symbol; output and every gradient match eager. The static path also matches the
    exact-size path of the same layer."""
    _reset()
    layer, x, grad = make_layer(seed, device, num_tokens=12)
    graphs = []
    compiled = torch.compile(layer, fullgraph=True, backend=inductor_recording(graphs))
    got = layer_step(compiled, x, grad)
    expected = layer_step(layer, x, grad)
    layer.num_worst_tokens = 0
    exact = layer_step(layer, x, grad)
    tol = 1e-5 if device == "cpu" else 1e-4  # cuBLAS may split the sums differently per shape
    for i, (a, b, c) in enumerate(zip(got, expected, exact)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m: f"tensor {i}, compiled vs eager: {m}")
        torch.testing.assert_close(b, c, rtol=tol, atol=tol, msg=lambda m: f"tensor {i}, static vs exact: {m}")
    assert len(graphs) == 1 and not unbacked_symbols(graphs)


def test_moe_layer_fullgraph():
    rank_pool(2).run(rank_layer, _seed())


# ------------------------------------------------------------------------ low-latency ops (traced only)

class _Traced(Exception):
    pass


def rank_low_latency_traces(hook):
    """The low-latency wrappers trace as one graph (dynamo, then AOT autograd's forward graph,
    which inductor compiles) with fullgraph=True; here on CPU tensors and without running them (the ops need NVSHMEM and
    CUDA: tests/test_cuda_compile.py runs them), the set-up at trace time stubbed out."""
    from torch._functorch.aot_autograd import aot_module_simplified

    import torch_ep.low_latency as ll

    _reset()
    size = dist.get_world_size()
    graphs = []

    def backend(gm, example_inputs):
        def forward_compiler(fw, inputs):
            from torch._inductor.compile_fx import compile_fx_inner

            graphs.append(fw)
            compile_fx_inner(fw, inputs)  # inductor lowers it too
            raise _Traced()
        from torch._inductor.decomposition import select_decomp_table

        return aot_module_simplified(gm, example_inputs, fw_compiler=forward_compiler,
                                     decompositions=select_decomp_table())

    def step(x, idx, w):
        d = torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=2 * size, use_fp8=True,
                                          return_recv_hook=hook)
        if hook:
            d.hook()
        y = d.recv_x[0].float() * d.recv_x[1].repeat_interleave(128, dim=-1)
        c = torch_ep.low_latency_combine(y.bfloat16(), idx, w, d.handle, return_recv_hook=hook)
        if hook:
            c.hook()
        return c.combined_x

    setup = ll._ensure_buffers_when_traced
    ll._ensure_buffers_when_traced = torch.compiler.assume_constant_result(lambda *args: 0)
    try:
        x = torch.randn(5, 256).bfloat16()
        idx = torch.randint(0, 2 * size, (5, 3))
        w = torch.rand(5, 3)
        with pytest.raises(Exception, match="_Traced"):
            torch.compile(step, fullgraph=True, backend=backend)(x, idx, w)
    finally:
        ll._ensure_buffers_when_traced = setup
    assert len(graphs) == 1 and not unbacked_symbols(graphs), unbacked_symbols(graphs)
    ops = ops_in(graphs)
    assert {"ep.low_latency_dispatch", "ep.low_latency_combine_in_graph"} <= ops, ops


@pytest.mark.parametrize("hook", [False, True], ids=["no_hook", "hook"])
def test_low_latency_traces(hook):
    rank_pool(2).run(rank_low_latency_traces, hook)
