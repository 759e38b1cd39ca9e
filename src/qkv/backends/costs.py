"""Rough run-time estimates, used only to rank backends for the dispatcher.

Each backend owns its estimate (its ``estimate`` method); this module holds only the shared
per-device rates. Each backend's time is modelled per attention *score* (one query-key pair of
one head), as a fixed element-wise part plus a part proportional to ``D + Dv`` (the two matmuls), with extra terms for a
mask that must be materialised, partial tiles that need an element-wise mask, and a fixed cost per
Python-level step. The constants were fitted on the machines named below with
``benchmarks/attention_speed.py``; they need only rank backends, not predict absolute times.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..problem import Problem


@dataclass(frozen=True)
class Rates:
    """Seconds per score (at ``D + Dv``), per mask element, per step; backward/forward ratios."""

    sdpa_score: float             # fused kernel, fixed part per score
    sdpa_score_per_dim: float     # fused kernel, per score and per unit of D + Dv
    sdpa_causal_fraction: float   # time with is_causal relative to no mask
    sdpa_mask_slowdown: float     # time with an explicit mask relative to no mask
    mask_element: float           # building one element of a dense mask
    tiled_score: float            # tiled, fixed part per visited score (max, exp, sum, scaling)
    tiled_score_per_dim: float    # tiled, per visited score and per unit of D + Dv
    tiled_partial_score: float    # tiled, extra per score on a partial tile (mask evaluation)
    tiled_bias_score: float       # tiled, extra per visited score with a float mask (slice, add)
    tiled_step: float             # tiled, fixed cost of one run of tiles (Python, dispatch)
    reference_score: float        # reference, per score (materialised softmax)
    sdpa_backward: float          # backward / forward time
    tiled_backward: float


#: CPU: fitted on 2 cores of an x86-64 server (AVX-512), torch 2.13, B=1 H=4 D=64 float32.
#: ``tiled_bias_score`` refitted with ``benchmarks/tiled_bias_cost.py`` (one thread, CPU time, so
#: that other jobs on the cores do not matter): a float mask made the forward x1.24-1.62 slower at
#: N = 1k-16k (2.3-3.2 ns per score on one thread, about 1 ns on two); forward + backward x1.3.
#: CUDA: order-of-magnitude guesses for a Hopper GPU, where torch's fused kernels are far ahead of
#: a PyTorch-level tiled loop; to be fitted when measured.
RATES = {
    "cpu": Rates(sdpa_score=0.3e-9, sdpa_score_per_dim=0.0083e-9, sdpa_causal_fraction=0.57,
                 sdpa_mask_slowdown=1.5, mask_element=0.8e-9, tiled_score=0.6e-9,
                 tiled_score_per_dim=0.0102e-9, tiled_partial_score=3e-9, tiled_bias_score=1.0e-9,
                 tiled_step=1.2e-4, reference_score=10e-9, sdpa_backward=2.6, tiled_backward=3.3),
    "cuda": Rates(sdpa_score=2e-13, sdpa_score_per_dim=2e-15, sdpa_causal_fraction=0.55,
                  sdpa_mask_slowdown=2.0, mask_element=5e-13, tiled_score=2e-12, tiled_score_per_dim=4e-15,
                  tiled_partial_score=2e-12, tiled_bias_score=2e-12, tiled_step=2e-4, reference_score=5e-12,
                  sdpa_backward=2.5, tiled_backward=3.0),
}


def rates(problem: Problem) -> Rates:
    """The rates of the problem's device type (CPU rates for devices not fitted)."""
    return RATES.get(problem.device.type, RATES["cpu"])


def with_backward(problem: Problem, forward: float, ratio: float) -> float:
    """``forward`` plus the backward pass (``ratio`` times the forward) when gradients are needed."""
    return forward * (1.0 + ratio) if problem.requires_grad else forward


#: Below this many scores per head, the tiled estimate assumes every tile is visited: small
#: problems never favour tiling, and computing a block view costs more than it could save.
SMALL_PROBLEM_SCORES = 1 << 18
