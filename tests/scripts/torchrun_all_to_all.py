"""A user's script, run under torchrun: init_process_group(backend="ep") with no other argument,
one uneven all_to_all_single checked against torch_ep.reference and one all_reduce checked
against its closed form. Prints one "OK" line per rank; any mismatch raises (non-zero exit)."""
import os

import torch
import torch.distributed as dist

import torch_ep
from torch_ep import reference


def main() -> None:
    dist.init_process_group(backend="ep")  # rank, world size and rendezvous from torchrun's environment
    rank, size = dist.get_rank(), dist.get_world_size()
    assert dist.get_backend() == "ep", dist.get_backend()
    assert rank == int(os.environ["RANK"]) and size == int(os.environ["WORLD_SIZE"])

    seed = int(os.environ.get("TEST_SEED", "1234"))
    splits = torch.randint(1, 6, (size, size), generator=torch.Generator().manual_seed(seed))  # [src, dst] rows
    in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
    x = torch.randn(sum(in_splits), 33, generator=torch.Generator().manual_seed(seed + 1 + rank))
    y = torch.full((sum(out_splits), 33), float("nan"))
    dist.all_to_all_single(y, x, out_splits, in_splits)
    expected = reference.all_to_all_single(y.shape, x, out_splits, in_splits)
    assert torch.equal(y, expected), f"rank {rank}: all_to_all_single differs from the reference"

    t = torch.full((4,), float(rank + 1), dtype=torch.float64)
    dist.all_reduce(t)
    assert torch.equal(t, torch.full((4,), size * (size + 1) / 2, dtype=torch.float64)), f"rank {rank}: all_reduce {t}"

    backend = torch_ep.get_backend()
    print(f"OK rank={rank} world_size={size} host_path={backend.host_path} "
          f"slot_bytes={backend.config.host_slot_bytes} rows={y.shape[0]}", flush=True)
    # Dropped before destroy_process_group: a ProcessGroupEP whose last reference is a Python one can
    # deadlock on release (tests/test_torchrun.py::test_releasing_last_backend_reference_does_not_hang).
    del backend
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
