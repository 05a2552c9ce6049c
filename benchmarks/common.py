"""Helpers shared by the benchmark scripts: timing, statistics, and the table, JSON and plot writers.

Timing follows DESIGN.md "Measuring": warm-up calls first, then at least 20 timed runs, and the
median is what gets reported. On the CPU a run is timed with time.perf_counter, on CUDA with
events on the current stream; either way every run starts at a barrier, so that the ranks start
together and a run measures the collective rather than a late rank.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import random
import statistics
import subprocess
import time
from collections import Counter
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_TIMED_RUNS = 20
L2_FLUSH_BYTES = 256 << 20  # several times any current GPU's L2 (H100: 50 MiB)


def time_runs(op: Callable[[], object], *, device: torch.device, runs: int = MIN_TIMED_RUNS, warmup: int = 5,
              ops_per_run: int = 1, barrier: Optional[Callable[[], object]] = None) -> List[float]:
    """Seconds per call of `op` in each of `runs` timed runs on this rank.

    A run calls `op` `ops_per_run` times back to back and counts the mean; more calls per run
    keep the barrier's exit skew small against short ops. `barrier` (e.g. a Gloo barrier of
    every rank taking part) starts each run; leave it None to time one rank alone.
    """
    for _ in range(warmup):
        op()
    cuda = device.type == "cuda"
    times = []
    for _ in range(runs):
        if cuda:
            torch.cuda.synchronize(device)
        if barrier is not None:
            barrier()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(ops_per_run):
                op()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            start_s = time.perf_counter()
            for _ in range(ops_per_run):
                op()
            seconds = time.perf_counter() - start_s
        times.append(seconds / ops_per_run)
    return times


def time_stream(op: Callable[[], object], *, device: torch.device, calls: int,
                host_s: Optional[List[float]] = None) -> List[float]:
    """Seconds of each of `calls` back-to-back calls of `op` (DeepEP's bench): each call sits
    between two events on the current stream and the host never waits in between, so it runs
    ahead of the device as a model's forward pass does. On the CPU, wall time per call.
    On CUDA `host_s` gets the host's seconds per call issued, the first call left out as the
    device times are: where it nears the device's time per call the device waits for the host,
    and the stream's figure is partly the host's (on the CPU the two are one: nothing added)."""
    if device.type != "cuda":
        times = []
        for _ in range(calls):
            start_s = time.perf_counter()
            op()
            times.append(time.perf_counter() - start_s)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(calls)]
    first = min(1, calls - 1)  # the call the host's clock starts at
    for i, (start, end) in enumerate(events):
        if i == first:
            first_s = time.perf_counter()
        start.record()
        op()
        end.record()
    issued_s = time.perf_counter()
    torch.cuda.synchronize(device)
    if host_s is not None:
        host_s.append((issued_s - first_s) / max(calls - 1, 1))
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def l2_flusher(device: torch.device) -> Callable[[], object]:
    """A call that evicts the GPU's L2 cache by writing 256 MiB (DeepEP's bench writes 256 MB),
    so that the next timed op reads its inputs from device memory; a no-op on the CPU."""
    if device.type != "cuda":
        return lambda: None
    return torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device).zero_


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def format_bytes(num_bytes: int) -> str:
    """1024 -> '1 KiB', 64 << 20 -> '64 MiB'; sizes that are not whole units keep a fraction."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if num_bytes >= 1 << shift:
            value = num_bytes / (1 << shift)
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{num_bytes} B"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table, columns padded so that it also reads well as plain text."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    def line(row):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |"
    separator = "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"
    return "\n".join([line(cells[0]), separator] + [line(row) for row in cells[1:]])


def write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")


def write_json(path: str, data: object) -> None:
    write_text(path, json.dumps(data, indent=2))


def write_plot(path: str, series: Dict[str, Tuple[Sequence[float], Sequence[float]]], *, title: str,
               xlabel: str, ylabel: str, dashed: Sequence[str] = (),
               xtick_label: Callable[[float], str] = lambda x: format_bytes(int(x)), log_y: bool = True) -> bool:
    """A PNG with one line per entry of `series` ({label: (xs, ys)}), x on a log2 axis (ticks named by
    `xtick_label`), y on a log axis unless `log_y` is False; False without matplotlib.

    matplotlib is imported here, not at the top, so that scripts run where it is not installed.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, "--" if label in dashed else "-o", label=label, markersize=4)
    ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0)
    xs = sorted({x for xs, _ in series.values() for x in xs})
    ax.set_xticks(xs, [xtick_label(x) for x in xs], rotation=45, ha="right")
    ax.minorticks_off()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def git_commit() -> str:
    """The short hash of the checked-out commit, with '+dirty' when files differ from it."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (x{torch.cuda.device_count()})"
    return f"CPU {cpu_model()}, {os.cpu_count()} cores"


def run_metadata(device: torch.device, **extra) -> Dict[str, object]:
    """What a result file needs to be read later: when, on what, from which commit."""
    return {
        "date": datetime.date.today().isoformat(),
        "commit": git_commit(),
        "machine": machine_description(device),
        "device": device.type,
        "torch": torch.__version__,
        # Other work on the machine skews timings; a load well above the ranks' count says so.
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        **extra,
    }


# ------------------------------------------------------------------ ranks (every benchmark script)

def pick_device(kind: str = "auto") -> torch.device:
    """cuda:(LOCAL_RANK % device_count) where CUDA is available (or asked for), else the CPU."""
    if kind == "cpu" or (kind == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def slowest_rank(run_times_s: List[float], sync_group) -> List[float]:
    times = torch.tensor(run_times_s, dtype=torch.float64)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=sync_group)
    return times.tolist()


def shared_seed(sync_group) -> int:
    """A fresh seed, the same on every rank: senders and receivers derive the same data from it."""
    seed = [random.getrandbits(31) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(seed, src=0, group=sync_group)
    return seed[0]


def rank_problems(problem: Optional[str], sync_group) -> List[str]:
    """Every rank's `problem` (None for none), as 'rank r: ...', the same list on every rank."""
    problems: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem, group=sync_group)
    return [f"rank {r}: {p}" for r, p in enumerate(problems) if p]


def ranks_per_gpu(device: torch.device, sync_group) -> int:
    """The most ranks that share one GPU (1 when every rank has its own)."""
    uuids: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(uuids, str(torch.cuda.get_device_properties(device).uuid), group=sync_group)
    return max(Counter(uuids).values())
