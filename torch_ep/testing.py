"""Helpers for multi-process tests: a pool of ranks that stays up across tests.

Starting N Python processes that import torch costs seconds; a test suite that did it per test
would spend most of its time there. ``RankPool`` starts the ranks once, joins them in one
process group, and runs module-level functions on every rank (or on some of them), returning
each rank's result or raising with every failing rank's traceback. Fault tests may SIGKILL a
rank (``kill``): each rank talks to the test process over its own pipe, so a rank that dies
mid-message can block nobody else (a shared multiprocessing.Queue has a write lock that a
killed rank can take to its grave, which hung the survivors' answers).
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch


class RankError(AssertionError):
    """One or more ranks raised, hung or died; the message holds each one's traceback."""


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel SIGKILLs this rank when the test process dies, even mid-task. A rank
    that only noticed at its next recv() finished its task first (a fault test waits out a
    timeout), holding its GPU's MPS client while the next job started ("busy or unavailable").
    The kernel watches the thread that started the rank: RankPool is made on the test's thread."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0 and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before the signal was armed


def _rank_main(rank: int, world_size: int, init_file: str, backend: str, env: Dict[str, str],
               timeout_s: float, cuda: bool, conn, parent_pid: int) -> None:
    _die_with_parent(parent_pid)
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
        conn.send((False, traceback.format_exc()))
        return
    conn.send((True, None))
    while True:
        try:
            task = conn.recv()
        except EOFError:  # the test process went away
            break
        if task is None:
            break
        fn, args, kwargs = task
        try:
            result = (True, fn(*args, **kwargs))
        except BaseException:
            result = (False, traceback.format_exc())
        conn.send(result)
    try:
        dist.destroy_process_group()
    except BaseException:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # close() reports the exit code


class RankPool:
    """`world_size` processes in one process group (default backend "ep"), run on demand.

    ``pool.run(fn, *args)`` calls ``fn(*args)`` on every rank (fn must be importable:
    a module-level function) and returns the per-rank results, indexed by rank;
    ``pool.run_on(ranks, fn, *args)`` on some ranks only. Every wait is bounded: a rank that
    does not answer within the timeout, or dies, raises RankError and marks the pool broken.
    """

    def __init__(self, world_size: int, backend: str = "ep", env: Optional[Dict[str, str]] = None,
                 timeout_s: float = 60.0, cuda: bool = False):
        self.world_size = world_size
        self.timeout_s = timeout_s
        ctx = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory(prefix="torch_ep_pool_")
        init_file = os.path.join(self._dir.name, "store")
        self._conns, self._procs = [], []
        for r in range(world_size):
            ours, theirs = ctx.Pipe()
            self._conns.append(ours)
            self._procs.append(ctx.Process(target=_rank_main, daemon=True,
                                           args=(r, world_size, init_file, backend, dict(env or {}), timeout_s,
                                                 cuda, theirs, os.getpid())))
            self._procs[-1].start()
            theirs.close()  # only the child holds its end: its death shows here as end-of-file
        self.pids = [p.pid for p in self._procs]
        self.broken = False
        self._exit_codes: Optional[List[Optional[int]]] = None
        try:
            self._collect("process group initialisation", range(world_size), timeout_s + 60)
        except BaseException:
            self.close()  # no process outlives a failed start
            raise

    def _collect(self, what: str, ranks: Iterable[int], timeout_s: float) -> Dict[int, Any]:
        pending = {self._conns[r]: r for r in ranks}
        out: Dict[int, Any] = {}
        errors: Dict[int, str] = {}
        dead: List[int] = []
        deadline = time.monotonic() + timeout_s
        while pending:
            ready = mp.connection.wait(list(pending), timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.broken = True
                raise RankError(f"{what}: no answer within {timeout_s:.0f} s from ranks {sorted(pending.values())}; "
                                f"errors so far: {errors}")
            for conn in ready:
                rank = pending.pop(conn)
                try:
                    ok, value = conn.recv()
                except (EOFError, OSError):
                    dead.append(rank)
                    continue
                (out if ok else errors)[rank] = value
        if dead:
            self.broken = True
            for r in dead:
                self._procs[r].join(timeout=5)
            codes = {r: self._procs[r].exitcode for r in dead}
            raise RankError(f"{what}: ranks {sorted(dead)} died (exit codes {codes}); errors so far: {errors}")
        if errors:
            # A rank's transport failed (a collective left waiting when another rank raised): its
            # group takes no more calls, so later tests get a fresh pool, not this test's failure.
            if any("DistBackendError" in tb for tb in errors.values()):
                self.broken = True
            text = "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items()))
            raise RankError(f"{what} failed on ranks {sorted(errors)}:\n{text}")
        return out

    def run(self, fn: Callable, *args, timeout_s: Optional[float] = None, **kwargs) -> List[Any]:
        out = self.run_on(range(self.world_size), fn, *args, timeout_s=timeout_s, **kwargs)
        return [out[r] for r in range(self.world_size)]

    def run_on(self, ranks: Iterable[int], fn: Callable, *args, timeout_s: Optional[float] = None,
               **kwargs) -> Dict[int, Any]:
        """Runs fn on `ranks` only (the others stay idle); returns {rank: result}."""
        ranks = list(ranks)
        self.start(ranks, fn, *args, **kwargs)
        return self.results(ranks, getattr(fn, "__name__", str(fn)), timeout_s)

    def start(self, ranks: Iterable[int], fn: Callable, *args, **kwargs) -> None:
        """Starts fn on `ranks` and returns at once (a fault test kills a rank meanwhile);
        results() collects the answers."""
        if self.broken:
            raise RankError("this RankPool broke in an earlier call (a rank hung or died)")
        for r in ranks:
            try:
                self._conns[r].send((fn, args, kwargs))
            except OSError:
                self.broken = True
                raise RankError(f"{getattr(fn, '__name__', fn)}: rank {r} is gone "
                                f"(exit code {self._procs[r].exitcode})") from None

    def results(self, ranks: Iterable[int], what: str = "results", timeout_s: Optional[float] = None) -> Dict[int, Any]:
        """The answers of `ranks` to what start() sent them, {rank: result}."""
        return self._collect(what, ranks, timeout_s or self.timeout_s * 2)

    def kill(self, rank: int) -> None:
        """SIGKILLs one rank (fault tests) and reaps it; the pool no longer runs on every rank."""
        os.kill(self._procs[rank].pid, signal.SIGKILL)
        self._procs[rank].join(timeout=self.timeout_s)
        if self._procs[rank].exitcode != -signal.SIGKILL:
            raise RankError(f"rank {rank} did not die of SIGKILL (exit code {self._procs[rank].exitcode})")

    def close(self) -> List[Optional[int]]:
        """Destroys the process group on every live rank and ends the processes; returns their
        exit codes (0: destroy_process_group and exit were clean; -9: killed). Ranks that do not
        exit within the timeout are killed."""
        if self._exit_codes is not None:
            return self._exit_codes
        self.broken = True  # runs nothing more
        for conn, p in zip(self._conns, self._procs):
            if p.is_alive():
                try:
                    conn.send(None)
                except OSError:
                    pass
        deadline = time.monotonic() + self.timeout_s
        for p in self._procs:
            p.join(timeout=max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(self._procs) if p.is_alive()]
        for r in hung:
            self._procs[r].kill()
            self._procs[r].join()
        for conn in self._conns:
            conn.close()
        self._dir.cleanup()
        self._exit_codes = [None if r in hung else p.exitcode for r, p in enumerate(self._procs)]
        return self._exit_codes

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


def where_bits_differ(a: torch.Tensor, b: torch.Tensor, row_splits=None) -> str:
    """For a failed same_bits: how many bytes differ and where the first one lies (its row and,
    given the rows per source rank, the source), so that a failure on a GPU run says which
    message went wrong."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"shape/dtype {tuple(a.shape)} {a.dtype} against {tuple(b.shape)} {b.dtype}"
    x = a.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    y = b.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
    wrong = (x != y).nonzero().flatten()
    if wrong.numel() == 0:
        return "no byte differs"
    first, last = int(wrong[0]), int(wrong[-1])
    row_bytes = max(1, x.numel() // max(1, a.shape[0] if a.dim() else 1))
    where = f"{wrong.numel()} of {x.numel()} bytes differ, bytes {first}..{last} (row {first // row_bytes})"
    if row_splits is not None:
        start = 0
        for source, rows in enumerate(row_splits):
            if first // row_bytes < start + rows:
                where += f", first in the rows from rank {source} (rows {start}..{start + rows - 1})"
                break
            start += rows
    return where
