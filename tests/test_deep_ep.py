"""torch_ep.deep_ep, DeepEP's Buffer API on torch_ep, on 2 to 4 CPU ranks.

Every method against torch_ep.reference and against values each rank computes from all ranks'
gathered inputs (the handle's rank_prefix_matrix, the per-node counts); Buffers over the default
("ep") group, a Gloo group and virtual nodes; async_finish with previous_event; num_worst_tokens;
bad input raising the native API's errors before any data moves, the group working afterwards.
The rank functions take a `device` so that tests/test_cuda_deep_ep.py runs them on CUDA.
"""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import test_moe as moe_checks
from conftest import rank_pool
from test_torchrun import run_process_group
from torch_ep import deep_ep, reference
from torch_ep.testing import same_bits

_seed = moe_checks._seed


def make_buffer(group_kind: str, **kwargs) -> deep_ep.Buffer:
    if group_kind == "default":
        return deep_ep.Buffer(dist.group.WORLD, **kwargs)
    if group_kind == "gloo":  # DeepEP's callers' group where ranks share a GPU
        return deep_ep.Buffer(dist.new_group(backend="gloo"), **kwargs)
    raise ValueError(group_kind)


def gathered_prefix_matrix(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[R, R]: [i][j] = tokens of ranks 0..i that go to rank j, from every rank's topk_idx."""
    size = dist.get_world_size()
    per_rank = num_experts // size
    everyone = [None] * size
    dist.all_gather_object(everyone, topk_idx.cpu())
    sends = torch.zeros(size, size, dtype=torch.int64)
    for src, idx in enumerate(everyone):
        for dst in range(size):
            owned = (idx >= dst * per_rank) & (idx < (dst + 1) * per_rank)
            sends[src, dst] = int(owned.any(dim=1).sum())
    return sends.cumsum(0).to(torch.int32)


def check_layout(buffer, idx, num_experts):
    per_rank, per_rdma, per_expert, in_rank, event = buffer.get_dispatch_layout(idx, num_experts)
    want = reference.get_dispatch_layout(idx.cpu(), num_experts)
    assert torch.equal(per_rank.cpu(), want.num_tokens_per_rank) and per_rank.dtype == torch.int32
    assert torch.equal(per_expert.cpu(), want.num_tokens_per_expert)
    assert torch.equal(in_rank.cpu(), want.is_token_in_rank)
    assert per_rdma is None and event.event is None
    return per_rank, per_expert, in_rank


def rank_high_throughput(seed, group_kind, hidden, dtype, alignment=1, device="cpu"):
    """layout, dispatch (bf16 and the fp8 pair), the handle, cached dispatch, combine with weights and bias."""
    rank, size = dist.get_rank(), dist.get_world_size()
    buffer = make_buffer(group_kind, num_nvl_bytes=1 << 20)
    assert (buffer.rank, buffer.group_size) == (rank, size)
    assert (buffer.ep_group is dist.group.WORLD) == (group_kind == "default")
    num_experts, g, x, idx, w = moe_checks.make_inputs(seed, "random", hidden, 3, 2, dtype, device)
    xc, idxc, wc = x.cpu(), idx.cpu(), w.cpu()
    per_rank, per_expert, in_rank = check_layout(buffer, idx, num_experts)
    # Each layout's routing table stays at hand for dispatch while its is_token_in_rank lives.
    second = buffer.get_dispatch_layout(idx, num_experts)[3]
    assert {id(in_rank), id(second)} == set(buffer._layouts)
    del second
    assert set(buffer._layouts) == {id(in_rank)}

    expected = reference.dispatch(xc, idxc, wc, num_experts=num_experts, expert_alignment=alignment)
    moe_checks._poison_cache(device, expected.recv_x.numel() * 4)
    recv_x, recv_idx, recv_w, per_expert_list, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx, topk_weights=w, expert_alignment=alignment)
    assert same_bits(recv_x.cpu(), expected.recv_x)
    assert torch.equal(recv_idx.cpu(), expected.recv_topk_idx) and recv_idx.dtype == deep_ep.topk_idx_t
    assert torch.equal(recv_w.cpu(), expected.recv_topk_weights)
    assert per_expert_list == expected.num_recv_tokens_per_expert and event.event is None
    # DeepEP's intranode handle: 6 elements, element 0 the rank prefix matrix, 4 is_token_in_rank.
    assert isinstance(handle, tuple) and len(handle) == 6
    prefix = handle[0]
    assert prefix.dtype == torch.int32 and prefix.shape == (size, size) and prefix.device == x.device
    assert torch.equal(prefix.cpu(), gathered_prefix_matrix(idxc, num_experts))
    assert int(prefix[-1, rank]) == recv_x.shape[0]
    assert handle[4] is in_rank

    # A cached dispatch of new data along the handle; the fp8 pair sent as is.
    x2 = torch.randint(-60, 60, tuple(x.shape), generator=g).to(dtype)
    again = buffer.dispatch(x2.to(device), handle=handle, expert_alignment=alignment)
    assert same_bits(again[0].cpu(), reference.dispatch(x2, handle=expected.handle).recv_x)
    assert again[1:5] == (None, None, None, None) and again[5].event is None
    scales = torch.rand(x.shape[0], -(-hidden // 128), generator=g)
    fp8 = (x2.float().to(torch.float8_e4m3fn), scales)
    got8 = buffer.dispatch(tuple(t.to(device) for t in fp8), num_tokens_per_rank=per_rank, is_token_in_rank=in_rank,
                           num_tokens_per_expert=per_expert, topk_idx=idx)
    want8 = reference.dispatch(fp8, idxc, num_experts=num_experts)
    assert isinstance(got8[0], tuple) and got8[2] is None
    assert same_bits(got8[0][0].cpu(), want8.recv_x[0]) and same_bits(got8[0][1].cpu(), want8.recv_x[1])

    # Combine: each rank sends back its rows times (rank + 1), with the weights; then with bias.
    back = (recv_x.float() * (rank + 1)).to(dtype)
    want = reference.combine((expected.recv_x.float() * (rank + 1)).to(dtype), expected.handle,
                             expected.recv_topk_weights)
    combined, combined_w, event = buffer.combine(back, handle, recv_w, config=deep_ep.Buffer.get_combine_config(size))
    assert same_bits(combined.cpu(), want.combined_x) and torch.equal(combined_w.cpu(), want.combined_topk_weights)
    assert event.event is None
    bias = torch.randint(-8, 8, tuple(x.shape), generator=g).to(dtype)
    bias2 = torch.randint(-8, 8, tuple(x.shape), generator=g).to(dtype)
    with_bias = buffer.combine(back, handle, bias=bias.to(device))[0]
    assert same_bits(with_bias.cpu(), (want.combined_x.float() + bias.float()).to(dtype))
    with_two = buffer.combine(back, handle, bias=(bias.to(device), bias2.to(device)))[0]
    assert same_bits(with_two.cpu(), (want.combined_x.float() + bias.float() + bias2.float()).to(dtype))
    if group_kind == "gloo":
        dist.destroy_process_group(buffer.group)  # the "ep" group stays, for the next Buffer over these ranks


@pytest.mark.parametrize("group_kind", ["default", "gloo"])
def test_high_throughput(pool, group_kind):
    pool.run(rank_high_throughput, _seed(), group_kind, 130, torch.bfloat16)


def test_high_throughput_float_and_alignment(pool4):
    pool4.run(rank_high_throughput, _seed(), "default", 16, torch.float32, alignment=4)


def rank_async(seed, device="cpu"):
    """async_finish with previous_event: the event waits on the current stream, the `with` form too."""
    buffer = make_buffer("default")
    num_experts, g, x, idx, w = moe_checks.make_inputs(seed, "random", 24, 4, 2, torch.bfloat16, device)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    previous = deep_ep.Buffer.capture()
    per_rank, _, per_expert, in_rank, event = buffer.get_dispatch_layout(
        idx, num_experts, previous_event=previous, async_finish=True, allocate_on_comm_stream=True)
    event.current_stream_wait()
    recv_x, recv_idx, recv_w, _, handle, event = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
        topk_weights=w, previous_event=event, async_finish=True)
    assert isinstance(event, deep_ep.EventOverlap) and event.event is not None
    event.current_stream_wait()
    assert same_bits(recv_x.cpu(), expected.recv_x) and torch.equal(recv_idx.cpu(), expected.recv_topk_idx)
    combined, _, event = buffer.combine(recv_x, handle, previous_event=deep_ep.Buffer.capture(), async_finish=True)
    with event:
        pass  # work overlapped with the combine would go here
    assert same_bits(combined.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
    with pytest.raises(ValueError, match="allocate_on_comm_stream=True needs previous_event"):
        buffer.combine(recv_x, handle, allocate_on_comm_stream=True)
    with pytest.raises(RuntimeError, match="holds no event"):
        deep_ep.EventOverlap().current_stream_wait()


def test_async_finish_and_previous_event(pool):
    pool.run(rank_async, _seed())


def rank_worst_tokens(seed, device="cpu"):
    """num_worst_tokens: outputs that many rows, an empty per-expert list (DeepEP's contract),
    the handle's prefix matrix still right, combine along it right."""
    size = dist.get_world_size()
    buffer = make_buffer("default")
    num_experts, g, x, idx, w = moe_checks.make_inputs(seed, "random", 9, 3, 2, torch.float32, device)
    worst = 24 * size
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
        topk_weights=w, num_worst_tokens=worst)
    m = expected.recv_x.shape[0]
    assert recv_x.shape[0] == worst and per_expert_list == []
    assert same_bits(recv_x[:m].cpu(), expected.recv_x) and bool((recv_idx[m:] == -1).all())
    assert torch.equal(handle[0].cpu(), gathered_prefix_matrix(idx.cpu(), num_experts))
    combined = buffer.combine(recv_x, handle)[0]
    assert same_bits(combined.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
    again = buffer.dispatch(x, handle=handle)[0]
    assert again.shape[0] == worst and same_bits(again[:m].cpu(), expected.recv_x)


def test_num_worst_tokens(pool):
    pool.run(rank_worst_tokens, _seed())


def _raises(fn, exc, text):
    with pytest.raises(exc) as info:
        fn()
    assert text in str(info.value), str(info.value)


def rank_bad_input(device="cpu"):
    """The native API's errors, raised before any data moves, naming the argument; then the
    Buffer still dispatches and combines correctly."""
    buffer = make_buffer("default")
    num_experts, g, x, idx, w = moe_checks.make_inputs(12345, "random", 8, 2, 2, torch.float32, device)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    layout = dict(num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
    d = lambda **kw: buffer.dispatch(**{"x": x, "topk_idx": idx, "topk_weights": w, **layout, **kw})  # noqa: E731
    _raises(lambda: d(x=x.int()), TypeError, "x must be bfloat16, float16 or float32")
    _raises(lambda: d(topk_idx=idx.int()), TypeError, "topk_idx must be int64")
    _raises(lambda: d(topk_weights=w.double()), TypeError, "topk_weights must be float32")
    _raises(lambda: d(expert_alignment=0), ValueError, "expert_alignment must be >= 1")
    _raises(lambda: d(num_tokens_per_expert=per_expert[:-1]), ValueError, "must be divisible by the group size")
    _raises(lambda: d(num_tokens_per_rank=None), ValueError, "num_tokens_per_rank")
    _raises(lambda: d(is_token_in_rank=in_rank[:, :1]), ValueError, "is_token_in_rank must have shape")
    _raises(lambda: d(topk_idx=None, topk_weights=None), ValueError, "topk_idx: torch_ep routes")
    _raises(lambda: d(num_worst_tokens=-1), ValueError, "num_worst_tokens must be an integer >= 0")
    _raises(lambda: d(config="fast"), TypeError, "config: expected")
    _raises(lambda: buffer.get_dispatch_layout(idx.int(), num_experts), TypeError, "topk_idx must be int64")
    good = d()
    handle = good[4]
    _raises(lambda: buffer.dispatch(x, handle=tuple(handle)), TypeError, "handle: expected the handle")
    _raises(lambda: buffer.dispatch(x, handle=handle, topk_idx=idx), ValueError, "cached handle sends none")
    _raises(lambda: buffer.dispatch(x[:0] if x.shape[0] else x.new_ones(1, 8), handle=handle), ValueError,
            "the handle routes")
    _raises(lambda: buffer.combine(good[0], list(handle)), TypeError, "handle: expected")
    _raises(lambda: buffer.combine(good[0], handle, bias=x[:, :1]), ValueError, "bias must have shape")
    _raises(lambda: buffer.combine(good[0], handle, bias=(x, x, x)), ValueError, "bias: expected a tensor or a pair")
    _raises(lambda: buffer.combine(torch.ones(good[0].shape[0] + 1, 8, device=device), handle), ValueError,
            "x must have one row per row")
    _raises(lambda: buffer.low_latency_dispatch(x, idx, 8, num_experts), ValueError, "low_latency_mode")
    _raises(lambda: buffer.get_local_buffer_tensor(torch.bfloat16), NotImplementedError, "get_local_buffer_tensor")
    _raises(lambda: buffer.low_latency_update_mask_buffer(0, True), ValueError, "enable_shrink")

    # After all that, the Buffer still dispatches and combines correctly.
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    recv_x, recv_idx, *_ = d()
    assert same_bits(recv_x.cpu(), expected.recv_x) and torch.equal(recv_idx.cpu(), expected.recv_topk_idx)
    combined = buffer.combine(recv_x, handle)[0]
    assert same_bits(combined.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)


def test_bad_input(pool):
    pool.run(rank_bad_input)


def rank_buffer_arguments():
    """What DeepEP's constructor takes and torch_ep cannot honour raises naming it; destroy()."""
    group = dist.group.WORLD
    _raises(lambda: deep_ep.Buffer(None), ValueError, "group: a torch.distributed process group is required")
    _raises(lambda: deep_ep.Buffer(None, comm=object()), ValueError, "comm: torch_ep.deep_ep runs on")
    _raises(lambda: deep_ep.Buffer(group, enable_shrink=True), ValueError, "enable_shrink=True")
    _raises(lambda: deep_ep.Buffer(group, num_nvl_bytes=-1), ValueError, "num_nvl_bytes must be")
    _raises(lambda: deep_ep.Buffer(group, low_latency_mode=True, num_qps_per_rank=0), ValueError, "num_qps_per_rank")
    _raises(lambda: deep_ep.Buffer(group, low_latency_mode=True, allow_nvlink_for_low_latency_mode=False),
            ValueError, "allow_nvlink_for_low_latency_mode=False")
    _raises(lambda: deep_ep.Buffer(group).destroy(), RuntimeError, "explicitly_destroy=True")

    # A Buffer over a Gloo group makes its own "ep" group; destroy() releases it.
    size = dist.get_world_size()
    buffer = make_buffer("gloo", low_latency_mode=True, num_rdma_bytes=1 << 20, explicitly_destroy=True,
                         allow_mnnvl=True)
    assert buffer.ep_group is not buffer.group and dist.get_backend(buffer.ep_group) == "ep"
    assert dist.get_process_group_ranks(buffer.ep_group) == list(range(size))
    buffer.clean_low_latency_buffer(8, 256, 2 * size)
    _raises(lambda: buffer.clean_low_latency_buffer(8, 256, 2 * size + 1), ValueError, "must be divisible")
    x = torch.randn(4, 256).to(torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int64)
    # The native op's own error on CPU tensors (needs CUDA and NVSHMEM), after the arguments' checks.
    with pytest.raises((RuntimeError, ValueError)) as info:
        buffer.low_latency_dispatch(x, idx, 8, 2 * size)
    assert "CUDA tensors" in str(info.value) or "nvshmem4py-cu13" in str(info.value), str(info.value)
    _raises(lambda: buffer.low_latency_dispatch(x, idx, 8, 2 * size, dispatch_wait_recv_cost_stats=idx), ValueError,
            "dispatch_wait_recv_cost_stats")
    _raises(lambda: buffer.low_latency_dispatch(x, idx, 8, 2 * size, use_ue8m0=True), ValueError,
            "use_ue8m0=True needs use_fp8=True and round_scale=True")
    _raises(lambda: buffer.low_latency_dispatch(x, idx, 8, 2 * size, async_finish=True, return_recv_hook=True),
            ValueError, "cannot both be set")
    _raises(lambda: buffer.low_latency_dispatch(x, idx, 8, 2 * size,
                                                cumulative_local_expert_recv_stats=torch.zeros(3, dtype=torch.int32)),
            ValueError, "cumulative_local_expert_recv_stats must have shape [2]")
    _raises(lambda: buffer.low_latency_combine(x, idx, idx.float(), (None,) * 5), TypeError, "handle: expected")
    group_of_buffer = buffer.group
    buffer.destroy()
    buffer.destroy()  # twice is harmless
    _raises(lambda: buffer.get_dispatch_layout(idx, 2 * size), RuntimeError, "this Buffer was destroyed")
    dist.destroy_process_group(group_of_buffer)
    dist.barrier()


def test_buffer_arguments_and_destroy(pool):
    pool.run(rank_buffer_arguments)


def test_static_surface():
    assert deep_ep.topk_idx_t == torch.int64
    assert set(deep_ep.__all__) >= {"Buffer", "Config", "EventOverlap", "topk_idx_t"}
    for ranks in (1, 2, 3, 8, 24):
        config = deep_ep.Buffer.get_dispatch_config(ranks)
        assert config.num_sms == deep_ep.Buffer.num_sms
        assert config.get_nvl_buffer_size_hint(7168 * 2, ranks) > 0
        assert deep_ep.Buffer.get_combine_config(ranks).get_rdma_buffer_size_hint(7168 * 2, ranks) >= 0
    _raises(lambda: deep_ep.Config(20, 8, 8), ValueError, "num_max_nvl_chunked_send_tokens must be below")
    before = deep_ep.Buffer.num_sms, deep_ep.Buffer._num_sms_set
    try:
        _raises(lambda: deep_ep.Buffer.set_num_sms(23), ValueError, "new_num_sms must be even")
        deep_ep.Buffer.set_num_sms(24)
        assert deep_ep.Buffer.get_dispatch_config(2).num_sms == 24
    finally:
        deep_ep.Buffer.num_sms, deep_ep.Buffer._num_sms_set = before
    hint = deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 256)
    assert hint >= 256 // 8 * 8 * 128 * 7168  # at least every expert's bf16 rows
    _raises(lambda: deep_ep.Buffer.get_low_latency_rdma_size_hint(128, 7168, 8, 250), ValueError, "divisible")
    assert isinstance(deep_ep.Buffer.is_sm90_compiled(), bool)
    event = deep_ep.Buffer.capture()
    event.current_stream_wait()
    with event:
        pass
    # UE8M0: each power-of-two scale's exponent byte, four to an int32.
    scales = torch.tensor([[[2.0 ** -3, 1.0, 2.0 ** 5, 0.5, 4.0]]])
    packed = deep_ep.utils._pack_ue8m0(scales)
    assert packed.shape == (1, 1, 2) and packed.dtype == torch.int32
    assert packed.view(torch.uint8).flatten().tolist() == [124, 127, 132, 126, 129, 0, 0, 0]


def rank_internode(seed):
    """4 ranks as 2 virtual nodes: DeepEP's internode layout and 10-element handle."""
    rank, size = dist.get_rank(), dist.get_world_size()
    buffer = make_buffer("default")
    num_experts, g, x, idx, w = moe_checks.make_inputs(seed, "random", 16, 3, 2, torch.bfloat16, "cpu")
    per_rank, per_node, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    assert torch.equal(per_node, in_rank.view(-1, 2, 2).any(2).sum(0).int()) and per_node.dtype == torch.int32
    expected = reference.dispatch(x, idx, w, num_experts=num_experts)
    recv_x, recv_idx, recv_w, per_expert_list, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_node, is_token_in_rank=in_rank,
        num_tokens_per_expert=per_expert, topk_idx=idx, topk_weights=w)
    assert same_bits(recv_x, expected.recv_x) and torch.equal(recv_idx, expected.recv_topk_idx)
    assert len(handle) == 10 and handle[0] is in_rank
    assert torch.equal(handle[6], gathered_prefix_matrix(idx, num_experts)[:, rank])
    combined, combined_w, _ = buffer.combine(recv_x, handle, recv_w)
    want = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights)
    assert same_bits(combined, want.combined_x) and torch.equal(combined_w, want.combined_topk_weights)
    assert size == 4


def test_handle_elements_made_when_read():
    """A handle element given as _Lazy is made once, on first read, by every way a caller reads a
    tuple (index, negative index, slice, unpacking, iteration), and not before."""
    from torch_ep.deep_ep.utils import _Handle, _Lazy
    made = []

    def make():
        made.append(1)
        return torch.arange(4)

    handle = _Handle((None, None, "two", 3), "native", {0: _Lazy(make)})
    assert len(handle) == 4 and handle.native == "native" and handle[2] == "two" and not made
    assert handle.tensors_made() == []
    assert torch.equal(handle[-4], torch.arange(4)) and handle[0] is handle[-4] and len(made) == 1
    first, _, two, three = handle
    assert first is handle[0] and (two, three) == ("two", 3) and handle[1:3] == (None, "two")
    assert list(handle)[0] is first and isinstance(handle, tuple) and len(made) == 1
    assert len(handle.tensors_made()) == 1 and "tensor" in repr(handle)
    with pytest.raises(IndexError):
        handle[4]


def test_internode_virtual_nodes():
    rank_pool(4, env={"TORCH_EP_RANKS_PER_NODE": "2"}).run(rank_internode, _seed())


def test_drop_in_example_under_torchrun():
    """examples/deep_ep_drop_in.py on 2 CPU ranks of a Gloo default group: its first step matches
    the dense layer (forward and gradients), the loss goes down, and it exits 0."""
    example = Path(__file__).parent.parent / "examples" / "deep_ep_drop_in.py"
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_EP_TIMEOUT_S="60")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", str(example), "--device", "cpu", "--steps", "12", "--batch", "32"]
    returncode, stdout, stderr = run_process_group(cmd, env, 180)
    log = f"exit code {returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-4000:]}"
    assert returncode == 0 and "2 ranks on cpu (gloo group)" in stdout, log


# ------------------------------------------------------------------------------------ low latency
# The low-latency ops need CUDA and NVSHMEM (tests/test_cuda_deep_ep.py runs them). Here the
# Buffer's own work around them (the receive hook, DeepEP's handle encodings, the statistics,
# UE8M0 packing, the zero-copy rule) runs on CPU over stand-ins built on torch_ep.reference's
# low-latency ops, whose outputs stay poisoned until their hook runs, as the real ones' do.

class _ReferenceLowLatency:
    """Stand-ins for torch_ep's low-latency ops, on torch_ep.reference."""

    def __init__(self):
        self.combine_buffers = {}

    def dispatch(self, x, topk_idx, *, max_tokens_per_rank, num_experts, use_fp8, round_scale, return_recv_hook,
                 group):
        from torch_ep.testing import poison_
        from torch_ep.types import LowLatencyDispatchResult, LowLatencyHandle

        d = reference.low_latency_dispatch(x, topk_idx, max_tokens_per_rank=max_tokens_per_rank,
                                           num_experts=num_experts, use_fp8=use_fp8, round_scale=round_scale,
                                           group=group)
        h = d.handle
        real = [d.recv_x] if not use_fp8 else list(d.recv_x)
        real += [d.recv_count, h.src_info, h.layout]
        outs = [t.clone() for t in real]
        handle = LowLatencyHandle(h.group_name, h.num_ranks, h.num_experts, h.max_tokens_per_rank, h.num_tokens,
                                  h.hidden, outs[-2], outs[-1], h.send_slot, use_fp8)

        def receive():
            for out, t in zip(outs, real):
                out.copy_(t)

        if return_recv_hook:
            for out in outs:
                poison_(out)
        else:
            receive()
        recv_x = tuple(outs[:2]) if use_fp8 else outs[0]
        return LowLatencyDispatchResult(recv_x, outs[-3], handle, receive if return_recv_hook else None)

    def combine(self, x, topk_idx, topk_weights, handle, *, return_recv_hook=False, out=None):
        from torch_ep.testing import poison_
        from torch_ep.types import LowLatencyCombineResult

        combined = reference.low_latency_combine(x, topk_idx, topk_weights, handle).combined_x
        out = out if out is not None else torch.empty_like(combined)
        def receive():
            out.copy_(combined)

        if return_recv_hook:
            poison_(out)
            return LowLatencyCombineResult(out, receive)
        receive()
        return LowLatencyCombineResult(out, None)

    def combine_buffer(self, handle):
        shape = (handle.num_experts // handle.num_ranks, handle.num_ranks * handle.max_tokens_per_rank, handle.hidden)
        if shape not in self.combine_buffers:
            self.combine_buffers[shape] = torch.empty(shape, dtype=torch.bfloat16)
        return self.combine_buffers[shape]


def rank_low_latency_on_reference(seed, num_tokens, hidden, top_k, experts_per_rank, use_fp8, use_ue8m0, max_tokens,
                                  hook, zero_copy):
    from test_low_latency import expert_outputs, make_inputs
    from torch_ep.deep_ep import buffer as buffer_module
    from torch_ep.testing import poison_

    rank, size = dist.get_rank(), dist.get_world_size()
    stand_in = _ReferenceLowLatency()
    saved = buffer_module._ll_dispatch, buffer_module._ll_combine, buffer_module.low_latency_combine_buffer
    buffer_module._ll_dispatch, buffer_module._ll_combine = stand_in.dispatch, stand_in.combine
    buffer_module.low_latency_combine_buffer = stand_in.combine_buffer
    try:
        buffer = deep_ep.Buffer(dist.group.WORLD, low_latency_mode=True, num_qps_per_rank=experts_per_rank)
        num_experts, x, idx, w = make_inputs(seed, "random", num_tokens, hidden, top_k, experts_per_rank)
        local = num_experts // size
        stats0 = torch.randint(0, 1000, (local,), dtype=torch.int32)
        stats = stats0.clone()
        recv_x, recv_count, handle, event, recv_hook = buffer.low_latency_dispatch(
            x, idx, max_tokens, num_experts, cumulative_local_expert_recv_stats=stats, use_fp8=use_fp8,
            round_scale=use_ue8m0, use_ue8m0=use_ue8m0, return_recv_hook=hook)
        assert (recv_hook is not None) == hook and event.event is None
        if hook:
            recv_hook()

        # What every rank can compute from all ranks' inputs: rank s's (token, slot) pairs for
        # expert e, in order, packed after those of ranks before s.
        everyone = [None] * size
        dist.all_gather_object(everyone, (x, idx))
        src_info, layout_range, *sizes = handle
        assert sizes == [max_tokens, hidden, num_experts] and len(handle) == 5
        assert layout_range.dtype == torch.int64 and src_info.dtype == torch.int32
        rows = recv_x[0] if use_fp8 else recv_x
        total = torch.zeros(local, dtype=torch.int32)
        for le in range(local):
            for s, (xs, idxs) in enumerate(everyone):
                pairs = (idxs.reshape(-1) == rank * local + le).nonzero().flatten()[:max_tokens]
                begin, count = int(layout_range[le, s]) >> 32, int(layout_range[le, s]) & 0xFFFFFFFF
                assert (begin, count) == (int(total[le]), pairs.numel())
                tokens = pairs // idxs.shape[1]
                assert torch.equal(src_info[le, begin:begin + count].long(), tokens)
                if not use_fp8:
                    assert same_bits(rows[le, begin:begin + count], xs[tokens])
                total[le] += count
        assert torch.equal(recv_count, total) and torch.equal(stats, stats0 + total)
        if use_ue8m0:
            packed = recv_x[1]
            assert packed.dtype == torch.int32 and packed.shape == (local, size * max_tokens, -(-hidden // 512))
            assert packed.stride()[1] == 1  # column-major in the last two dimensions, as DeepEP's
            # The received rows' power-of-two scales, from the reference's dispatch of the same inputs.
            ref = reference.low_latency_dispatch(x, idx, max_tokens_per_rank=max_tokens, num_experts=num_experts,
                                                 round_scale=True)
            exponents = ((ref.recv_x[1].view(torch.int32) >> 23) & 0xFF).to(torch.uint8)
            got = torch.empty(packed.shape, dtype=torch.int32).copy_(packed).view(torch.uint8)
            got = got[..., :exponents.shape[-1]]
            valid = torch.arange(size * max_tokens).view(1, -1) < ref.recv_count.view(-1, 1)
            assert torch.equal(got[valid], exponents[valid])

        # Combine: each expert's rows times (its global id + 1), weighted and summed per token.
        y_ref = expert_outputs(recv_x if not use_ue8m0 else ref.recv_x, handle.native)
        want = reference.low_latency_combine(y_ref, idx, w, handle.native).combined_x
        y = y_ref
        if zero_copy:
            y = poison_(buffer.get_next_low_latency_combine_buffer(handle))
            y.copy_(y_ref)
        out = poison_(torch.empty(x.shape[0], hidden, dtype=torch.bfloat16))
        combined, event, send_hook = buffer.low_latency_combine(y, idx, w, handle, zero_copy=zero_copy,
                                                                return_recv_hook=hook, out=out)
        assert combined is out and (send_hook is not None) == hook
        if hook:
            send_hook()
        assert same_bits(out, want)
        with pytest.raises(ValueError, match="zero_copy=True: x must be the tensor"):
            buffer.low_latency_combine(y_ref.clone(), idx, w, handle, zero_copy=True)
    finally:
        buffer_module._ll_dispatch, buffer_module._ll_combine, buffer_module.low_latency_combine_buffer = saved


@pytest.mark.parametrize("case", [  # tokens, hidden, top-k, experts per rank, fp8, ue8m0, max tokens, hook, zero copy
    (6, 256, 3, 2, False, False, 8, True, True),
    (9, 384, 4, 3, True, False, 9, False, False),
    (5, 512, 2, 2, True, True, 5, True, False),
], ids=lambda c: "-".join(str(v) for v in c))
def test_low_latency_layer_on_reference(pool4, case):
    pool4.run(rank_low_latency_on_reference, _seed(), *case)


def rank_subgroups(seed):
    """4 ranks as two expert-parallel groups of 2 (as in TP x EP): each rank makes a Buffer over
    its own Gloo subgroup only; the "ep" group under it is made by those 2 ranks alone."""
    rank = dist.get_rank()
    halves = [dist.new_group([0, 1], backend="gloo"), dist.new_group([2, 3], backend="gloo")]
    mine = halves[rank // 2]
    buffer = deep_ep.Buffer(mine)
    assert dist.get_process_group_ranks(buffer.ep_group) == [rank // 2 * 2, rank // 2 * 2 + 1]
    g = torch.Generator().manual_seed(seed + rank)
    num_experts = 6
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(7)])
    x = torch.randint(-60, 60, (7, 32), generator=g).to(torch.bfloat16)
    w = torch.rand(idx.shape, generator=g)
    per_rank, _, per_expert, in_rank, _ = buffer.get_dispatch_layout(idx, num_experts)
    recv_x, recv_idx, recv_w, _, handle, _ = buffer.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert, topk_idx=idx,
        topk_weights=w)
    expected = reference.dispatch(x, idx, w, num_experts=num_experts, group=mine)
    assert same_bits(recv_x, expected.recv_x) and torch.equal(recv_idx, expected.recv_topk_idx)
    assert int(handle[0][-1, mine.rank()]) == recv_x.shape[0]
    combined, combined_w, _ = buffer.combine(recv_x, handle, recv_w)
    want = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights, group=mine)
    assert same_bits(combined, want.combined_x) and torch.equal(combined_w, want.combined_topk_weights)
    for group in halves:
        dist.destroy_process_group(group)


def test_buffer_over_a_subgroup(pool4):
    pool4.run(rank_subgroups, _seed())
