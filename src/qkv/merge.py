"""Combining attention over disjoint key sets: ``merge_partials``.

Attention of one set of queries over keys ``K = K_1 ∪ ... ∪ K_n`` (disjoint) is a weighted mean of
the attention over each part, weighted by how much softmax mass each part holds::

    lse   = log(sum_p exp(lse_p))
    out   = sum_p exp(lse_p - lse) * out_p

where ``out_p, lse_p`` are what :func:`qkv.attention` returns with ``return_lse=True`` for the key
part ``K_p`` (at its ``k_offset``). Ring attention and split-KV decoding both reduce with this.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _check(outs, lses) -> None:
    for name, seq in (("outs", outs), ("lses", lses)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence) or not all(isinstance(t, Tensor) for t in seq):
            raise TypeError(f"merge_partials: {name} must be a sequence of tensors")
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError(f"merge_partials: expected one lse per output and at least one of each, "
                         f"got {len(outs)} outputs and {len(lses)} lses")
    shape, lse_shape = tuple(outs[0].shape), tuple(outs[0].shape[:-1])
    if len(shape) != 4:
        raise ValueError(f"merge_partials: outs must be (B, H, N, Dv), got shape {shape}")
    for i, (o, lse) in enumerate(zip(outs, lses)):
        if tuple(o.shape) != shape:
            raise ValueError(f"merge_partials: outs[{i}] has shape {tuple(o.shape)}, outs[0] has {shape}")
        if tuple(lse.shape) != lse_shape:
            raise ValueError(f"merge_partials: lses[{i}] has shape {tuple(lse.shape)}, expected (B, H, N) = {lse_shape}")
        if not lse.is_floating_point() or not o.is_floating_point():
            raise TypeError(f"merge_partials: outs[{i}] and lses[{i}] must be floating tensors")
        if o.device != outs[0].device or lse.device != outs[0].device:
            raise ValueError(f"merge_partials: all tensors must be on one device, got {o.device} and {lse.device} "
                             f"vs {outs[0].device}")


def merge_partials(outs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Attention over the union of disjoint key sets, from the attention over each.

    Args:
        outs: ``n`` outputs ``(B, H, N, Dv)`` of the same queries over ``n`` disjoint key sets.
        lses: their log-sum-exps ``(B, H, N)`` (``qkv.attention(..., return_lse=True)``).

    Returns:
        ``(out, lse)``: ``out (B, H, N, Dv)`` in the dtype of ``outs[0]`` and ``lse (B, H, N)`` in
        the widest dtype of ``lses``, exactly the attention over the union (up to rounding).
        Differentiable in every input. A row that saw nothing in any part gets zeros and
        ``-inf`` (and zero gradients, never NaN); a row whose lse is NaN in some part (NaN reached
        a visible score) is NaN, output and lse.
    """
    _check(outs, lses)
    dtype = torch.promote_types(torch.float32, lses[0].dtype)
    for lse in lses[1:]:
        dtype = torch.promote_types(dtype, lse.dtype)
    stacked = torch.stack([lse.to(dtype) for lse in lses])  # (n, B, H, N)
    seen = (stacked != float("-inf")).any(dim=0)  # NaN counts as seen: a visible NaN stays NaN
    # Rows that saw nothing: all parts -inf; use 0 there so that no NaN reaches the gradient.
    safe = torch.where(seen, stacked, torch.zeros_like(stacked))
    total = torch.logsumexp(safe, dim=0)
    weights = torch.exp(safe - total) * seen  # (n, B, H, N); rows that saw nothing: 0
    out = sum(w.unsqueeze(-1) * o.to(dtype) for w, o in zip(weights, outs))
    lse = torch.where(seen, total, torch.full_like(total, float("-inf")))
    return out.to(outs[0].dtype), lse


__all__ = ["merge_partials"]
