"""Soak: a long stream of mixed calls on one group, every call's data checked, memory flat.

The stream mixes all_to_all_single of random sizes (through the ring and the one-copy path),
several async all_to_all_single in flight at once, and dispatch + combine (some async, some
re-dispatched along the handle). Every call is checked: all_to_all blocks carry values every
rank can compute, and combine(dispatch(x)) must give x times the number of ranks each token
went to; every CHECK_EVERY-th call is also compared with torch_ep.reference. After a warm-up,
host RSS, /dev/shm and (on CUDA) the allocator's bytes in use must stay flat.

TORCH_EP_SOAK_CALLS sets the number of calls (CI default below; the GPU suite and the manual
run in tests/README.md use 10 000). Seeded: TORCH_EP_SOAK_SEED reproduces a run.
"""
import os
import random
import time

import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import cuda_world_sizes, rank_pool
from test_faults import checked_all_to_all, checked_round_trip
from torch_ep import reference
from torch_ep.testing import poison_, same_bits

CHECK_EVERY = 100
# Growth allowed after the warm-up (see growth()). A leak of one message or one dispatch per
# call exceeds it within the CI run (messages average tens of KiB); allocator noise does not.
RSS_SLACK_BYTES = 24 << 20
CUDA_SLACK_BYTES = 1 << 20


def _calls():
    return int(os.environ.get("TORCH_EP_SOAK_CALLS", 2000))


def _seed():
    return int(os.environ.get("TORCH_EP_SOAK_SEED", random.randrange(2**31)))


def _rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _shm_used_bytes():
    if not os.path.isdir("/dev/shm"):
        return 0
    st = os.statvfs("/dev/shm")
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def _shm_names():
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith("torch_ep_")) if os.path.isdir("/dev/shm") else []


def _memory(device):
    cuda = torch.cuda.memory_allocated() if device != "cpu" else 0
    return _rss_bytes(), _shm_used_bytes(), cuda


def _reference_all_to_all(splits, g, device):
    """One all_to_all_single of random float data, compared with torch_ep.reference."""
    rank = dist.get_rank()
    x = torch.randn(int(splits[rank].sum()), 16, generator=g).to(device)
    out_splits = splits[:, rank].tolist()
    y = poison_(torch.empty(sum(out_splits), 16, device=device))
    dist.all_to_all_single(y, x, out_splits, splits[rank].tolist())
    assert same_bits(y, reference.all_to_all_single(y.shape, x, out_splits, splits[rank].tolist()))


def _reference_moe(g, device):
    """dispatch + combine of random routes, compared with torch_ep.reference."""
    size = dist.get_world_size()
    num_experts = 2 * size
    n = int(torch.randint(0, 64, (), generator=g))
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:2] for _ in range(n)]) if n else \
        torch.empty(0, 2, dtype=torch.int64)
    x = torch.randint(-50, 50, (n, 32), generator=g).bfloat16()
    w = torch.rand(n, 2, generator=g)
    expected = reference.dispatch(x, idx, w, num_experts=num_experts)
    got = torch_ep.dispatch(x.to(device), idx.to(device), w.to(device), num_experts=num_experts)
    assert same_bits(got.recv_x.cpu(), expected.recv_x)
    assert torch.equal(got.recv_topk_idx.cpu(), expected.recv_topk_idx)
    comb = torch_ep.combine(got.recv_x, got.handle, got.recv_topk_weights)
    ref = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights)
    assert same_bits(comb.combined_x.cpu(), ref.combined_x)


def rank_soak(seed, calls, device="cpu"):
    """`calls` mixed calls (the same sequence on every rank); returns the call count, memory
    samples (call, rss, shm used, cuda bytes) and the op mix."""
    rank, size = dist.get_rank(), dist.get_world_size()
    shared = random.Random(seed)
    g = torch.Generator().manual_seed(seed * 31 + rank)
    samples, mix = [], {}
    sample_every = max(1, calls // 50)
    call, next_check = 0, CHECK_EVERY
    start = time.monotonic()
    while call < calls:
        if call >= len(samples) * sample_every:
            samples.append((call, *_memory(device)))
        op = shared.choice(["single", "single", "single", "async_batch", "moe", "moe_async", "moe_again"])
        # Rows of 64 int64 (512 B): mostly small messages through the ring, some past the one-copy
        # threshold (64 KiB = 128 rows), now and then a large one (up to 4 MiB).
        top = shared.choice([8, 64, 256, 1024]) if shared.random() > 0.02 else 8192
        splits = torch.tensor([[shared.randrange(top + 1) for _ in range(size)] for _ in range(size)])
        if op == "single":
            checked_all_to_all(call, splits, width=64, device=device)
            done = {"all_to_all_single": 1}
        elif op == "async_batch":  # several in flight at once, waited in order
            batch = min(shared.randint(2, 4), calls - call)
            works = []
            for i in range(batch):
                s = torch.tensor([[shared.randrange(65) for _ in range(size)] for _ in range(size)])
                works.append(_start_checked(call + i, s, device))
            for check in works:
                check()
            done = {"all_to_all_single async": batch}
        else:  # dispatch + combine
            g_shared = torch.Generator().manual_seed(shared.randrange(2**31) + rank)
            if op == "moe_async":
                _round_trip_async(g_shared, device)
                done = {"dispatch async": 1, "combine async": 1}
            elif op == "moe_again":
                _round_trip_twice(g_shared, device)
                done = {"dispatch": 1, "dispatch along a handle": 1, "combine": 2}
            else:
                checked_round_trip(g_shared, num_tokens=shared.randint(0, 256), hidden=128, device=device)
                done = {"dispatch": 1, "combine": 1}
        for kind, n in done.items():
            mix[kind] = mix.get(kind, 0) + n
            call += n
        if call >= next_check:
            next_check += CHECK_EVERY
            if shared.random() < 0.5:
                _reference_all_to_all(splits.clamp(max=64), g, device)
                mix["checked against torch_ep.reference: all_to_all_single"] = mix.get(
                    "checked against torch_ep.reference: all_to_all_single", 0) + 1
            else:
                _reference_moe(g, device)
                mix["checked against torch_ep.reference: dispatch + combine"] = mix.get(
                    "checked against torch_ep.reference: dispatch + combine", 0) + 1
    if device != "cpu":
        torch.cuda.synchronize()
    samples.append((call, *_memory(device)))
    return dict(calls=call, samples=samples, mix=mix, seconds=time.monotonic() - start,
                shm_names=_shm_names() if rank == 0 else [])


def _start_checked(call, splits, device, width=8):
    """Starts an async checked all_to_all_single; returns the function that waits and checks."""
    from test_faults import _block

    rank, size = dist.get_rank(), splits.shape[0]
    x = torch.cat([_block(call, rank, d, int(splits[rank, d]), width, device) for d in range(size)])
    out_splits = splits[:, rank].tolist()
    y = poison_(torch.empty(sum(out_splits), width, dtype=torch.int64, device=device))
    work = dist.all_to_all_single(y, x, out_splits, splits[rank].tolist(), async_op=True)

    def check():
        work.wait()
        expected = torch.cat([_block(call, s, rank, int(splits[s, rank]), width, device) for s in range(size)])
        assert torch.equal(y, expected), f"call {call}: async all_to_all_single delivered wrong data"

    return check


def _routes(g, size, num_tokens=64, experts_per_rank=2, top_k=3):
    num_experts = experts_per_rank * size
    idx = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(num_tokens)])
    idx[torch.rand(idx.shape, generator=g) < 0.25] = -1
    return idx, num_experts


def _round_trip_async(g, device):
    """dispatch and combine with async_op: the same invariant as checked_round_trip."""
    idx, num_experts = _routes(g, dist.get_world_size())
    x = torch.randint(-50, 50, (idx.shape[0], 48), generator=g).float()
    d = torch_ep.dispatch(x.to(device), idx.to(device), num_experts=num_experts, async_op=True)
    d.work.wait()
    c = torch_ep.combine(d.recv_x, d.handle, async_op=True)
    c.work.wait()
    hits = reference.get_dispatch_layout(idx, num_experts).is_token_in_rank.sum(1, keepdim=True)
    assert torch.equal(c.combined_x.cpu(), x * hits), "async dispatch + combine lost or changed rows"


def _round_trip_twice(g, device):
    """A dispatch, then new data along its handle; both combined back."""
    idx, num_experts = _routes(g, dist.get_world_size())
    hits = reference.get_dispatch_layout(idx, num_experts).is_token_in_rank.sum(1, keepdim=True)
    x = torch.randint(-50, 50, (idx.shape[0], 40), generator=g).float()
    d = torch_ep.dispatch(x.to(device), idx.to(device), num_experts=num_experts)
    x2 = torch.randint(-50, 50, x.shape, generator=g).float()
    again = torch_ep.dispatch(x2.to(device), handle=d.handle)
    for data, rows in ((x, d.recv_x), (x2, again.recv_x)):
        back = torch_ep.combine(rows, d.handle).combined_x
        assert torch.equal(back.cpu(), data * hits), "dispatch along a handle + combine lost or changed rows"


def growth(samples, calls, column):
    """Growth of a memory column between the warm-up's end and the run's end, as the change of
    its minimum over a window (20-40 % of the calls, then the last 20 %): transient peaks (a 16 MiB
    message in flight when a sample is taken) cancel out, a leak does not."""
    early = [s[column] for s in samples if calls // 5 <= s[0] < 2 * calls // 5]
    late = [s[column] for s in samples if s[0] >= 4 * calls // 5]
    return min(late) - min(early)


def summary(results, calls):
    """One line per rank: what tests/README.md records."""
    lines = []
    for rank, r in enumerate(results):
        warm = next(x for x in r["samples"] if x[0] >= calls // 5)
        last = r["samples"][-1]
        lines.append(f"rank {rank}: {r['calls']} calls in {r['seconds']:.1f} s, mix {r['mix']}; RSS {warm[1] >> 20} MiB "
                     f"after the warm-up (call {warm[0]}), {last[1] >> 20} MiB at the end (growth of the windowed "
                     f"minimum {growth(r['samples'], calls, 1) / 2**20:+.2f} MiB); /dev/shm used {warm[2] >> 20} -> "
                     f"{last[2] >> 20} MiB; CUDA allocated {warm[3]} -> {last[3]} bytes")
    return "\n".join(lines)


def check_flat(results, calls, device):
    print(summary(results, calls))
    for rank, r in enumerate(results):
        assert r["calls"] >= calls, (rank, r["calls"])
        samples = r["samples"]
        rss = growth(samples, calls, 1)
        assert rss < RSS_SLACK_BYTES, f"rank {rank}: host RSS grew {rss >> 20} MiB after the warm-up ({samples})"
        shm = growth(samples, calls, 2)
        assert shm < 1 << 20, f"rank {rank}: /dev/shm use grew {shm} bytes after the warm-up ({samples})"
        if device != "cpu":
            cuda = samples[-1][3] - samples[len(samples) // 5][3]
            assert cuda < CUDA_SLACK_BYTES, f"rank {rank}: the CUDA allocator grew {cuda} bytes ({samples})"
    assert results[0]["shm_names"] == [], results[0]["shm_names"]


# Ranks of their own, where glibc returns every large block to the system when it is freed:
# by default it raises its mmap threshold after the first large free and keeps later large
# blocks in the heap, a one-time step in RSS that says nothing about torch_ep.
SOAK_ENV = {"MALLOC_MMAP_THRESHOLD_": str(128 << 10)}


def test_soak():
    seed, calls = _seed(), _calls()
    print(f"TORCH_EP_SOAK_SEED={seed} TORCH_EP_SOAK_CALLS={calls}")
    pool = rank_pool(4, env=SOAK_ENV)
    try:
        results = pool.run(rank_soak, seed, calls, timeout_s=max(120, calls * 0.1))
    finally:
        pool.close()  # its memory goes back before the next tests
    check_flat(results, calls, "cpu")


@pytest.fixture(params=cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def cuda_pool(request):
    pool = rank_pool(request.param, cuda=True, env=SOAK_ENV)
    yield pool
    pool.close()


@pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                    reason="needs CUDA and a CUDA build of torch_ep")
def test_soak_cuda(cuda_pool):
    seed, calls = _seed(), _calls()
    print(f"TORCH_EP_SOAK_SEED={seed} TORCH_EP_SOAK_CALLS={calls}")
    results = cuda_pool.run(rank_soak, seed, calls, device="cuda", timeout_s=max(120, calls * 0.1))
    check_flat(results, calls, "cuda")
