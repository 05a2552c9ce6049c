"""Launching as users do: torchrun with init_process_group(backend="ep") and no other arguments,
and init_process_group with an explicit Store (TCPStore, FileStore) from plain spawned processes."""
import multiprocessing as mp
import os
import queue
import re
import signal
import subprocess
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "scripts" / "torchrun_all_to_all.py"
LAUNCH_TIMEOUT_S = 120


def run_process_group(cmd, env, timeout_s):
    """Runs `cmd` in its own session; on timeout kills the whole session (torchrun's workers too,
    which killing torchrun alone would leave running) and reports the timeout as exit code None."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
        return proc.returncode, stdout, stderr
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr + f"\n[killed after {timeout_s} s]"


def test_torchrun_standalone():
    """`python -m torch.distributed.run --standalone --nproc-per-node 2 script.py` runs an "ep" job to exit 0.

    The script checks an uneven all_to_all_single against the reference and an all_reduce; each rank
    prints what it used, which shows the shared-memory path ran and that TORCH_EP_* variables reach
    the group's options.
    """
    seed = int(torch.randint(0, 2**30, ()).item())
    env = dict(os.environ, TEST_SEED=str(seed), TORCH_EP_HOST_SLOT_BYTES="4096", TORCH_EP_TIMEOUT_S="60",
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "0", str(SCRIPT)]
    returncode, stdout, stderr = run_process_group(cmd, env, LAUNCH_TIMEOUT_S)
    log = f"exit code {returncode}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr[-4000:]}"
    assert returncode == 0, log

    splits = torch.randint(1, 6, (2, 2), generator=torch.Generator().manual_seed(seed))
    # The ranks share one stdout pipe: their lines may interleave, so find each report by pattern.
    lines = sorted(re.findall(r"OK rank=\d+ world_size=\d+ host_path=\w* slot_bytes=\d+ rows=\d+", stdout))
    expected = [f"OK rank={r} world_size=2 host_path=shm slot_bytes=4096 rows={int(splits[:, r].sum())}"
                for r in range(2)]
    assert lines == expected, log


# ----------------------------------------------------------------------------- explicit store


def store_rank_main(rank, world_size, port, file_store_path, seed, results):
    """One rank: init "ep" on a TCPStore, check, destroy; then again on a FileStore (re-created group)."""
    try:
        import torch.distributed as dist

        import torch_ep
        from torch_ep import reference

        torch.set_num_threads(1)
        rows = []
        stores = [
            lambda: dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=timedelta(seconds=60)),
            lambda: dist.FileStore(file_store_path, world_size),
        ]
        for round_id, make_store in enumerate(stores):
            dist.init_process_group("ep", store=make_store(), rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=60))
            assert dist.get_backend() == "ep"
            g = torch.Generator().manual_seed(seed + round_id)
            splits = torch.randint(0, 5, (world_size, world_size), generator=g)
            in_splits, out_splits = splits[rank].tolist(), splits[:, rank].tolist()
            x = torch.randint(-2**40, 2**40, (sum(in_splits), 5), generator=torch.Generator().manual_seed(seed + rank))
            y = torch.full((sum(out_splits), 5), -1, dtype=torch.int64)
            dist.all_to_all_single(y, x, out_splits, in_splits)
            assert torch.equal(y, reference.all_to_all_single(y.shape, x, out_splits, in_splits)), \
                f"round {round_id}: all_to_all_single differs from the reference"
            t = torch.tensor([rank + 1.0, -rank])
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            assert t.tolist() == [float(world_size), 0.0], f"round {round_id}: all_reduce MAX gave {t}"
            rows.append((torch_ep.get_backend().host_path, y.shape[0]))
            dist.destroy_process_group()
        results.put((rank, True, rows))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def test_init_with_explicit_store(tmp_path):
    """init_process_group("ep", store=TCPStore|FileStore, rank=, world_size=) from spawned processes,
    twice in a row (the default group destroyed and re-created)."""
    import torch.distributed as dist

    world_size = 3
    seed = int(torch.randint(0, 2**30, ()).item())
    server = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                           timeout=timedelta(seconds=60))  # held by the test: the port is known before spawning
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=store_rank_main, daemon=True,
                         args=(r, world_size, server.port, str(tmp_path / "filestore"), seed, results))
             for r in range(world_size)]
    for p in procs:
        p.start()
    answers = {}
    try:
        for _ in range(world_size):
            rank, ok, value = results.get(timeout=LAUNCH_TIMEOUT_S)
            answers[rank] = (ok, value)
    except queue.Empty:
        pass
    finally:
        for p in procs:
            p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join()
    failures = {r: v for r, (ok, v) in answers.items() if not ok}
    assert not failures, "\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failures.items()))
    assert sorted(answers) == list(range(world_size)), f"no answer from ranks {set(range(world_size)) - set(answers)}"
    for r in range(world_size):
        expected_rows = [int(torch.randint(0, 5, (world_size, world_size),
                                           generator=torch.Generator().manual_seed(seed + i))[:, r].sum())
                         for i in range(2)]
        assert answers[r][1] == [("shm", n) for n in expected_rows]
    assert [p.exitcode for p in procs] == [0] * world_size


# ----------------------------------------------------------------------------- releasing the backend


def release_rank_main(rank, init_file, results):
    """Holds torch_ep.get_backend() (as a user script may), destroys the group while an all_reduce
    is still in flight on Gloo's thread, then drops that last reference."""
    try:
        import time

        import torch.distributed as dist

        import torch_ep

        dist.init_process_group("ep", init_method=f"file://{init_file}", rank=rank, world_size=2,
                                timeout=timedelta(seconds=30))
        backend = torch_ep.get_backend()
        results.put((rank, True, "ready"))
        if rank == 1:
            time.sleep(1.0)  # rank 0's all_reduce waits for this one on Gloo's worker thread meanwhile
        dist.all_reduce(torch.randn(1 << 12), async_op=True)  # the Work is referenced only by Gloo
        dist.destroy_process_group()
        del backend  # the last reference: ProcessGroupEP is destroyed here
        results.put((rank, True, "released"))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def test_releasing_last_backend_reference_does_not_hang(tmp_path):
    """Dropping a torch_ep.get_backend() reference after destroy_process_group returns promptly."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=release_rank_main, daemon=True, args=(r, str(tmp_path / "init"), results))
             for r in range(2)]
    for p in procs:
        p.start()
    answers = {}
    try:
        deadline = None
        while len([v for v in answers.values() if v != "ready"]) < 2:
            timeout = LAUNCH_TIMEOUT_S if deadline is None else max(0.1, deadline - time.monotonic())
            try:
                rank, ok, value = results.get(timeout=timeout)
            except queue.Empty:
                break
            assert ok, f"rank {rank} failed:\n{value}"
            answers[rank] = value
            if deadline is None and list(answers.values()).count("ready") == 2:
                deadline = time.monotonic() + 5  # about 1.5 s of work once both ranks are up
    finally:
        for p in procs:
            if p.is_alive():
                p.join(timeout=0.5)
            if p.is_alive():
                p.kill()
                p.join()
    assert answers == {0: "released", 1: "released"}, f"ranks did not release the backend: {answers}"
