"""Across nodes on CUDA (GPU machines with NVSHMEM only): virtual nodes on the GPU(s) of one
machine, 4 ranks as 2 nodes of 2 and 8 ranks as 2 nodes of 4 (TORCH_EP_INTERNODE_TOPOLOGIES
picks them, e.g. "2x2,2x4"). all_to_all_single goes by CUDA IPC inside a node and by NVSHMEM
puts between nodes; dispatch/combine take the hierarchical route, on both of its CUDA forms
(TORCH_EP_INTERNODE_ROUTES picks them, default "device,host"): "device", driven by the device
through NVSHMEM's device API (Options.internode_device, the default), and "host", the rounds
the host drives (rail hop on NVSHMEM, node hop on IPC). Same checks as the CPU tests
(test_internode.py, test_moe.py), same reference; the device route adds CUDA-graph capture, its
capacity check and the zero-copy inputs (torch_ep.combine_buffer, torch_ep.dispatch_buffer).

Ranks sharing a GPU need MPS (NVSHMEM's full multi-process-per-GPU mode; GPU-NOTES.md). The
ranks get NVSHMEM's single-host settings unless the environment already sets them.
"""
import os

import pytest
import torch

import test_compile as compile_checks
import test_internode as internode
import test_moe as checks
import torch_ep
from conftest import rank_pool

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not torch_ep._C.has_cuda or not torch_ep._C.has_nvshmem,
    reason="needs CUDA and a torch_ep build with NVSHMEM")

SINGLE_HOST_NVSHMEM = {"NVSHMEM_REMOTE_TRANSPORT": "none", "NVSHMEM_BOOTSTRAP_UID_SOCK_IFNAME": "lo",
                       "NVSHMEM_DISABLE_NCCL": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def topologies():
    return os.environ.get("TORCH_EP_INTERNODE_TOPOLOGIES", "2x2,2x4").split(",")


def routes():
    return os.environ.get("TORCH_EP_INTERNODE_ROUTES", "device,host").split(",")


# Tokens per rank per call the device route's buffer takes in these tests (the most any test
# sends is 600, rank_many_tokens; test_over_capacity sends more).
CAPACITY = 1024
ROW_BYTES = 18 << 10


def _pool(topology, route, extra=None):
    world, per_node = internode.TOPOLOGIES[topology]
    env = {name: os.environ.get(name, value) for name, value in SINGLE_HOST_NVSHMEM.items()}
    # A small registered budget: messages stream through the NVSHMEM slots in many chunks.
    env.update({"TORCH_EP_RANKS_PER_NODE": str(per_node), "TORCH_EP_CUDA_BUFFER_BYTES": str(1 << 20),
                "TORCH_EP_INTERNODE_DEVICE": "1" if route == "device" else "0",
                "TORCH_EP_INTERNODE_CAPACITY": str(CAPACITY),
                # The buffer's row stride is fixed by a group's first call (at least 16.5 KiB);
                # the widest route case (hidden 8320 bf16, top-40, 65 fp8 scales) needs 17152.
                "TORCH_EP_INTERNODE_ROW_BYTES": str(ROW_BYTES),
                "TORCH_EP_TIMEOUT_S": os.environ.get("TORCH_EP_TIMEOUT_S", "60"), **(extra or {})})
    return rank_pool(world, cuda=True, env=env)


@pytest.fixture(params=[(t, r) for t in topologies() for r in routes()], ids=lambda p: f"{p[0]}-{p[1]}")
def cuda_nodes(request):
    return _pool(*request.param)


@pytest.fixture(params=topologies())
def device_route(request):
    if "device" not in routes():
        pytest.skip("TORCH_EP_INTERNODE_ROUTES leaves out the device route")
    return _pool(request.param, "device")


_seed = checks._seed


def test_all_to_all_across_nodes(cuda_nodes):
    cuda_nodes.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda")
    # Messages of several chunks each (128 KiB slots): slots are reused, credits flow back.
    cuda_nodes.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda", max_rows=3000, width=64)


@pytest.mark.parametrize("topology", topologies())
def test_all_to_all_across_nodes_past_the_slots(topology):
    """Messages of up to 6 MiB, many times the slots a peer has (16 x 64 KiB at the 1 MiB
    budget): senders wait for credits mid-call. At 2x4 the device hop's grid (128 blocks) is not
    resident at once on a rank's 14 SMs; the schedule's pairing (exchange_partner) keeps each
    pair's sender and receiver resident together, so the call finishes."""
    pool = _pool(topology, "device")
    pool.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda", max_rows=3000, width=512)


@pytest.mark.parametrize("topology", topologies())
def test_nothing_spins_while_idle(topology):
    """After calls across nodes (NVSHMEM up, its remote transport none), no thread of a rank's
    process spins while it idles: NVSHMEM's proxy thread is off (nvshmem_runtime.cpp's init_over)."""
    _pool(topology, "device").run(internode.rank_nothing_spins_while_idle, _seed(), device="cuda")


NODE_HOPS = {"copy_engines": {"TORCH_EP_ALL_TO_ALL_KERNEL_BYTES": "0"},
             "kernel_in_turn": {"TORCH_EP_WHATIF_NODE_KERNEL_IN_TURN": "1"}}


@pytest.mark.parametrize("node_hop", NODE_HOPS)
@pytest.mark.parametrize("topology", topologies())
def test_all_to_all_across_nodes_node_hop(topology, node_hop):
    """The node hop's other forms (internode_path.cpp; the default is its direct kernel beside the
    NVSHMEM hop): on the copy engines (TORCH_EP_ALL_TO_ALL_KERNEL_BYTES=0), beside too, or the
    kernel before the NVSHMEM hop on the op's stream (the what-if TORCH_EP_WHATIF_NODE_KERNEL_IN_TURN=1);
    small and multi-chunk messages, several calls back to back."""
    pool = _pool(topology, "device", NODE_HOPS[node_hop])
    for _ in range(2):
        pool.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda")
    pool.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda", max_rows=3000, width=64)


@pytest.mark.parametrize("topology", topologies())
def test_all_to_all_across_nodes_host_rounds(topology):
    """The same, with the NVSHMEM hop in rounds the host queues (TORCH_EP_INTERNODE_A2A_DEVICE=0;
    the default is one launch): any split, many chunks per pair (the 1 MiB budget), several calls
    so the slots wrap."""
    pool = _pool(topology, "device", {"TORCH_EP_INTERNODE_A2A_DEVICE": "0"})
    for _ in range(2):
        pool.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda")
    pool.run(internode.rank_all_to_all_across_nodes, _seed(), device="cuda", max_rows=3000, width=64)


@pytest.mark.parametrize("kind,hidden,top_k,experts_per_rank,dtype", checks.ROUTE_CASES, ids=checks.CASE_IDS)
def test_dispatch_combine(cuda_nodes, kind, hidden, top_k, experts_per_rank, dtype):
    cuda_nodes.run(checks.rank_dispatch_combine, _seed(), kind, hidden, top_k, experts_per_rank, dtype, device="cuda")


def test_many_tokens_autograd_async_worst_case(cuda_nodes):
    cuda_nodes.run(checks.rank_many_tokens, _seed(), device="cuda")
    cuda_nodes.run(checks.rank_autograd, _seed(), device="cuda")
    cuda_nodes.run(checks.rank_async, _seed(), device="cuda")
    cuda_nodes.run(checks.rank_worst_case, _seed(), device="cuda")


def test_hop_bytes(cuda_nodes):
    cuda_nodes.run(internode.rank_hop_bytes, _seed(), device="cuda")


# ----------------------------------------------------------------------------- device route only

def node_routing(kind, g, num_tokens, top_k, experts_per_rank):
    """topk_idx [num_tokens, top_k] (distinct experts, -1 in random slots) whose experts lie on
    chosen nodes of the group: "own_node" (the source's node only: no rail hop), "other_nodes"
    (none on the source's node: its node's ranks get nothing from it), "node0" (node 0's ranks
    only: the other nodes receive nothing), "mixed" (the three in turn, token by token: own node
    only, other nodes only, anywhere), "sparse" (nowhere, other nodes only, nowhere, anywhere in
    turn: the packed rows, one per token that goes anywhere, leave gaps, and a token's rail slot
    at a node differs from its index)."""
    import torch.distributed as dist

    rank, size = dist.get_rank(), dist.get_world_size()
    per_node = torch_ep.get_backend().topology.ranks_per_node
    node, nodes = rank // per_node, size // per_node

    def experts_of(ms):
        return torch.cat([torch.arange(m * per_node * experts_per_rank, (m + 1) * per_node * experts_per_rank)
                          for m in ms])

    pools = {"own_node": experts_of([node]), "other_nodes": experts_of([m for m in range(nodes) if m != node]),
             "node0": experts_of([0]), "anywhere": torch.arange(size * experts_per_rank)}
    turns = {"mixed": ["own_node", "other_nodes", "anywhere"],
             "sparse": ["nowhere", "other_nodes", "nowhere", "anywhere"]}.get(kind, [kind])
    if num_tokens == 0:
        return torch.empty(0, top_k, dtype=torch.int64)
    rows = []
    for t in range(num_tokens):
        turn = turns[t % len(turns)]
        if turn == "nowhere":
            rows.append(torch.full((top_k,), -1, dtype=torch.int64))
            continue
        pool = pools[turn]
        rows.append(pool[torch.randperm(len(pool), generator=g)[:top_k]])
    idx = torch.stack(rows)
    idx[torch.rand(idx.shape, generator=g) < 0.2] = -1
    return idx


def rank_node_routing(seed, kind, hidden, worst=False, device="cuda", misaligned=False):
    """dispatch, combine and a re-dispatch along the handle with the routing of node_routing(kind)
    and uneven sizes (rank 0 sends 300 tokens, each node's last rank none): the own node's rows
    take the in-place path, the others the rail. bf16 rows of any value, so combine's one
    rounding per node is checked bit for bit; outputs poisoned. `misaligned`: combine's input
    starts 2 bytes past a 16-byte boundary, so each rank pushes its rows for itself into its
    stage instead of reading them from x in place. Returns (rows this rank got from its own node,
    from other nodes)."""
    import torch.distributed as dist
    from torch_ep import reference
    from torch_ep.testing import same_bits

    rank, size = dist.get_rank(), dist.get_world_size()
    per_node = torch_ep.get_backend().topology.ranks_per_node
    top_k, experts_per_rank = 3, 2
    num_experts = experts_per_rank * size
    g = torch.Generator().manual_seed(seed + 7919 * rank)
    n = 300 if rank == 0 else 0 if rank % per_node == per_node - 1 else int(torch.randint(1, 24, (), generator=g))
    idx = node_routing(kind, g, n, top_k, experts_per_rank)
    x = torch.randn(n, hidden, generator=g).mul(50).to(torch.bfloat16)
    w = torch.randint(1, 9, idx.shape, generator=g).float() / 8
    expected = reference.dispatch(x, idx, w, num_experts=num_experts)
    m = expected.recv_x.shape[0]
    worst_rows = 300 + 24 * size if worst else 0
    checks._poison_cache(device, max(m, worst_rows) * hidden * 4)
    got = torch_ep.dispatch(x.to(device), idx.to(device), w.to(device), num_experts=num_experts,
                            num_worst_tokens=worst_rows)
    if worst:
        assert got.recv_x.shape[0] == worst_rows
        assert same_bits(got.recv_x[:m].cpu(), expected.recv_x), "recv_x differs"
        assert torch.equal(got.recv_topk_idx[:m].cpu(), expected.recv_topk_idx), "recv_topk_idx differs"
        assert torch.equal(got.recv_topk_weights[:m].cpu(), expected.recv_topk_weights), "weights differ"
        assert bool((got.recv_topk_idx[m:] == -1).all()) and bool((got.recv_x[m:] == 0).all())
    else:
        checks.check_result(got, expected)

    back = torch.randn(tuple(got.recv_x.shape), generator=g).mul(100).to(torch.bfloat16)
    want = reference.combine(back[:m], expected.handle, expected.recv_topk_weights)
    back_dev = back.to(device)
    if misaligned:
        back_dev = torch.empty(back.numel() + 1, dtype=back.dtype, device=device)[1:].view(back.shape).copy_(back)
    checks._poison_cache(device, n * hidden * 4)
    comb = torch_ep.combine(back_dev, got.handle, got.recv_topk_weights)
    assert same_bits(comb.combined_x.cpu(), want.combined_x), "combined_x differs from the reference"
    assert torch.equal(comb.combined_topk_weights.cpu(), want.combined_topk_weights)

    if not worst:
        x2 = torch.randn(n, hidden, generator=g).mul(50).to(torch.bfloat16)
        checks._poison_cache(device, m * hidden * 4)
        again = torch_ep.dispatch(x2.to(device), handle=got.handle)
        checks.check_result(again, reference.dispatch(x2, handle=expected.handle), with_topk=False)
    node = rank // per_node
    own = sum(expected.handle.recv_counts[node * per_node:(node + 1) * per_node])
    return own, m - own


@pytest.mark.parametrize("kind", ["own_node", "other_nodes", "node0", "mixed", "sparse"])
def test_node_routing(device_route, kind):
    """The own node's rows (gets from the source's packed rows, summed by the source in combine)
    and the rail's, alone and together, on uneven sizes; hidden 7 (byte copies) and 136 (16-byte
    words), with and without num_worst_tokens; mixed also with combine's input misaligned (its
    rows pushed, not read in place)."""
    size = device_route.world_size
    cases = [(136, False, False), (7, False, False), (136, True, False)] + ([(136, False, True)] if kind == "mixed" else [])
    for hidden, worst, misaligned in cases:
        got = device_route.run(rank_node_routing, _seed(), kind, hidden, worst, misaligned=misaligned)
        own, other = sum(o for o, _ in got), sum(r for _, r in got)
        if kind in ("own_node", "mixed"):
            assert own > 0
        if kind == "own_node":
            assert other == 0
        if kind == "other_nodes":
            assert own == 0 and other > 0
        if kind == "node0":
            assert all(o == 0 and r == 0 for o, r in got[size // 2:]), "node 1 receives nothing"
        if kind in ("mixed", "sparse"):
            assert other > 0


@pytest.mark.parametrize("topology", topologies())
def test_node_hop_by_puts(topology):
    """TORCH_EP_INTERNODE_NODE_P2P=0: the node hop by NVSHMEM puts and gets, the path of node
    peers NVSHMEM does not map (by default it stores and loads through the mapped buffers)."""
    if "device" not in routes():
        pytest.skip("TORCH_EP_INTERNODE_ROUTES leaves out the device route")
    pool = _pool(topology, "device", {"TORCH_EP_INTERNODE_NODE_P2P": "0"})
    for hidden, worst in ((136, False), (7, False), (136, True)):
        own_other = pool.run(rank_node_routing, _seed(), "mixed", hidden, worst)
        assert sum(o for o, _ in own_other) > 0 and sum(r for _, r in own_other) > 0
    pool.run(checks.rank_autograd, _seed(), device="cuda")
    # Without the mapping no rank reads another's combine input: combine_buffer is a plain tensor.
    assert not any(pool.run(rank_zero_copy, _seed(), 136))
    # dispatch_buffer needs no mapping: the node's ranks get the packed rows, the rail puts from them.
    assert all(pool.run(rank_zero_copy_dispatch, _seed(), 136))


def zero_copy_routing(seed, top_k=3, experts_per_rank=2):
    """The zero-copy tests' routing, on the CPU: rank 0 sends 300 tokens, each node's last rank
    none, the others 1-23, over "mixed" nodes. Returns (generator, n, topk_idx, num_experts); the
    caller draws its rows and weights from the generator next."""
    import torch.distributed as dist
    rank, size = dist.get_rank(), dist.get_world_size()
    per_node = torch_ep.get_backend().topology.ranks_per_node
    g = torch.Generator().manual_seed(seed + 7919 * rank)
    n = 300 if rank == 0 else 0 if rank % per_node == per_node - 1 else int(torch.randint(1, 24, (), generator=g))
    return g, n, node_routing("mixed", g, n, top_k, experts_per_rank), experts_per_rank * size


def rank_zero_copy(seed, hidden, who="all", worst=False, rounds=2):
    """combine from torch_ep.combine_buffer (zero copy) after a dispatch of node_routing's "mixed"
    kind with rank_node_routing's uneven sizes: `rounds` combines in a row, each writing fresh
    rows into a new combine_buffer right after the previous combine was queued (no host sync:
    the buffer's wait must hold the writes until the node's ranks have read the previous rows).
    who: "all" ranks pass the buffer, or "mix" (odd ranks the buffer, even ranks a plain tensor).
    bf16 rows of any value and weights, outputs poisoned, bit for bit against the reference.
    Returns whether this rank's buffer was the group's region (the same address twice)."""
    import torch.distributed as dist
    from torch_ep import reference
    from torch_ep.testing import same_bits

    rank, size = dist.get_rank(), dist.get_world_size()
    g, n, idx, num_experts = zero_copy_routing(seed)
    x = torch.randn(n, hidden, generator=g).mul(50).to(torch.bfloat16)
    w = torch.randint(1, 9, idx.shape, generator=g).float() / 8
    expected = reference.dispatch(x, idx, w, num_experts=num_experts)
    m = expected.recv_x.shape[0]
    got = torch_ep.dispatch(x.cuda(), idx.cuda(), w.cuda(), num_experts=num_experts,
                            num_worst_tokens=300 + 24 * size if worst else 0)
    rows = got.recv_x.shape[0]
    use_buffer = who == "all" or rank % 2 == 1
    backs = [torch.randn(rows, hidden, generator=g).mul(100).to(torch.bfloat16) for _ in range(rounds)]
    backs_dev = [b.cuda() for b in backs]
    torch.cuda.synchronize()
    in_region, results = None, []
    for back in backs_dev:
        if use_buffer:
            buf = torch_ep.combine_buffer(got.handle)
            assert buf.shape == (rows, hidden) and buf.dtype == torch.bfloat16 and buf.is_cuda
            again = torch_ep.combine_buffer(got.handle)
            in_region = again.data_ptr() == buf.data_ptr()  # a plain tensor would be another allocation
            buf.copy_(back)
        else:
            buf = back.clone()
        checks._poison_cache("cuda", max(n, 1) * hidden * 4)
        results.append(torch_ep.combine(buf, got.handle, got.recv_topk_weights))
    for r, (back, comb) in enumerate(zip(backs, results)):
        want = reference.combine(back[:m], expected.handle, expected.recv_topk_weights)
        assert same_bits(comb.combined_x.cpu(), want.combined_x), f"combine {r}: combined_x differs"
        assert torch.equal(comb.combined_topk_weights.cpu(), want.combined_topk_weights), f"combine {r}: weights"
    dist.barrier()
    return in_region


ZERO_COPY_CASES = [("all", 136, False), ("all", 7, False), ("all", 136, True), ("mix", 136, False),
                   ("mix", 7, True)]


@pytest.mark.parametrize("who,hidden,worst", ZERO_COPY_CASES, ids=lambda v: str(v))
def test_zero_copy_combine(device_route, who, hidden, worst):
    """combine_buffer hands out the group's region on the device route (NVSHMEM maps the node's
    ranks on one GPU), and a combine from it (every rank's, or some ranks' only) equals the
    reference, also a second one right after (the region's reuse wait)."""
    got = device_route.run(rank_zero_copy, _seed(), hidden, who, worst)
    assert all(r is not False for r in got) and any(got), got


def rank_zero_copy_by_route(seed):
    return torch_ep.get_backend().config.internode_device, rank_zero_copy(seed, 136, "all", False, 1)


def test_combine_buffer_by_route(cuda_nodes):
    """The region on the device route; on the host-driven route a plain tensor, and combine works."""
    for device_route, in_region in cuda_nodes.run(rank_zero_copy_by_route, _seed()):
        assert in_region == device_route


def check_dispatch(got, expected, worst_rows, what):
    """got (a dispatch with num_worst_tokens = worst_rows, or without: 0) against the reference."""
    from torch_ep.testing import same_bits

    if not worst_rows:
        checks.check_result(got, expected)
        return
    pairs = list(zip(got.recv_x, expected.recv_x)) if isinstance(got.recv_x, tuple) else [(got.recv_x, expected.recv_x)]
    m = pairs[0][1].shape[0]
    assert got.recv_topk_idx.shape[0] == worst_rows
    for out, want in pairs:
        assert same_bits(out[:m].cpu(), want), f"{what}: recv_x differs"
    assert torch.equal(got.recv_topk_idx[:m].cpu(), expected.recv_topk_idx), f"{what}: recv_topk_idx differs"
    assert torch.equal(got.recv_topk_weights[:m].cpu(), expected.recv_topk_weights), f"{what}: weights differ"
    assert bool((got.recv_topk_idx[m:] == -1).all())


def rank_zero_copy_dispatch(seed, hidden, who="all", worst=False, fp8=False, rounds=3):
    """dispatch from torch_ep.dispatch_buffer (zero copy) with node_routing's "mixed" routing and
    rank_node_routing's uneven sizes: `rounds` dispatches in a row, each from fresh rows written
    into a new dispatch_buffer right after the previous dispatch was queued (no host sync: the
    buffer's wait must hold the writes until the node's ranks have read the previous rows). In
    bf16, a combine of the previous dispatch runs between each fill and its dispatch (its sums
    must not touch the rows). who: "all" ranks use the buffer, or "mix" (every other rank, node 0
    from its first rank, node 1 from its second, ...: each node has a sender of tokens of each
    kind; the others plain tensors). fp8: the pair, the first round's scales in the buffer too, the
    later rounds' plain (copied by the pack). Outputs poisoned, bit for bit against the
    reference. Returns whether this rank's buffer was its packed rows (the same address twice)."""
    import torch.distributed as dist
    from torch_ep import reference
    from torch_ep.testing import same_bits

    rank, size = dist.get_rank(), dist.get_world_size()
    per_node = torch_ep.get_backend().topology.ranks_per_node
    g, n, idx, num_experts = zero_copy_routing(seed)
    w = torch.randint(1, 9, idx.shape, generator=g).float() / 8
    idx_dev, w_dev = idx.cuda(), w.cuda()
    worst_rows = 300 + 24 * size if worst else 0
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16

    def payload():
        x = torch.randn(n, hidden, generator=g).mul(50).to(torch.bfloat16)
        return (x.float().to(dtype), torch.rand(n, (hidden + 127) // 128, generator=g)) if fp8 else x

    xs = [payload() for _ in range(rounds)]
    xs_dev = [tuple(t.cuda() for t in x) if fp8 else x.cuda() for x in xs]
    torch_ep.dispatch(xs_dev[0], idx_dev, w_dev, num_experts=num_experts)  # the first call allocates the buffer
    torch.cuda.synchronize()
    use_buffer = who == "all" or (rank + rank // per_node) % 2 == 0
    in_region, results, combines = None, [], []
    for r, x in enumerate(xs_dev):
        src = x
        if use_buffer:
            buf, again = torch_ep.dispatch_buffer(n, hidden, dtype), torch_ep.dispatch_buffer(n, hidden, dtype)
            data = buf[0] if fp8 else buf
            assert data.shape == (n, hidden) and data.dtype == dtype and data.is_cuda
            in_region = (again[0] if fp8 else again).data_ptr() == data.data_ptr()
            data.copy_(x[0] if fp8 else x)
            if fp8 and r == 0:
                buf[1].copy_(x[1])
            src = (data, buf[1] if r == 0 else x[1]) if fp8 else data
        if results and not fp8:
            prev = results[-1]
            combines.append(torch_ep.combine(prev.recv_x, prev.handle, prev.recv_topk_weights))
        checks._poison_cache("cuda", (300 + 24 * size) * hidden * 4)
        results.append(torch_ep.dispatch(src, idx_dev, w_dev, num_experts=num_experts, num_worst_tokens=worst_rows))
    for r, (x, got) in enumerate(zip(xs, results)):
        expected = reference.dispatch(x, idx, w, num_experts=num_experts)
        check_dispatch(got, expected, worst_rows, f"dispatch {r}")
        if r < len(combines):
            want = reference.combine(expected.recv_x, expected.handle, expected.recv_topk_weights)
            assert same_bits(combines[r].combined_x.cpu(), want.combined_x), f"combine after dispatch {r} differs"
            assert torch.equal(combines[r].combined_topk_weights.cpu(), want.combined_topk_weights)
    dist.barrier()
    return in_region


ZERO_COPY_DISPATCH_CASES = [("all", 136, False, False), ("all", 7, False, False), ("all", 136, True, False),
                            ("mix", 136, False, False), ("all", 136, False, True), ("mix", 7, True, True)]


@pytest.mark.parametrize("who,hidden,worst,fp8", ZERO_COPY_DISPATCH_CASES, ids=lambda v: str(v))
def test_zero_copy_dispatch(device_route, who, hidden, worst, fp8):
    """dispatch_buffer hands out this rank's packed rows on the device route, and dispatches from
    them (every rank's, or some ranks' only; bf16 and the fp8 pair) equal the reference, also
    back to back (the rows' reuse wait) and with a combine between a fill and its dispatch."""
    got = device_route.run(rank_zero_copy_dispatch, _seed(), hidden, who, worst, fp8)
    assert all(r is not False for r in got) and any(got), got


def rank_dispatch_buffer_slice(seed):
    """x a view of the packed rows other than dispatch_buffer's (from its second row): dispatch
    copies it out before the pack writes those rows (a warning), and equals the reference."""
    from torch_ep import reference

    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 136, 3, 2, torch.bfloat16, "cuda")
    n, hidden = x.shape
    torch_ep.dispatch(x, idx, w, num_experts=num_experts)  # the first call allocates the buffer
    rows = torch_ep.dispatch_buffer(n + 1, hidden)
    rows[1:].copy_(x)
    expected = reference.dispatch(x.cpu(), idx.cpu(), w.cpu(), num_experts=num_experts)
    checks.check_result(torch_ep.dispatch(rows[1:], idx, w, num_experts=num_experts), expected)


def rank_dispatch_buffer_by_route(seed):
    checks.rank_dispatch_buffer(seed, device="cuda")
    rank_dispatch_buffer_slice(seed + 1)
    a, b = torch_ep.dispatch_buffer(4, 64), torch_ep.dispatch_buffer(4, 64)
    return torch_ep.get_backend().config.internode_device, a.data_ptr() == b.data_ptr()


def test_dispatch_buffer_by_route(cuda_nodes):
    """The CPU test's checks (test_moe.rank_dispatch_buffer) and a slice of the rows as x: this
    rank's packed rows on the device route, plain tensors on the host-driven route."""
    for device_route, in_region in cuda_nodes.run(rank_dispatch_buffer_by_route, _seed()):
        assert in_region == device_route


def rank_graph_capture(seed, replays=3, routing="anywhere", zero_copy=False, zero_copy_dispatch=False):
    """dispatch + combine with num_worst_tokens captured in one CUDA graph, replayed with new
    inputs of the same shapes: every replay matches the reference. routing "nodes" replays
    node_routing's kinds in turn (own node only, other nodes only, node 0 only, mixed, sparse),
    so that the own node's counters and the rail's go from some rows to none between replays.
    zero_copy: the graph also holds combine_buffer (its wait) and the write of recv_x into it;
    zero_copy_dispatch likewise dispatch_buffer and the write of x into it."""
    import torch.distributed as dist
    from torch_ep import reference
    from torch_ep.testing import same_bits

    hidden, top_k, experts_per_rank, n = 64, 3, 2, 20
    size = dist.get_world_size()
    num_experts, worst = experts_per_rank * size, n * size
    kinds = ["anywhere"] if routing == "anywhere" else ["own_node", "other_nodes", "node0", "mixed", "sparse"]

    def fixed(s, turn=0):  # n tokens, top_k distinct experts each, exact weights
        g = torch.Generator().manual_seed(s + 7919 * dist.get_rank())
        x = torch.randint(-60, 60, (n, hidden), generator=g).to(torch.bfloat16)
        idx = node_routing(kinds[turn % len(kinds)], g, n, top_k, experts_per_rank)
        w = torch.randint(1, 9, idx.shape, generator=g).float() / 8
        return x.cuda(), idx.cuda(), w.cuda()

    x, idx, w = fixed(seed)

    def step():
        src = torch_ep.dispatch_buffer(n, hidden).copy_(x) if zero_copy_dispatch else x
        d = torch_ep.dispatch(src, idx, w, num_experts=num_experts, num_worst_tokens=worst)
        if not zero_copy:
            return d, torch_ep.combine(d.recv_x, d.handle)
        buf = torch_ep.combine_buffer(d.handle)
        buf.copy_(d.recv_x)
        return d, torch_ep.combine(buf, d.handle)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        warm, _ = step()  # warm up outside the capture (the first call allocates the buffers)
        if zero_copy:  # the group's region, not a plain tensor
            assert torch_ep.combine_buffer(warm.handle).data_ptr() == torch_ep.combine_buffer(warm.handle).data_ptr()
        if zero_copy_dispatch:  # this rank's packed rows (the first call allocated the buffer)
            assert torch_ep.dispatch_buffer(n, hidden).data_ptr() == torch_ep.dispatch_buffer(n, hidden).data_ptr()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    dist.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        d, c = step()
    torch.cuda.synchronize()
    dist.barrier()
    for r in range(replays):
        nx, nidx, nw = fixed(seed + 17 * (r + 1), r)
        x.copy_(nx), idx.copy_(nidx), w.copy_(nw)
        graph.replay()
        torch.cuda.synchronize()
        expected = reference.dispatch(nx.cpu(), nidx.cpu(), nw.cpu(), num_experts=num_experts)
        m = expected.recv_x.shape[0]
        assert same_bits(d.recv_x[:m].cpu(), expected.recv_x), f"replay {r}: recv_x differs"
        assert torch.equal(d.recv_topk_idx[:m].cpu(), expected.recv_topk_idx), f"replay {r}: recv_topk_idx differs"
        assert bool((d.recv_topk_idx[m:] == -1).all())
        ref = reference.combine(expected.recv_x, expected.handle)
        assert same_bits(c.combined_x.cpu(), ref.combined_x), f"replay {r}: combined_x differs"
        dist.barrier()
    return True


@pytest.mark.parametrize("routing", ["anywhere", "nodes", "nodes-zero-copy", "nodes-zero-copy-dispatch"])
def test_graph_capture_and_replay(device_route, routing):
    """nodes-zero-copy: combine from combine_buffer; nodes-zero-copy-dispatch: dispatch from
    dispatch_buffer too (both buffers' waits and fills captured)."""
    replays = 3 if routing == "anywhere" else 6
    assert all(device_route.run(rank_graph_capture, _seed(), replays, routing.split("-")[0],
                                "-zero-copy" in routing, routing.endswith("-dispatch")))


def test_compile_fullgraph_with_num_worst_tokens(device_route):
    """get_dispatch_layout, dispatch, a re-dispatch and combine across nodes, forward and
    backward, as one fullgraph inductor graph with no unbacked size (the device route's handle
    has a fixed size), equal to eager bit for bit (test_compile.rank_ops)."""
    device_route.run(compile_checks.rank_ops, _seed(), "worst", device="cuda", timeout_s=300)


def rank_first_calls_of_different_widths(seed):
    """The group's first calls across nodes need rows of different widths: topk_weights on rank 0
    only, rows just past the default stride with them (hidden 8256 bf16, top-32) and within it
    without. The ranks size the one symmetric buffer alike, the widest (before, each sized its own:
    the regions' offsets then differed from rank to rank); the mixed call itself is refused; then
    full calls of that width match the reference."""
    import torch.distributed as dist

    num_experts, g, x, idx, w = checks.make_inputs(seed, "random", 8256, 32, 8, torch.bfloat16, "cuda")
    # Refused on every rank (the hosts wait for the records); before the buffer agreed on its
    # stride, the notify timed out instead (the regions' offsets differed).
    with pytest.raises(RuntimeError, match="whether topk_weights are sent"):
        torch_ep.dispatch(x, idx, w if dist.get_rank() == 0 else None, num_experts=num_experts)
    checks.rank_dispatch_combine(seed + 1, "random", 8256, 32, 8, torch.bfloat16, device="cuda")


@pytest.mark.parametrize("topology", topologies())
def test_first_calls_of_different_widths(topology):
    # A fresh group (the buffer is sized by its first call) at the default row stride.
    _pool(topology, "device", {"TORCH_EP_INTERNODE_ROW_BYTES": "0"}).run(rank_first_calls_of_different_widths, _seed())
