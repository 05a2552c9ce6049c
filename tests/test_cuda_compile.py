"""torch.compile on CUDA (GPU machines only): tests/test_compile.py's checks on CUDA tensors,
mode="reduce-overhead" (inductor's CUDA graphs) of an MoE layer with num_worst_tokens and of a
low-latency decode step, replayed with new inputs and compared with eager, and a dispatch whose
rank receives more rows than num_worst_tokens: torch_ep.check_errors() (or the group's next call
on every rank) names it, and the group keeps working.

    TORCH_EP_TEST_WORLD_SIZES=2 python -m pytest tests/test_cuda_compile.py -q
"""
import pytest
import torch
import torch.distributed as dist

import test_compile as checks
import test_moe
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from test_moe import _seed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")


def _has_low_latency():
    try:
        import nvshmem.core  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return torch_ep._C.has_nvshmem


needs_low_latency = pytest.mark.skipif(not _has_low_latency(),
                                       reason="needs a torch_ep built with NVSHMEM, and nvshmem4py")


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


@pytest.mark.parametrize("mode", ["exact", "worst"])
def test_ops_fullgraph(cuda_pool, mode):
    cuda_pool.run(checks.rank_ops, _seed(), mode, device="cuda")


def test_funcol_all_to_all_single_autograd(cuda_pool):
    cuda_pool.run(checks.rank_funcol, _seed(), device="cuda")


def test_moe_layer_fullgraph(cuda_pool):
    cuda_pool.run(checks.rank_layer, _seed(), device="cuda")


# ------------------------------------------------------------------------ mode="reduce-overhead"

def rank_layer_reduce_overhead(seed, train):
    """ExpertParallelMoE(num_worst_tokens=) under torch.compile(mode="reduce-overhead",
    fullgraph=True): each call with new inputs of the same shape (CUDA-graph replays after the
    first calls) matches eager; with `train`, forward and backward, gradients included."""
    checks._reset()
    layer, x, grad = checks.make_layer(seed, "cuda", num_tokens=64)
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    g = torch.Generator().manual_seed(seed + 97 * dist.get_rank())
    for step in range(5):
        x = torch.randn(x.shape, generator=g).cuda()
        if train:
            got = [t.clone() for t in checks.layer_step(compiled, x, grad)]
            expected = checks.layer_step(layer, x, grad)
        else:
            with torch.no_grad():
                got = [compiled(x).clone()]
                expected = [layer(x)]
        for i, (a, b) in enumerate(zip(got, expected)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"call {step}, tensor {i}: {m}")
    from torch._dynamo.utils import counters
    return dict(counters["inductor"])


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
def test_moe_layer_reduce_overhead(cuda_pool, train):
    cuda_pool.run(rank_layer_reduce_overhead, _seed(), train)


def ll_step(num_experts, max_tokens, hook):
    """A decode step: low-latency dispatch (bf16), the 'experts' (x 2, exact), combine."""
    def step(x, idx, w):
        d = torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=max_tokens, num_experts=num_experts,
                                          use_fp8=False, return_recv_hook=hook)
        if hook:
            d.hook()
        c = torch_ep.low_latency_combine(d.recv_x * 2, idx, w, d.handle, return_recv_hook=hook)
        if hook:
            c.hook()
        return c.combined_x
    return step


def rank_low_latency(seed, mode, hook):
    """A low-latency decode step compiled with fullgraph=True (the default mode, or
    "reduce-overhead": CUDA-graph replays), each call on new inputs of the same shapes, equal to
    the eager step bit for bit (integer-valued data, weights in eighths)."""
    from test_low_latency import make_inputs

    checks._reset()
    num_experts, x, idx, w = make_inputs(seed, "random", 24, 256, 4, 2, device="cuda")
    step = ll_step(num_experts, 32, hook)
    step(x, idx, w)  # eager first: NVSHMEM and the buffers are set up here
    compiled = torch.compile(step, fullgraph=True, **({"mode": mode} if mode != "default" else {}))
    for call in range(4):
        num_experts, x, idx, w = make_inputs(seed + 1 + call, "random", 24, 256, 4, 2, device="cuda")
        got = compiled(x, idx, w).clone()
        expected = step(x, idx, w)
        assert torch.equal(got, expected), f"call {call}: the compiled step differs from eager"
    torch_ep.check_errors()


@needs_low_latency
@pytest.mark.parametrize("mode,hook", [("default", False), ("default", True), ("reduce-overhead", False)])
def test_low_latency_compiled(cuda_pool, mode, hook):
    cuda_pool.run(rank_low_latency, _seed(), mode, hook)


# ------------------------------------------------------------------------ num_worst_tokens too small

def rank_overflow(seed):
    """Every token goes to rank 0's expert with num_worst_tokens=1: the dispatch returns, its
    outputs hold one row, torch_ep.check_errors() on rank 0 names the dispatch, the rows that
    arrived and num_worst_tokens; the combine along its handle reads only the kept row. An
    overflow nobody checked is raised by the next call on every rank, and one in a CUDA graph by
    check_errors between replays. The group stays usable throughout."""
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts = 2 * size
    g = torch.Generator().manual_seed(seed + rank)
    n = 8
    x = torch.randint(-60, 60, (n, 64), generator=g).float().cuda()
    idx = torch.full((n, 2), -1, dtype=torch.int64)
    idx[:, 0] = 0  # rank 0's first expert
    idx = idx.cuda()
    arrived = n * size
    pattern = rf"dispatch #{{}}: rank 0 received {arrived} rows, more than num_worst_tokens=1"

    def expect_raise(fn, call_id):
        with pytest.raises(ValueError, match=pattern.format(call_id)):
            fn()

    # 1. check_errors after a synchronize.
    d = torch_ep.dispatch(x, idx, num_experts=num_experts, num_worst_tokens=1)
    torch.cuda.synchronize()
    if rank == 0:
        assert d.recv_x.shape == (1, 64)
        expect_raise(torch_ep.check_errors, d.handle.dispatch_id)
    torch_ep.check_errors()  # taken: nothing left to raise
    combined = torch_ep.combine(d.recv_x, d.handle).combined_x
    expected = torch.zeros_like(x)
    if rank == 0:
        expected[0] = x[0]  # the one row rank 0 kept: its own first token
    assert torch.equal(combined, expected)

    # 2. Unchecked: the next call raises on every rank, naming the dispatch.
    d = torch_ep.dispatch(x, idx, num_experts=num_experts, num_worst_tokens=1)
    torch.cuda.synchronize()
    dist.barrier()
    expect_raise(lambda: torch_ep.combine(d.recv_x, d.handle), d.handle.dispatch_id)

    # 3. In a CUDA graph: check_errors between replays names the captured dispatch.
    static_x = x.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gd = torch_ep.dispatch(static_x, idx, num_experts=num_experts, num_worst_tokens=1)
    for _ in range(2):
        static_x.copy_(torch.randint(-60, 60, x.shape, generator=g).float())
        graph.replay()
        torch.cuda.synchronize()
        if rank == 0:
            expect_raise(torch_ep.check_errors, gd.handle.dispatch_id)
            assert torch.equal(gd.recv_x[0], static_x[0])
        dist.barrier()
    del graph

    # 4. The group still works, exactly.
    test_moe.rank_dispatch_combine(seed, "random", 16, 2, 2, torch.float32, device="cuda")
    test_moe.rank_worst_case(seed, device="cuda")
    torch_ep.check_errors()


def test_num_worst_tokens_overflow(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(rank_overflow, _seed())
