"""Peak memory and time of big materialised bool masks: ``qkv.explain_dispatch`` (the block view
and the estimates) and ``qkv.attention(..., backend="sdpa")``, against plain
``torch.nn.functional.scaled_dot_product_attention`` with the same mask and against building the
mask alone.

    python benchmarks/mask_memory.py [--sizes 16384 32768] [--out benchmarks/results/mask_memory.json]

Each case runs in its own subprocess, so that its peak resident memory (``ru_maxrss``) is its own.
The mask is a causal pattern built in place as bool (``torch.ones(N, N, dtype=bool).tril_()``),
1 byte per element: 256 MiB at 16k, 1 GiB at 32k. ``q, k, v`` are ``(1, 1, N, 64)`` float32.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CASES = ("mask_only", "explain_dispatch", "explain_dispatch_forced_sdpa", "qkv_sdpa", "torch_sdpa")


def run_case(case: str, n: int) -> dict:
    """In this process: build the inputs, run ``case`` once, report seconds and peak RSS."""
    import torch

    import qkv

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, n, 64) for _ in range(3))
    mask = torch.ones(n, n, dtype=torch.bool).tril_()
    start = time.perf_counter()
    if case == "explain_dispatch":
        chosen = qkv.explain_dispatch(q, k, v, mask).chosen
    elif case == "explain_dispatch_forced_sdpa":
        chosen = qkv.explain_dispatch(q, k, v, mask, backend="sdpa").chosen
    elif case == "qkv_sdpa":
        with torch.no_grad():
            out = qkv.attention(q, k, v, mask, backend="sdpa")
        chosen = "sdpa" if bool(torch.isfinite(out).all()) else "sdpa (non-finite output!)"
    elif case == "torch_sdpa":
        with torch.no_grad():
            torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        chosen = "-"
    else:
        chosen = "-"
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    return {"case": case, "n": n, "seconds": round(seconds, 3), "peak_rss_bytes": peak,
            "peak_rss_gib": round(peak / 2**30, 3), "chosen": chosen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 32768])
    parser.add_argument("--out", default="benchmarks/results/mask_memory.json")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:  # the child
        print(json.dumps(run_case(args.case, args.n)))
        return
    import torch

    results = []
    for n in args.sizes:
        for case in CASES:
            child = subprocess.run([sys.executable, __file__, "--case", case, "--n", str(n)], capture_output=True,
                                   text=True, check=True)
            row = json.loads(child.stdout.strip().splitlines()[-1])
            results.append(row)
            print(f"N={n:>6} {case:<30} {row['seconds']:>8.2f} s  peak {row['peak_rss_gib']:.2f} GiB  {row['chosen']}",
                  flush=True)
    by = {(r["n"], r["case"]): r for r in results}
    summary = {}
    for n in args.sizes:
        base = by[(n, "mask_only")]["peak_rss_bytes"]
        summary[str(n)] = {case: round((by[(n, case)]["peak_rss_bytes"] - base) / 2**30, 3)
                           for case in CASES if case != "mask_only"}
    payload = {
        "benchmark": "mask_memory",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu", "cpu": platform.processor() or platform.machine(), "python": platform.python_version(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "note": "peak RSS per case in its own process; summary: GiB above building the mask alone",
        "results": results, "summary_gib_above_mask_only": summary,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(payload, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
