"""torch_ep.all_to_all_v on CPU tensors (the GPU file runs the same rank functions on CUDA).

Fresh random data every call, outputs poisoned first, results compared bit for bit with
torch_ep.reference.all_to_all_v (built on all_to_all_single).
"""
import pytest
import torch
import torch.distributed as dist

import test_all_to_all as all_to_all_checks
import torch_ep
from conftest import rank_pool
from torch_ep import reference
from torch_ep.testing import poison_, random_tensor, same_bits

DTYPES = [torch.float32, torch.bfloat16, torch.float8_e4m3fn, torch.bool, torch.int8, torch.int64, torch.complex64]
ROW_SHAPES = [(), (5,), (2, 3)]


def split_matrix(kind: str, size: int, seed: int) -> torch.Tensor:
    """[src, dst] rows sent, the same on every rank (seeded by `seed` alone): test_all_to_all's
    kinds, and "random", which also has a rank that receives nothing."""
    if kind != "random":
        return all_to_all_checks.split_matrix(kind, size, seed)
    g = torch.Generator().manual_seed(seed)
    m = torch.randint(0, 6, (size, size), generator=g)
    m[int(torch.randint(0, size, (1,), generator=g)), :] = 0   # a rank that sends nothing
    m[:, int(torch.randint(0, size, (1,), generator=g))] = 0   # a rank that receives nothing
    return m


def _case(kind, seed, dtype, row_shape, device):
    rank, size = dist.get_rank(), dist.get_world_size()
    m = split_matrix(kind, size, seed)
    splits = m[rank].to(device)
    g = torch.Generator().manual_seed(seed * 131 + rank)
    inp = random_tensor((int(m[rank].sum()), *row_shape), dtype, g, device)
    return m, splits, inp, int(m[:, rank].sum())


def _bytes_past(t, rows):
    """The raw bytes of t's rows from `rows` on (a bool clone would normalise poisoned bytes)."""
    flat = t.contiguous().reshape(-1).view(torch.uint8)
    return flat[rows * (flat.numel() // max(t.shape[0], 1)):].clone()


def _reported(device):
    """Where the device finds a problem (CUDA, given output) it raises after a synchronisation."""
    if device == "cuda":
        torch.cuda.synchronize()
        torch_ep.check_errors()


def _check_result(res, expected, what):
    assert same_bits(res.output_splits, expected.output_splits), f"{what}: output_splits"
    assert same_bits(res.output_offsets, expected.output_offsets), f"{what}: output_offsets"
    assert res.output_splits.device == expected.output_splits.device, f"{what}: output_splits on the wrong device"
    assert res.work is None


def rank_given_and_allocated(seed, device="cpu"):
    i = 0
    for dtype in DTYPES:
        for row_shape in ROW_SHAPES:
            for kind in ("random", "zeros", "to_one"):
                i += 1
                if (dtype != torch.float32 and row_shape != (5,)) and kind != "random":
                    continue  # every dtype and shape once; every kind with float32 [*, 5]
                m, splits, inp, total = _case(kind, seed + i, dtype, row_shape, device)
                what = f"{dtype} {row_shape} {kind}"
                expected = reference.all_to_all_v(inp, splits)
                res = torch_ep.all_to_all_v(inp, splits)  # allocated: exactly the received rows
                assert res.output.shape == (total, *row_shape), what
                assert same_bits(res.output, expected.output), f"{what}: allocated output differs"
                _check_result(res, expected, what)
                extra = (seed + i) % 4
                out = poison_(torch.empty((total + extra, *row_shape), dtype=dtype, device=device))
                untouched = _bytes_past(out, total)
                res = torch_ep.all_to_all_v(inp, splits, output=out)
                assert res.output is out, what
                assert same_bits(out[:total], expected.output), f"{what}: given output differs"
                assert torch.equal(_bytes_past(out, total), untouched), f"{what}: rows past the received ones were written"
                _check_result(res, expected, what)
    # A non-contiguous input and output.
    m, splits, inp, total = _case("random", seed, torch.float32, (6,), device)
    strided_in = inp.t().contiguous().t()
    storage = poison_(torch.empty(total + 2, 12, device=device))
    res = torch_ep.all_to_all_v(strided_in, splits, output=storage[:, ::2])
    assert same_bits(storage[:total, ::2], reference.all_to_all_v(inp, splits).output)
    assert torch.isnan(storage[:, 1::2]).all() and torch.isnan(storage[total:]).all(), "wrote outside the output"
    return torch_ep.get_backend().cuda_path if device == "cuda" else torch_ep.get_backend().host_path


def test_given_and_allocated_outputs(pool):
    paths = pool.run(rank_given_and_allocated, seed=torch.randint(0, 2**30, ()).item())
    assert paths == ["shm"] * pool.world_size  # the data went over torch_ep's own transport


def rank_overflow(seed, device="cpu"):
    """The last rank gets every row (to_one) into an output one row too small: it raises and
    writes nothing; the others' calls complete; then the group keeps working."""
    rank, size = dist.get_rank(), dist.get_world_size()
    m, splits, inp, total = _case("to_one", seed, torch.float32, (3,), device)
    expected = reference.all_to_all_v(inp, splits)
    short = rank == size - 1
    out = poison_(torch.empty(total - 1 if short else total + 1, 3, device=device))
    before = out.clone()
    error = None
    try:
        torch_ep.all_to_all_v(inp, splits, output=out)
        _reported(device)
    except RuntimeError as e:
        error = str(e)
    if short:
        assert error is not None, "the overflowing rank did not raise"
        assert "output" in error and f"room for {total - 1} rows" in error and f"{total} rows arrived" in error, error
        assert same_bits(out, before), "an overflowing call wrote its output"
    else:
        assert error is None, error
        assert same_bits(out[:total], expected.output) and same_bits(out[total:], before[total:])
    # The group still works, on this op and on all_to_all_single.
    m, splits, inp, total = _case("random", seed + 1, torch.float32, (3,), device)
    res = torch_ep.all_to_all_v(inp, splits)
    assert same_bits(res.output, reference.all_to_all_v(inp, splits).output)


def test_overflow_refused_and_group_keeps_working(pool):
    pool.run(rank_overflow, seed=torch.randint(0, 2**30, ()).item())


def _error_of(fn):
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return type(e), str(e)
    return None


def rank_bad_input(device="cpu"):
    rank, size = dist.get_rank(), dist.get_world_size()
    x = torch.randn(2 * size, 4, device=device)
    good = torch.full((size,), 2, dtype=torch.int64, device=device)
    out = poison_(torch.empty(2 * size, 4, device=device))
    before = out.clone()
    cases = {
        "float splits": (lambda: torch_ep.all_to_all_v(x, good.float(), output=out), TypeError,
                         ["input_splits", "int64"]),
        "short splits": (lambda: torch_ep.all_to_all_v(x, good[:-1], output=out), ValueError,
                         ["input_splits", f"[{size}]"]),
        "2-D splits": (lambda: torch_ep.all_to_all_v(x, good.view(1, size), output=out), ValueError,
                       ["input_splits"]),
        "list splits": (lambda: torch_ep.all_to_all_v(x, [2] * size), TypeError, ["input_splits"]),
        "output dtype": (lambda: torch_ep.all_to_all_v(x, good, output=out.double()), TypeError,
                         ["output", "dtype"]),
        "output shape": (lambda: torch_ep.all_to_all_v(x, good, output=out[:, :3]), ValueError, ["output", "shape"]),
        "0-d input": (lambda: torch_ep.all_to_all_v(x[0, 0], good), ValueError, ["input"]),
    }
    if device == "cuda":
        cases["splits on cpu"] = (lambda: torch_ep.all_to_all_v(x, good.cpu(), output=out), ValueError,
                                  ["input_splits", "device"])
    # Only the data can tell: every rank raises through the exchange, before any data moves.
    wrong_sum = good.clone()
    wrong_sum[0] += 1 if rank == 0 else 0
    negative = good.clone()
    negative[0], negative[1 % size] = (-1, 2 * size + 1) if rank == size - 1 and size > 1 else (2, 2)
    cases["sum"] = (lambda: (torch_ep.all_to_all_v(x, wrong_sum, output=out), _reported(device)), ValueError,
                    ["input_splits", "sum to"] if rank == 0 else ["rank 0", "input_splits"])
    if size > 1:
        cases["negative"] = (lambda: (torch_ep.all_to_all_v(x, negative, output=out), _reported(device)), ValueError,
                             ["input_splits[0]", "-1"] if rank == size - 1 else [f"rank {size - 1}", "input_splits"])
    cases["sum, allocated"] = (lambda: torch_ep.all_to_all_v(x, wrong_sum), ValueError,
                               ["input_splits", "sum to"] if rank == 0 else ["rank 0", "input_splits"])
    problems = []
    for name, (fn, kind, words) in cases.items():
        err = _error_of(fn)
        if err is None or not issubclass(err[0], kind) or not all(w in err[1] for w in words):
            problems.append(f"{name}: expected {kind.__name__} naming {words}, got {err}")
    assert not problems, "\n".join(problems)
    assert same_bits(out, before), "a refused call wrote its output"
    torch_ep.all_to_all_v(x, good, output=out)  # the group still works
    assert same_bits(out, reference.all_to_all_v(x, good).output)


def test_bad_input_raises_naming_the_argument(pool):
    pool.run(rank_bad_input)


def rank_autograd(seed, device="cpu"):
    """The backward sends each gradient row back where its row came from: with loss =
    sum(output * w), input's gradient is w's received rows sent back, i.e. the reference's
    all_to_all_v of w along output_splits."""
    for given in (False, True):
        m, splits, inp, total = _case("random", seed + given, torch.float64, (3,), device)
        x = inp.clone().requires_grad_()
        out = poison_(torch.empty(total + 2, 3, dtype=torch.float64, device=device)) if given else None
        res = torch_ep.all_to_all_v(x, splits, output=out)
        expected = reference.all_to_all_v(inp, splits)
        assert same_bits(res.output[:total], expected.output)
        assert res.output.requires_grad
        g = torch.Generator().manual_seed(seed + 17 + dist.get_rank())
        w = torch.randn(res.output.shape, generator=g, dtype=torch.float64).to(device)
        (res.output[:total] * w[:total]).sum().backward()  # rows past the received ones get no gradient
        back = reference.all_to_all_v(w[:total].contiguous(), res.output_splits)
        assert same_bits(x.grad, back.output), f"given={given}: input's gradient differs"


def test_autograd(pool):
    pool.run(rank_autograd, seed=torch.randint(0, 2**30, ()).item())


def rank_async(seed, device="cpu"):
    calls = []
    for i in range(4):
        m, splits, inp, total = _case("random", seed + i, torch.float32, (4,), device)
        out = poison_(torch.empty(total, 4, device=device)) if i % 2 else None
        calls.append((inp, splits, torch_ep.all_to_all_v(inp, splits, output=out, async_op=True)))
    for inp, splits, res in calls:
        assert res.work is not None and res.work.wait()
        expected = reference.all_to_all_v(inp, splits)
        assert same_bits(res.output, expected.output) and same_bits(res.output_splits, expected.output_splits)


def test_async_op(pool4):
    pool4.run(rank_async, seed=torch.randint(0, 2**30, ()).item())


def rank_compiled(seed, device="cpu"):
    """torch_ep.all_to_all_v traces as one graph under torch.compile(fullgraph=True) with the
    default backend (inductor): a given output keeps static shapes (no unbacked size), an
    allocated one gets an unbacked row count, and the backward (into a given output) is compiled
    too."""
    import torch._dynamo
    from test_compile import inductor_recording, ops_in, unbacked_symbols

    def given(x, s, out):
        r = torch_ep.all_to_all_v(x, s, output=out)
        return r.output * 2, r.output_splits, r.output_offsets

    def allocated(x, s):
        return torch_ep.all_to_all_v(x, s).output + 1

    def loss(x, s, out, w):
        r = torch_ep.all_to_all_v(x, s, output=out)
        return (r.output * w).nansum()  # rows past the received ones are poison: no gradient flows there

    torch._dynamo.reset()
    m, splits, inp, total = _case("random", seed, torch.float32, (4,), device)
    expected = reference.all_to_all_v(inp, splits)
    out = poison_(torch.empty(total + 1, 4, device=device))
    graphs = []
    doubled, s, offsets = torch.compile(given, fullgraph=True, backend=inductor_recording(graphs))(inp, splits, out)
    assert same_bits(doubled[:total], expected.output * 2) and same_bits(out[:total], expected.output)
    assert same_bits(s, expected.output_splits) and same_bits(offsets, expected.output_offsets)
    assert len(graphs) == 1 and "ep.all_to_all_v" in str(ops_in(graphs)), ops_in(graphs)
    assert not unbacked_symbols(graphs), unbacked_symbols(graphs)
    with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
        plus = torch.compile(allocated, fullgraph=True)(inp, splits)
    assert same_bits(plus, expected.output + 1)
    x = inp.clone().requires_grad_()
    g = torch.Generator().manual_seed(seed + 5 + dist.get_rank())
    w = torch.randint(1, 5, (total + 1, 4), generator=g).float().to(device)
    torch.compile(loss, fullgraph=True)(x, splits, poison_(torch.empty_like(out)), w).backward()
    assert same_bits(x.grad, reference.all_to_all_v(w[:total].contiguous(), expected.output_splits).output)


@pytest.mark.parametrize("world_size", [2])
def test_torch_compile(world_size):
    rank_pool(world_size).run(rank_compiled, seed=torch.randint(0, 2**30, ()).item())
