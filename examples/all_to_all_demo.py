"""all_to_all_single through torch_ep's "ep" backend, checked, then timed against Gloo.

    torchrun --nproc-per-node 4 examples/all_to_all_demo.py

Runs on CPU tensors (the shared-memory transport), or on cuda:(LOCAL_RANK % device_count) where
there is a GPU. The measuring is benchmarks/all_to_all.py's; this is its short form.
"""
import os
import sys

import torch.distributed as dist

import torch_ep  # noqa: F401  registers the "ep" backend

# For `benchmarks`; after torch_ep's import, so that the installed torch_ep (with its built
# extension) wins over the source tree's.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import all_to_all as bench  # noqa: E402
from benchmarks.common import format_bytes  # noqa: E402

SIZES = [64 << 10, 1 << 20, 16 << 20]  # bytes sent per rank


def main() -> None:
    device = bench.pick_device()
    dist.init_process_group(backend="ep")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    gloo = dist.new_group(backend="gloo")
    if rank == 0:
        print(f"torch_ep: {world_size} ranks on {device.type}; default group backend {dist.get_backend()!r}",
              flush=True)

    measurements = []
    for size in SIZES:
        # Checks each output against the expected bytes before timing it.
        measurements += bench.measure_size({"ep": dist.group.WORLD, "gloo": gloo}, size, device, gloo,
                                           runs=20, warmup=3)
    if rank == 0:
        print(f"all_to_all_single output checked at {', '.join(map(format_bytes, SIZES))} per rank: correct")
        print(bench.results_table(measurements, world_size))
        print("algbw = bytes sent per rank / time; busbw = algbw * (R-1)/R; times are medians of 20 runs")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
