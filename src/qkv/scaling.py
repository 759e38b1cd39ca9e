"""How attention's cost grows with the sequence length: time and peak memory against ``N``.

Each *method* is one way to attend ``(B, H, N, D)`` self-attention: exact and materialised
(``dense``: the reference backend, ``O(N^2)`` memory), exact and tiled (``tiled_full``,
``tiled_causal``: ``O(N)`` memory, ``O(N^2)`` time), exact over a sparse pattern (``window``,
``bigbird``: both ``O(N)``), and approximate (``linear``: ``elu + 1``, ``linear_causal``, ``performer``).

Every method runs in a subprocess of its own (``python -m qkv.scaling``), over increasing ``N``:
peak memory is the rise of the process's resident set during one call (``VmHWM``, reset through
``/proc/self/clear_refs``; for that call glibc maps every block of 64 KiB or more on its own, so
freed memory leaves the resident set at once), so one method's buffers never count for another;
the timed runs that follow use the allocator as usual.
Then :func:`fit_slope` fits ``log t = a + s log N`` over the long lengths and :func:`crossovers`
finds where one method becomes cheaper than another.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator

import torch

#: method -> one-line description (also the plot's legend).
METHODS = {
    "dense": "exact, materialised (reference)",
    "tiled_full": "exact, tiled (full)",
    "tiled_causal": "exact, tiled (causal)",
    "window": "exact, sliding window 512",
    "bigbird": "exact, BigBird (blocks of 128: 3 window, 1 global, 2 random)",
    "linear": "linear, elu+1",
    "linear_causal": "linear, elu+1, causal (chunked)",
    "performer": "Performer FAVOR+, 256 features",
}

DEFAULT_SEQS = (256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


def attention_call(method: str, n: int, *, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                   device: str) -> Callable[[], object]:
    """A zero-argument call that attends fresh random ``(batch, heads, n, head_dim)`` inputs."""
    import qkv
    from qkv.linear import PerformerFeatures, linear_attention

    g = torch.Generator(device=device).manual_seed(n)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g, device=device, dtype=dtype) for _ in range(3))
    exact = {
        "dense": (None, "reference"),
        "tiled_full": (None, "tiled"),
        "tiled_causal": (qkv.causal(), "tiled"),
        "window": (qkv.sliding_window(512), "tiled"),
        # Blocks of 128 match the tiled backend's tiles, so its visited tiles are FULL (no per-element test).
        "bigbird": (qkv.bigbird(block_size=128, window_blocks=3, global_blocks=1, random_blocks=2), "tiled"),
    }
    if method in exact:
        mask, backend = exact[method]
        return lambda: qkv.attention(q, k, v, mask, backend=backend)
    if method == "linear":
        return lambda: linear_attention(q, k, v)
    if method == "linear_causal":
        return lambda: linear_attention(q, k, v, qkv.causal())
    if method == "performer":
        features = PerformerFeatures(head_dim, 256, seed=0, device=device, dtype=dtype)
        return lambda: linear_attention(q, k, v, feature_map=features)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def dense_bytes(n: int, batch: int, heads: int, element: int = 4) -> int:
    """What the materialised method holds at its peak: about three ``(B, H, N, N)`` score-sized tensors."""
    return 3 * batch * heads * n * n * element


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        return True
    except OSError:
        return False


class _Malloc:
    """glibc's allocator settings (no-ops elsewhere). For the memory run every block of 64 KiB or
    more is mapped and unmapped on its own, so the resident set rises and falls with the tensors;
    for the timed runs freed memory is kept for reuse, as in a normal long-running process."""

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self):
        try:
            import ctypes

            self.libc = ctypes.CDLL("libc.so.6")
        except OSError:
            self.libc = None

    def exact_footprint(self) -> None:
        if self.libc:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 64 << 10)
            self.libc.malloc_trim(0)

    def reuse(self) -> None:
        if self.libc:
            self.libc.mallopt(self.M_MMAP_THRESHOLD, 32 << 20)  # glibc's own ceiling for its dynamic threshold
            self.libc.mallopt(self.M_TRIM_THRESHOLD, 256 << 20)


_MALLOC = _Malloc()


def measure(call: Callable[[], object], *, device: str, budget_s: float, repeat: int,
            min_total_s: float = 0.5, max_runs: int = 30) -> dict:
    """Peak memory of one call of ``call``, then its best time over at least ``repeat`` further
    runs (more while they took under ``min_total_s`` in all, at most ``max_runs``), stopping early
    once the runs would exceed ``budget_s``.

    Two clocks: ``seconds`` (wall) and, on CPU, ``cpu_seconds`` (CPU time of this process, all its
    threads): on a shared machine a process waiting for a core accrues wall time but no CPU time,
    so with one thread ``cpu_seconds`` is the cost of the work itself. Best-of-many for both."""
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    walls, cpus = [], []

    def timed():
        sync()
        w0, c0 = time.perf_counter(), time.process_time()
        call()
        sync()
        return time.perf_counter() - w0, time.process_time() - c0

    with torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            _MALLOC.exact_footprint()
            _reset_peak()
            base = (_status_kib("VmRSS") or 0) * 1024
        first_wall, first_cpu = timed()
        if cuda:
            peak = torch.cuda.max_memory_allocated() - base
        else:
            hwm = _status_kib("VmHWM")
            peak = None if hwm is None else hwm * 1024 - base
            _MALLOC.reuse()
        while len(walls) < max_runs and (not walls or sum(walls) + min(walls) < budget_s) and (
                len(walls) < repeat or sum(walls) < min_total_s):
            if not walls and first_wall > budget_s:
                break  # one run is all the budget allows: the memory run's times stand
            wall, cpu = timed()
            walls.append(wall)
            cpus.append(cpu)
    if not walls:
        walls, cpus = [first_wall], [first_cpu]
    row = {"seconds": min(walls), "runs": len(walls), "peak_bytes": peak}
    if not cuda:
        row["cpu_seconds"] = min(cpus)
    return row


def time_key(rows: list[dict]) -> str:
    """The clock the slopes and crossovers use: CPU time where every row has it, else wall time."""
    ran = [r for r in rows if "seconds" in r]
    return "cpu_seconds" if ran and all("cpu_seconds" in r for r in ran) else "seconds"


def sweep(method: str, seqs, *, batch: int, heads: int, head_dim: int, dtype: torch.dtype, device: str,
          repeat: int, max_seconds: float, max_dense_bytes: int, min_total_s: float = 0.5) -> Iterator[dict]:
    """Measure ``method`` at each length in ``seqs`` (ascending), stopping once the next point is
    predicted (from the last two) to take longer than ``max_seconds``."""
    # Warm-up: first-call costs stay out of the figures.
    measure(attention_call(method, 256, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device),
            device=device, budget_s=1.0, repeat=1, min_total_s=0.0)
    done: list[dict] = []
    for n in seqs:
        element = torch.finfo(dtype).bits // 8
        if method == "dense" and dense_bytes(n, batch, heads, element) > max_dense_bytes:
            yield {"method": method, "n": n, "skipped": "materialised scores exceed --max-dense-gib"}
            continue
        if len(done) >= 2:  # grow the last wall time by the slope of the work (CPU time where known)
            clock = "cpu_seconds" if "cpu_seconds" in done[-1] else "seconds"
            (n0, t0), (n1, t1) = [(d["n"], d[clock]) for d in done[-2:]]
            slope = max(1.0, math.log(t1 / t0) / math.log(n1 / n0)) if t0 > 0 and t1 > t0 else 1.0
            predicted = done[-1]["seconds"] * (n / n1) ** slope
            if predicted > max_seconds:
                yield {"method": method, "n": n, "skipped": f"predicted {predicted:.0f} s > --max-seconds"}
                continue
        call = attention_call(method, n, batch=batch, heads=heads, head_dim=head_dim, dtype=dtype, device=device)
        row = {"method": method, "n": n, **measure(call, device=device, budget_s=max_seconds / 4, repeat=repeat,
                                                   min_total_s=min_total_s)}
        del call
        done.append(row)
        yield row


def fit_slope(ns: list[int], values: list[float], *, min_n: int = 4096) -> float | None:
    """Slope of ``log value`` against ``log N`` over the points with ``N >= min_n`` (or the last
    three, if fewer qualify): the median of the slopes between every two points (Theil-Sen), so
    one run disturbed by other load on a shared machine does not tilt the line. None with fewer
    than two points."""
    pts = sorted((n, v) for n, v in zip(ns, values) if v and v > 0)
    long = [p for p in pts if p[0] >= min_n]
    pts = long if len(long) >= 3 else pts[-3:]
    if len(pts) < 2:
        return None
    slopes = sorted((math.log(v1 / v0)) / math.log(n1 / n0)
                    for i, (n0, v0) in enumerate(pts) for n1, v1 in pts[i + 1:] if n1 != n0)
    if not slopes:
        return None
    mid = len(slopes) // 2
    return slopes[mid] if len(slopes) % 2 else (slopes[mid - 1] + slopes[mid]) / 2


def _log_interp(ns, values, n):
    """``value`` at ``n`` by log-log interpolation (extrapolating the end segments)."""
    lx = [math.log(x) for x in ns]
    ly = [math.log(y) for y in values]
    x = math.log(n)
    i = 0 if x <= lx[0] else len(lx) - 2 if x >= lx[-1] else max(j for j in range(len(lx) - 1) if lx[j] <= x)
    t = (x - lx[i]) / (lx[i + 1] - lx[i])
    return math.exp(ly[i] + t * (ly[i + 1] - ly[i]))


def crossover(a: dict[int, float], b: dict[int, float], *, extrapolate_to: int | None = None) -> dict | None:
    """The length where method ``b`` stops being slower than ``a`` (each ``{N: seconds}``).

    Found between measured points where ``b - a`` changes sign (log-log interpolation); if it never
    does on the common lengths, extrapolated from the fitted power laws of both (``extrapolated``:
    True) when the lines converge before ``extrapolate_to``. None if ``b`` is never cheaper."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    ratio = [math.log(b[n] / a[n]) for n in common]
    if ratio[0] <= 0:
        return {"n": common[0], "extrapolated": False, "note": "cheaper from the shortest length measured"}
    for i in range(1, len(common)):
        if ratio[i] <= 0:
            x0, x1 = math.log(common[i - 1]), math.log(common[i])
            t = ratio[i - 1] / (ratio[i - 1] - ratio[i])
            return {"n": int(round(math.exp(x0 + t * (x1 - x0)))), "extrapolated": False}
    if extrapolate_to is None or len(common) < 2:
        return None
    sa = fit_slope(list(a), list(a.values()))
    sb = fit_slope(list(b), list(b.values()))
    if sa is None or sb is None or sb >= sa:
        return None
    n_last = common[-1]
    gap = ratio[-1]  # log(b / a) at the last common length, closing at (sa - sb) per unit log N
    log_n = math.log(n_last) + gap / (sa - sb)  # in logs: lines that barely converge meet far out
    if log_n > math.log(extrapolate_to):
        return None
    return {"n": int(round(math.exp(log_n))), "extrapolated": True}


def _worker(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m qkv.scaling")
    p.add_argument("method", choices=list(METHODS))
    p.add_argument("--seqs", type=int, nargs="+", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--max-seconds", type=float, default=60.0)
    p.add_argument("--max-dense-bytes", type=int, default=8 << 30)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    for row in sweep(a.method, a.seqs, batch=a.batch, heads=a.heads, head_dim=a.head_dim,
                     dtype=getattr(torch, a.dtype), device=a.device, repeat=a.repeat, max_seconds=a.max_seconds,
                     max_dense_bytes=a.max_dense_bytes):
        print(json.dumps(row), flush=True)
    return 0


def worker_environment() -> dict:
    """Environment of a worker process (this one's, so that it imports the same qkv)."""
    return dict(os.environ)


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1:]))
