"""torch_ep's kernels are loaded when a CUDA transport is set up (GPU machines only).

Under CUDA's lazy loading a kernel's code loads at its first launch, and that load may wait for
the device: behind one of our kernels spinning on a lost peer, the host would be held until the
wait timed out (backend/transport/cuda/kernel_preload.hpp). The ranks here run with
CUDA_MODULE_LOADING=LAZY, so the preload has work to do whatever the driver's default. It is on
unless TORCH_EP_PRELOAD_KERNELS=0.
"""
import os

import pytest
import torch

import test_all_to_all as cpu_checks
import torch_ep
from conftest import rank_pool
from test_cuda_all_to_all import _seed

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() or not torch_ep._C.has_cuda,
                                reason="needs CUDA and a CUDA build of torch_ep")

LAZY = {"CUDA_MODULE_LOADING": "LAZY"}
ON = LAZY  # the default: no TORCH_EP_PRELOAD_KERNELS

# The modules built apart (no -rdc): all_to_all, all_to_all_v, internode, moe, moe_bulk, moe_push,
# moe_records, moe_unroll (backend/kernels/module_kernels.hpp). NVSHMEM builds add one.
MODULES_BUILT_APART = 8


def rank_preload_report(seed):
    """One all_to_all_single on the group's CUDA transport (checked against torch_ep.reference);
    the preload's report before and after it."""
    assert os.environ.get("CUDA_MODULE_LOADING") == "LAZY"
    before = torch_ep._C._kernels_preloaded()
    cpu_checks.check_single(torch.float32, "uneven", (33,), seed, device="cuda")
    return before, torch_ep._C._kernels_preloaded()


def test_kernels_are_loaded_when_the_transport_is_set_up():
    pool = rank_pool(2, cuda=True, env=ON)
    for rank, (before, after) in enumerate(pool.run(rank_preload_report, _seed())):
        assert after["error"] == "", f"rank {rank}: {after}"
        assert after["skipped"] == "", f"rank {rank}: {after}"
        assert after["modules"] >= MODULES_BUILT_APART, f"rank {rank}: {after}"
        assert after["functions"] > after["modules"], f"rank {rank}: {after}"  # most modules hold several
        # A pool's first CUDA op sets the transport up; a reused pool had it from an earlier test.
        assert before["modules"] in (0, after["modules"]), f"rank {rank}: {before} then {after}"


def rank_preload_off_report(seed):
    assert os.environ.get("TORCH_EP_PRELOAD_KERNELS") == "0"
    cpu_checks.check_single(torch.float32, "uneven", (33,), seed, device="cuda")
    return torch_ep._C._kernels_preloaded()


def test_preload_off():
    """TORCH_EP_PRELOAD_KERNELS=0: nothing loaded at set-up, and the ops work as before."""
    pool = rank_pool(2, cuda=True, env={**LAZY, "TORCH_EP_PRELOAD_KERNELS": "0"})
    for rank, report in enumerate(pool.run(rank_preload_off_report, _seed())):
        assert report == {"modules": 0, "functions": 0, "skipped": "TORCH_EP_PRELOAD_KERNELS=0", "error": ""}, \
            f"rank {rank}: {report}"


def rank_preload_bad_value(seed):
    with pytest.raises(RuntimeError, match=r"TORCH_EP_PRELOAD_KERNELS='2': expected 0 or 1"):
        cpu_checks.check_single(torch.float32, "uneven", (33,), seed, device="cuda")


def test_preload_bad_value():
    """A value other than 0 or 1 raises at the transport's set-up, naming the variable, on every rank."""
    rank_pool(2, cuda=True, env={"TORCH_EP_PRELOAD_KERNELS": "2"}).run(rank_preload_bad_value, _seed())
