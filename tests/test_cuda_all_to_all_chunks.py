"""all_to_all on CUDA about the staged move's chunk sizes and the device protocol's settings (GPU
machines only): messages just under, at and over each cut, every pair in both directions, through
default, small and tiny staging slots and the eager path's bound; outputs poisoned and compared bit
for bit with torch_ep.reference. The helpers serve the all_to_all_v and comm pool tests too.
"""
import contextlib
import math

import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import cuda_world_sizes, rank_pool
from test_cuda_all_to_all import EAGER_BYTES, PROTOCOLS, _seed, cuda_pool  # noqa: F401 (cuda_pool: a fixture)
from torch_ep import reference
from torch_ep.testing import poison_, random_tensor, same_bits, where_bits_differ

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")


# Message sizes in bytes about the staged move's chunks (backend/kernels/all_to_all_v.cu cuts each
# message into chunks of its own size, from 32 KiB up to one staging slot, spread over the lanes in
# at least 4 rounds; its sender and its receiver must cut it alike): empty, a few bytes, under
# 32 KiB, either side of 32 KiB, between 32 KiB and a 64 KiB slot (SMALL_SLOTS), either side of
# that slot, a few such slots, just past 1 MiB (8 default 128 KiB slots), and many rounds of
# 64 KiB slots. None but the empty one is a multiple of 16 bytes.
CHUNK_EDGE_BYTES = (0, 5, 1000, (32 << 10) - 1, (32 << 10) + 1, (48 << 10) + 7, (64 << 10) - 3, (64 << 10) + 5,
                    (300 << 10) + 11, (1 << 20) + 1, (7 << 19) + 13)
# cuda_buffer_bytes that cut the host protocol's chunks small, with 64 KiB staging slots for the
# device protocol (Options.all_to_all_slot_bytes), and a buffer whose slot would be under the
# smallest, 4 KiB (the buffer over ranks x lanes x 2).
SMALL_SLOTS, TINY_SLOTS = 4 << 20, 64 << 10
# Many rounds of the default 128 KiB slots (a round is lanes x 128 KiB: 4 MiB at 2 ranks).
LARGE_MESSAGE_BYTES = (40 << 20) + 3


def chunk_edge_matrix(size: int, call: int, large: bool = False) -> torch.Tensor:
    """[src, dst] message bytes of call `call`, the same on every rank. Over len(CHUNK_EDGE_BYTES)
    calls every pair meets every size, and a pair's two directions always differ (3s + 5d and
    3d + 5s differ mod 11), so each block of the move sends and receives messages cut into
    chunks of different sizes and counts. `large`: rank 0 sends the last rank LARGE_MESSAGE_BYTES."""
    n = len(CHUNK_EDGE_BYTES)
    m = torch.tensor([[CHUNK_EDGE_BYTES[(call + 3 * s + 5 * d) % n] for d in range(size)] for s in range(size)],
                     dtype=torch.int64)
    if large:
        m[0, size - 1] = LARGE_MESSAGE_BYTES
    return m


def chunk_edge_input(rows: int, dtype, row_shape, generator, device="cuda") -> torch.Tensor:
    """Random rows; as uint8, never 0 (poison_'s value for uint8), so that no byte left unwritten
    can pass for data."""
    if dtype == torch.uint8:
        return torch.randint(1, 256, (rows, *row_shape), generator=generator, dtype=torch.uint8).to(device)
    return random_tensor((rows, *row_shape), dtype, generator, device)


# Raw bytes (every size exact, mostly unaligned), and 12-byte rows (sizes rounded up to rows).
CHUNK_EDGE_ROWS = ((torch.uint8, ()), (torch.float32, (3,)))


def chunk_edge_rows(m: torch.Tensor, dtype, row_shape) -> torch.Tensor:
    """The bytes of m as whole rows of dtype x row_shape, rounded up."""
    row_bytes = torch.empty((), dtype=dtype).element_size() * math.prod(row_shape)
    return (m + row_bytes - 1) // row_bytes


@contextlib.contextmanager
def chunk_edge_groups():
    """{name: group}: the default group (None), and groups with 64 KiB and 4 KiB staging slots;
    those are destroyed afterwards."""
    groups = {"default": None}
    try:
        for name, options in (("64 KiB slots", dict(cuda_buffer_bytes=SMALL_SLOTS, all_to_all_slot_bytes=64 << 10)),
                              ("4 KiB slots", dict(cuda_buffer_bytes=TINY_SLOTS))):
            groups[name] = dist.new_group(pg_options=torch_ep.Options(**options))
        yield groups
    finally:
        for group in groups.values():
            if group is not None:
                dist.destroy_process_group(group)


def chunk_edge_cases(seed, groups, large_groups=("default",)):
    """(what, group, dtype, row_shape, rows, generator) for every call of the chunk-edge tests:
    each group in turn, every CHUNK_EDGE_BYTES matrix as each kind of row (rows: [src, dst] rows
    of the message, the same on every rank), and on the groups named in large_groups one call with
    a message of many rounds; the generator draws this rank's input of that call."""
    rank, size = dist.get_rank(), dist.get_world_size()
    n = len(CHUNK_EDGE_BYTES)
    for name, group in groups.items():
        for call in range(n + (name in large_groups)):
            large = call == n
            m = chunk_edge_matrix(size, (seed + call) % n, large=large)
            for dtype, row_shape in CHUNK_EDGE_ROWS[:1] if large else CHUNK_EDGE_ROWS:
                g = torch.Generator().manual_seed(seed * 131 + call * 17 + rank)
                yield (f"{name}, bytes {m.tolist()}, {dtype} {row_shape}", group, dtype, row_shape,
                       chunk_edge_rows(m, dtype, row_shape), g)


def rank_chunk_edges(seed):
    """all_to_all_single of CHUNK_EDGE_BYTES messages, every pair in both directions, through the
    device protocol's default 128 KiB staging slots (one call with a message of many rounds too),
    64 KiB and 4 KiB slots (the host protocol's chunks, cut from the same buffer sizes, likewise);
    outputs poisoned, compared bit for bit with the reference."""
    with chunk_edge_groups() as groups:
        for what, group, dtype, row_shape, rows, g in chunk_edge_cases(seed, groups):
            chunk_edge_call(group, dtype, row_shape, rows, g, what)


def chunk_edge_call(group, dtype, row_shape, rows, g, what):
    """One all_to_all_single of a chunk_edge_cases case into a poisoned output, checked bit for
    bit against the reference; returns (input, output, expected output)."""
    rank = dist.get_rank()
    in_splits, out_splits = rows[rank].tolist(), rows[:, rank].tolist()
    inp = chunk_edge_input(sum(in_splits), dtype, row_shape, g)
    out = poison_(torch.empty((sum(out_splits), *row_shape), dtype=dtype, device="cuda"))
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    expected = reference.all_to_all_single(out.shape, inp.cpu(), out_splits, in_splits, group=group)
    assert same_bits(out, expected), \
        f"{what}: all_to_all_single output differs: {where_bits_differ(out, expected, out_splits)}"
    return inp, out, expected


def test_messages_about_the_chunk_sizes(cuda_pool):
    cuda_pool.run(rank_chunk_edges, seed=_seed(), timeout_s=300)


# The device protocol's settings (torch_ep.Options.all_to_all_*) other than the defaults: few lanes
# and slots under, at and over the 32 KiB least chunk (a message then takes many rounds), the
# largest lane count with 1 MiB slots, and plan and move in one launch.
KNOB_GROUPS = {
    "3 lanes, 8 KiB slots": dict(all_to_all_lanes=3, all_to_all_slot_bytes=8 << 10),
    "1 lane, 36 KiB slots": dict(all_to_all_lanes=1, all_to_all_slot_bytes=36 << 10),
    "32 lanes, 1 MiB slots": dict(all_to_all_lanes=32, all_to_all_slot_bytes=1 << 20),
    "one launch": dict(all_to_all_one_launch=True),
}


def rank_device_protocol_settings(seed):
    """all_to_all_single of CHUNK_EDGE_BYTES messages on the device protocol with each of
    KNOB_GROUPS' settings (one call with a message of many rounds each), and all_to_all_v into a
    given output on the same groups (its plan and move in one launch on the last); outputs
    poisoned, compared bit for bit with the reference."""
    rank = dist.get_rank()
    groups = {}
    try:
        for name, options in KNOB_GROUPS.items():
            groups[name] = dist.new_group(pg_options=torch_ep.Options(all_to_all_device=True, **options))
        for what, group, dtype, row_shape, rows, g in chunk_edge_cases(seed, groups, large_groups=tuple(groups)):
            inp, out, expected = chunk_edge_call(group, dtype, row_shape, rows, g, what)
            poison_(out)
            res = torch_ep.all_to_all_v(inp, rows[rank].cuda(), output=out, group=group)
            torch.cuda.synchronize()
            torch_ep.check_errors(group)
            assert same_bits(out, expected), f"{what}: all_to_all_v output differs"
            assert res.output_splits.tolist() == rows[:, rank].tolist(), f"{what}: all_to_all_v output_splits"
    finally:
        for group in groups.values():
            dist.destroy_process_group(group)


@pytest.mark.parametrize("protocol", ["device", "eager"])
@pytest.mark.parametrize("world_size", cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def test_device_protocol_settings(world_size, protocol):
    rank_pool(world_size, cuda=True, env=PROTOCOLS[protocol]).run(rank_device_protocol_settings, seed=_seed(),
                                                                   timeout_s=300)


def rank_eager_threshold(seed, eager_bytes):
    """The eager path about its bound: messages of eager_bytes - 1, eager_bytes and eager_bytes + 1
    (and empty ones) in one call, every pair both ways, as raw bytes and as 12-byte rows, with the
    plan and move in two launches and in one; then a call all of whose messages fit, captured in a
    CUDA graph and replayed. Outputs poisoned, compared bit for bit with the reference."""
    rank, size = dist.get_rank(), dist.get_world_size()
    edges = (0, eager_bytes - 1, eager_bytes, eager_bytes + 1, 16, eager_bytes + 4096)
    groups = {}
    try:
        for name, options in (("two launches", {}), ("one launch", dict(all_to_all_one_launch=True))):
            groups[name] = dist.new_group(pg_options=torch_ep.Options(
                all_to_all_device=True, all_to_all_eager_bytes=eager_bytes, **options))
        for name, group in groups.items():
            for call in range(len(edges)):
                m = torch.tensor([[edges[(call + 2 * s + 3 * d) % len(edges)] for d in range(size)]
                                  for s in range(size)], dtype=torch.int64)
                for dtype, row_shape in CHUNK_EDGE_ROWS:
                    g = torch.Generator().manual_seed(seed * 131 + call * 17 + rank)
                    chunk_edge_call(group, dtype, row_shape, chunk_edge_rows(m, dtype, row_shape), g,
                                    f"{name}, eager {eager_bytes}, bytes {m.tolist()}, {dtype} {row_shape}")
            # All messages fit: the eager launch alone, captured and replayed.
            g = torch.Generator(device="cuda").manual_seed(seed + rank)
            static_in = torch.randint(1, 256, (size * eager_bytes,), dtype=torch.uint8, device="cuda", generator=g)
            static_out = torch.empty_like(static_in)
            dist.all_to_all_single(static_out, static_in, group=group)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                dist.all_to_all_single(static_out, static_in, group=group)
            for _ in range(5):
                static_in.random_(1, 256, generator=g)
                poison_(static_out)
                graph.replay()
                torch.cuda.synchronize()
                expected = reference.all_to_all_single(static_out.shape, static_in.cpu(), group=group)
                assert same_bits(static_out, expected), f"{name}: a replay's output differs"
    finally:
        for group in groups.values():
            dist.destroy_process_group(group)


@pytest.mark.parametrize("world_size", cuda_world_sizes(), ids=lambda n: f"{n}ranks")
def test_eager_threshold(world_size):
    pool = rank_pool(world_size, cuda=True, env=PROTOCOLS["device"])
    for eager_bytes in (1008, EAGER_BYTES):
        pool.run(rank_eager_threshold, seed=_seed(), eager_bytes=eager_bytes, timeout_s=300)
