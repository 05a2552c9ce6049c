"""MoE dispatch / combine on CUDA tensors (GPU machines only).

The CPU tests' rank functions run here on CUDA tensors (same reference, same exact checks), plus
what only CUDA has: CUDA-graph capture with num_worst_tokens, an SM budget, memory that stays
flat, and a peer that never comes raising instead of hanging. The push dispatch and device
records: tests/test_cuda_moe_push.py (it imports the copy-variant helpers from here).
"""
import json
import os
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import test_moe as checks
import torch_ep
from conftest import cuda_world_sizes, rank_pool
from torch_ep import reference
from torch_ep.testing import same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


_seed = checks._seed


@pytest.mark.parametrize("kind,hidden,top_k,experts_per_rank,dtype", checks.ROUTE_CASES, ids=checks.CASE_IDS)
def test_dispatch_combine(cuda_pool, kind, hidden, top_k, experts_per_rank, dtype):
    cuda_pool.run(checks.rank_dispatch_combine, _seed(), kind, hidden, top_k, experts_per_rank, dtype, device="cuda")


def test_expert_alignment_and_many_tokens(cuda_pool):
    cuda_pool.run(checks.rank_dispatch_combine, _seed(), "random", 12, 3, 3, torch.bfloat16, alignment=4,
                  device="cuda")
    cuda_pool.run(checks.rank_many_tokens, _seed(), device="cuda")


def test_autograd(cuda_pool):
    cuda_pool.run(checks.rank_autograd, _seed(), device="cuda")


@pytest.mark.parametrize("direct", [True, False], ids=["direct_call", "torch_ops"])
def test_direct_call(direct):
    """The direct call (the default) and TORCH_EP_DIRECT_CALL=0 on CUDA: outputs and errors (test_moe.py)."""
    rank_pool(2, cuda=True, env={"TORCH_EP_DIRECT_CALL": "1" if direct else "0"}).run(
        checks.rank_direct_call, _seed(), device="cuda", direct=direct)


def test_async_op(cuda_pool):
    cuda_pool.run(checks.rank_async, _seed(), device="cuda")


def test_num_worst_tokens(cuda_pool):
    cuda_pool.run(checks.rank_worst_case, _seed(), device="cuda")


def test_bad_input(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    cuda_pool.run(checks.rank_bad_input, device="cuda")
    cuda_pool.run(checks.rank_mismatched_handles, device="cuda")


def rank_small_outputs(seed, together=None):
    """recv_x's small siblings (the fp8 scales, the top-k ids and weights), in one allocation or
    each in its own (backend/ops/cuda/cuda_outputs.hpp; `together` says which, None: not checked):
    each lies apart from the others, aligned, holds the reference's values (num_worst_tokens'
    padding included), and writing one leaves the others."""
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 300, 3, 2, torch.bfloat16, "cuda")
    fp8 = (x.cpu().float().to(torch.float8_e4m3fn), torch.rand(x.shape[0], 3, generator=g))  # 300 channels: 3 scales
    expected = reference.dispatch(fp8, idx.cpu(), w.cpu(), num_experts=num_experts)
    m = expected.recv_topk_idx.shape[0]
    for worst in (0, 24 * dist.get_world_size()):
        got = torch_ep.dispatch(tuple(t.cuda() for t in fp8), idx, w, num_experts=num_experts,
                                num_worst_tokens=worst)
        recv_x, scales = got.recv_x
        small = [scales, got.recv_topk_idx, got.recv_topk_weights]
        assert all(t.is_contiguous() and t.shape[0] == (worst or m) for t in small)
        spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in small)
        assert all(lo % 16 == 0 for lo, _ in spans), f"misaligned: {spans}"
        assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:])), f"overlapping: {spans}"
        if together is not None and (worst or m):  # empty tensors hold no allocation
            storages = {t.untyped_storage().data_ptr() for t in small}
            assert len(storages) == (1 if together else 3), f"together={together}: {len(storages)} allocations"
        assert same_bits(recv_x[:m].cpu(), expected.recv_x[0]), "fp8 recv_x differs"
        assert same_bits(scales[:m].cpu(), expected.recv_x[1]), "fp8 scales differ"
        assert torch.equal(got.recv_topk_idx[:m].cpu(), expected.recv_topk_idx)
        assert bool((got.recv_topk_idx[m:] == -1).all())
        got.recv_topk_idx.fill_(-7)
        scales.fill_(float("nan"))
        assert torch.equal(got.recv_topk_weights[:m].cpu(), expected.recv_topk_weights)
        assert bool((got.recv_topk_weights[m:] == 0).all())
        got.recv_topk_weights.fill_(5.0)
        assert bool((got.recv_topk_idx == -7).all()) and bool(scales.isnan().all())
        assert same_bits(recv_x[:m].cpu(), expected.recv_x[0]), "writing the small outputs reached recv_x"
        dist.barrier()


def rank_small_outputs_switched(seed, together):
    """As the environment says (read at the first dispatch), then the other way from
    _C._set_outputs_together (tools/moe_profile.py's switch between calls)."""
    rank_small_outputs(seed, together=together)
    torch_ep._C._set_outputs_together(not together)
    try:
        rank_small_outputs(seed + 1, together=not together)
    finally:
        torch_ep._C._set_outputs_together(together)


@pytest.mark.parametrize("together", ["0", "1"], ids=["apart", "together"])
def test_small_outputs(together):
    """All small outputs in one allocation (the default), and each in its own (TORCH_EP_OUTPUTS_TOGETHER=0)."""
    rank_pool(2, cuda=True, env={"TORCH_EP_OUTPUTS_TOGETHER": together}).run(
        rank_small_outputs_switched, _seed(), together=together == "1")


def rank_graph(seed):
    """dispatch + combine captured in one CUDA graph (num_worst_tokens: no host sync), replayed
    on new data, each replay checked against the reference."""
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 64, 4, 2, torch.bfloat16, "cuda")
    worst = 24 * dist.get_world_size()
    static_x = x.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph: the transport is set up here
        torch_ep.dispatch(static_x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch_ep.dispatch(static_x, idx, w, num_experts=num_experts, num_worst_tokens=worst)
        comb = torch_ep.combine(out.recv_x, out.handle)
    for _ in range(3):
        new_x = torch.randint(-60, 60, tuple(x.shape), generator=g).to(torch.bfloat16)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.dispatch(new_x, idx.cpu(), w.cpu(), num_experts=num_experts)
        m = expected.recv_x.shape[0]
        assert same_bits(out.recv_x[:m].cpu(), expected.recv_x)
        assert torch.equal(out.recv_topk_idx[:m].cpu(), expected.recv_topk_idx)
        assert bool((out.recv_topk_idx[m:] == -1).all())
        assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
        dist.barrier()


def test_cuda_graph(cuda_pool):
    cuda_pool.run(rank_graph, _seed())


def rank_sm_budget(seed):
    """Options.num_sms=1: one block per kernel still moves every row."""
    group = dist.new_group(pg_options=torch_ep.Options(num_sms=1))
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 256, 4, 2, torch.bfloat16, "cuda", max_tokens=200)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, group=group)
    checks.check_result(got, expected)
    comb = torch_ep.combine(got.recv_x, got.handle, group=group)
    assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
    dist.destroy_process_group(group)


def test_sm_budget(cuda_pool):
    cuda_pool.run(rank_sm_budget, _seed())


def rank_memory_flat(seed):
    """After warm-up, repeated dispatch/combine allocate nothing new (caching allocator stats)."""
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 512, 8, 4, torch.bfloat16, "cuda", max_tokens=300)

    def step():
        d = torch_ep.dispatch(x, idx, w, num_experts=num_experts)
        torch_ep.combine(d.recv_x, d.handle, d.recv_topk_weights)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_stats()["allocated_bytes.all.current"], torch.cuda.memory_reserved()
    for _ in range(50):
        step()
    torch.cuda.synchronize()
    after = torch.cuda.memory_stats()["allocated_bytes.all.current"], torch.cuda.memory_reserved()
    assert after == before, (before, after)


def test_memory_flat(cuda_pool):
    cuda_pool.run(rank_memory_flat, _seed())


def rank_missing_peer(options=None, worst_per_rank=0, check_errors=False):
    """The last rank never calls dispatch: every other rank raises within the timeout, naming the op.
    `options` add to the group's Options, `worst_per_rank` x ranks is the call's num_worst_tokens,
    and `check_errors` asks torch_ep.check_errors after it (a call that does not wait raises there)."""
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(pg_options=torch_ep.Options(timeout=timedelta(seconds=3), **(options or {})))
    num_experts, g, x, idx, w = checks.make_inputs(_seed_for(rank), "random", 16, 2, 2, torch.float32, "cuda")
    torch_ep.dispatch(x, idx, num_experts=num_experts, group=group)  # every rank sets the transport up
    torch.cuda.synchronize()
    error = None
    if rank != size - 1:
        start = time.monotonic()
        try:
            torch_ep.dispatch(x, idx, num_experts=num_experts, group=group, num_worst_tokens=worst_per_rank * size)
            torch.cuda.synchronize()
            if check_errors:
                torch_ep.check_errors(group)
        except Exception as e:  # noqa: BLE001
            error = (str(e), time.monotonic() - start)
    dist.barrier()
    dist.destroy_process_group(group)
    return error


def _seed_for(rank):
    return 4242


def test_missing_peer_times_out(cuda_pool):
    if cuda_pool.world_size < 2:
        pytest.skip("needs two ranks")
    results = cuda_pool.run(rank_missing_peer)
    for message, elapsed in results[:-1]:
        assert "dispatch" in message and "timed out" in message, message
        assert elapsed < 30


# ----------------------------------------------------------------------------- copy variants
# Options.moe_copy's kernels (TORCH_EP_MOE_COPY) at small SM budgets and the automatic one (0),
# on the same checks: rows the bulk copies take (multiples of 16 bytes), rows that fall back to
# the warp kernels (odd hidden sizes), fp8 with its scales, dispatch along a handle, combine with
# weights, many tokens (the ring wraps many times), num_worst_tokens padding. Pools of
# TORCH_EP_COPY_WORLD_SIZES ranks (default 2), so that the GPU suite's 1,2,4,8 do not multiply them.
COPY_CASES = ([("bulk", sms) for sms in (1, 2, 8, 0)] + [("unroll", sms) for sms in (1, 8, 0)]
              + [("warp", sms) for sms in (1, 8, 0)])
COPY_ROUTES = [
    ("random", 7168, 8, 4, torch.bfloat16),   # 14 KiB rows: bulk, a row across two stages
    ("random", 64, 4, 2, torch.float32),      # 256-byte rows: bulk, many rows a stage
    ("random", 7, 4, 2, torch.bfloat16),      # 14-byte rows: warp kernels
    ("random", 130, 9, 3, torch.float16),     # 260-byte rows: warp kernels
    ("random", 8320, 40, 24, torch.bfloat16),  # fp8 with 65 scales, 40 experts a token: past 64 and 32
    ("empty_rank", 256, 3, 2, torch.bfloat16),
    ("unrouted", 24, 3, 2, torch.bfloat16),
    ("one_expert", 16, 2, 2, torch.bfloat16),
    ("repeated", 8, 3, 2, torch.float32),
]


def copy_world_sizes():
    return [int(n) for n in os.environ.get("TORCH_EP_COPY_WORLD_SIZES", "2").split(",")]


@pytest.fixture(params=[(n, copy, sms) for n in copy_world_sizes() for copy, sms in COPY_CASES],
                ids=lambda v: f"{v[0]}ranks-{v[1]}-sms{v[2]}")
def copy_pool(request):
    world_size, copy, sms = request.param
    return rank_pool(world_size, cuda=True, env={"TORCH_EP_MOE_COPY": copy, "TORCH_EP_NUM_SMS": str(sms)})


def rank_worst_case_wide(seed):
    """num_worst_tokens on rows the bulk copies take, bf16 then fp8 with scales: real rows first,
    then padding rows routed nowhere (topk ids -1, weights 0), in outputs poisoned beforehand."""
    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 256, 4, 2, torch.bfloat16, "cuda", max_tokens=90)
    worst = 100 * dist.get_world_size()
    scales = torch.rand(x.shape[0], 2, generator=g)
    fp8 = (x.cpu().float().to(torch.float8_e4m3fn), scales)
    for payload, sent in ((x.cpu(), x), (fp8, tuple(t.cuda() for t in fp8))):
        expected = reference.dispatch(payload, idx.cpu(), w.cpu(), num_experts=num_experts)
        # Poison where the outputs will lie: torch's default pool, and the blocks of a call of the
        # same shapes, filled and freed (under TORCH_EP_MOE_PUSH they are the MoE pool's, which
        # _poison_cache does not reach; tests/test_cuda_moe_push.py checks that they are reused).
        stale = torch_ep.dispatch(sent, idx, w, num_experts=num_experts, num_worst_tokens=worst)
        xs = stale.recv_x if isinstance(stale.recv_x, tuple) else (stale.recv_x,)
        for t in (*xs, stale.recv_topk_idx, stale.recv_topk_weights):
            t.view(torch.uint8).fill_(0x7F)
        del stale, xs, t
        checks._poison_cache("cuda", worst * 256 * 8)
        got = torch_ep.dispatch(sent, idx, w, num_experts=num_experts, num_worst_tokens=worst)
        m = expected.recv_topk_idx.shape[0]
        if isinstance(payload, tuple):
            assert same_bits(got.recv_x[0][:m].cpu(), expected.recv_x[0]), "fp8 recv_x differs"
            assert same_bits(got.recv_x[1][:m].cpu(), expected.recv_x[1]), "fp8 scales differ"
        else:
            assert same_bits(got.recv_x[:m].cpu(), expected.recv_x), "recv_x differs"
        assert torch.equal(got.recv_topk_idx[:m].cpu(), expected.recv_topk_idx)
        assert torch.equal(got.recv_topk_weights[:m].cpu(), expected.recv_topk_weights)
        assert bool((got.recv_topk_idx[m:] == -1).all()) and bool((got.recv_topk_weights[m:] == 0).all())
        if not isinstance(payload, tuple):
            comb = torch_ep.combine(got.recv_x, got.handle)
            assert same_bits(comb.combined_x.cpu(), reference.combine(expected.recv_x, expected.handle).combined_x)
        dist.barrier()


def rank_copy_variant(seed):
    for i, case in enumerate(COPY_ROUTES):
        checks.rank_dispatch_combine(seed + i, *case, device="cuda")
    rank_float_sums(seed)
    checks.rank_many_tokens(seed, device="cuda")
    rank_worst_case_wide(seed)
    checks.rank_dispatch_combine(seed, "random", 12, 3, 3, torch.bfloat16, alignment=4, device="cuda")


def test_copy_variant(copy_pool):
    """Every check above on a pool whose default group runs TORCH_EP_MOE_COPY's kernels with
    TORCH_EP_NUM_SMS blocks, against torch_ep.reference bit for bit."""
    copy_pool.run(rank_copy_variant, _seed())


def rank_whole_rounds(seed):
    rank_copy_variant(seed)
    # Hidden 10240: fp8 rows of two rounds of depth 10 with 80 scales, bf16 rows of four; 40 experts
    # a token: past 64 scales and 32 ids after whole rounds.
    checks.rank_dispatch_combine(seed + 101, "random", 10240, 40, 24, torch.bfloat16, device="cuda")


@pytest.mark.parametrize("sms", [1, 8, 0])
def test_unroll_whole_rounds(sms):
    """unroll's rows of whole rounds, copied unguarded at the largest depth of 16, 14, 12, 10, 8
    whose round divides the row (hidden 7168 at 14: fp8 one round, bf16 two; 10240 at 10, past 64
    scales and 32 ids; other rows the guarded kernel), on every check of test_copy_variant."""
    pool = rank_pool(2, cuda=True, env={"TORCH_EP_MOE_COPY": "unroll", "TORCH_EP_NUM_SMS": str(sms)})
    pool.run(rank_whole_rounds, _seed())


def rank_float_sums(seed, device="cuda"):
    """Rows of random float32 values from up to four ranks: their float sums depend on the order,
    which must be ascending rank, as the reference's (the other checks' integer rows sum exactly
    in any order). Hidden 64 takes the 16-byte path, 7 the one-element one."""
    for i, hidden in enumerate((64, 7)):
        num_experts, g, _, idx, _ = checks.make_inputs(seed + i, "random", hidden, 8, 2, torch.float32, device)
        x = torch.randn(idx.shape[0], hidden, generator=g)
        w = torch.rand(idx.shape, generator=g)
        expected = reference.dispatch(x, idx.cpu(), w, num_experts=num_experts)
        got = torch_ep.dispatch(x.to(device), idx, w.to(device), num_experts=num_experts)
        checks.check_result(got, expected)
        back = expected.recv_x * torch.randn(expected.recv_x.shape[0], 1, generator=g)  # each rank's rows differ
        ref = reference.combine(back, expected.handle, expected.recv_topk_weights)
        comb = torch_ep.combine(back.to(device), got.handle, got.recv_topk_weights)
        assert same_bits(comb.combined_x.cpu(), ref.combined_x), "combined_x differs from the reference"
        assert torch.equal(comb.combined_topk_weights.cpu(), ref.combined_topk_weights)


def rank_many_sources(seed):
    for i, case in enumerate(COPY_ROUTES[:4]):
        checks.rank_dispatch_combine(seed + i, *case, device="cuda")
    rank_float_sums(seed)


@pytest.mark.parametrize("sms", [1, 8])
def test_unroll_many_sources(sms):
    """The unroll combine sums a token's rows two sources at a time where more than two ranks sent
    one, which the copy pools above (2 ranks in the GPU suite) never have: 4 ranks here."""
    pool = rank_pool(4, cuda=True, env={"TORCH_EP_MOE_COPY": "unroll", "TORCH_EP_NUM_SMS": str(sms)})
    pool.run(rank_many_sources, _seed())


def rank_copy_options(copy, num_sms=3):
    group = dist.new_group(pg_options=torch_ep.Options(moe_copy=copy, num_sms=num_sms))
    if copy == "auto":  # the table's pick for this GPU and group, with its budgets
        from torch_ep import sm_table

        config, ranks = torch_ep.get_backend(group).config, dist.get_world_size()
        key = (torch.cuda.get_device_name(), ranks, -(-ranks // torch.cuda.device_count()))
        table = sm_table.load()
        for op, got in sm_table.settings(config).items():
            chosen = sm_table.choose_copy(*key, table, op=op if table.get(sm_table.PER_KERNEL_KEY) else "dispatch")
            assert got == (chosen, (sm_table.lookup(*key, table, copy=chosen) or {op: 0})[op])
    num_experts, g, x, idx, w = checks.make_inputs(_seed_for(0) + dist.get_rank(), "random", 512, 4, 2,
                                                   torch.bfloat16, "cuda", max_tokens=200)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    got = torch_ep.dispatch(x, idx, w, num_experts=num_experts, group=group)
    checks.check_result(got, expected)
    comb = torch_ep.combine(got.recv_x, got.handle, got.recv_topk_weights, group=group)
    ref = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights)
    assert same_bits(comb.combined_x.cpu(), ref.combined_x)
    assert torch.equal(comb.combined_topk_weights.cpu(), ref.combined_topk_weights)
    dist.destroy_process_group(group)


@pytest.mark.parametrize("copy", ["bulk", "unroll", "warp"])
def test_copy_variant_through_options(cuda_pool, copy):
    """Options(moe_copy=...) on a new group, beside the default group's kernels (auto's pick)."""
    cuda_pool.run(rank_copy_options, copy)


def test_auto_copy_takes_the_tables_variant(cuda_pool):
    """Options(moe_copy="auto", num_sms=0): the group runs the variant and budgets that
    sm_table.choose_copy picks for this GPU and group, bit for bit as every variant."""
    cuda_pool.run(rank_copy_options, "auto", 0)


# A table's sweep (rank_write_mixed_table) where each kernel's best is another variant's, at its own budget.
MIXED_PEAKS = {"warp": {"dispatch": (3, 100.0), "dispatch_fp8": (3, 50.0), "combine": (3, 50.0)},
               "bulk": {"dispatch": (2, 50.0), "dispatch_fp8": (2, 100.0), "combine": (2, 50.0)},
               "unroll": {"dispatch": (5, 50.0), "dispatch_fp8": (5, 50.0), "combine": (5, 100.0)}}
MIXED_PICKS = {"dispatch": ("warp", 3), "dispatch_fp8": ("bulk", 2), "combine": ("unroll", 5)}


def rank_write_mixed_table(path):
    """Rank 0 writes, for this GPU and group, a table whose one sweep picks MIXED_PICKS."""
    from torch_ep import sm_table

    if dist.get_rank() == 0:
        ranks = dist.get_world_size()
        entries = [sm_table.derive_entry({op: {1: 10.0, sms: gbps} for op, (sms, gbps) in peaks.items()},
                                         device=torch.cuda.get_device_name(), ranks=ranks,
                                         ranks_per_gpu=-(-ranks // torch.cuda.device_count()), copy=copy,
                                         measured={"commit": "test", "date": "today"})
                   for copy, peaks in MIXED_PEAKS.items()]
        with open(path, "w") as f:
            json.dump({sm_table.PER_KERNEL_KEY: True, "entries": entries}, f)
    dist.barrier()


def rank_kernels_per_op(seed):
    from torch_ep import sm_table

    assert sm_table.settings(torch_ep.get_backend().config) == MIXED_PICKS
    rank_copy_variant(seed)


def test_auto_copy_per_kernel(cuda_pool, tmp_path):
    """Options.moe_copy="auto" on a table of one's own (TORCH_EP_SM_TABLE) that picks another
    variant and budget for each kernel: a group whose bf16 dispatch runs warp on 3 SMs, fp8
    dispatch bulk on 2 and combine unroll on 5, through every check of test_copy_variant (combine
    of a dispatch by another variant, along the same handle), bit for bit."""
    path = tmp_path / "sm_table.json"
    cuda_pool.run(rank_write_mixed_table, str(path))
    pool = rank_pool(cuda_pool.world_size, cuda=True,
                     env={"TORCH_EP_SM_TABLE": str(path), "TORCH_EP_MOE_COPY": "auto", "TORCH_EP_NUM_SMS": "0"})
    pool.run(rank_kernels_per_op, _seed())


# ----------------------------------------------------------------------------- push (Options.moe_push)
