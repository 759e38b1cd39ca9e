"""Check (and refit) the dispatcher's CPU cost model against ``benchmarks/attention_speed.py``
results: per row, each backend's measured time against its estimate, the backend the estimates
pick and how much slower than the measured best that is (the target: at most 1.1x).

    python benchmarks/attention_speed.py --threads 1 --clock cpu --out /tmp/speed.json
    python benchmarks/fit_cpu_costs.py /tmp/speed.json [more.json ...] [--fit]

``--fit`` also prints least-squares rates (relative error) for this machine, in the units of
``src/qkv/backends/costs.py`` and ``flex.py`` (one thread's seconds; the split between the fixed
and the per-``D + Dv`` part of a score is kept as in the current rates, since the benchmark runs
one head dimension). Best fed with one-thread CPU times (``--threads 1 --clock cpu``), which other
jobs on a shared machine barely move.
"""

from __future__ import annotations

import argparse
import json

import torch

from qkv import bench
from qkv.backends import REGISTRY, costs
from qkv.backends import flex as flex_backend
from qkv.backends.tiled import _count_walk
from qkv.problem import make_problem

BACKENDS = ("tiled", "sdpa", "flex")


def load(paths: list[str]) -> list[dict]:
    rows = []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        settings = data["settings"]
        for r in data["rows"]:
            rows.append({**r, "window": settings["window"], "documents": settings.get("documents", 8),
                         "threads": settings.get("threads") or data["environment"].get("cpu_threads", 1),
                         "source": path})
    return rows


def features(row: dict) -> dict:
    """The problem of a row (meta-free CPU tensors of its shape) and what the estimates count."""
    n = row["seq"]
    q = torch.empty(1, 4, n, 64)
    mask = bench.make_mask(row["mask"], n, row["window"], row["documents"])
    p = make_problem(q, q, q, mask)
    flex_visited, flex_partial = flex_backend.visited_scores(p)
    sizes = REGISTRY["tiled"].sizes
    if mask is None:
        tiled = (p.batch * p.q_heads * n * n, 0, -(-n // sizes.block_q) * -(-n // sizes.max_run), 0)
    else:
        tiled = _count_walk(p, p.layout(sizes.block_q, sizes.block_k), sizes)
    return {"problem": p, "flex": (flex_visited, flex_partial), "tiled": tiled,
            "work": mask.work if mask is not None else 0.0}


def estimates(p) -> dict[str, float]:
    return {"tiled": REGISTRY["tiled"].estimate(p), "sdpa": REGISTRY["sdpa"].estimate(p),
            "flex": flex_backend.estimate_seconds(p)}


def check(rows: list[dict]) -> None:
    print("| N | mask | " + " | ".join(f"{b} meas / est" for b in BACKENDS)
          + " | best | estimates pick | picked/best |")
    print("|---|---|" + "---|" * (len(BACKENDS) + 3))
    worst = 1.0
    for row in rows:
        torch.set_num_threads(int(row["threads"]))
        f = row["features"]
        est = estimates(f["problem"])
        meas = {b: row["times"].get(b) for b in BACKENDS if row["times"].get(b)}
        best = min(meas, key=meas.get)
        pick = min((b for b in est if b in meas), key=est.get)
        ratio = meas[pick] / meas[best]
        worst = max(worst, ratio)
        cells = [f"{meas[b] * 1e3:.1f} / {est[b] * 1e3:.1f}" if b in meas else "—" for b in BACKENDS]
        flag = "" if ratio <= 1.1 else " **"
        print(f"| {row['seq']} | {row['mask']} | " + " | ".join(cells) + f" | {best} | {pick} | {ratio:.2f}{flag} |")
    print(f"\nworst picked/best: {worst:.2f} (target <= 1.1)")


def _lstsq(columns: list[list[float]], y: list[float]) -> list[float]:
    x = torch.tensor(columns, dtype=torch.float64).T
    t = torch.tensor(y, dtype=torch.float64)
    w = 1.0 / t  # relative error
    return torch.linalg.lstsq(x * w[:, None], t * w).solution.tolist()


def fit(rows: list[dict]) -> None:
    """Least-squares rates on one-thread-equivalent seconds (measured time x threads)."""
    dims = 128  # D + Dv of the benchmark
    cpu = costs.RATES[costs.device_key(torch.device("cpu"))]
    fr = flex_backend.RATES[costs.device_key(torch.device("cpu"))]
    one = [dict(r, t={b: r["times"][b] * r["threads"] for b in BACKENDS if r["times"].get(b)}) for r in rows]
    # tiled: visited * a + partial * (b + c * work) + steps * d + partial steps * work * e
    sel = [r for r in one if "tiled" in r["t"]]
    f = [r["features"]["tiled"] for r in sel]
    work = [r["features"]["work"] for r in sel]
    a, b, c, d, e = _lstsq([[v for v, *_ in f], [pt for _, pt, *_ in f], [x[1] * w for x, w in zip(f, work)],
                            [x[2] for x in f], [x[3] * w for x, w in zip(f, work)]], [r["t"]["tiled"] for r in sel])
    share = cpu.tiled_score / (cpu.tiled_score + cpu.tiled_score_per_dim * dims)
    print(f"tiled: tiled_score={a * share:.3g}, tiled_score_per_dim={a * (1 - share) / dims:.3g}, "
          f"tiled_partial_score={b:.3g}, tiled_partial_per_work={c:.3g}, tiled_step={d:.3g}, "
          f"tiled_partial_step_per_work={e:.3g}")
    # flex: call + visited * a + partial * (b + c * work)
    sel = [r for r in one if "flex" in r["t"]]
    f = [r["features"]["flex"] for r in sel]
    call, a, b, c = _lstsq([[1.0] * len(sel), [v for v, _ in f], [pt for _, pt in f],
                            [pt * r["features"]["work"] for (_, pt), r in zip(f, sel)]], [r["t"]["flex"] for r in sel])
    share = fr.score / (fr.score + fr.score_per_dim * dims)
    print(f"flex: score={a * share:.3g}, score_per_dim={a * (1 - share) / dims:.3g}, partial_score={b:.3g}, "
          f"partial_per_work={c:.3g}, call={call:.3g}")
    # sdpa: per score without a mask; causal fraction; masked: slowdown * score + mask elements
    full = [r for r in one if r["mask"] == "full" and "sdpa" in r["t"]]
    per_score = sum(r["t"]["sdpa"] / (4 * r["seq"] ** 2) for r in full) / max(1, len(full))
    causal = [r["t"]["sdpa"] / (4 * r["seq"] ** 2) / per_score for r in one if r["mask"] == "causal"]
    masked = [r for r in one if r["mask"] not in ("full", "causal") and "sdpa" in r["t"]]
    # With one head count, the slowdown of a masked kernel and the mask's build (per B*Nq*Nk element)
    # cannot be told apart: the slowdown is kept and the build cost fitted.
    extra = [r["t"]["sdpa"] - cpu.sdpa_mask_slowdown * 4 * r["seq"] ** 2 * per_score for r in masked]
    element = sum(e / r["seq"] ** 2 for e, r in zip(extra, masked)) / max(1, len(masked))
    share = cpu.sdpa_score / (cpu.sdpa_score + cpu.sdpa_score_per_dim * dims)
    print(f"sdpa: sdpa_score={per_score * share:.3g}, sdpa_score_per_dim={per_score * (1 - share) / dims:.3g}, "
          f"sdpa_causal_fraction={sum(causal) / max(1, len(causal)):.3g} (per N: {[round(x, 2) for x in causal]}), "
          f"mask_element={element:.3g} (at sdpa_mask_slowdown={cpu.sdpa_mask_slowdown})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", help="attention_speed.py result files")
    parser.add_argument("--fit", action="store_true", help="also print least-squares rates")
    args = parser.parse_args()
    rows = load(args.results)
    threads = torch.get_num_threads()
    for row in rows:
        row["features"] = features(row)
    check(rows)
    torch.set_num_threads(threads)
    if args.fit:
        print()
        fit(rows)


if __name__ == "__main__":
    main()
