"""``torch.nn.functional.scaled_dot_product_attention`` for the problems it maps onto.

Torch's fused kernels are the fastest dense attention there is on most devices, but they know only
``is_causal`` (aligned top-left) and a materialised ``attn_mask``: any other mask is built here as a
dense ``(B|1, H|1, Nq, Nk)`` tensor, which costs ``Nq * Nk`` memory and no tile is ever skipped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..masks import Causal
from ..problem import Problem
from . import costs

#: Largest mask this backend will materialise for SDPA, in bytes.
MAX_DENSE_MASK_BYTES = 2 << 30


def uses_is_causal(problem: Problem) -> bool:
    """A plain causal mask whose query row ``i`` sits at key column ``i`` (SDPA's top-left
    ``is_causal``; a square problem at the default positions) maps onto ``is_causal``."""
    return isinstance(problem.mask, Causal) and problem.positions.diagonal == 0 and problem.bias is None


def needs_no_mask(problem: Problem) -> bool:
    """A causal mask over a single query at or after every key (a decoding step) hides nothing."""
    diagonal = problem.positions.diagonal
    return (isinstance(problem.mask, Causal) and problem.nq == 1 and diagonal is not None
            and diagonal >= problem.nk - 1)


def dense_mask_bytes(problem: Problem) -> int:
    """Bytes of the mask SDPA would need (0 if none)."""
    if problem.bias is None and (problem.mask is None or uses_is_causal(problem) or needs_no_mask(problem)):
        return 0
    per_element = 1 if problem.bias is None else torch.finfo(problem.dtype).bits // 8
    return problem.batch * problem.q_heads * problem.nq * problem.nk * per_element


class SdpaBackend:
    name = "sdpa"

    def unsupported(self, problem: Problem) -> list[str]:
        reasons = []
        if problem.score_mod is not None:
            reasons.append("score_mod: SDPA has no score modifier hook")
        if problem.return_lse:
            reasons.append("return_lse: SDPA's public API does not return the log-sum-exp")
        if problem.dropout_p > 0:
            reasons.append("dropout_p > 0: SDPA draws its own dropout mask, which `generator` cannot "
                           "reproduce and which differs from the other backends'")
        if problem.device.type == "meta":
            reasons.append("meta tensors: nothing to run")
        mask_bytes = dense_mask_bytes(problem)
        if mask_bytes > MAX_DENSE_MASK_BYTES:
            reasons.append(f"mask: SDPA needs it materialised, {mask_bytes / 2**30:.1f} GiB for "
                           f"(B, H, Nq, Nk); the limit is {MAX_DENSE_MASK_BYTES / 2**30:.0f} GiB")
        return reasons

    def estimate(self, problem: Problem) -> float:
        return costs.sdpa(problem)

    def run(self, problem: Problem) -> tuple[Tensor, None]:
        p = problem
        attn_mask = None
        if p.mask is not None and not uses_is_causal(p) and not needs_no_mask(p):
            attn_mask = p.mask.dense(p.batch, p.q_heads, p.nq, p.nk, p.device, p.positions)
        if p.bias is not None:
            bias = p.bias.to(p.dtype)
            attn_mask = bias if attn_mask is None else torch.where(attn_mask, bias, float("-inf"))
        kwargs = {"enable_gqa": True} if p.group > 1 else {}
        out = F.scaled_dot_product_attention(p.q, p.k, p.v, attn_mask=attn_mask, is_causal=uses_is_causal(p),
                                             scale=p.scale, **kwargs)
        return out, None
