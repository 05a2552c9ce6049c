"""Low-latency dispatch / combine on CUDA (NVSHMEM) against torch_ep.reference.

bf16 payloads compare bit for bit; fp8 payloads are cast with the reference's arithmetic, so
scales must be equal and payload bytes nearly all equal (and all within the quantisation
error); combine compares bit for bit (integer-valued data, weights in eighths). Also: the
receive hook, two live results, repeated calls, CUDA-graph capture and replay, and bad input
raising before any kernel while the group keeps working. Ranks share the GPU under MPS in the
GPU suite (NVSHMEM's full multi-process-per-GPU mode needs it).
"""
import time

import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import cuda_world_sizes, rank_pool
from test_cuda_all_to_all_v import abort_while_waiting
from test_low_latency import FP8_BLOCK, expert_outputs, make_inputs, valid_rows
from torch_ep import reference
from torch_ep.testing import poison_, same_bits


def _nvshmem4py_importable():
    try:
        import nvshmem.core  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not torch_ep._C.has_cuda or not torch_ep._C.has_nvshmem
    or not _nvshmem4py_importable(),
    reason="needs CUDA, a torch_ep built with NVSHMEM, and nvshmem4py")


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


def _seed():
    return int(torch.randint(0, 2**30, ()).item())


def check_dispatch(got, expected, use_fp8):
    """The rows each (expert, rank) received, the counts and the handle, against the reference."""
    h, eh = got.handle, expected.handle
    assert torch.equal(h.layout.cpu(), eh.layout), (h.layout.cpu(), eh.layout)
    assert torch.equal(got.recv_count.cpu(), expected.recv_count)
    valid = valid_rows(eh)
    assert torch.equal(h.src_info.cpu()[valid], eh.src_info[valid])
    assert torch.equal(h.send_slot.cpu(), eh.send_slot), "send_slot differs from the reference"
    if not use_fp8:
        assert same_bits(got.recv_x.cpu()[valid], expected.recv_x[valid]), "recv_x differs from the reference"
        return
    x8, scales = (t.cpu()[valid] for t in got.recv_x)
    ex8, escales = (t[valid] for t in expected.recv_x)
    assert same_bits(scales, escales), "fp8 scales differ from the reference"
    same = (x8.view(torch.uint8) == ex8.view(torch.uint8))
    assert same.float().mean().item() >= 0.999 if same.numel() else True, f"{(~same).sum().item()} fp8 bytes differ"
    step = scales.repeat_interleave(FP8_BLOCK, dim=1) * 32  # one e4m3 step at the top of the range
    assert bool(((x8.float() * scales.repeat_interleave(FP8_BLOCK, 1) -
                  ex8.float() * escales.repeat_interleave(FP8_BLOCK, 1)).abs() <= step).all())


def run_case(seed, kind, num_tokens, hidden, top_k, experts_per_rank, use_fp8, round_scale, max_tokens, hook=False,
             zero_copy=False):
    num_experts, x, idx, w = make_inputs(seed, kind, num_tokens, hidden, top_k, experts_per_rank, device="cuda")
    xc, idxc, wc = x.cpu(), idx.cpu(), w.cpu()
    expected = reference.low_latency_dispatch(xc, idxc, max_tokens_per_rank=max_tokens, num_experts=num_experts,
                                              use_fp8=use_fp8, round_scale=round_scale)
    got = torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=max_tokens, num_experts=num_experts,
                                        use_fp8=use_fp8, round_scale=round_scale, return_recv_hook=hook)
    assert (got.hook is not None) == hook
    if hook:
        got.hook()
    check_dispatch(got, expected, use_fp8)

    y_ref = expert_outputs(expected.recv_x, expected.handle)
    ref_out = reference.low_latency_combine(y_ref, idxc, wc, expected.handle).combined_x
    out = poison_(torch.empty(x.shape[0], hidden, dtype=torch.bfloat16, device="cuda"))
    y = y_ref.cuda()
    if zero_copy:  # the expert outputs written straight into the symmetric buffer the peers read
        y = poison_(torch_ep.low_latency_combine_buffer(got.handle))
        y.copy_(y_ref)
    comb = torch_ep.low_latency_combine(y, idx, w, got.handle, return_recv_hook=hook, out=out)
    assert comb.combined_x is out
    if hook:
        comb.hook()
    assert same_bits(out.cpu(), ref_out), "combined_x differs from the reference"
    torch.cuda.synchronize()
    torch_ep.low_latency.check_errors()  # nothing returned: a result (with its hook) does not pickle


CASES = [  # kind, tokens, hidden, top-k, experts per rank, fp8, round_scale, max_tokens_per_rank
    ("random", 6, 256, 3, 2, False, False, 8),
    ("random", 6, 256, 3, 2, True, False, 8),
    ("random", 9, 384, 4, 3, True, True, 9),
    ("random", 128, 7168, 8, 4, True, False, 128),
    ("random", 128, 7168, 8, 4, False, False, 128),
    ("one_expert", 16, 128, 2, 2, False, False, 16),
    ("empty_rank", 5, 128, 2, 1, True, False, 8),
    ("unrouted", 12, 256, 3, 2, False, False, 12),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_dispatch_combine(cuda_pool, case):
    cuda_pool.run(run_case, _seed(), *case)


def test_hook(cuda_pool):
    cuda_pool.run(run_case, _seed(), "random", 8, 256, 3, 2, True, False, 8, hook=True)
    cuda_pool.run(run_case, _seed(), "random", 8, 256, 3, 2, False, False, 8, hook=True)


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[6]], ids=lambda c: "-".join(str(v) for v in c))
def test_zero_copy_combine(cuda_pool, case):
    """x written into low_latency_combine_buffer: the combine sends it without a copy. Twice in
    a row (the two buffer halves), then with the hook."""
    seed = _seed()
    cuda_pool.run(run_case, seed, *case, zero_copy=True)
    cuda_pool.run(run_case, seed + 1, *case, zero_copy=True)
    cuda_pool.run(run_case, seed + 2, *case, hook=True, zero_copy=True)


def rank_two_live_and_repeated(seed):
    """Two dispatches alive at once (with hooks: both sent before either is received), then a
    run of repeated calls with fresh data, each checked."""
    max_tokens = 10
    inputs = [make_inputs(seed + i, "random", 10, 256, 3, 2, device="cuda") for i in range(2)]
    num_experts = inputs[0][0]
    sent = [torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=max_tokens, num_experts=num_experts,
                                          use_fp8=False, return_recv_hook=True) for _, x, idx, _ in inputs]
    for d in sent:
        d.hook()
    for d, (_, x, idx, _) in zip(sent, inputs):
        check_dispatch(d, reference.low_latency_dispatch(x.cpu(), idx.cpu(), max_tokens_per_rank=max_tokens,
                                                         num_experts=num_experts, use_fp8=False), False)
    for i in range(6):
        run_case(seed + 100 + i, "random", 10, 256, 3, 2, i % 2 == 0, False, max_tokens, hook=i % 3 == 0)


def test_two_live_results_and_repeated_calls(cuda_pool):
    cuda_pool.run(rank_two_live_and_repeated, _seed())


def rank_graph(seed, use_fp8, zero_copy=False):
    """dispatch + expert + combine captured in one CUDA graph, replayed on new data (with
    zero_copy the expert writes into low_latency_combine_buffer)."""
    max_tokens, hidden = 12, 256
    num_experts, x, idx, w = make_inputs(seed, "random", 12, hidden, 3, 2, device="cuda")
    static_x = x.clone()
    out = torch.empty(x.shape[0], hidden, dtype=torch.bfloat16, device="cuda")

    def step():
        d = torch_ep.low_latency_dispatch(static_x, idx, max_tokens_per_rank=max_tokens, num_experts=num_experts,
                                          use_fp8=use_fp8)
        y = expert_outputs(d.recv_x, d.handle)
        if zero_copy:
            y = torch_ep.low_latency_combine_buffer(d.handle).copy_(y)
        torch_ep.low_latency_combine(y, idx, w, d.handle, out=out)
        return d

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: NVSHMEM and the buffers are set up here
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        d = step()
    g = torch.Generator().manual_seed(seed + 1 + dist.get_rank())
    for _ in range(3):
        new_x = torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.low_latency_dispatch(new_x, idx.cpu(), max_tokens_per_rank=max_tokens,
                                                  num_experts=num_experts, use_fp8=use_fp8)
        check_dispatch(d, expected, use_fp8)
        y_ref = expert_outputs(expected.recv_x, expected.handle)
        ref_out = reference.low_latency_combine(y_ref, idx.cpu(), w.cpu(), expected.handle).combined_x
        if not use_fp8:
            assert same_bits(out.cpu(), ref_out)
        dist.barrier()
    torch_ep.low_latency.check_errors()


@pytest.mark.parametrize("use_fp8,zero_copy", [(False, False), (True, False), (False, True)],
                         ids=["bf16", "fp8", "bf16-zero-copy"])
def test_cuda_graph(cuda_pool, use_fp8, zero_copy):
    cuda_pool.run(rank_graph, _seed(), use_fp8, zero_copy)


def rank_bad_input(seed):
    """Bad input raises on the calling rank before any kernel; every rank then makes a good call."""
    num_experts, x, idx, w = make_inputs(seed, "random", 6, 256, 2, 2, device="cuda")
    with pytest.raises(ValueError, match="more than max_tokens_per_rank"):
        torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=3, num_experts=num_experts)
    with pytest.raises(ValueError, match="multiple of 128"):
        torch_ep.low_latency_dispatch(x[:, :100].contiguous(), idx, max_tokens_per_rank=8, num_experts=num_experts)
    with pytest.raises(TypeError, match="bfloat16"):
        torch_ep.low_latency_dispatch(x.float(), idx, max_tokens_per_rank=8, num_experts=num_experts)
    if dist.get_world_size() > 1:  # any count divides among one rank
        with pytest.raises(ValueError, match="divisible"):
            torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=num_experts + 1)
    d = torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=num_experts, use_fp8=False)
    buf = torch_ep.low_latency_combine_buffer(d.handle)
    with pytest.raises(ValueError, match="inside a low_latency_combine_buffer"):
        torch_ep.low_latency_combine(buf.view(-1)[128:], idx, w, d.handle)
    torch_ep.low_latency_combine(d.recv_x, idx, w, d.handle)  # completes the round
    run_case(seed + 1, "random", 6, 256, 2, 2, False, False, 8)


def test_bad_input(cuda_pool):
    cuda_pool.run(rank_bad_input, _seed())


def rank_errors_the_kernels_see(seed):
    """What only the kernels can check without a host sync: an expert id past num_experts (on
    rank 0), and more pairs for one expert than its capacity (every token names expert 0 twice).
    The calls complete as the reference does (the id unrouted, the pairs past the capacity
    dropped), check_errors then raises naming the problem, and the group keeps working."""
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts, n, hidden, max_tokens = 2 * size, 4, 256, 4
    g = torch.Generator().manual_seed(seed + rank)
    x = torch.randint(-60, 60, (n, hidden), generator=g).to(torch.bfloat16)
    w = torch.randint(1, 9, (n, 2), generator=g).float() / 8
    twice = torch.zeros(n, 2, dtype=torch.int64)  # 2n = 8 pairs for expert 0, capacity 4
    bad = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(n)])
    if rank == 0:
        bad[1, 1] = num_experts + 3
    for idx, problem in ((twice, "more than max_tokens_per_rank"), (bad, "outside \\[-1, num_experts\\)")):
        routed = idx.masked_fill(idx >= num_experts, -1)
        expected = reference.low_latency_dispatch(x, routed, max_tokens_per_rank=max_tokens, num_experts=num_experts,
                                                  use_fp8=False)
        got = torch_ep.low_latency_dispatch(x.cuda(), idx.cuda(), max_tokens_per_rank=max_tokens,
                                            num_experts=num_experts, use_fp8=False)
        check_dispatch(got, expected, False)
        torch.cuda.synchronize()
        if rank == 0 or idx is twice:  # every rank sends expert 0 too many pairs
            with pytest.raises(dist.DistBackendError, match=problem):
                torch_ep.low_latency.check_errors()
        torch_ep.low_latency.check_errors()  # reported once, and not fatal
        y = expert_outputs(expected.recv_x, expected.handle)
        ref_out = reference.low_latency_combine(y, routed, w, expected.handle).combined_x
        comb = torch_ep.low_latency_combine(y.cuda(), idx.cuda(), w.cuda(), got.handle)
        assert same_bits(comb.combined_x.cpu(), ref_out), "combined_x differs from the reference"
        torch.cuda.synchronize()
        torch_ep.low_latency.check_errors()
    run_case(seed + 1, "random", 6, 256, 2, 2, True, False, 8)


def test_errors_the_kernels_see(cuda_pool):
    cuda_pool.run(rank_errors_the_kernels_see, _seed())


def _set_up_then_lose(absent):
    """A dispatch and a combine on every rank (they set the buffers up), then rank `absent` stops
    calling: (num_experts, x, topk_idx, topk_weights, that dispatch) elsewhere, None on `absent`.
    Every kernel the calls behind the lost peer launch (the ops', the inputs', the fills of
    uninitialised outputs) runs here first: CUDA loads a kernel at its first launch (lazy
    loading), which may wait for the device, so a first launch queued behind a wait that spins
    for the lost peer would hold the host until that wait timed out (torch_ep loads its own
    kernels at set-up, backend/transport/cuda/kernel_preload.hpp; torch's it does not)."""
    num_experts, x, idx, w = make_inputs(7, "random", 6, 256, 2, 2, device="cuda")
    torch.use_deterministic_algorithms(True, warn_only=True)  # as rank_queued_calls_after_a_lost_peer
    try:
        d = torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=num_experts)
        expert_rows = torch.randn(d.recv_x[0].shape, device="cuda").to(torch.bfloat16)
        out = poison_(torch.empty(x.shape, dtype=torch.bfloat16, device="cuda"))
        torch_ep.low_latency_combine(expert_rows, idx, w, d.handle, out=out)
    finally:
        torch.use_deterministic_algorithms(False)
    torch.cuda.synchronize()
    dist.barrier()
    return None if dist.get_rank() == absent else (num_experts, x, idx, w, d)


def rank_peer_never_sends(absent):
    """A peer that never makes the call: the receive gives up after the group's timeout, the
    error names the op, this rank and the missing peer, and every later call raises."""
    state = _set_up_then_lose(absent)
    if state is None:
        return None
    num_experts, x, idx, w, d = state
    start = time.monotonic()
    torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=num_experts)
    torch.cuda.synchronize()  # returns: the kernel gave up waiting
    waited = time.monotonic() - start
    with pytest.raises(dist.DistBackendError) as first:
        torch_ep.low_latency.check_errors()
    expert_rows = torch.zeros(d.recv_x[0].shape, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(dist.DistBackendError) as later:
        torch_ep.low_latency_combine(expert_rows, idx, w, d.handle)
    return waited, str(first.value), str(later.value)


def rank_queued_calls_after_a_lost_peer(absent):
    """Rank `absent` stops calling; this rank queues a dispatch, a combine and a dispatch without
    waiting. The first wait that gives up ends every later wait of the rank's kernels at once
    (GroupArgs::gave_up): the three take one timeout, not three, and the receives that gave up
    read nothing (the combine's rows, into a poisoned out, are zeros). Returns (seconds waited,
    the error raised after, whether the combine wrote zeros, whether the last dispatch counted
    no rows) on the ranks that stayed, None on `absent`."""
    state = _set_up_then_lose(absent)
    if state is None:
        return None
    num_experts, x, idx, w, d = state
    out = poison_(torch.empty(x.shape, dtype=torch.bfloat16, device="cuda"))
    # The ops' outputs filled (integers with their largest value) where they are allocated, so a
    # count the kernel leaves unwritten cannot read as zero by chance.
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        start = time.monotonic()
        first = torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=num_experts)
        expert_rows = torch.randn(first.recv_x[0].shape, device="cuda").to(torch.bfloat16)
        torch_ep.low_latency_combine(expert_rows, idx, w, first.handle, out=out)
        last = torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=num_experts)
        torch.cuda.synchronize()  # returns: the first wait gave up, the later ones ended on it
        waited = time.monotonic() - start
    finally:
        torch.use_deterministic_algorithms(False)
    with pytest.raises(dist.DistBackendError) as error:
        torch_ep.low_latency.check_errors()
    no_rows = bool((last.recv_count == 0).all()) and bool((last.handle.layout == 0).all())
    return waited, str(error.value), bool((out == 0).all()), no_rows


def test_queued_calls_after_a_lost_peer():
    timeout_s, absent = 4, 1  # a pool of its own: the lost peer leaves its group failed
    pool = rank_pool(2, cuda=True, env={"TORCH_EP_TIMEOUT_S": str(timeout_s)})
    waited, error, zeros, no_rows = pool.run(rank_queued_calls_after_a_lost_peer, absent)[0]
    assert timeout_s - 0.5 <= waited < 1.8 * timeout_s, waited  # three timeouts without gave_up
    assert f"rank 0: a low_latency_dispatch receive waited past the timeout ({timeout_s}" in error, error
    assert f"for rank {absent} to send" in error, error
    assert zeros, "the combine that gave up left out unwritten"
    assert no_rows, "the dispatch that gave up left recv_count unwritten"


def rank_abort_releases_low_latency_waits():
    """Rank 0 aborts a group while its low-latency dispatch waits for rank 1, held up by a
    5-second kernel: rank 0's stream is released at once, not when rank 1 sends (about 4.5 s
    later) nor at the 20-second timeout, and its next call raises naming the abort
    (abort_while_waiting). A group of its own: the pool's default one stays for the barriers."""
    group = dist.new_group()
    num_experts, x, idx, _ = make_inputs(7, "random", 6, 256, 2, 2, device="cuda")
    return abort_while_waiting(group, lambda: torch_ep.low_latency_dispatch(
        x, idx, max_tokens_per_rank=8, num_experts=num_experts, group=group), held_rank=1)


def test_abort_releases_low_latency_waits():
    pool = rank_pool(2, cuda=True, env={"TORCH_EP_TIMEOUT_S": "20", "TORCH_EP_TEST_POOL": "abort"})
    try:
        (elapsed, later), _ = pool.run(rank_abort_releases_low_latency_waits, timeout_s=120)
    finally:
        pool.close()  # its NVSHMEM world belongs to the aborted group
    assert elapsed < 2, elapsed
    assert later is not None and later[0] == "DistBackendError" and "aborted" in later[1], later


def test_peer_never_sends():
    timeout_s, absent = 5, 1
    pool = rank_pool(2, cuda=True, env={"TORCH_EP_TIMEOUT_S": str(timeout_s)})
    waited, first, later = pool.run(rank_peer_never_sends, absent)[0]
    assert timeout_s - 0.5 <= waited <= timeout_s + 10, waited
    assert f"rank 0: a low_latency_dispatch receive waited past the timeout ({timeout_s}" in first, first
    assert f"for rank {absent} to send" in first, first
    assert "low_latency_combine" in later and "every later call raises" in later, later
