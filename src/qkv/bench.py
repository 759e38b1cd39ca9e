"""Side-by-side timing of attention backends and peers, one problem at a time.

Used by ``qkv bench`` (a quick table) and ``benchmarks/attention_speed.py`` (the full grid with a
result file). Every problem is run by each qkv backend that supports it, by qkv's automatic choice
(``auto``: ``qkv.attention`` with ``backend=None``, dispatch included) and optionally by
FlexAttention called directly. After one warm-up call each (compilation happens there), the
callables are timed in **interleaved rounds** (round ``r`` runs every one of them once, starting at
a rotating position), so that load from other processes on a shared machine falls on all of them
alike; a row's time is the **median** over the rounds, every run's wall time is kept
(``Row.samples``, with the process CPU time in ``Row.cpu_samples``) so that the spread shows how
noisy the machine was, and the load average is recorded per row.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import torch

import qkv
from qkv.backends import REGISTRY
from qkv.backends import flex as flex_backend
from qkv.dispatch import choose
from qkv.problem import make_problem

#: The reference backend materialises scores and weights; skip it beyond this many bytes of them.
REFERENCE_LIMIT_BYTES = 6 << 30
MASKS = ("full", "causal", "window", "document", "prefix", "window_global")
CLOCKS = ("wall", "cpu")


@dataclass
class Row:
    """One problem's timings in seconds, the median over the rounds (None: not run, with the
    reason in ``notes``); ``samples`` every round's wall time, ``cpu_samples`` its process CPU
    time; ``load`` the 1-minute load average before and after the row."""

    seq: int
    mask: str
    times: dict[str, float | None] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    auto_choice: str = ""
    samples: dict[str, list[float]] = field(default_factory=dict)
    flex_compiles: int | None = None  # compiled versions of qkv's flex kernels after this row
    cpu_samples: dict[str, list[float]] = field(default_factory=dict)
    load: tuple[float, float] | None = None

    def spread(self, name: str, clock: str = "wall") -> tuple[float, float, float] | None:
        """``(min, median, max)`` seconds over the timed runs of ``name``, or None if it did not run."""
        runs = sorted((self.samples if clock == "wall" else self.cpu_samples).get(name) or [])
        if not runs:
            return None
        return runs[0], median(runs), runs[-1]

    @property
    def best(self) -> tuple[str, float]:
        """The fastest qkv backend (what auto could have picked) and its time."""
        ran = {k: v for k, v in self.times.items() if v is not None and k in REGISTRY}
        name = min(ran, key=ran.get)
        return name, ran[name]


def make_mask(name: str, seq: int, window: int, documents: int):
    """The benchmark's masks: full (none), causal, causal sliding window, packed documents."""
    if name == "full":
        return None
    if name == "causal":
        return qkv.causal()
    if name == "window":
        return qkv.sliding_window(window)
    if name == "document":
        return qkv.document(torch.arange(seq) * documents // seq)
    if name == "prefix":
        return qkv.prefix_lm(seq // 4)
    if name == "window_global":
        return qkv.sliding_window(window) | qkv.global_tokens(_global_positions(seq))
    raise ValueError(f"unknown mask {name!r}; choose from {MASKS}")


def _global_positions(seq: int) -> torch.Tensor:
    """The benchmark's global tokens: 8 positions spread over the sequence."""
    return torch.arange(8) * (seq // 8)


def best_time(fn: Callable[[], object], repeat: int, device: str | torch.device = "cpu") -> float:
    """Best wall time of ``repeat`` runs after a warm-up (and compilation, for compiled peers);
    on CUDA the device is synchronised around each run, so the time covers the kernels."""
    return min(run_times(fn, repeat, device))


def run_times(fn: Callable[[], object], repeat: int, device: str | torch.device = "cpu") -> list[float]:
    """Wall times of ``repeat`` runs after one warm-up run, as :func:`best_time` takes them."""
    return interleaved({"fn": fn}, repeat, device)[0]["fn"]


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, device: str | torch.device = "cpu",
                warm: bool = True) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """``(wall, cpu)``: per name, the wall and process CPU seconds of each of ``rounds`` runs.
    Each callable runs once first (``warm``; compiles happen there), then round ``r`` runs all of
    them once, starting at position ``r`` of ``fns``: neighbours in time share the machine's load."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    names = list(fns)
    for name in names if warm else ():
        fns[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            sync()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


def median(values: list[float]) -> float:
    runs = sorted(values)
    mid = len(runs) // 2
    return runs[mid] if len(runs) % 2 else (runs[mid - 1] + runs[mid]) / 2


def _flex_runner(q, k, v, mask_name, seq, window, documents):
    """FlexAttention (compiled) with the same mask as a block mask; None if unavailable."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError:
        return None, "torch has no flex_attention"
    seg = torch.arange(seq, device=q.device) * documents // seq
    is_global = torch.zeros(seq, dtype=torch.bool, device=q.device)
    is_global[_global_positions(seq).to(q.device)] = True
    prefix = seq // 4
    mods = {
        "full": None,
        "causal": lambda b, h, i, j: j <= i,
        "window": lambda b, h, i, j: (j <= i) & (j >= i - window),
        "document": lambda b, h, i, j: seg[i] == seg[j],
        "prefix": lambda b, h, i, j: (j <= i) | (j < prefix),
        "window_global": lambda b, h, i, j: ((j <= i) & (j >= i - window)) | is_global[i] | is_global[j],
    }
    block_mask = None
    if mods[mask_name] is not None:
        block_mask = create_block_mask(mods[mask_name], None, None, seq, seq, device=str(q.device))
    # Compiled for this shape alone (its fastest form), as a user calling Flex directly would; dynamo's
    # recompile limit is lifted for it (no torch._dynamo.reset(), which would drop qkv's kernels too).
    compiled = torch.compile(flex_attention, dynamic=False)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

    def run():
        with torch._dynamo.config.patch(**{limit: 1 << 20}):
            return compiled(q, k, v, block_mask=block_mask)

    return run, ""


def run_problem(seq: int, mask_name: str, *, batch=1, heads=4, head_dim=64, dtype=torch.float32, device="cpu",
                window=512, documents=8, backward=False, repeat=3, peers=("flex",),
                backends=None, clock="wall") -> Row:
    """Time one problem on every supporting backend, on auto and on the peers, in ``repeat``
    interleaved rounds (see :func:`interleaved`). ``clock``: what ``Row.times`` holds, the median
    ``"wall"`` time or the median process ``"cpu"`` time (steadier on a shared machine; with one
    thread it is the work done, whatever else runs)."""
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, head_dim, generator=gen, device=device, dtype=dtype)
               .requires_grad_(backward) for _ in range(3))
    mask = make_mask(mask_name, seq, window, documents)
    row = Row(seq, mask_name)
    grad = torch.ones(batch, heads, seq, head_dim, device=device, dtype=dtype)
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    def timed(call):
        def once():
            if backward:
                call().backward(grad)
            else:
                with torch.no_grad():
                    call()
        return once

    with torch.set_grad_enabled(backward):
        dispatch = choose(make_problem(q, k, v, mask))
    fns = {}
    for name in backends or REGISTRY:
        if dispatch.estimates.get(name) is None:
            row.times[name], row.notes[name] = None, "; ".join(dispatch.reasons.get(name, ["not registered"]))
            continue
        if name == "reference" and 3 * batch * heads * seq * seq * 4 > REFERENCE_LIMIT_BYTES:
            row.times[name], row.notes[name] = None, "skipped: materialised scores too large"
            continue
        fn = timed(lambda name=name: qkv.attention(q, k, v, mask, backend=name))
        try:
            fn()  # the warm-up (flex compiles here, once per kind of problem)
        except RuntimeError as err:  # a kernel that fails here is reported in the table, not fatal
            row.times[name], row.notes[name] = None, f"{type(err).__name__}: {str(err).splitlines()[-1][:120]}"
            continue
        fns[name] = fn
    with torch.set_grad_enabled(backward):  # auto's pick now that the backends ran (flex compiled):
        row.auto_choice = choose(make_problem(q, k, v, mask)).chosen  # the steady state of a loop
    row.flex_compiles = flex_backend.compile_count()
    if row.auto_choice not in fns:  # the picked backend was left out of ``backends``: time it too
        fns[row.auto_choice] = timed(lambda: qkv.attention(q, k, v, mask, backend=row.auto_choice))
        fns[row.auto_choice]()
    fns["auto"] = timed(lambda: qkv.attention(q, k, v, mask))
    fns["auto"]()
    if "flex" in peers:
        runner, why = _flex_runner(q, k, v, mask_name, seq, window, documents)
        try:
            if runner:
                fns["flex_direct"] = timed(runner)
                fns["flex_direct"]()  # compiles for this shape
            else:
                row.times["flex_direct"] = None
        except Exception as err:  # a peer that fails to compile here is reported, not fatal
            fns.pop("flex_direct", None)
            row.times["flex_direct"], why = None, f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        if why:
            row.notes["flex_direct"] = why
    row.samples, row.cpu_samples = interleaved(fns, repeat, device, warm=False)
    for name, runs in (row.samples if clock == "wall" else row.cpu_samples).items():
        row.times[name] = median(runs)
    row.load = (load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan"))
    return row


def environment() -> dict:
    """Device, versions and date, stored with every result."""
    info = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "qkv": qkv.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def format_ratio(x: float) -> str:
    """A speed ratio that never rounds to ``0.0x``: ``16.4x``, ``1.38x``, ``0.042x``."""
    if x >= 10:
        return f"{x:.1f}x"
    if x >= 0.1:
        return f"{x:.2f}x"
    return f"{x:.2g}x"


def format_table(rows: list[Row], columns: list[str]) -> str:
    """A Markdown table: milliseconds per backend (median of the interleaved rounds), auto's choice,
    ``auto/best`` (auto's own time, dispatch included, over the fastest qkv backend's: the target
    is <= 1.1), ``picked/best`` (the picked backend's time over the fastest's: 1.00 when it picked
    the fastest, free of the noise between two timings of one backend), tiled's speed-up over SDPA
    (``sdpa/tiled``) and, with ``flex_direct`` (FlexAttention called directly, its own
    ``create_block_mask``), auto's speed relative to it (``flex_direct / auto``: the target on
    masked rows is >= 0.95)."""
    direct = any(r.times.get("flex_direct") for r in rows)
    head = ["N", "mask", *columns, "auto picks", "auto/best", "picked/best", "sdpa/tiled"] + (
        ["auto vs flex_direct"] if direct else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r.seq), r.mask]
        for c in columns:
            t = r.times.get(c)
            cells.append("—" if t is None else f"{t * 1e3:.1f}")
        _, best = r.best
        auto, picked = r.times.get("auto"), r.times.get(r.auto_choice)
        tiled, sdpa = r.times.get("tiled"), r.times.get("sdpa")
        cells += [r.auto_choice, f"{auto / best:.2f}" if auto else "—", f"{picked / best:.2f}" if picked else "—",
                  format_ratio(sdpa / tiled) if tiled and sdpa else "—"]
        if direct:
            cells.append(format_ratio(r.times["flex_direct"] / auto) if r.times.get("flex_direct") and auto else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_spread(rows: list[Row], columns: list[str], clock: str = "wall") -> str:
    """A Markdown table of each timing's spread over its runs, milliseconds ``min / median / max``:
    a wide spread means a noisy machine, and the ratios above are only as good as it."""
    head = ["N", "mask", *columns, "max/min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells, worst = [str(r.seq), r.mask], 1.0
        for c in columns:
            spread = r.spread(c, clock) if r.times.get(c) is not None else None
            if spread is None:
                cells.append("—")
                continue
            low, mid, high = spread
            cells.append(f"{low * 1e3:.1f} / {mid * 1e3:.1f} / {high * 1e3:.1f}")
            worst = max(worst, high / low if low > 0 else 1.0)
        cells.append(f"{worst:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save(rows: list[Row], path: str, settings: dict) -> None:
    with open(path, "w") as f:
        json.dump({"environment": environment(), "settings": settings, "rows": [asdict(r) for r in rows]}, f, indent=1)
