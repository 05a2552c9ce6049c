"""The package builds, registers "ep", and its CUDA kernels compile where nvcc exists."""
import glob
import os
import subprocess

import pytest
import torch
import torch.distributed as dist

import torch_ep
from conftest import has_nvcc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_backend_registered():
    assert "EP" in dist.Backend._plugins
    assert dist.Backend._plugins["EP"].extended_api
    assert dist.Backend.default_device_backend_map.get("cpu") != "ep"  # we do not hijack defaults
    assert dist.Backend("ep") == "ep"


def test_extension_matches_torch():
    assert torch_ep._C.has_cuda == (torch.version.cuda is not None and torch_ep._C.has_cuda)


KERNELS = sorted(glob.glob(os.path.join(ROOT, "backend", "kernels", "*.cu")))


@pytest.mark.skipif(not has_nvcc, reason="nvcc not on PATH")
@pytest.mark.parametrize("source", KERNELS, ids=os.path.basename)
def test_kernel_compiles_for_sm90(source, tmp_path):
    """Kernels are torch-free: they compile with nvcc alone, so CI checks them without a GPU."""
    cmd = ["nvcc", "-c", "-std=c++17", "-arch=sm_90", "-O2", f"-I{ROOT}", source, "-o", str(tmp_path / "k.o")]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
