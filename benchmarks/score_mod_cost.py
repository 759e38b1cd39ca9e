"""What a score modifier costs per score on the CPU, on ``tiled`` and on compiled ``flex``, to fit
``ScoreMod.work``'s rates (``tiled_mod_per_work`` in ``src/qkv/backends/costs.py``,
``mod_per_work`` in ``src/qkv/backends/flex.py``).

    python benchmarks/score_mod_cost.py [--sizes 1024 2048] [--heads 4] [--threads 1] [--out FILE]

One thread: best-of CPU time of this process (robust to other jobs on the cores); more threads:
best-of wall time (the machine must be idle). Per size, mask
(none, causal, window 256) and modifier (none, ALiBi, soft cap, relative bias, a user function): measured
seconds on each backend, and the modifier's cost in ns per visited score against the same row
without a modifier, also divided by the modifier's ``work``. Flex compiles each kind once first
(~10 s each). Writes a JSON with the device, versions and date.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
import warnings

import torch

import qkv
from qkv.backends import REGISTRY, flex
from qkv.problem import make_problem
from tiled_bias_cost import best_of  # a sibling script: benchmarks/ is on sys.path when run


def user_distance(score, b, h, q, k):
    """A user function of ``q - k`` (what a hand-written relative score looks like)."""
    return score - 0.01 * (q - k).abs()


def modifiers(heads: int) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "none": None,
        "alibi": qkv.scores.alibi(heads),
        "softcap": qkv.scores.softcap(30.0),
        "relative_bias": qkv.scores.relative_bias(torch.randn(heads, 65, generator=g)),
        "user q-k": qkv.scores.ScoreMod(user_distance),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/score_mod_cost_cpu[_Nthreads].json")
    args = parser.parse_args()
    out = args.out or ("benchmarks/results/score_mod_cost_cpu.json" if args.threads == 1 else
                       f"benchmarks/results/score_mod_cost_cpu_{args.threads}threads.json")
    clock = time.process_time if args.threads == 1 else time.perf_counter
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    rows = []
    for n in args.sizes:
        q, k, v = (torch.randn(1, args.heads, n, 64) for _ in range(3))
        for mask_name, mask in (("full", None), ("causal", qkv.causal()), ("window 256", qkv.sliding_window(256))):
            base = {}
            for mod_name, mod in modifiers(args.heads).items():
                p = make_problem(q, k, v, mask, score_mod=mod)
                visited = flex.visited_scores(p)[0]
                row = {"n": n, "mask": mask_name, "score_mod": mod_name, "work": mod.work if mod else 0.0,
                       "visited_scores": visited}
                for name in ("tiled", "flex"):
                    with torch.no_grad():
                        qkv.attention(q, k, v, mask, score_mod=mod, backend=name)  # compile, warm up
                        seconds = best_of(lambda: qkv.attention(q, k, v, mask, score_mod=mod, backend=name),
                                          clock=clock)
                    row[f"{name}_s"] = seconds
                    row[f"{name}_estimate_s"] = REGISTRY[name].estimate(p)
                    if mod is None:
                        base[name] = seconds
                    else:
                        extra = (seconds - base[name]) / visited * 1e9
                        row[f"{name}_mod_ns_per_score"] = extra
                        row[f"{name}_mod_ns_per_score_per_work"] = extra / mod.work
                rows.append(row)
                print(f"N={n} {mask_name:10s} {mod_name:13s} work {row['work']:.0f}: " + "  ".join(
                    f"{b} {row[f'{b}_s'] * 1e3:7.1f} ms (est {row[f'{b}_estimate_s'] * 1e3:7.1f})"
                    + (f", +{row[f'{b}_mod_ns_per_score']:.2f} ns/score" if mod else "")
                    for b in ("tiled", "flex")), flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or
            platform.machine(), "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": args.threads,
            "timing": "best of 3, forward without grad; " + ("process CPU time" if args.threads == 1 else "wall time"),
            "shape": f"B=1 H={args.heads} D=64 float32", "failed_kinds": list(flex._FAILED.values())}
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
