"""Fuzz: random shapes, dtypes and split matrices for all_to_all_single and all_to_all, and
random routes for dispatch/combine, each against torch_ep.reference with poisoned outputs.

Extremes are drawn on purpose: everything to one rank, ranks that send and receive nothing, all
splits zero, one huge message (4-16 MiB, past the ring and the one-copy threshold),
non-contiguous inputs and outputs (handled: the outputs' other elements stay untouched).

Reproducible: every rank derives case i from (seed, i) alone. The seed is random unless
TORCH_EP_FUZZ_SEED sets it, and every failure names it and the case; TORCH_EP_FUZZ_CASES sets
the number of cases per test (CI default below: bounded time). The rank functions take a device,
so the same cases run on CUDA (the tests at the end, on GPU machines).
"""
import os
import random

import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import cuda_world_sizes, rank_pool
from test_moe import _poison_cache, check_result, make_routing
from torch_ep import reference
from torch_ep.testing import poison_, random_tensor, same_bits

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.float8_e4m3fn, torch.complex64,
          torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
MOE_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SPLIT_KINDS = ["random", "random", "to_one", "from_one", "empty_ranks", "zeros", "huge"]
ROUTE_KINDS = ["random", "random", "one_expert", "unrouted", "repeated", "empty_rank"]


def _cases(default):
    return int(os.environ.get("TORCH_EP_FUZZ_CASES", default))


def _seed():
    return int(os.environ.get("TORCH_EP_FUZZ_SEED", random.randrange(2**31)))


# ----------------------------------------------------------------------------- all_to_all

def all_to_all_case(seed, case, size):
    """Case `case`'s parameters: the same on every rank."""
    r = random.Random(seed * 1_000_003 + case)
    kind = r.choice(SPLIT_KINDS)
    dtype = r.choice(DTYPES)
    row_shape = tuple(r.randint(1, 7) for _ in range(r.choice([0, 1, 1, 2, 3])))
    row_bytes = max(1, int(torch.tensor(row_shape).prod())) * torch.empty(0, dtype=dtype).element_size()
    m = torch.tensor([[r.randint(0, 8) for _ in range(size)] for _ in range(size)])
    if kind == "to_one":
        m.zero_()
        m[:, r.randrange(size)] = torch.tensor([r.randint(1, 30) for _ in range(size)])
    elif kind == "from_one":
        m.zero_()
        m[r.randrange(size)] = torch.tensor([r.randint(1, 30) for _ in range(size)])
    elif kind == "empty_ranks":
        for q in r.sample(range(size), r.randint(1, size)):
            m[q, :] = 0
            m[:, q] = 0
    elif kind == "zeros":
        m.zero_()
    elif kind == "huge":
        m[r.randrange(size), r.randrange(size)] = r.randint(4 << 20, 16 << 20) // row_bytes
    form = r.choice(["single", "single", "single_async", "list"])
    if kind != "huge" and r.random() < 0.2 and form != "list":
        m[:] = m[0, 0]  # an even split, passed without split sizes
        form = "even"
    layout = {"input": r.choice(["contiguous", "contiguous", "transposed", "strided"]),
              "output": r.choice(["contiguous", "contiguous", "strided"])}
    return dict(kind=kind, dtype=dtype, row_shape=row_shape, splits=m, form=form, layout=layout)


def _input(rows, row_shape, dtype, how, g, device):
    """rows x row_shape of fresh data, laid out contiguously or not."""
    if how == "transposed" and row_shape:  # built as [row_shape[-1], ..., rows], seen as [rows, ...]
        t = random_tensor((*row_shape[::-1], rows), dtype, g, device)
        return t.permute(*range(t.dim() - 1, -1, -1))
    if how == "strided":  # every other row of a twice-as-long tensor
        return random_tensor((2 * rows, *row_shape), dtype, g, device)[::2]
    return random_tensor((rows, *row_shape), dtype, g, device)


def _output(rows, row_shape, dtype, how, device):
    """A poisoned output, and the storage it views when it is strided (every other row)."""
    if how == "strided":
        storage = poison_(torch.empty((2 * rows, *row_shape), dtype=dtype, device=device))
        return storage[1::2], storage
    return poison_(torch.empty((rows, *row_shape), dtype=dtype, device=device)), None


def _check_output(out, storage, expected, what):
    """`out` holds `expected`, bit for bit; a strided output's storage is otherwise untouched.
    Compared as raw bytes: copying a non-contiguous bool tensor would normalise poison bytes."""
    if storage is None:
        assert same_bits(out, expected), f"{what}: output differs from the reference"
        return
    want = poison_(torch.empty_like(storage, device="cpu"))
    want[1::2] = expected
    got = storage.cpu().reshape(-1).view(torch.uint8)
    ok = torch.equal(got, want.reshape(-1).view(torch.uint8))
    if not ok and same_bits(out, expected):
        raise AssertionError(f"{what}: wrote outside the output view")
    assert ok, f"{what}: output differs from the reference"


def run_all_to_all_case(p, seed, case, device):
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(seed * 7919 + case * 131 + rank)
    m, dtype, row_shape = p["splits"], p["dtype"], p["row_shape"]
    in_splits, out_splits = m[rank].tolist(), m[:, rank].tolist()
    what = f"fuzz seed {seed}, case {case}: {p['kind']} {p['form']} {dtype} rows {row_shape} {p['layout']}"
    if p["form"] == "list":
        inputs = [_input(n, row_shape, dtype, p["layout"]["input"], g, device) for n in in_splits]
        pairs = [_output(n, row_shape, dtype, p["layout"]["output"], device) for n in out_splits]
        dist.all_to_all([o for o, _ in pairs], inputs)
        expected = reference.all_to_all(inputs)
        for src, ((out, storage), want) in enumerate(zip(pairs, expected)):
            _check_output(out, storage, want, f"{what}, block from rank {src}")
        return
    x = _input(sum(in_splits), row_shape, dtype, p["layout"]["input"], g, device)
    out, storage = _output(sum(out_splits), row_shape, dtype, p["layout"]["output"], device)
    if p["form"] == "even":
        dist.all_to_all_single(out, x)
        expected = reference.all_to_all_single(out.shape, x)
    else:
        work = dist.all_to_all_single(out, x, out_splits, in_splits, async_op=p["form"] == "single_async")
        if work is not None:
            work.wait()
        expected = reference.all_to_all_single(out.shape, x, out_splits, in_splits)
    _check_output(out, storage, expected, what)


def rank_fuzz_all_to_all(seed, cases, device="cpu"):
    kinds = {}
    for case in range(cases):
        p = all_to_all_case(seed, case, dist.get_world_size())
        run_all_to_all_case(p, seed, case, device)
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    return kinds


# ----------------------------------------------------------------------------- dispatch / combine

def moe_case(seed, case, size):
    r = random.Random(seed * 1_000_033 + case)
    experts_per_rank = r.randint(1, 4)
    return dict(
        kind=r.choice(ROUTE_KINDS), dtype=r.choice(MOE_DTYPES),
        hidden=r.choice([1, 2, 7, 64, 130, 513, r.randint(1, 300), 7168 if r.random() < 0.1 else 96]),
        top_k=r.randint(1, min(9, experts_per_rank * size)), experts_per_rank=experts_per_rank,
        max_tokens=r.choice([1, 8, 40, 130]), alignment=r.choice([1, 1, 2, 4, 8]),
        weights=r.random() < 0.8, fp8=r.random() < 0.2, worst=r.random() < 0.2, async_op=r.random() < 0.3,
        x_layout=r.choice(["contiguous", "contiguous", "transposed", "column_slice"]),
        idx_layout=r.choice(["contiguous", "contiguous", "transposed"]), again=r.random() < 0.5)


def _laid_out(t, how):
    """The same values as `t`, in a non-contiguous tensor when `how` asks for one."""
    if how == "transposed" and t.dim() == 2:
        return t.t().contiguous().t()
    if how == "column_slice" and t.dim() == 2:
        wide = torch.empty(t.shape[0], t.shape[1] + 3, dtype=t.dtype, device=t.device)
        wide[:, 1:-2] = t
        return wide[:, 1:-2]
    return t


def _rows(payload):
    return payload[0].shape[0] if isinstance(payload, tuple) else payload.shape[0]


def _trimmed(result, m):
    """A num_worst_tokens result cut to its first m (real) rows."""
    cut = (lambda t: t[:m]) if m is not None else (lambda t: t)
    x = tuple(cut(t) for t in result.recv_x) if isinstance(result.recv_x, tuple) else cut(result.recv_x)
    weights = cut(result.recv_topk_weights) if result.recv_topk_weights is not None else None
    return _with(result, recv_x=x, recv_topk_idx=cut(result.recv_topk_idx), recv_topk_weights=weights)


def _with(result, **changes):
    """A copy of a DispatchResult with `changes` (it is not a dataclass: no dataclasses.replace)."""
    fields = dict(recv_x=result.recv_x, recv_topk_idx=result.recv_topk_idx, recv_topk_weights=result.recv_topk_weights,
                  num_recv_tokens_per_expert=result.num_recv_tokens_per_expert, handle=result.handle,
                  work=result.work, expert_alignment=result.expert_alignment)
    return torch_ep.DispatchResult(**{**fields, **changes})


def run_moe_case(p, seed, case, device):
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed * 6151 + case * 37 + rank)
    num_experts = p["experts_per_rank"] * size
    what = f"fuzz seed {seed}, case {case}: {p}"
    num_tokens = 0 if (p["kind"] == "empty_rank" and rank == size - 1) else int(
        torch.randint(0, p["max_tokens"] + 1, (), generator=g))
    idx = make_routing(p["kind"], g, num_tokens, p["top_k"], num_experts, rank, size)
    x = torch.randint(-60, 60, (num_tokens, p["hidden"]), generator=g).to(p["dtype"])
    w = torch.randint(1, 9, idx.shape, generator=g).float() / 8 if p["weights"] else None
    payload = x
    if p["fp8"]:
        payload = (x.float().to(torch.float8_e4m3fn), torch.rand(num_tokens, (p["hidden"] + 127) // 128, generator=g))
    expected = reference.dispatch(payload, idx, w, num_experts=num_experts, expert_alignment=p["alignment"])
    m = _rows(expected.recv_x)
    worst = 0
    if p["worst"]:  # fixed-size outputs that must hold every rank's rows: agree on the largest
        t = torch.tensor([m + int(torch.randint(0, 5, (), generator=g))])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        worst = max(int(t), 1)

    def on_device(t):
        return _laid_out(t.to(device), p["x_layout"]) if t is not None else None

    def route(t):
        return _laid_out(t.to(device), p["idx_layout"]) if t is not None else None

    sent = tuple(on_device(t) for t in payload) if p["fp8"] else on_device(x)
    _poison_cache(device, max(m, worst, 1) * p["hidden"] * 4)
    got = torch_ep.dispatch(sent, route(idx), route(w), num_experts=num_experts, expert_alignment=p["alignment"],
                            num_worst_tokens=worst, async_op=p["async_op"])
    if got.work is not None:
        got.work.wait()
    try:
        if worst:
            assert _rows(got.recv_x) == worst, f"{_rows(got.recv_x)} rows, expected num_worst_tokens={worst}"
            assert bool((got.recv_topk_idx[m:] == -1).all()), "padding rows are routed"
            real = _trimmed(got, m)
            if device != "cpu" and all(c == -1 for c in real.num_recv_tokens_per_expert):
                # A CUDA dispatch with num_worst_tokens leaves the counts on the device.
                real = _with(real, num_recv_tokens_per_expert=expected.num_recv_tokens_per_expert)
            check_result(real, expected)
        else:
            check_result(got, expected)
    except AssertionError as e:
        raise AssertionError(f"{what}: dispatch: {e}") from None
    if p["fp8"]:
        return  # combine takes bf16/fp16/fp32 rows; the fp8 pair only travels one way

    # Combine what arrived, scaled by (rank + 1), with its weights: the reverse route. Padding
    # rows (num_worst_tokens) carry junk that must not reach any token.
    back = (expected.recv_x.float() * (rank + 1)).to(p["dtype"])
    ref = reference.combine(back, expected.handle, expected.recv_topk_weights)
    if worst:
        back = torch.cat([back, torch.full((worst - m, p["hidden"]), 7, dtype=p["dtype"])])
    _poison_cache(device, max(num_tokens, 1) * p["hidden"] * 4)
    comb = torch_ep.combine(on_device(back), got.handle, got.recv_topk_weights, async_op=p["async_op"])
    if comb.work is not None:
        comb.work.wait()
    assert same_bits(comb.combined_x.cpu(), ref.combined_x), f"{what}: combined_x differs from the reference"
    if w is not None:
        assert torch.equal(comb.combined_topk_weights.cpu(), ref.combined_topk_weights), f"{what}: weights differ"
    if p["again"]:  # new data along the same route
        x2 = torch.randint(-60, 60, (num_tokens, p["hidden"]), generator=g).to(p["dtype"])
        again = torch_ep.dispatch(on_device(x2), handle=got.handle, expert_alignment=p["alignment"])
        want = reference.dispatch(x2, handle=expected.handle, expert_alignment=p["alignment"])
        assert same_bits(again.recv_x[:m].cpu(), want.recv_x), f"{what}: re-dispatch along the handle differs"


def rank_fuzz_moe(seed, cases, device="cpu"):
    kinds = {}
    for case in range(cases):
        p = moe_case(seed, case, dist.get_world_size())
        run_moe_case(p, seed, case, device)
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + 1
    return kinds


# ----------------------------------------------------------------------------- tests

def test_fuzz_all_to_all(pool):
    seed = _seed()
    print(f"TORCH_EP_FUZZ_SEED={seed}")
    kinds = pool.run(rank_fuzz_all_to_all, seed, _cases(100))[0]
    assert sum(kinds.values()) == _cases(100)


def test_fuzz_dispatch_combine(pool):
    seed = _seed()
    print(f"TORCH_EP_FUZZ_SEED={seed}")
    kinds = pool.run(rank_fuzz_moe, seed, _cases(60))[0]
    assert sum(kinds.values()) == _cases(60)


def test_cases_cover_the_extremes():
    """The case generator draws every kind of split, route and layout within the default
    number of cases (whatever the seed: checked for 20 seeds)."""
    for seed in range(20):
        cases = [all_to_all_case(seed, c, 4) for c in range(100)]
        assert {p["kind"] for p in cases} >= {"to_one", "empty_ranks", "huge", "random"}, seed
        assert any(p["layout"]["input"] != "contiguous" for p in cases)
        assert any(p["layout"]["output"] != "contiguous" for p in cases)
        routes = [moe_case(seed, c, 4) for c in range(60)]
        assert {p["x_layout"] for p in routes} > {"contiguous"}, seed


cuda = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                          reason="needs CUDA and a CUDA build of torch_ep")


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    return rank_pool(request.param, cuda=True)


@cuda
def test_fuzz_all_to_all_cuda(cuda_pool):
    seed = _seed()
    print(f"TORCH_EP_FUZZ_SEED={seed}")
    cuda_pool.run(rank_fuzz_all_to_all, seed, _cases(100), device="cuda")


@cuda
def test_fuzz_dispatch_combine_cuda(cuda_pool):
    seed = _seed()
    print(f"TORCH_EP_FUZZ_SEED={seed}")
    cuda_pool.run(rank_fuzz_moe, seed, _cases(60), device="cuda")


@cuda
@pytest.mark.parametrize("copy,sms", [("bulk", 1), ("bulk", 3), ("unroll", 2), ("unroll", 5)])
def test_fuzz_dispatch_combine_cuda_copy_variants(copy, sms):
    """The CUDA dispatch/combine fuzz on the copy variants (TORCH_EP_MOE_COPY) with few SMs: their
    own kernels where rows are multiples of 16 bytes, the warp kernels' fallback elsewhere."""
    pool = rank_pool(cuda_world_sizes()[0], cuda=True, env={"TORCH_EP_MOE_COPY": copy, "TORCH_EP_NUM_SMS": str(sms)})
    seed = _seed()
    print(f"TORCH_EP_FUZZ_SEED={seed} (TORCH_EP_MOE_COPY={copy}, TORCH_EP_NUM_SMS={sms})")
    pool.run(rank_fuzz_moe, seed, _cases(40), device="cuda")
