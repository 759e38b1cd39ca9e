"""Ring attention across processes: memory, communication, load balance and skipped steps.

Spawns ``W`` processes (gloo on CPU; NCCL with one GPU per rank when there are enough GPUs), each
holding ``1/W`` of one sequence, and runs forward + backward of ``qkv.parallel.ring_attention``:

1. per-rank peak memory against world size (should fall about as ``1/W``);
2. bytes each rank sends per ring step (one K/V shard forward; a shard plus its gradient
   accumulator backward);
3. causal attention, contiguous vs zigzag layout: per-rank compute time (zigzag should even it out);
4. a sliding window: ring steps run out of ``W`` (measured), and the plan for more ranks.

On CPU, memory is the peak resident set of the call (Linux ``VmHWM``, reset just before it through
``/proc/self/clear_refs``) minus the resident set at its start: inputs, outputs, gradients and
temporaries. glibc's malloc is told to map every block over 64 KiB on its own
(``MALLOC_MMAP_THRESHOLD_``), so freed tensors leave the resident set at once and the peak is the
peak of live memory. On GPUs it is ``torch.cuda.max_memory_allocated``. Compute time is this
thread's CPU time in the blocks (``time.thread_time``), which the oversubscribed CPUs of a small
machine do not inflate; wall time is reported alongside.

    python benchmarks/ring_attention.py            # writes benchmarks/results/ring_attention.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import qkv  # noqa: E402
from qkv.bench import environment  # noqa: E402
from qkv.parallel import RingStats, build_plan, ring_attention, shard_pieces  # noqa: E402
from qkv.parallel.pairs import GlobalMask  # noqa: E402


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _rank_main(rank, world, port, config, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    use_cuda = config["cuda"]
    if use_cuda:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=300))
    mask = {"causal": qkv.causal(), "window": qkv.sliding_window(config["window"]), "full": None}[config["mask"]]
    b, h, hkv, d, n = config["batch"], config["heads"], config["kv_heads"], config["head_dim"], config["n"]
    local_n = sum(stop - start for start, stop in shard_pieces(n, world, rank, config["layout"]))

    def run(length):
        gen = torch.Generator().manual_seed(rank)
        q = torch.randn(b, h, length, d, generator=gen).to(device).requires_grad_()
        k = torch.randn(b, hkv, length, d, generator=gen).to(device).requires_grad_()
        v = torch.randn(b, hkv, length, d, generator=gen).to(device).requires_grad_()
        stats = RingStats(clock=time.perf_counter if use_cuda else time.thread_time)
        start = time.perf_counter()
        out = ring_attention(q, k, v, mask, layout=config["layout"], stats=stats, backend=config["backend"])
        out.backward(torch.ones_like(out))
        if use_cuda:
            torch.cuda.synchronize()
        return stats, time.perf_counter() - start

    # Warm-up on a small problem of the same layout, then measure.
    small = sum(stop - start for start, stop in shard_pieces(64 * world, world, rank, config["layout"]))
    run(small)
    dist.barrier()
    if use_cuda:
        torch.cuda.reset_peak_memory_stats()
        start_bytes = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak resident set
        start_bytes = _status_bytes("VmRSS")
    stats, wall = run(local_n)
    peak = torch.cuda.max_memory_allocated() if use_cuda else _status_bytes("VmHWM")
    row = {"rank": rank, "local_n": local_n, "wall_s": wall, "peak_bytes": peak - start_bytes,
           "qkv_bytes": local_n * (h + 2 * hkv) * d * 4,
           "forward_sent_per_step": stats.forward_sent, "backward_sent_per_step": stats.backward_sent,
           "forward_compute_s": sum(stats.forward_compute_s), "backward_compute_s": sum(stats.backward_compute_s),
           "forward_wait_s": sum(stats.forward_wait_s), "backward_wait_s": sum(stats.backward_wait_s),
           "plan": stats.plan.summary()}
    results.put(row)
    dist.barrier()
    dist.destroy_process_group()


def measure(world: int, config: dict) -> list[dict]:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, config, results), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    rows = [results.get(timeout=1800) for _ in range(world)]
    for p in procs:
        p.join(timeout=60)
        if p.exitcode != 0:
            raise RuntimeError(f"a rank exited with {p.exitcode}")
    return sorted(rows, key=lambda r: r["rank"])


def window_plans(n: int, window: int, worlds: list[int]) -> list[dict]:
    """Ring steps a causal sliding window needs, from the plan alone (no processes)."""
    rows = []
    for world in worlds:
        pieces = [shard_pieces(n, world, r, "contiguous") for r in range(world)]
        plan = build_plan(pieces, GlobalMask(qkv.sliding_window(window), 1, 1, n, "cpu").is_empty)
        rows.append({"world_size": world, "n": n, "window": window, **plan.summary()})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384, help="whole sequence length for memory and balance")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "ring_attention.json"))
    parser.add_argument("--parts", nargs="+", default=["memory", "balance", "window"])
    args = parser.parse_args()
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 << 10))  # for the ranks: see the docstring
    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= max(args.worlds)
    base = dict(batch=1, heads=4, kv_heads=4, head_dim=64, n=args.n, window=args.window, cuda=use_cuda,
                backend="tiled")

    memory, balance, window = [], {}, {}
    for world in args.worlds if "memory" in args.parts else []:
        rows = measure(world, {**base, "mask": "causal", "layout": "zigzag"})
        memory.append({"world_size": world, "peak_bytes_per_rank": [r["peak_bytes"] for r in rows],
                       "local_qkv_bytes": rows[0]["qkv_bytes"],
                       "forward_sent_per_step": rows[0]["forward_sent_per_step"],
                       "backward_sent_per_step": rows[0]["backward_sent_per_step"],
                       "wall_s": max(r["wall_s"] for r in rows)})
        print(f"W={world}: peak per rank {max(r['peak_bytes'] for r in rows) / 2**20:.1f} MiB, forward bytes/step "
              f"{rows[0]['forward_sent_per_step']}, backward {rows[0]['backward_sent_per_step']}", flush=True)

    world = max(args.worlds)
    for layout in ("contiguous", "zigzag") if "balance" in args.parts else []:
        rows = measure(world, {**base, "mask": "causal", "layout": layout})
        balance[layout] = [{"rank": r["rank"], "forward_compute_s": r["forward_compute_s"],
                            "backward_compute_s": r["backward_compute_s"], "wait_s": r["forward_wait_s"]
                            + r["backward_wait_s"], "wall_s": r["wall_s"]}
                           for r in rows]
        totals = [r["forward_compute_s"] + r["backward_compute_s"] for r in rows]
        print(f"causal {layout}, W={world}: compute per rank {[round(t, 2) for t in totals]} s "
              f"(max/min {max(totals) / min(totals):.2f})", flush=True)

    if "window" in args.parts:
        rows = measure(world, {**base, "mask": "window", "layout": "contiguous"})
        window = {"measured": {"world_size": world, "n": args.n, "window": args.window, **rows[0]["plan"],
                               "forward_sent_per_step_by_rank": [r["forward_sent_per_step"] for r in rows],
                               "compute_s_by_rank": [r["forward_compute_s"] + r["backward_compute_s"] for r in rows]},
                  "planned": window_plans(args.n, args.window, [2, 4, 8, 16, 32])}
        print(f"sliding_window({args.window}), W={world}: {rows[0]['plan']['steps']} of {world} steps run",
              flush=True)

    result = {"environment": {**environment(), "backend": "nccl" if use_cuda else "gloo",
                              "device": "cuda" if use_cuda else "cpu"},
              "config": {k: v for k, v in base.items() if k != "cuda"},
              "memory_vs_world_size": memory, "causal_balance": balance, "sliding_window": window}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
