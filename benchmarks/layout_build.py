"""Cost of building a block layout: O(tiles) in time and memory, and a second call reuses it.

For causal, sliding-window and document masks at N up to 128k (B=1, H=8, 128x128 tiles, meta
tensors: no data exists, only the layout), each measurement runs in a fresh one-thread process
and reports the CPU time (``time.process_time``: other jobs on the machine do not count) of the
first ``problem.layout(128, 128)`` (built), of a second one from a new call with the same mask
object (cached: nothing is built), of the merged view and of the kv-block view, and the growth
of the process's peak resident set size (ru_maxrss) while building. For contrast, the same causal
mask written as a ``from_function`` mask is evaluated element by element (O(N^2)).

    python benchmarks/layout_build.py       # prints a table, writes benchmarks/results/layout_build.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import resource, sys, time, torch, qkv
from qkv.problem import make_problem
n, name = int(sys.argv[1]), sys.argv[2]
torch.set_num_threads(1)
q = torch.empty(1, 8, n, 64, device="meta")
make = {"causal": lambda n: qkv.causal(),
        "window": lambda n: qkv.sliding_window(4096),
        "document": lambda n: qkv.document(torch.arange(n) // 3000),
        "function_causal": lambda n: qkv.from_function(lambda b, h, q, k: k <= q, "causal")}[name]
small = torch.empty(1, 8, 1024, 64, device="meta")
make_problem(small, small, small, make(1024)).layout(128, 128)  # warm up the code paths
mask = make(n)
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
clock = time.process_time  # CPU time of this one-thread process: other jobs on the cores do not count
t0 = clock()
layout = make_problem(q, q, q, mask).layout(128, 128)
t1 = clock()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
again = make_problem(q, q, q, mask).layout(128, 128)
t2 = clock()
merged = layout.merged()
t3 = clock()
blocks = layout.kv_blocks()
t4 = clock()
assert again is layout
tiles = layout.num_q_blocks * layout.num_k_blocks
visited = int((merged != 0).sum())
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3, (peak - baseline) * 1024, tiles, visited)
"""


def measure(n: int, mask: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(n), mask], capture_output=True, text=True, check=True)
    build, reuse, merged, kv, rss, tiles, visited = result.stdout.split()
    return {"seq": n, "mask": mask, "tiles": int(tiles), "non_empty_tiles": int(visited),
            "build_seconds": float(build), "second_call_seconds": float(reuse), "merged_seconds": float(merged),
            "kv_blocks_seconds": float(kv), "peak_rss_growth_bytes": int(rss),
            "build_ns_per_tile": 1e9 * float(build) / int(tiles),
            "build_ns_per_score": 1e9 * float(build) / (n * n)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32768, 65536, 131072])
    parser.add_argument("--masks", nargs="+", default=["causal", "window", "document"])
    parser.add_argument("--dense-seq", type=int, nargs="+", default=[8192, 16384])
    parser.add_argument("--json", default="benchmarks/results/layout_build.json")
    args = parser.parse_args()
    sys.path.insert(0, "src")
    from qkv.bench import environment

    rows = [measure(n, m) for m in args.masks for n in args.seq]
    rows += [measure(n, "function_causal") for n in args.dense_seq]
    print("| mask | N | tiles | build | ns/tile | ns/score | 2nd call | merged | kv_blocks | peak RSS growth |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mask']} | {r['seq']} | {r['tiles']} | {r['build_seconds'] * 1e3:.1f} ms | "
              f"{r['build_ns_per_tile']:.0f} | {r['build_ns_per_score']:.3f} | {r['second_call_seconds'] * 1e6:.0f} us | "
              f"{r['merged_seconds'] * 1e3:.1f} ms | {r['kv_blocks_seconds'] * 1e3:.1f} ms | "
              f"{r['peak_rss_growth_bytes'] / 2**20:.1f} MiB |")
    with open(args.json, "w") as f:
        json.dump({"environment": environment(), "tile": [128, 128], "batch": 1, "heads": 8, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
