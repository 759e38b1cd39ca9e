"""``qkv.attention``: the one entry point. Validate, dispatch, run."""

from __future__ import annotations

import torch
from torch import Tensor

from .fastpath import attend as _fast_attend
from .backends import reference as _reference
from .dispatch import choose
from .problem import Problem, make_problem

_NUMBERS = (float, int)


def attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, scale: float | None = None, score_mod=None,
              dropout_p: float = 0.0, generator: torch.Generator | None = None, return_lse: bool = False,
              backend: str | None = None, q_offset=None, k_offset=0):
    r"""Scaled dot-product attention, ``softmax(q k^T * scale + score_mod, masked) v``.

    Args:
        q: queries ``(B, Hq, Nq, D)``.
        k: keys ``(B, Hkv, Nk, D)``; ``Hq`` must be a multiple of ``Hkv`` (grouped/multi-query heads).
        v: values ``(B, Hkv, Nk, Dv)``.
        mask: ``None``; a :class:`qkv.Mask` (``qkv.causal()``, ``qkv.sliding_window(w)``, ...);
            a bool tensor (True = may attend); or a float tensor added to the scores. Tensors must
            broadcast to ``(B, Hq, Nq, Nk)``. Masks and score modifiers see positions (below).
        scale: score scale, default ``1 / sqrt(D)``.
        score_mod: a :class:`qkv.scores.ScoreMod` or ``fn(score, b, h, q, k)`` applied to the scaled
            scores before masking (ALiBi, soft-capping, relative bias).
        dropout_p: probability of dropping each attention weight (outputs rescaled by ``1/(1-p)``).
        generator: source of the dropout seed, for reproducible dropout.
        return_lse: also return the log-sum-exp of each row's scores.
        backend: ``None`` (pick the fastest that supports the problem) or a name from
            ``qkv.backends.REGISTRY`` (``"reference"``, ``"tiled"``, ``"sdpa"``).
        q_offset, k_offset: positions of query row 0 and key column 0, each an int or a ``(B,)``
            integer tensor: key column ``j`` of batch ``b`` sits at ``k_offset[b] + j``, query row
            ``i`` at ``q_offset[b] + i``. Default ``k_offset = 0`` and ``q_offset = k_offset + Nk - Nq``
            (bottom-right: the last query and the last key share a position). A chunk of keys of a
            longer sequence passes its offset; :func:`qkv.merge_partials` combines the chunks.

    Returns:
        ``out (B, Hq, Nq, Dv)`` in the input dtype, and with ``return_lse=True`` also
        ``lse (B, Hq, Nq)`` (float32; float64 for float64 inputs). A query row that may attend to
        nothing gets zeros, ``lse = -inf`` and zero gradients. float16/bfloat16 inputs accumulate
        in float32.
    """
    if score_mod is None and generator is None and return_lse is False and q_offset is None \
            and type(k_offset) is int and k_offset == 0 and type(dropout_p) in _NUMBERS and dropout_p == 0:
        out = _fast_attend(q, k, v, mask, scale, backend)  # a decision remembered per problem signature
        if out is not None:
            return out
    problem = make_problem(q, k, v, mask, scale=scale, score_mod=score_mod, dropout_p=dropout_p,
                           generator=generator, return_lse=return_lse, q_offset=q_offset, k_offset=k_offset)
    if problem.is_empty:
        out, lse = _empty_result(problem)
    else:
        out, lse = choose(problem, backend, learn=True).backend.run(problem)
    return (out, lse) if return_lse else out


def attention_weights(q: Tensor, k: Tensor, v: Tensor | None = None, mask=None, *, scale: float | None = None,
                      score_mod=None, q_offset=None, k_offset=0) -> Tensor:
    """The attention weights ``(B, Hq, Nq, Nk)`` (float32; float64 for float64 inputs) that
    :func:`attention` applies to ``v``, materialised. Rows with nothing to attend to are zero."""
    if v is None:
        v = k[..., :1]
    problem = make_problem(q, k, v, mask, scale=scale, score_mod=score_mod, q_offset=q_offset, k_offset=k_offset)
    if problem.is_empty:
        return torch.zeros(problem.batch, problem.q_heads, problem.nq, problem.nk, dtype=problem.compute_dtype,
                           device=problem.device)
    return _reference.attention_weights(problem)[0]


def _empty_result(p: Problem) -> tuple[Tensor, Tensor]:
    """Output for a problem with a zero-sized dimension: zeros, ``lse = -inf``, zero gradients."""
    out = torch.zeros(p.batch, p.q_heads, p.nq, p.v_dim, dtype=p.dtype, device=p.device)
    lse = torch.full((p.batch, p.q_heads, p.nq), float("-inf"), dtype=p.compute_dtype, device=p.device)
    if p.requires_grad:  # keep the graph connected so that backward() yields zero gradients
        anchor = sum((t.sum() * 0 for t in (p.q, p.k, p.v) if t.requires_grad), torch.zeros((), device=p.device))
        out = out + anchor.to(p.dtype)
    return out, lse
