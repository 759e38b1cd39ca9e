"""``qkv bench --scaling``: time and peak memory of exact, sparse and linear attention against N.

Runs each method of :mod:`qkv.scaling` in its own subprocess over increasing lengths (with a
progress bar), then prints the table, the fitted log-log slopes and the crossover lengths, and
writes the JSON (device, versions, date) and a log-log plot.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("scaling (with --scaling)")
    group.add_argument("--scaling", action="store_true",
                       help="time and peak memory against N for exact, sparse, linear and Performer attention")
    group.add_argument("--scaling-seq", type=int, nargs="+", default=None, metavar="N",
                       help="lengths (default 1024 .. 65536, doubling)")
    group.add_argument("--methods", nargs="+", default=None, metavar="METHOD",
                       help="dense tiled_full tiled_causal window bigbird linear linear_causal performer (default all)")
    group.add_argument("--max-seconds", type=float, default=40.0,
                       help="skip a length whose run is predicted to take longer (default 40)")
    group.add_argument("--max-dense-gib", type=float, default=6.0,
                       help="skip the materialised method beyond this many GiB of scores (default 6)")
    group.add_argument("--threads", type=int, default=0,
                       help="CPU threads per worker (default: torch's); 1 is steadier on a shared machine")
    group.add_argument("--plot", metavar="PNG", help="write the log-log plot here (default: next to --json)")


def run(args: argparse.Namespace) -> int:
    from qkv import bench, scaling

    methods = args.methods or list(scaling.METHODS)
    unknown = [m for m in methods if m not in scaling.METHODS]
    if unknown:
        print(f"qkv bench: error: unknown --methods {' '.join(unknown)}; choose from {' '.join(scaling.METHODS)}",
              file=sys.stderr)
        return 2
    seqs = sorted(args.scaling_seq or scaling.DEFAULT_SEQS)
    if any(n <= 0 for n in seqs):
        print("qkv bench: error: --scaling-seq must be positive lengths", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm
    except ImportError:  # the progress bar is a nicety
        tqdm = None
    env = bench.environment()
    print(f"qkv bench --scaling: B={args.batch} H={args.heads} D={args.head_dim} {args.dtype} forward on "
          f"{args.device}; N = {', '.join(map(str, seqs))}; each method in its own process")
    rows = []
    bar = tqdm(total=len(methods) * len(seqs), unit="run", dynamic_ncols=True) if tqdm else None
    for method in methods:
        cmd = [sys.executable, "-m", "qkv.scaling", method, "--seqs", *map(str, seqs), "--batch", str(args.batch),
               "--heads", str(args.heads), "--head-dim", str(args.head_dim), "--dtype", args.dtype,
               "--device", args.device, "--repeat", str(args.repeat), "--max-seconds", str(args.max_seconds),
               "--max-dense-bytes", str(int(args.max_dense_gib * (1 << 30))), "--threads", str(args.threads)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=scaling.worker_environment())
        seen = 0
        for line in proc.stdout:
            row = json.loads(line)
            rows.append(row)
            seen += 1
            if bar:
                bar.set_description(f"{method} N={row['n']}")
                bar.update(1)
        err = proc.stderr.read()
        if proc.wait() != 0:
            reason = err.strip().splitlines()[-1] if err.strip() else f"exit code {proc.returncode}"
            for n in seqs[seen:]:
                rows.append({"method": method, "n": n, "skipped": f"worker failed: {reason[:160]}"})
            if bar:
                bar.update(len(seqs) - seen)
    if bar:
        bar.close()
    summary = summarise(rows, methods, seqs)
    print()
    print(format_tables(rows, methods, seqs, summary))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k in (
            "batch", "heads", "head_dim", "dtype", "device", "repeat", "max_seconds", "max_dense_gib", "threads")}
        settings.update(seqs=seqs, methods={m: scaling.METHODS[m] for m in methods})
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"environment": env, "settings": settings, "rows": rows, "summary": summary}, f, indent=1)
        print(f"\nwrote {args.json}")
    plot_path = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot_path:
        try:
            plot(rows, methods, summary, plot_path, title=f"B={args.batch} H={args.heads} D={args.head_dim} "
                 f"{args.dtype}, {env.get('gpu') or env.get('cpu', args.device)}, torch {env['torch']}")
            print(f"wrote {plot_path}")
        except ImportError:
            print("no plot: matplotlib is not installed (pip install 'qkv[models]')", file=sys.stderr)
    return 0


def _series(rows, method, key):
    return {r["n"]: r[key] for r in rows if r["method"] == method and r.get(key)}


def summarise(rows, methods, seqs) -> dict:
    """Fitted slopes (time and memory) per method, and crossover lengths against the exact methods."""
    from qkv import scaling

    clock = scaling.time_key(rows)
    slopes = {}
    for m in methods:
        t, mem = _series(rows, m, clock), _series(rows, m, "peak_bytes")
        slopes[m] = {"time": scaling.fit_slope(list(t), list(t.values())),
                     "memory": scaling.fit_slope(list(mem), list(mem.values()))}
    crossings = {}
    for base in ("dense", "tiled_full"):
        if base not in methods:
            continue
        for m in methods:
            if m in ("dense", base):
                continue
            c = scaling.crossover(_series(rows, base, clock), _series(rows, m, clock),
                                  extrapolate_to=16 * max(seqs))
            crossings[f"{m} vs {base}"] = c
    return {"clock": clock, "slopes": slopes, "crossovers": crossings}


def _fmt_slope(s):
    return "—" if s is None else f"{s:.2f}"


def format_tables(rows, methods, seqs, summary) -> str:
    """Markdown: milliseconds and MiB per (N, method); slopes; crossovers."""
    out = []
    clock = summary["clock"]
    tables = [("seconds", "wall time, best run (ms)"), ("peak_bytes", "peak memory (MiB)")]
    if clock == "cpu_seconds":
        tables.insert(0, ("cpu_seconds", "CPU time of the worker, best run (ms); slopes and crossovers use it"))
    for key, title in tables:
        scale = 1 / (1 << 20) if key == "peak_bytes" else 1e3
        head = ["N", *methods]
        out += [title, "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for n in seqs:
            cells = [str(n)]
            for m in methods:
                r = next((r for r in rows if r["method"] == m and r["n"] == n), None)
                v = None if r is None else r.get(key)
                cells.append("—" if v is None else f"{v * scale:.1f}" if v * scale < 1000 else f"{v * scale:.0f}")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    out += ["| method | time slope | memory slope |", "|---|---|---|"]
    for m in methods:
        s = summary["slopes"][m]
        out.append(f"| {m} | {_fmt_slope(s['time'])} | {_fmt_slope(s['memory'])} |")
    out += ["", "crossovers (time): the length from which the first becomes cheaper than the second"]
    for name, c in summary["crossovers"].items():
        if c is None:
            text = "never, within the measured range or its extrapolation"
        else:
            text = f"N ≈ {c['n']}" + (" (extrapolated)" if c["extrapolated"] else "") + (
                f" ({c['note']})" if c.get("note") else "")
        out.append(f"  {name}: {text}")
    return "\n".join(out)


def plot(rows, methods, summary, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    clock = summary["clock"]
    time_label = "CPU time of the call (s)" if clock == "cpu_seconds" else "time (s)"
    for ax, key, label in ((axes[0], clock, time_label), (axes[1], "peak_bytes", "peak memory (bytes)")):
        for m in methods:
            s = _series(rows, m, key)
            if not s:
                continue
            slope = summary["slopes"][m]["time" if key == clock else "memory"]
            ax.plot(list(s), list(s.values()), marker="o", label=f"{m} (slope {_fmt_slope(slope)})")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for name, c in summary["crossovers"].items():
        if c and not c["extrapolated"] and name.endswith("vs dense") and not c.get("note"):
            axes[0].axvline(c["n"], color="grey", linestyle=":", linewidth=1)
            axes[0].annotate(name.split(" vs ")[0], (c["n"], axes[0].get_ylim()[0]), rotation=90, fontsize=7,
                             color="grey", xytext=(2, 4), textcoords="offset points")
    axes[0].set_title("time; dotted: where a method overtakes dense")
    axes[1].set_title("peak memory of the call")
    fig.suptitle("attention cost against sequence length" + (f" — {title}" if title else ""), fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
