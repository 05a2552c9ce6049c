"""Low-latency dispatch / combine on the CPU: the argument checks, the clear error where NVSHMEM
or CUDA is missing, the fake kernels, and torch_ep.reference's low-latency ops against a dense
brute-force computation from every rank's gathered inputs. The rank functions that compare the
real ops with the reference live in tests/test_cuda_low_latency.py.
"""
import pytest
import torch
import torch.distributed as dist

import torch_ep
from torch_ep import _C, reference
from torch_ep.testing import same_bits

FP8_BLOCK = 128


def _seed():
    return int(torch.randint(0, 2**30, ()).item())


def make_inputs(seed, kind, num_tokens, hidden, top_k, experts_per_rank, device="cpu"):
    """x [N, H] bf16 integer-valued, topk_idx [N, K] (distinct experts, -1 in some slots or an
    extreme route), weights [N, K] multiples of 1/8: every product and sum is exact."""
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts = experts_per_rank * size
    g = torch.Generator().manual_seed(seed + 7919 * rank)
    n = 0 if (kind == "empty_rank" and rank == size - 1) else num_tokens
    top_k = min(top_k, num_experts)
    if kind == "one_expert":
        idx = torch.full((n, top_k), -1, dtype=torch.int64)
        idx[:, 0] = num_experts - 1
    else:
        idx = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(n)]) if n else \
            torch.empty(0, top_k, dtype=torch.int64)
        idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
        if kind == "unrouted":
            idx[: n // 2] = -1
    x = torch.randint(-60, 60, (n, hidden), generator=g).to(torch.bfloat16)
    w = torch.randint(1, 9, idx.shape, generator=g).float() / 8
    return num_experts, x.to(device), idx.to(device), w.to(device)


def expert_outputs(recv_x, handle):
    """What each local expert sends back: its rows (dequantised when fp8) times (global id + 1),
    as bf16. Rows past the counts are whatever recv_x holds; combine never reads them."""
    if isinstance(recv_x, tuple):
        x8, scales = recv_x
        local, rows, hidden = x8.shape
        deq = x8.float().view(local, rows, hidden // FP8_BLOCK, FP8_BLOCK) * scales.unsqueeze(3)
        base = deq.view(local, rows, hidden)
    else:
        base = recv_x.float()
    rank = dist.get_rank()
    factor = torch.arange(base.shape[0], dtype=torch.float32, device=base.device) + rank * base.shape[0] + 1
    return (base * factor.view(-1, 1, 1)).to(torch.bfloat16)


def valid_rows(handle):
    """[E_local, R*max] bool: the rows the dispatch wrote (each expert's, packed from row 0)."""
    size, max_tokens = handle.num_ranks, handle.max_tokens_per_rank
    return torch.arange(size * max_tokens).view(1, -1) < handle.layout.long().cpu().sum(1, keepdim=True)


# ------------------------------------------------------------------------------------ argument checks

def test_ops_and_api_exist():
    for name in ("low_latency_dispatch", "low_latency_dispatch_recv", "low_latency_combine", "low_latency_combine_recv"):
        assert hasattr(torch.ops.ep, name)
    assert callable(torch_ep.low_latency_dispatch) and callable(torch_ep.low_latency_combine)
    assert isinstance(_C.has_nvshmem, bool)


def _raises(fn, exc, text):
    with pytest.raises(exc) as info:
        fn()
    assert text in str(info.value), str(info.value)


def test_remote_puts_setting():
    """TORCH_EP_LL_REMOTE_PUTS (how a dispatch across nodes puts its tokens) parses its documented
    values, and anything else raises a ValueError that names the variable and what it takes."""
    parse = _C._ll_parse_remote_puts  # (tokens per put, one fence per token, signals per block, per buffer)
    settings = (None, "", "token", "fenced", "grouped", "batched", "batched1", "batched64", "block")
    assert [tuple(parse(v)) for v in settings] == [(0, False, False, True), (0, False, False, True),
                                                   (0, False, False, False), (0, True, False, False),
                                                   (1, False, False, False), (4, False, False, False),
                                                   (1, False, False, False), (64, False, False, False),
                                                   (0, False, True, False)]
    for bad in ("batched0", "batched65", "batched999", "batchedx", "tokens", "Batched", "batched-1", "grouped2",
                "fenced1", "blocks", "block1"):
        with pytest.raises(ValueError, match=r"TORCH_EP_LL_REMOTE_PUTS='.*': expected token, fenced, grouped, batched"):
            parse(bad)


def test_whatif_switch():
    """TORCH_EP_WHATIF_COPY_PUTS (the measurements' what-if) is on only at 1; a value other than 0
    or 1 raises a ValueError naming the variable, not a silent off."""
    name = "TORCH_EP_WHATIF_COPY_PUTS"
    assert [_C._env_switch(name, v) for v in (None, "", "0", "1")] == [False, False, False, True]
    for bad in ("2", "yes", "true", " 1", "on"):
        with pytest.raises(ValueError, match=r"TORCH_EP_WHATIF_COPY_PUTS='.*': expected 0 or 1"):
            _C._env_switch(name, bad)


@pytest.mark.parametrize("name", ["TORCH_EP_DIRECT_GPU_SCOPE", "TORCH_EP_DEVICE_GPU_SCOPE", "TORCH_EP_EARLY_LAUNCH",
                                  "TORCH_EP_POOL_PIECES", "TORCH_EP_OUTPUTS_TOGETHER", "TORCH_EP_RELEASE_PEER_MAPPINGS"])
def test_switch_on_by_default(monkeypatch, name):
    """The switches the CUDA paths read once (at their set-up or first call) are on unless 0: unset,
    "" and 1 are on; a value other than 0 or 1 raises a ValueError naming the variable."""
    monkeypatch.delenv(name, raising=False)
    assert _C._env_switch_on_by_default(name)
    for value, on in (("", True), ("1", True), ("0", False)):
        monkeypatch.setenv(name, value)
        assert _C._env_switch_on_by_default(name) == on, value
    for bad in ("2", "off", "false"):
        monkeypatch.setenv(name, bad)
        with pytest.raises(ValueError, match=name + r"='.*': expected 0 or 1"):
            _C._env_switch_on_by_default(name)


def test_dispatch_argument_checks():
    x = torch.zeros(4, 256, dtype=torch.bfloat16)
    idx = torch.zeros(4, 2, dtype=torch.int64)

    def check(x=x, idx=idx, max_tokens=8, experts=4, fp8=True, ranks=2):
        _C._ll_check_dispatch_args(x, idx, max_tokens, experts, fp8, ranks)

    check()
    _raises(lambda: check(x=x.float()), TypeError, "x must be bfloat16")
    _raises(lambda: check(x=torch.zeros(4, 100, dtype=torch.bfloat16)), ValueError, "multiple of 128")
    _raises(lambda: check(x=torch.zeros(256, dtype=torch.bfloat16)), ValueError, "x must be 2-D")
    _raises(lambda: check(max_tokens=3), ValueError, "more than max_tokens_per_rank=3")
    _raises(lambda: check(experts=3), ValueError, "divisible by the group size")
    _raises(lambda: check(idx=idx.int()), TypeError, "topk_idx must be int64")
    _raises(lambda: check(idx=torch.zeros(3, 2, dtype=torch.int64)), ValueError, "topk_idx must have shape [4")


def test_combine_argument_checks():
    local, ranks, max_tokens, hidden = 2, 2, 4, 128
    x = torch.zeros(local, ranks * max_tokens, hidden, dtype=torch.bfloat16)
    idx = torch.zeros(3, 2, dtype=torch.int64)
    w = torch.zeros(3, 2)
    slot = torch.zeros(3, 2, dtype=torch.int32)
    layout = torch.zeros(local, ranks, dtype=torch.int32)
    out = torch.empty(3, hidden, dtype=torch.bfloat16)

    def check(x=x, w=w, slot=slot, layout=layout, out=out):
        _C._ll_check_combine_args(x, idx, w, slot, layout, out, max_tokens, local * ranks, ranks)

    check()
    _raises(lambda: check(x=x[:1]), ValueError, "x must have shape [2, 8, hidden]")
    _raises(lambda: check(w=w.double()), TypeError, "topk_weights must be float32")
    _raises(lambda: check(layout=layout[:, :1]), ValueError, "handle")
    _raises(lambda: check(slot=slot[:2]), ValueError, "send_slot")
    _raises(lambda: check(slot=slot.long()), ValueError, "send_slot")
    _raises(lambda: check(out=torch.empty(3, hidden)), TypeError, "out must be bfloat16")
    _raises(lambda: check(out=torch.empty(hidden, 3, dtype=torch.bfloat16).t()), ValueError, "contiguous")


def rank_errors_without_cuda():
    """On CPU tensors the op raises, after the argument checks: what to install (no NVSHMEM in
    the build), or that it runs on CUDA tensors. The group keeps working."""
    num_experts, x, idx, w = make_inputs(1, "random", 4, 128, 2, 2)
    with pytest.raises((RuntimeError, ValueError)) as info:
        torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=num_experts)
    text = str(info.value)
    if not _C.has_nvshmem:
        assert "nvshmem4py-cu13" in text and "nvidia-nvshmem-cu13" in text and "rebuild" in text, text
    else:
        assert "CUDA tensors" in text, text
    with pytest.raises(ValueError, match="more than max_tokens_per_rank"):
        torch_ep.low_latency_dispatch(x, idx, max_tokens_per_rank=2, num_experts=num_experts)
    # No autograd (decoding ops): a tensor that requires grad is refused, not silently detached.
    with pytest.raises(RuntimeError, match="x requires grad, but the low-latency ops have no autograd"):
        torch_ep.low_latency_dispatch(x.clone().requires_grad_(), idx, max_tokens_per_rank=8, num_experts=num_experts)
    d = reference.low_latency_dispatch(x, idx, max_tokens_per_rank=8, num_experts=num_experts, use_fp8=False)
    with pytest.raises(RuntimeError, match="topk_weights requires grad"):
        torch_ep.low_latency_combine(d.recv_x, idx, w.clone().requires_grad_(), d.handle)
    with torch.no_grad(), pytest.raises((RuntimeError, ValueError)) as info:  # past the autograd check
        torch_ep.low_latency_combine(d.recv_x, idx, w.clone().requires_grad_(), d.handle)
    assert "requires grad" not in str(info.value)
    # The receive hook's op checks what it is given too.
    t = torch.empty(0)
    with pytest.raises(ValueError, match="num_topk must be 1 to 64, got 0"):
        torch.ops.ep.low_latency_dispatch_recv(t, t, t, t, t, 0, 8, 0, num_experts, dist.group.WORLD.group_name)
    dist.barrier()


def test_errors_without_cuda(pool):
    pool.run(rank_errors_without_cuda)


def rank_fake_kernels():
    from torch._subclasses.fake_tensor import FakeTensorMode

    size = dist.get_world_size()
    name = dist.group.WORLD.group_name
    with FakeTensorMode():
        x = torch.empty(5, 256, dtype=torch.bfloat16)
        idx = torch.empty(5, 3, dtype=torch.int64)
        recv_x, scales, count, src, layout, slot, half = torch.ops.ep.low_latency_dispatch(
            x, idx, 8, 2 * size, True, False, False, name)
        assert recv_x.shape == (2, 8 * size, 256) and recv_x.dtype == torch.float8_e4m3fn
        assert scales.shape == (2, 8 * size, 2) and count.shape == (2,) and src.shape == (2, 8 * size)
        assert layout.shape == (2, size) and slot.shape == (5, 3) and slot.dtype == torch.int32
        recv_bf16 = torch.ops.ep.low_latency_dispatch(x, idx, 8, 2 * size, False, False, False, name)[0]
        assert recv_bf16.dtype == torch.bfloat16


def test_fake_kernels(pool):
    pool.run(rank_fake_kernels)


# ------------------------------------------------------------------------------------ the reference

def rank_reference(seed, kind, num_tokens, hidden, top_k, experts_per_rank, use_fp8, round_scale, max_tokens):
    """reference.low_latency_dispatch / combine against a dense computation from all inputs."""
    rank, size = dist.get_rank(), dist.get_world_size()
    num_experts, x, idx, w = make_inputs(seed, kind, num_tokens, hidden, top_k, experts_per_rank)
    local = num_experts // size
    got = reference.low_latency_dispatch(x, idx, max_tokens_per_rank=max_tokens, num_experts=num_experts,
                                         use_fp8=use_fp8, round_scale=round_scale)
    gathered = [None] * size
    dist.all_gather_object(gathered, (x, idx, w))

    # send_slot: each of this rank's pairs' position among its pairs for the same expert, -1 when
    # not routed or past the capacity.
    flat = idx.reshape(-1)
    slots = torch.full_like(flat, -1)
    for e in flat[flat >= 0].unique():
        pairs = (flat == e).nonzero().flatten()[:max_tokens]
        slots[pairs] = torch.arange(pairs.numel())
    assert got.handle.send_slot.dtype == torch.int32 and got.handle.send_slot.shape == idx.shape
    assert torch.equal(got.handle.send_slot.reshape(-1).long(), slots)

    # Dispatch: rank s's pairs for expert e, in (t, k) order, packed after those of ranks before s.
    recv_x = got.recv_x[0].view(torch.uint8) if use_fp8 else got.recv_x
    for le in range(local):
        e = rank * local + le
        total = 0
        for s, (xs, idxs, _) in enumerate(gathered):
            pairs = (idxs.reshape(-1) == e).nonzero().flatten()[:max_tokens]
            count = pairs.numel()
            total += count
            assert int(got.handle.layout[le, s]) == count
            rows = slice(total - count, total)
            assert torch.equal(got.handle.src_info[le, rows].long(), pairs)
            tokens = pairs // idxs.shape[1]
            if use_fp8:
                x8, scales = reference.cast_fp8_blocks(xs, round_scale)
                assert same_bits(recv_x[le, rows], x8.view(torch.uint8)[tokens])
                assert same_bits(got.recv_x[1][le, rows], scales[tokens])
            else:
                assert same_bits(recv_x[le, rows], xs[tokens])
        assert int(got.recv_count[le]) == total

    # Combine: out[t] = sum over valid k of w * (row as expert e sent it back).
    y = expert_outputs(got.recv_x, got.handle)
    comb = reference.low_latency_combine(y, idx, w, got.handle)
    expected = torch.zeros(x.shape[0], hidden)
    x8, scales = reference.cast_fp8_blocks(x, round_scale) if use_fp8 else (None, None)
    for t in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = int(idx[t, k])
            if e < 0:
                continue
            base = (x8[t].float().view(-1, FP8_BLOCK) * scales[t].unsqueeze(1)).view(-1) if use_fp8 else x[t].float()
            row = (base * (e + 1)).to(torch.bfloat16).float()
            expected[t] = expected[t] + w[t, k] * row
    assert same_bits(comb.combined_x, expected.to(torch.bfloat16))
    out = torch.empty(x.shape[0], hidden, dtype=torch.bfloat16)
    assert reference.low_latency_combine(y, idx, w, got.handle, out=out).combined_x is out


REFERENCE_CASES = [
    ("random", 6, 256, 3, 2, False, False, 8),
    ("random", 5, 128, 2, 3, True, False, 6),
    ("random", 7, 384, 4, 2, True, True, 7),
    ("one_expert", 4, 128, 2, 2, True, False, 4),
    ("empty_rank", 3, 128, 2, 1, False, False, 3),
    ("unrouted", 6, 128, 3, 2, False, False, 6),
]


@pytest.mark.parametrize("kind,n,hidden,top_k,per_rank,fp8,round_scale,max_tokens", REFERENCE_CASES,
                         ids=lambda v: str(v))
def test_reference(pool, kind, n, hidden, top_k, per_rank, fp8, round_scale, max_tokens):
    pool.run(rank_reference, _seed(), kind, n, hidden, top_k, per_rank, fp8, round_scale, max_tokens)


def test_fp8_cast_properties():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(9, 512, generator=g) * 10).to(torch.bfloat16)
    x[0] = 0  # all-zero block: amax clamps at 1e-4
    for round_scale in (False, True):
        x8, scales = reference.cast_fp8_blocks(x, round_scale)
        assert x8.dtype == torch.float8_e4m3fn and scales.shape == (9, 4)
        deq = (x8.float().view(9, 4, 128) * scales.unsqueeze(2)).view(9, 512)
        # e4m3 keeps 3 mantissa bits: relative error at most 2^-4 of the block's scale * 448.
        assert bool(((deq - x.float()).abs() <= scales.repeat_interleave(128, 1) * 16 + 1e-6).all())
        if round_scale:
            mantissa = scales.view(torch.int32) & 0x7FFFFF
            assert bool((mantissa == 0).all())
