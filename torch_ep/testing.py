"""Helpers for multi-process tests: a pool of ranks that stays up across tests.

Starting N Python processes that import torch costs seconds; a test suite that did it per test
would spend most of its time there. ``RankPool`` starts the ranks once, joins them in one
process group, and runs module-level functions on every rank, returning each rank's result or
raising with every failing rank's traceback.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional

import torch


class RankError(AssertionError):
    """One or more ranks raised; the message holds each one's traceback."""


def _rank_main(rank: int, world_size: int, init_file: str, backend: str, env: Dict[str, str],
               timeout_s: float, cuda: bool, tasks: "mp.Queue", results: "mp.Queue") -> None:
    os.environ.update(env)
    import torch.distributed as dist

    import torch_ep  # noqa: F401  registers "ep"

    torch.set_num_threads(1)
    try:
        if cuda:  # ranks beyond the GPU count share GPUs, as in GPU-NOTES.md
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
        return
    results.put((rank, True, None))
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, args, kwargs = task
        try:
            results.put((rank, True, fn(*args, **kwargs)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    try:
        dist.destroy_process_group()
    except Exception:
        pass


class RankPool:
    """`world_size` processes in one process group (default backend "ep"), run on demand.

    ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank (fn must be importable:
    a module-level function) and returns the per-rank results, indexed by rank.
    """

    def __init__(self, world_size: int, backend: str = "ep", env: Optional[Dict[str, str]] = None,
                 timeout_s: float = 60.0, cuda: bool = False):
        self.world_size = world_size
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="torch_ep_pool_")
        init_file = os.path.join(self._dir.name, "store")
        self._results = ctx.Queue()
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._procs = [
            ctx.Process(target=_rank_main, daemon=True,
                        args=(r, world_size, init_file, backend, dict(env or {}), timeout_s, cuda,
                              self._tasks[r], self._results))
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self.broken = False
        self._collect("process group initialisation", timeout_s + 60)

    def _collect(self, what: str, timeout_s: float) -> List[Any]:
        out: List[Any] = [None] * self.world_size
        answered, errors = set(), {}
        deadline = time.monotonic() + timeout_s
        while len(answered) < self.world_size:
            try:
                rank, ok, value = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in answered]
                if dead or time.monotonic() > deadline:
                    self.broken = True
                    why = f"ranks {dead} died" if dead else f"no answer within {timeout_s:.0f} s"
                    raise RankError(f"{what}: {why}; errors so far: {errors}") from None
                continue
            answered.add(rank)
            if ok:
                out[rank] = value
            else:
                errors[rank] = value
        if errors:
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RankError(f"{what} failed on ranks {sorted(errors)}:\n{text}")
        return out

    def run(self, fn: Callable, *args, timeout_s: Optional[float] = None, **kwargs) -> List[Any]:
        if self.broken:
            raise RankError("this RankPool broke in an earlier call (a rank hung or died)")
        for q in self._tasks:
            q.put((fn, args, kwargs))
        return self._collect(getattr(fn, "__name__", str(fn)), timeout_s or self.timeout_s * 2)

    def close(self) -> None:
        for q, p in zip(self._tasks, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join()
        self._dir.cleanup()

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fills `t` with a value a correct op never produces from the test data (NaN or a sentinel)."""
    if t.dtype.is_floating_point or t.dtype.is_complex:
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
            t.view(torch.uint8).fill_(0x7F)  # NaN in e4m3fn
        elif t.dtype in (torch.float8_e5m2, torch.float8_e5m2fnuz):
            t.view(torch.uint8).fill_(0x7F)  # NaN in e5m2
        else:
            t.fill_(float("nan"))
    elif t.dtype == torch.bool:
        t.view(torch.uint8).fill_(0xAA)  # not a valid bool byte: shows up in byte comparisons
    else:
        t.fill_(torch.iinfo(t.dtype).min)
    return t


def random_tensor(shape, dtype: torch.dtype, generator: torch.Generator, device="cpu") -> torch.Tensor:
    """Fresh random data of any dtype: every byte random where the dtype allows, never zeros."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=generator).bool().to(device)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 8).to(dtype).to(device)
    if dtype.is_complex:
        return torch.randn(shape, generator=generator, dtype=dtype).to(device)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**31)), min(info.max, 2**31 - 1)
    return torch.randint(lo, hi, shape, generator=generator, dtype=torch.int64).to(dtype).to(device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, and works for every dtype incl. fp8 and bool)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a, b = a.detach().cpu().contiguous(), b.detach().cpu().contiguous()
    if a.numel() == 0:
        return True
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
