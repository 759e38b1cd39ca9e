"""Measure the ``tiled`` backend with a float mask (an additive bias) against its cost estimate, to
fit ``Rates.tiled_bias_score`` in ``src/qkv/backends/costs.py``.

    python benchmarks/tiled_bias_cost.py [--sizes 1024 2048] [--heads 4]

Prints, per size: measured seconds without a mask and with a ``(Nq, Nk)`` float mask, the
estimate for each, and the per-score rate of the bias that the measurement implies.
"""

from __future__ import annotations

import argparse
import time

import torch

import qkv
from qkv.backends import REGISTRY
from qkv.problem import make_problem


def best_of(fn, repeat: int = 3, clock=time.process_time) -> float:
    """Best time of ``repeat`` calls; by default CPU time of this process (one thread): robust to
    other jobs sharing the cores."""
    times = []
    for _ in range(repeat):
        start = clock()
        fn()
        times.append(clock() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    parser.add_argument("--heads", type=int, default=4)
    args = parser.parse_args()
    tiled = REGISTRY["tiled"]
    torch.manual_seed(0)
    torch.set_num_threads(1)
    for n in args.sizes:
        q, k, v = (torch.randn(1, args.heads, n, 64) for _ in range(3))
        bias = torch.randn(n, n)
        with torch.no_grad():
            plain = best_of(lambda: qkv.attention(q, k, v, backend="tiled"))
            biased = best_of(lambda: qkv.attention(q, k, v, bias, backend="tiled"))
        est_plain = tiled.estimate(make_problem(q, k, v))
        est_biased = tiled.estimate(make_problem(q, k, v, bias))
        scores = n * n * args.heads
        # The cost model's rates are for 2 threads: compare ratios, which do not depend on that.
        print(f"N={n}: one-thread CPU time: no mask {plain:.3f} s, float mask {biased:.3f} s "
              f"(x{biased / plain:.2f}); estimates: no mask {est_plain:.4f} s, float mask {est_biased:.4f} s "
              f"(x{est_biased / est_plain:.2f}); measured bias cost {(biased - plain) / scores * 1e9:.2f} ns "
              f"per score on one thread")


if __name__ == "__main__":
    main()
