"""One-rank CUDA all_to_all_single smoke test, for debugging a build on a GPU machine."""
import os
import tempfile

import torch
import torch.distributed as dist

import torch_ep  # noqa: F401

store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
dist.init_process_group("ep", store=store, rank=0, world_size=1)
x = torch.randn(1024, device="cuda")
y = torch.empty_like(x)
dist.all_to_all_single(y, x)
torch.cuda.synchronize()
assert torch.equal(x, y)
try:  # error messages are built with ostringstream inside the extension
    dist.all_to_all_single(y, x, [3], [5])
except ValueError as e:
    print("error path ok:", e)
print("smoke ok", torch_ep.get_backend().cuda_path)
dist.destroy_process_group()
