"""Run a function on several CPU processes joined by torch.distributed (gloo on loopback).

``run_ranks(fn, world_size)`` spawns ``world_size`` fresh processes, initialises a gloo process
group on a free local port with a bounded timeout, calls ``fn(rank, world_size, *args)`` in each
and returns their results by rank. Nothing can hang the suite: every collective times out after
``group_timeout_s``, and the parent gives every rank ``timeout_s`` in all, then kills the
stragglers and fails with each rank's traceback (or "did not finish").
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, group_timeout_s, fn, args, results):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=group_timeout_s))
        results.put((rank, "ok", fn(rank, world_size, *args)))
    except BaseException:  # report everything, including assertion errors, to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        results.close()
        results.join_thread()  # deliver the result before leaving
        # Skip destroy_process_group: after a deliberate timeout a peer may still be gone.
        os._exit(0)


def run_ranks(fn, world_size: int, *args, timeout_s: float = 120.0, group_timeout_s: float = 30.0) -> list:
    """``[fn(0, W, *args), ..., fn(W-1, W, *args)]``, each computed in its own process."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, group_timeout_s, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    got: dict[int, tuple[str, object]] = {}
    try:
        while len(got) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                rank, status, value = results.get(timeout=min(left, 1.0))
                got[rank] = (status, value)
            except queue.Empty:
                if all(not p.is_alive() for p in procs) and results.empty():
                    break
    finally:
        for p in procs:
            p.join(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    problems = [f"rank {r}: {got[r][1]}" for r in sorted(got) if got[r][0] == "error"]
    late = time.monotonic() >= deadline
    missing = f"did not finish within {timeout_s:.0f} s (killed)" if late else "exited without a result"
    problems += [f"rank {r}: {missing}" for r in range(world_size) if r not in got]
    if problems:
        raise AssertionError(f"{len(problems)} of {world_size} ranks failed:\n" + "\n".join(problems))
    return [got[r][1] for r in range(world_size)]
