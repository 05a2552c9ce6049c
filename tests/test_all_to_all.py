"""all_to_all_single and all_to_all on CPU tensors over the "ep" backend (shared-memory path).

Every check draws fresh random data, poisons the output first and compares bit for bit with
torch_ep.reference, which goes through all_gather_object instead of torch_ep's transport.
"""
import pytest
import torch
import torch.distributed as dist

import torch_ep
from torch_ep import reference
from torch_ep.testing import poison_, random_tensor, same_bits, where_bits_differ

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2,
          torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.complex64]


def split_matrix(kind: str, size: int, seed: int) -> torch.Tensor:
    """[src, dst] rows sent; the same on every rank (seeded by `seed` alone)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "even":
        return torch.full((size, size), 3, dtype=torch.int64)
    if kind == "uneven":
        m = torch.randint(0, 6, (size, size), generator=g)
        m[torch.randint(0, size, (1,), generator=g), :] = 0  # a rank that sends nothing
        return m
    if kind == "zeros":
        return torch.zeros(size, size, dtype=torch.int64)
    if kind == "to_one":
        m = torch.zeros(size, size, dtype=torch.int64)
        m[:, size - 1] = torch.randint(1, 5, (size,), generator=g)
        return m
    raise ValueError(kind)


def check_single(dtype, kind, row_shape, seed, group=None, even_call=False, device="cpu"):
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    m = split_matrix(kind, size, seed)
    in_splits, out_splits = m[rank].tolist(), m[:, rank].tolist()
    g = torch.Generator().manual_seed(seed * 131 + rank)
    inp = random_tensor((sum(in_splits), *row_shape), dtype, g, device)
    out = poison_(torch.empty((sum(out_splits), *row_shape), dtype=dtype, device=device))
    if even_call:  # no split lists: the even split
        dist.all_to_all_single(out, inp, group=group)
        expected = reference.all_to_all_single(out.shape, inp, group=group)
    else:
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
        expected = reference.all_to_all_single(out.shape, inp, out_splits, in_splits, group=group)
    assert same_bits(out, expected), f"{dtype} {kind} {row_shape}: output differs from the reference"


def rank_all_dtypes(seed, device="cpu"):
    for i, dtype in enumerate(DTYPES):
        for kind in ("even", "uneven", "zeros", "to_one"):
            check_single(dtype, kind, (5,), seed + i, device=device)
    check_single(torch.float32, "even", (), seed, even_call=True, device=device)  # 1-D tensors
    check_single(torch.bfloat16, "even", (2, 3), seed, even_call=True, device=device)
    backend = torch_ep.get_backend()
    return backend.cuda_path if device == "cuda" else backend.host_path


def test_all_dtypes_and_splits(pool):
    paths = pool.run(rank_all_dtypes, seed=torch.randint(0, 2**30, ()).item())
    assert paths == ["shm"] * pool.world_size  # our transport, not the Gloo fallback


def rank_larger_than_buffers(seed):
    # About 3 MiB per message: one copy by process_vm_readv where the kernel allows it...
    check_single(torch.float32, "uneven", (150_000,), seed)
    # ...and through the ring (8 x 256 KiB per pair) when that path is off.
    ring = dist.new_group(pg_options=torch_ep.Options(host_one_copy=False))
    try:
        check_single(torch.float32, "uneven", (150_000,), seed + 1, group=ring)
        assert torch_ep.get_backend(ring).host_path == "shm" and not torch_ep.get_backend(ring).host_one_copy
    finally:
        dist.destroy_process_group(ring)
    # A tiny ring on a second group: every message crosses many slot boundaries.
    group = dist.new_group(pg_options=torch_ep.Options(host_slot_bytes=64, host_num_slots=2))
    try:
        for i, kind in enumerate(("even", "uneven", "to_one")):
            check_single(torch.int16, kind, (37,), seed + i, group=group)
    finally:
        dist.destroy_process_group(group)


def test_messages_larger_than_buffers(pool):
    pool.run(rank_larger_than_buffers, seed=torch.randint(0, 2**30, ()).item())


def rank_async_and_ordering(seed, device="cpu"):
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed + rank)
    inputs = [torch.randn(size * (i + 1), 4, generator=g).to(device) for i in range(6)]
    outputs = [poison_(torch.empty_like(x)) for x in inputs]
    works = [dist.all_to_all_single(o, x, async_op=True) for o, x in zip(outputs, inputs)]
    futures = [w.get_future() for w in works]
    for w, f, o in zip(works, futures, outputs):
        assert w.wait()
        value = f.wait()
        assert len(value) == 1 and value[0] is o or torch.equal(value[0], o)
    for o, x in zip(outputs, inputs):
        assert same_bits(o, reference.all_to_all_single(o.shape, x))


def test_async_op_and_future(pool):
    pool.run(rank_async_and_ordering, seed=torch.randint(0, 2**30, ()).item())


def rank_non_contiguous(seed, device="cpu"):
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed + rank)
    base = torch.randn(6, size * 2, generator=g).to(device)
    inp = base.t()  # [size*2, 6], not contiguous
    out_storage = poison_(torch.empty(size * 2, 12, device=device))
    out = out_storage[:, ::2]  # [size*2, 6], strided
    dist.all_to_all_single(out, inp)
    assert same_bits(out.contiguous(), reference.all_to_all_single(out.shape, inp.contiguous()))
    assert torch.isnan(out_storage[:, 1::2]).all(), "wrote outside the output view"


def test_non_contiguous(pool):
    pool.run(rank_non_contiguous, seed=torch.randint(0, 2**30, ()).item())


def rank_list_form(seed, device="cpu"):
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, 4, (size, size), generator=g)  # rows[src][dst]
    gl = torch.Generator().manual_seed(seed + 7 + rank)
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        inputs = [random_tensor((int(rows[rank][d]), 3), dtype, gl, device) for d in range(size)]
        outputs = [poison_(torch.empty(int(rows[s][rank]), 3, dtype=dtype, device=device)) for s in range(size)]
        dist.all_to_all(outputs, inputs)
        expected = reference.all_to_all(inputs)
        for s in range(size):
            assert same_bits(outputs[s], expected[s]), f"{dtype}: block from rank {s} differs"


def test_list_form(pool):
    pool.run(rank_list_form, seed=torch.randint(0, 2**30, ()).item())


def rank_repeated_calls(seed, iterations):
    rank, size = dist.get_rank(), dist.get_world_size()
    g = torch.Generator().manual_seed(seed + rank)
    shared = torch.Generator().manual_seed(seed)  # sizes every rank agrees on
    for i in range(iterations):
        n = int(torch.randint(0, 50, (), generator=shared).item())
        x = torch.randn(size * n, generator=g)
        y = poison_(torch.empty_like(x))
        dist.all_to_all_single(y, x)
        if i % 50 == 0:
            assert same_bits(y, reference.all_to_all_single(y.shape, x))


def test_repeated_calls(pool4):
    pool4.run(rank_repeated_calls, seed=torch.randint(0, 2**30, ()).item(), iterations=500)


def test_eager_bytes_option(monkeypatch):
    """Options.all_to_all_eager_bytes (TORCH_EP_ALL_TO_ALL_EAGER_BYTES): off by default, 0 or a
    multiple of 16 up to 1 MiB, passed to the group's config."""
    from datetime import timedelta

    monkeypatch.delenv("TORCH_EP_ALL_TO_ALL_EAGER_BYTES", raising=False)
    assert torch_ep.Options().all_to_all_eager_bytes == 0
    monkeypatch.setenv("TORCH_EP_ALL_TO_ALL_EAGER_BYTES", str(64 << 10))
    assert torch_ep.Options().all_to_all_eager_bytes == 64 << 10
    assert torch_ep.Options()._to_config(timedelta(seconds=1)).all_to_all_eager_bytes == 64 << 10
    for bad in (-16, 17, (1 << 20) + 16):
        with pytest.raises(ValueError, match="all_to_all_eager_bytes"):
            torch_ep.Options(all_to_all_eager_bytes=bad)
    assert torch_ep.Options(all_to_all_eager_bytes=1 << 20).all_to_all_eager_bytes == 1 << 20
    assert "TORCH_EP_ALL_TO_ALL_EAGER_BYTES" in torch_ep.options.ENVIRONMENT


def test_kernel_bytes_option(monkeypatch):
    """Options.all_to_all_kernel_bytes (TORCH_EP_ALL_TO_ALL_KERNEL_BYTES): 8 MiB by default, any
    size from 0 (the copy engines for every rank that sends), passed to the group's config."""
    from datetime import timedelta

    monkeypatch.delenv("TORCH_EP_ALL_TO_ALL_KERNEL_BYTES", raising=False)
    assert torch_ep.Options().all_to_all_kernel_bytes == 8 << 20
    monkeypatch.setenv("TORCH_EP_ALL_TO_ALL_KERNEL_BYTES", str(64 << 20))
    assert torch_ep.Options()._to_config(timedelta(seconds=1)).all_to_all_kernel_bytes == 64 << 20
    assert torch_ep.Options(all_to_all_kernel_bytes=0).all_to_all_kernel_bytes == 0
    with pytest.raises(ValueError, match=r"Options.all_to_all_kernel_bytes=-1: expected >= 0"):
        torch_ep.Options(all_to_all_kernel_bytes=-1)
    assert "TORCH_EP_ALL_TO_ALL_KERNEL_BYTES" in torch_ep.options.ENVIRONMENT


def test_where_bits_differ_names_the_bytes_and_source():
    """The GPU tests' failure message (torch_ep.testing.where_bits_differ): how many bytes differ,
    the first and last, its row, and the source rank whose rows hold it."""
    expected = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    got = expected.clone()
    got[3, 1] = float("nan")
    assert not same_bits(got, expected)
    message = where_bits_differ(got, expected, [2, 3, 1])
    assert message.startswith("4 of 96 bytes differ, bytes 52..55 (row 3)"), message
    assert "from rank 1 (rows 2..4)" in message, message
    assert where_bits_differ(expected, expected.clone()) == "no byte differs"
    assert "shape/dtype" in where_bits_differ(expected, expected.double())
