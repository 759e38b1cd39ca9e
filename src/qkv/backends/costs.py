"""Rough run-time estimates, used only to rank backends for the dispatcher.

Each backend's time is modelled as work over a throughput measured once per device type (see
``benchmarks/calibrate_costs.py``): matmul FLOPs, element-wise work on scores, the mask a backend has
to materialise, and a fixed cost per Python-level step. The numbers need only be right to within
the ratio between backends, not absolutely.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..masks import EMPTY, PARTIAL
from ..problem import Problem


@dataclass(frozen=True)
class Rates:
    sdpa_flops: float          # FLOP/s of torch's fused kernel without a mask
    sdpa_mask_slowdown: float  # factor when SDPA is given an explicit mask
    mask_element: float        # seconds to materialise one mask element
    matmul_flops: float        # FLOP/s of plain torch matmuls on score tiles
    score_element: float       # seconds of element-wise work per score (max, exp, sum, ...)
    partial_element: float     # extra seconds per score on a partial tile (mask evaluation)
    step: float                # seconds of fixed cost per tile run (Python, kernel launches)
    backward_factor: float     # backward / forward time


RATES = {
    "cpu": Rates(sdpa_flops=1.6e11, sdpa_mask_slowdown=1.7, mask_element=2e-10, matmul_flops=9e10,
                 score_element=2.5e-9, partial_element=2.5e-9, step=1.5e-4, backward_factor=2.5),
    "cuda": Rates(sdpa_flops=3e14, sdpa_mask_slowdown=2.0, mask_element=2e-12, matmul_flops=3e14,
                  score_element=2e-12, partial_element=2e-12, step=1.5e-4, backward_factor=2.5),
}


def _rates(problem: Problem) -> Rates:
    return RATES.get(problem.device.type, RATES["cpu"])


def _flops_per_score(problem: Problem) -> float:
    return 2.0 * problem.batch * problem.q_heads * (problem.head_dim + problem.v_dim)


def _with_backward(problem: Problem, forward: float) -> float:
    return forward * (1.0 + _rates(problem).backward_factor) if problem.requires_grad else forward


def sdpa(problem: Problem) -> float:
    from .sdpa import dense_mask_bytes, uses_is_causal

    r = _rates(problem)
    scores = problem.nq * problem.nk * (0.5 if uses_is_causal(problem) else 1.0)
    t = scores * _flops_per_score(problem) / r.sdpa_flops
    mask_bytes = dense_mask_bytes(problem)
    if mask_bytes:
        t = t * r.sdpa_mask_slowdown + mask_bytes * r.mask_element
    return _with_backward(problem, t)


def tiled(problem: Problem, sizes) -> float:
    r = _rates(problem)
    kinds = problem.block_kinds(sizes.block_q, sizes.block_k)
    tile_area = sizes.block_q * sizes.block_k
    visited_tiles = int((kinds != EMPTY).sum())
    visited = visited_tiles * tile_area
    partial = int((kinds == PARTIAL).sum()) * tile_area
    # A run starts wherever a non-empty tile differs in kind from its left neighbour.
    changes = kinds[:, 1:] != kinds[:, :-1]
    starts = int((kinds[:, 0] != EMPTY).sum()) + int((changes & (kinds[:, 1:] != EMPTY)).sum())
    steps = max(starts, visited_tiles * sizes.block_k // sizes.max_run)
    rows = problem.batch * problem.q_heads
    t = (visited * _flops_per_score(problem) / r.matmul_flops + visited * rows * r.score_element
         + partial * rows * r.partial_element + steps * r.step)
    return _with_backward(problem, t)


def reference(problem: Problem) -> float:
    r = _rates(problem)
    scores = problem.nq * problem.nk
    rows = problem.batch * problem.q_heads
    t = scores * _flops_per_score(problem) / r.matmul_flops + 3 * scores * rows * r.score_element
    return _with_backward(problem, t)
