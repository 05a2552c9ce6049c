"""torch_ep.comm_pool where no GPU is: its range allocator's bookkeeping, its option, and the
error a CPU-only build gives. The pool itself is tested in test_cuda_comm_pool.py."""
import random
from datetime import timedelta

import pytest
import torch

import torch_ep
from conftest import rank_pool
from torch_ep import _C

ALIGN = 512


def test_allocator_aligns_and_fits_first():
    a = _C._ArenaAllocator(10 * ALIGN + 100, ALIGN)
    assert a.bytes == 10 * ALIGN  # whole units only
    assert a.allocate(1) == 0 and a.allocate(ALIGN) == ALIGN and a.allocate(ALIGN + 1) == 2 * ALIGN
    assert a.allocate(0) == 4 * ALIGN  # an empty range still takes a unit: offsets stay unique
    assert a.used == 5 * ALIGN and a.num_allocations == 4
    assert a.allocate(6 * ALIGN) is None  # 5 units left
    assert a.allocate(5 * ALIGN) == 5 * ALIGN and a.largest_free == 0
    assert a.allocate(1) is None


def test_allocator_reuses_and_merges_freed_ranges():
    a = _C._ArenaAllocator(8 * ALIGN, ALIGN)
    offsets = [a.allocate(ALIGN) for _ in range(8)]
    assert offsets == [i * ALIGN for i in range(8)]
    for i in (1, 3, 2):  # 1..3 free again, merged whichever order they came back in
        assert a.free(offsets[i]) == ALIGN
    assert a.largest_free == 3 * ALIGN
    assert a.allocate(3 * ALIGN) == ALIGN  # the first range that fits
    a.free(ALIGN)
    a.free(offsets[0])
    a.free(offsets[4])  # 0..4 one range now
    assert a.largest_free == 5 * ALIGN
    with pytest.raises(ValueError, match="was not allocated"):
        a.free(offsets[4])
    with pytest.raises(ValueError, match="power of two"):
        _C._ArenaAllocator(1 << 20, 384)


def test_allocator_random_churn_keeps_its_books():
    """Random allocations and frees against a model: ranges never overlap, every freed byte
    comes back, and once all is freed the arena is one range again."""
    rng = random.Random(1234)
    a = _C._ArenaAllocator(1 << 20, ALIGN)
    live = {}
    for _ in range(3000):
        if live and (rng.random() < 0.45 or len(live) > 60):
            offset = rng.choice(list(live))
            assert a.free(offset) == live.pop(offset)
        else:
            want = rng.choice([0, 1, 100, ALIGN, 3000, 40_000, 200_000])
            offset = a.allocate(want)
            if offset is None:
                assert a.largest_free < max(want, 1)
                continue
            size = max(-(-want // ALIGN), 1) * ALIGN
            assert offset % ALIGN == 0 and offset + size <= a.bytes
            assert all(offset + size <= o or o + s <= offset for o, s in live.items()), "overlap"
            live[offset] = size
        assert a.used == sum(live.values()) and a.num_allocations == len(live)
    for offset in list(live):
        a.free(offset)
    assert a.used == 0 and a.largest_free == a.bytes


def test_option_and_environment(monkeypatch):
    assert torch_ep.Options().comm_pool_bytes == 1 << 30
    monkeypatch.setenv("TORCH_EP_COMM_POOL_BYTES", str(64 << 20))
    assert torch_ep.Options().comm_pool_bytes == 64 << 20
    assert torch_ep.Options()._to_config(timedelta(seconds=1)).comm_pool_bytes == 64 << 20
    with pytest.raises(ValueError, match="comm_pool_bytes"):
        torch_ep.Options(comm_pool_bytes=1 << 20)
    assert "TORCH_EP_COMM_POOL_BYTES" in torch_ep.options.ENVIRONMENT


def test_piece_bytes_option_and_environment(monkeypatch):
    """The one-copy move's piece in turn: 0 (64 KiB) by default, else a multiple of 64 KiB up to
    16 MiB, refused otherwise with the field named; the environment fills it, the Config carries it."""
    monkeypatch.delenv("TORCH_EP_ALL_TO_ALL_POOL_PIECE_BYTES", raising=False)
    assert torch_ep.Options().all_to_all_pool_piece_bytes == 0
    monkeypatch.setenv("TORCH_EP_ALL_TO_ALL_POOL_PIECE_BYTES", str(128 << 10))
    assert torch_ep.Options().all_to_all_pool_piece_bytes == 128 << 10
    assert torch_ep.Options()._to_config(timedelta(seconds=1)).all_to_all_pool_piece_bytes == 128 << 10
    for bad in (-(64 << 10), 4096, (64 << 10) + 16, 32 << 20):
        with pytest.raises(ValueError, match=r"all_to_all_pool_piece_bytes=.*expected 0 \(automatic\) or a multiple of 65536"):
            torch_ep.Options(all_to_all_pool_piece_bytes=bad)
    assert torch_ep.Options(all_to_all_pool_piece_bytes=16 << 20).all_to_all_pool_piece_bytes == 16 << 20
    for name in ("TORCH_EP_ALL_TO_ALL_POOL_PIECE_BYTES", "TORCH_EP_POOL_TICKET_AHEAD", "TORCH_EP_POOL_SELF_FIRST"):
        assert name in torch_ep.options.ENVIRONMENT


def rank_comm_pool_without_cuda():
    try:
        torch_ep.comm_pool()
    except RuntimeError as e:
        return str(e)
    return None


@pytest.mark.skipif(torch.cuda.is_available() and _C.has_cuda, reason="with CUDA the pool exists (GPU tests)")
def test_comm_pool_needs_cuda():
    for error in rank_pool(2).run(rank_comm_pool_without_cuda):
        assert error is not None and "needs CUDA" in error, error
