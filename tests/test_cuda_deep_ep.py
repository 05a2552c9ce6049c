"""torch_ep.deep_ep on CUDA tensors (GPU machines only).

The CPU tests' rank functions run here on CUDA (same references, same exact checks: the
communication stream, events and previous_event are real here), plus what only CUDA has: a
CUDA graph of the DeepEP-API dispatch and combine with num_worst_tokens, and the low-latency
path (NVSHMEM) with the receive hook, the zero-copy combine buffer, cumulative_local_expert_recv_stats,
UE8M0 scales and DeepEP's encodings of the handle, against torch_ep.reference.
"""
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

import test_deep_ep as checks
import test_moe as moe_checks
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from test_low_latency import valid_rows as _valid
from torch_ep import deep_ep, reference
from torch_ep.testing import poison_, same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")

_seed = checks._seed


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


@pytest.mark.parametrize("group_kind", ["default", "gloo"])
def test_high_throughput(cuda_pool, group_kind):
    cuda_pool.run(checks.rank_high_throughput, _seed(), group_kind, 7168, torch.bfloat16, device="cuda")
    cuda_pool.run(checks.rank_high_throughput, _seed(), group_kind, 130, torch.float32, alignment=4, device="cuda")


def test_async_finish_and_previous_event(cuda_pool):
    cuda_pool.run(checks.rank_async, _seed(), device="cuda")


def test_num_worst_tokens(cuda_pool):
    cuda_pool.run(checks.rank_worst_tokens, _seed(), device="cuda")


def test_bad_input(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks (the bad layouts it passes are good ones for one rank)")
    cuda_pool.run(checks.rank_bad_input, device="cuda")


def rank_comm_stream(seed):
    """The calls run on get_comm_stream(), after previous_event: work queued on another stream
    before the event is seen by the dispatch (its input is written there)."""
    buffer = deep_ep.Buffer(dist.group.WORLD)
    comm = buffer.get_comm_stream()
    assert isinstance(comm, torch.cuda.Stream) and comm != torch.cuda.current_stream()
    num_experts, g, x, idx, w = moe_checks.make_inputs(seed, "random", 4096, 4, 2, torch.bfloat16, "cuda")
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    producer = torch.cuda.Stream()
    late = torch.empty_like(x)
    with torch.cuda.stream(producer):
        torch.cuda._sleep(20_000_000)  # the input is written late on another stream
        late.copy_(x)
        ready = deep_ep.Buffer.capture()
    recv_x, *_, handle, event = buffer.dispatch(late, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
                                                previous_event=ready, async_finish=True)
    event.current_stream_wait()
    assert same_bits(recv_x.cpu(), expected.recv_x)


def test_comm_stream_and_previous_event(cuda_pool):
    cuda_pool.run(rank_comm_stream, _seed())


def rank_graph(seed):
    """DeepEP-API layout, dispatch and combine with num_worst_tokens captured in one CUDA graph,
    replayed on new data."""
    buffer = deep_ep.Buffer(dist.group.WORLD)
    num_experts, g, x, idx, w = moe_checks.make_inputs(seed, "random", 64, 4, 2, torch.bfloat16, "cuda")
    worst = 24 * dist.get_world_size()
    static_x = x.clone()

    def step():  # layout, dispatch and combine, all captured (as DeepEP's callers capture them)
        per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
        recv_x, _, _, _, handle, _ = buffer.dispatch(static_x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                                                     num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w,
                                                     num_worst_tokens=worst)
        return recv_x, handle, buffer.combine(recv_x, handle)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        recv_x, handle, combined = step()
    for _ in range(2):
        new_x = torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.dispatch(new_x, idx.cpu(), w.cpu(), num_experts=num_experts)
        m = expected.recv_x.shape[0]
        assert same_bits(recv_x[:m].cpu(), expected.recv_x)
        assert torch.equal(handle[0].cpu(), checks.gathered_prefix_matrix(idx.cpu(), num_experts))
        assert same_bits(combined.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
        dist.barrier()


# The capture used to set up the CUDA transport of the rank prefix matrix's all_to_all_single
# (cudaMalloc fails under capture): the Buffer now sets the exchange up on its first CUDA
# dispatch, and device-only counts come from num_tokens_per_rank. Passed on the H200 (2026-12-02).
def test_cuda_graph(cuda_pool):
    cuda_pool.run(rank_graph, _seed())


# ------------------------------------------------------------------------------------ low latency

def _nvshmem_ready():
    if not torch_ep._C.has_nvshmem:
        return False
    try:
        import nvshmem.core  # noqa: F401
        return True
    except Exception:  # noqa: BLE001
        return False


needs_nvshmem = pytest.mark.skipif(not _nvshmem_ready(), reason="needs a torch_ep built with NVSHMEM, and nvshmem4py")


def rank_low_latency(seed, num_tokens, hidden, top_k, experts_per_rank, use_fp8, round_scale, use_ue8m0, max_tokens,
                     hook, zero_copy, async_finish=False):
    from test_cuda_low_latency import check_dispatch
    from test_low_latency import expert_outputs, make_inputs

    size = dist.get_world_size()
    buffer = _ll_buffer()
    num_experts, x, idx, w = make_inputs(seed, "random", num_tokens, hidden, top_k, experts_per_rank, device="cuda")
    local = num_experts // size
    expected = reference.low_latency_dispatch(x.cpu(), idx.cpu(), max_tokens_per_rank=max_tokens,
                                              num_experts=num_experts, use_fp8=use_fp8, round_scale=round_scale)
    stats0 = torch.randint(0, 1000, (local,), dtype=torch.int32, device="cuda")
    stats = stats0.clone()
    buffer.clean_low_latency_buffer(max_tokens, hidden, num_experts)
    recv_x, recv_count, handle, event, recv_hook = buffer.low_latency_dispatch(
        x, idx, max_tokens, num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
        round_scale=round_scale, use_ue8m0=use_ue8m0, async_finish=async_finish, return_recv_hook=hook)
    assert (recv_hook is not None) == hook
    if hook:
        recv_hook()
    if async_finish:
        event.current_stream_wait()
    native = handle.native
    if use_ue8m0:  # DeepEP's packed scales: int32 [E_local, R*max, ceil(H/512)], column-major
        x8, packed = recv_x
        assert packed.dtype == torch.int32 and packed.shape == (local, size * max_tokens, -(-hidden // 512))
        assert packed.stride()[1] == 1
        scales = expected.recv_x[1]  # powers of two (round_scale)
        valid = _valid(expected.handle)
        want = ((scales.view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
        got = torch.empty(packed.shape, dtype=torch.int32).copy_(packed).view(torch.uint8)[..., :want.shape[-1]]
        assert torch.equal(got[valid], want[valid])
        # The fp8 rows, read with the reference's scales (the packed ones were checked above).
        check_dispatch(SimpleNamespace(recv_x=(x8, scales), recv_count=recv_count, handle=native), expected, use_fp8)
    else:
        check_dispatch(SimpleNamespace(recv_x=recv_x, recv_count=recv_count, handle=native), expected, use_fp8)
    # DeepEP's encodings: the source token index, and (begin << 32) | count per (expert, rank).
    src_info, layout_range, max_in_handle, hidden_in_handle, experts_in_handle = handle
    assert (max_in_handle, hidden_in_handle, experts_in_handle) == (max_tokens, hidden, num_experts)
    valid = _valid(expected.handle)
    assert torch.equal(src_info.cpu()[valid], (expected.handle.src_info // idx.shape[1])[valid])
    assert layout_range.dtype == torch.int64
    begin, count = (layout_range.cpu() >> 32), (layout_range.cpu() & 0xFFFFFFFF)
    counts = expected.handle.layout.long()
    assert torch.equal(begin, counts.cumsum(1) - counts)  # packed by source rank
    assert torch.equal(count.int(), expected.handle.layout)
    assert torch.equal(stats.cpu(), stats0.cpu() + expected.recv_count)

    # Combine: the expert outputs, written into the zero-copy buffer or passed as they are.
    y_ref = expert_outputs(expected.recv_x, expected.handle)
    want = reference.low_latency_combine(y_ref, idx.cpu(), w.cpu(), expected.handle).combined_x
    y = y_ref.cuda()
    if zero_copy:
        y = poison_(buffer.get_next_low_latency_combine_buffer(handle))
        y.copy_(y_ref)
    out = poison_(torch.empty(x.shape[0], hidden, dtype=torch.bfloat16, device="cuda"))
    combined, event, send_hook = buffer.low_latency_combine(y, idx, w, handle, zero_copy=zero_copy,
                                                            async_finish=async_finish, return_recv_hook=hook, out=out)
    assert combined is out
    if hook:
        send_hook()
    if async_finish:
        event.current_stream_wait()
    assert same_bits(out.cpu(), want), "combined_x differs from the reference"
    with pytest.raises(ValueError, match="zero_copy=True: x must be the tensor"):
        buffer.low_latency_combine(y_ref.cuda(), idx, w, handle, zero_copy=True)
    torch.cuda.synchronize()


_ll_buffers = {}


def _ll_buffer():
    """One low-latency Buffer per rank process (NVSHMEM is set up once per process)."""
    if "buffer" not in _ll_buffers:
        size = dist.get_world_size()
        hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, size, 4 * size)
        _ll_buffers["buffer"] = deep_ep.Buffer(dist.group.WORLD, num_rdma_bytes=hint, low_latency_mode=True,
                                               num_qps_per_rank=4)
    return _ll_buffers["buffer"]


LL_CASES = [  # tokens, hidden, top-k, experts per rank, fp8, round_scale, ue8m0, max tokens, hook, zero copy
    (6, 256, 3, 2, False, False, False, 8, False, False),
    (9, 384, 4, 3, True, False, False, 9, True, False),
    (16, 512, 3, 2, True, True, True, 16, False, True),
    (128, 7168, 8, 4, True, False, False, 128, True, True),
]


@needs_nvshmem
@pytest.mark.parametrize("case", LL_CASES, ids=lambda c: "-".join(str(v) for v in c))
def test_low_latency(cuda_pool, case):
    cuda_pool.run(rank_low_latency, _seed(), *case)


@needs_nvshmem
def test_low_latency_async_finish(cuda_pool):
    cuda_pool.run(rank_low_latency, _seed(), 8, 256, 2, 2, True, False, False, 8, False, False, async_finish=True)
