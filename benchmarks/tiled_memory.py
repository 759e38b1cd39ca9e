"""Peak memory of the tiled backend: forward + backward at B=1, H=4, N=32768, D=64, float32, CPU.

Dense scores alone would take B*H*N*N*4 bytes = 17.2 GB here; the tiled backend keeps only
(block_q x run) tiles, so the whole step should fit in well under 2 GB. Each measurement runs in a
fresh process and reads the kernel's peak resident set size (ru_maxrss), which counts everything:
the Python interpreter, torch's libraries, inputs, outputs, gradients and temporaries.

    python benchmarks/tiled_memory.py            # prints a table, writes benchmarks/results/tiled_memory.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import resource, sys, time, torch, qkv
n, mask_name, backend = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, n, 64, requires_grad=True) for _ in range(3))
mask = {"full": None, "causal": qkv.causal()}[mask_name]
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
out = qkv.attention(q, k, v, mask, backend=backend)
out.backward(torch.ones_like(out))
elapsed = time.perf_counter() - start
assert torch.isfinite(q.grad).all()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(baseline * 1024, peak * 1024, elapsed)
"""


def measure(n: int, mask: str, backend: str) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(n), mask, backend], capture_output=True, text=True,
                            check=True)
    baseline, peak, elapsed = result.stdout.split()
    return {"seq": n, "mask": mask, "backend": backend, "peak_rss_bytes": int(peak),
            "rss_before_attention_bytes": int(baseline), "seconds_fwd_bwd": float(elapsed),
            "dense_scores_bytes": 4 * 4 * n * n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, nargs="+", default=[32768])
    parser.add_argument("--masks", nargs="+", default=["causal", "full"])
    parser.add_argument("--json", default="benchmarks/results/tiled_memory.json")
    args = parser.parse_args()
    sys.path.insert(0, "src")
    from qkv.bench import environment

    rows = [measure(n, m, "tiled") for n in args.seq for m in args.masks]
    print("| N | mask | peak RSS (whole process) | RSS before attention | dense scores would be | fwd+bwd time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seq']} | {r['mask']} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
              f"{r['rss_before_attention_bytes'] / 2**30:.2f} GiB | {r['dense_scores_bytes'] / 1e9:.1f} GB | "
              f"{r['seconds_fwd_bwd']:.0f} s |")
    with open(args.json, "w") as f:
        json.dump({"environment": environment(), "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
