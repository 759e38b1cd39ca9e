"""Rough run-time estimates, used only to rank backends for the dispatcher.

Each backend owns its estimate (its ``estimate`` method); this module holds only the shared
per-device rates. Each backend's time is modelled per attention *score* (one query-key pair of
one head), as a fixed element-wise part plus a part proportional to ``D + Dv`` (the two matmuls),
with extra terms for a mask that must be materialised, partial tiles that need an element-wise mask
(more for a mask that does more work per score, :attr:`qkv.masks.Mask.work`), and a fixed cost
per Python-level step. The constants were fitted on the machines named below with
``benchmarks/attention_speed.py`` (``benchmarks/fit_cpu_costs.py`` refits them from its result
file); they need only rank backends, not predict absolute times.

CPU rates are **one thread's** seconds, fitted on one-thread CPU time (steady on a shared
machine); an estimate divides the arithmetic by the threads the problem can use
(:func:`parallel`) and keeps per-call and per-step costs whole. Which CPU set applies depends on
the vector instructions torch's CPU kernels use (:func:`device_key`): compiled FlexAttention
in particular is about twice as fast per score, relative to the other backends, with AVX-512.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

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
    reference_score: float        # reference, fixed part per score (materialised scores, softmax)
    sdpa_backward: float          # backward / forward time
    tiled_backward: float
    tiled_partial_per_work: float = 0.0  # tiled, extra per partial score per unit of the mask's work
    tiled_partial_step_per_work: float = 0.0  # tiled, extra per partial run per unit of the mask's work
    reference_score_per_dim: float = 0.0  # reference, per score and per unit of D + Dv
    reference_call: float = 0.0   # reference, fixed cost of a call
    sdpa_mask_call: float = 0.0   # sdpa, fixed cost of a call with a dense mask (building it, the guards)
    mod_score_per_work: float = 0.0  # tiled and reference: per score per unit of the score modifier's work


#: CPU, AVX2 (``"cpu"``, also the set for CPUs not fitted): 2 vCPUs of an AMD EPYC with AVX2 (no
#: AVX-512), torch 2.13, B=1 H=4 D=64 float32, fitted on 2026-12-01 to one-thread CPU times of
#: ``benchmarks/results/attention_speed_cpu.json``'s masks at N = 1k-16k: SDPA 9.4-9.7 ns per
#: score, x0.55-0.8 with ``is_causal``, 11-14 ns per score with a dense mask; tiled 12-13 ns per
#: visited score, 1-9 ns more on partial tiles (rising with the mask's work), 0.8 ms per run of
#: tiles (0.65-0.7 ms of it with next to no arithmetic: Python and op dispatch, which more threads
#: do not shorten) and ~0.15 ms more per unit of work on a partial run (the mask's small tensor
#: operations); a float mask x1.17-1.38 on tiled, 2.1-4.8 ns per score
#: (``benchmarks/tiled_bias_cost.py``); the reference 17-21 ns per score at N = 1k (D = 16, 64);
#: per call, about 0.6 ms of fixed work for SDPA with a dense mask and 0.9 ms for the reference
#: (small problems: B=1, H=2-12, N=64-256). A score modifier on tiled, one thread, N = 1k-2k, full
#: and causal (``benchmarks/score_mod_cost.py``, ``results/score_mod_cost_cpu.json``; two threads
#: at 2k-4k in ``..._2threads.json`` agree): ALiBi +2.6-4 ns per visited score, soft cap +7-8.5,
#: relative bias +9-10, a user ``q - k`` function +1.3-3; about 1.4 ns per unit of the
#: modifier's :attr:`~qkv.scores.ScoreMod.work` (each of its operations makes a tile-sized
#: temporary). The reference pays the same on every score.
#: CPU, AVX-512 (``"cpu-avx512"``): fitted on 2026-11-23 on 2 cores of an x86-64 server with
#: AVX-512, torch 2.13, B=1 H=4 D=64 float32, on two threads (here doubled to one thread's);
#: ``tiled_bias_score`` refitted with ``benchmarks/tiled_bias_cost.py`` (one thread, CPU time):
#: a float mask made the forward x1.24-1.62 slower at N = 1k-16k (2.3-3.2 ns per score). Its
#: score-modifier rate is not measured: the AVX2 rate scaled by the two sets' ``tiled_score``.
#: CUDA: order-of-magnitude guesses for a Hopper GPU, where torch's fused kernels are far ahead of
#: a PyTorch-level tiled loop; to be fitted when measured.
RATES = {
    "cpu": Rates(sdpa_score=2.1e-9, sdpa_score_per_dim=0.058e-9, sdpa_causal_fraction=0.65,
                 sdpa_mask_slowdown=1.15, mask_element=6.5e-9, tiled_score=3.8e-9,
                 tiled_score_per_dim=0.064e-9, tiled_partial_score=1.5e-9, tiled_bias_score=4.5e-9,
                 tiled_step=0.8e-3, reference_score=13e-9, sdpa_backward=2.6, tiled_backward=3.3,
                 tiled_partial_per_work=1.0e-9, tiled_partial_step_per_work=0.12e-3,
                 reference_score_per_dim=0.04e-9, reference_call=0.9e-3, sdpa_mask_call=0.6e-3,
                 mod_score_per_work=1.4e-9),
    "cpu-avx512": Rates(sdpa_score=0.6e-9, sdpa_score_per_dim=0.0166e-9, sdpa_causal_fraction=0.57,
                        sdpa_mask_slowdown=1.5, mask_element=1.6e-9, tiled_score=1.2e-9,
                        tiled_score_per_dim=0.0204e-9, tiled_partial_score=6e-9, tiled_bias_score=2.0e-9,
                        tiled_step=1.2e-4, reference_score=0.0, sdpa_backward=2.6, tiled_backward=3.3,
                        reference_score_per_dim=20e-9 / 128, mod_score_per_work=0.44e-9),
    "cuda": Rates(sdpa_score=2e-13, sdpa_score_per_dim=2e-15, sdpa_causal_fraction=0.55,
                  sdpa_mask_slowdown=2.0, mask_element=5e-13, tiled_score=2e-12, tiled_score_per_dim=4e-15,
                  tiled_partial_score=2e-12, tiled_bias_score=2e-12, tiled_step=2e-4, reference_score=0.0,
                  sdpa_backward=2.5, tiled_backward=3.0, reference_score_per_dim=5e-12 / 128,
                  mod_score_per_work=2e-12),
}


@lru_cache(maxsize=None)
def _cpu_capability() -> str:
    try:
        return torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):  # pragma: no cover - old torch
        return "DEFAULT"


def device_key(device: torch.device) -> str:
    """Which rate set a device gets: ``"cpu-avx512"`` on a CPU whose torch kernels use AVX-512,
    else the device type (``"cpu"``, ``"cuda"``, ...)."""
    if device.type == "cpu" and _cpu_capability().startswith("AVX512"):
        return "cpu-avx512"
    return device.type


def rates(problem: Problem) -> Rates:
    """The rates of the problem's device (CPU rates for devices not fitted)."""
    return RATES.get(device_key(problem.device), RATES["cpu"])


def parallel(problem: Problem) -> int:
    """Threads the arithmetic of a CPU problem is spread over (torch's intra-op threads, at most
    one per 128 query rows of a head); 1 elsewhere, where the rates are the device's own."""
    if problem.device.type not in ("cpu", "meta"):
        return 1
    return max(1, min(torch.get_num_threads(), problem.batch * problem.q_heads * -(-problem.nq // 128)))


def score_mod_work(problem: Problem) -> float:
    """The problem's score modifier's :attr:`~qkv.scores.ScoreMod.work` per score (0 without one)."""
    return problem.score_mod.work if problem.score_mod is not None else 0.0


def with_backward(problem: Problem, forward: float, ratio: float) -> float:
    """``forward`` plus the backward pass (``ratio`` times the forward) when gradients are needed."""
    return forward * (1.0 + ratio) if problem.requires_grad else forward


#: Below this many scores per head, the tiled estimate assumes every tile is visited: small
#: problems never favour tiling, and computing a block view costs more than it could save.
SMALL_PROBLEM_SCORES = 1 << 18
