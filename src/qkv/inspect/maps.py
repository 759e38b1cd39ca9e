"""Attention maps at any length, from qkv's own math, without the ``Nq x Nk`` matrix.

:func:`qkv.attention_weights` materialises every weight, which is fine for a sentence and
impossible for a long document (32k tokens, 12 heads, float32: 48 GiB). Two views scale:

* :func:`attention_rows`: the exact weights of a few chosen query rows (and heads), over every
  key. Each weight is ``exp(score - lse(row))``; the row's log-sum-exp ``lse`` is taken from a
  forward pass (``qkv.attention(..., return_lse=True)``) when given, else computed from the same
  scores. Memory ``O(len(rows) * Nk)``.
* :func:`pooled_attention_map`: every weight, pooled over ``(block_q x block_k)`` tiles (mean or
  max), computed tile by tile in two passes per band of query rows: first the rows' ``lse``, then
  the weights ``exp(s - lse)`` reduced tile by tile. Tiles that the mask's block view marks empty
  are skipped (their pooled value is 0), as in the tiled backend. Memory ``O(block_q * max_run)``
  per head for the scores plus the ``(Nq/block_q x Nk/block_k)`` result.

Scores are those of :func:`qkv.attention` exactly: ``q k^T * scale``, then ``score_mod``, then an
additive float mask, then the bool mask (``-inf``), with queries aligned bottom-right (the
default positions of :mod:`qkv.positions`) and grouped heads (GQA/MQA) read from their shared key head. A
row that may attend to nothing has all-zero weights. Results are float32 (float64 for float64
inputs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .. import scoring
from ..layout import plan_runs
from ..problem import Problem, make_problem
from ..validate import positive_int

def attention_rows(q: Tensor, k: Tensor, mask=None, *, rows, heads=None, scale: float | None = None,
                   score_mod=None, lse: Tensor | None = None, chunk: int = 4096) -> Tensor:
    """The attention weights of chosen query rows, over all keys, without the full matrix.

    Args:
        q: queries ``(B, Hq, Nq, D)``.
        k: keys ``(B, Hkv, Nk, D)``, ``Hq % Hkv == 0``.
        mask, scale, score_mod: as in :func:`qkv.attention`.
        rows: query row indices (an int, a sequence of ints or a 1-D integer tensor; negative
            indices count from the end, ``-1`` is the last row).
        heads: query head indices (same forms); ``None`` for all heads.
        lse: optional ``(B, Hq, Nq)`` log-sum-exp of a forward pass with the same arguments
            (``qkv.attention(q, k, v, mask, ..., return_lse=True)``); computed when omitted.
        chunk: keys scored per step (bounds the temporary memory to ``len(rows) * chunk`` per head).

    Returns:
        ``(B, len(heads), len(rows), Nk)`` weights, equal to
        ``qkv.attention_weights(q, k, mask=mask, ...)[:, heads][:, :, rows]``. Memory is
        ``O(len(rows) * Nk)``.
    """
    problem = _problem(q, k, mask, scale, score_mod)
    row_index = _indices("rows", rows, problem.nq, problem.index_device)
    head_index = _indices("heads", heads, problem.q_heads, problem.index_device)
    positive_int("chunk", chunk)
    given_lse = _checked_lse(lse, problem)
    scorer = _Scorer(problem, head_index)
    weights = torch.empty(problem.batch, len(head_index), len(row_index), problem.nk,
                          dtype=problem.compute_dtype, device=problem.device)
    q_rows = scorer.query_rows(row_index)
    for c0 in range(0, problem.nk, chunk):
        c1 = min(c0 + chunk, problem.nk)
        weights[..., c0:c1] = scorer.scores(q_rows, row_index, c0, c1, masked=True)
    if given_lse is None:
        row_lse = torch.logsumexp(weights, dim=-1, keepdim=True)
    else:
        row_lse = given_lse.index_select(1, head_index.to(problem.device))[:, :, row_index.to(problem.device), None]
    return weights.sub_(scoring.safe_lse(row_lse)).exp_()


def pooled_attention_map(q: Tensor, k: Tensor, mask=None, *, block: int | tuple[int, int] = 128,
                         reduce: str = "mean", heads=None, scale: float | None = None, score_mod=None,
                         lse: Tensor | None = None, max_run: int = 2048) -> Tensor:
    """The attention map pooled over ``(block_q x block_k)`` tiles, computed tile by tile.

    Args:
        q: queries ``(B, Hq, Nq, D)``.
        k: keys ``(B, Hkv, Nk, D)``, ``Hq % Hkv == 0``.
        mask, scale, score_mod: as in :func:`qkv.attention`.
        block: tile size, an int (square tiles) or ``(block_q, block_k)``.
        reduce: ``"mean"`` (average weight over the tile's entries; a ragged last tile averages
            over the entries it has) or ``"max"`` (largest weight in the tile).
        heads: query head indices to compute (an int, a sequence or a 1-D integer tensor);
            ``None`` for all heads.
        lse: optional ``(B, Hq, Nq)`` log-sum-exp of a forward pass with the same arguments;
            computed (one extra pass over the scores) when omitted.
        max_run: at most this many keys are scored per matmul (consecutive non-empty tiles merge).

    Returns:
        ``(B, len(heads), ceil(Nq / block_q), ceil(Nk / block_k))``: entry ``[b, h, i, j]`` is the
        mean (or max) of ``qkv.attention_weights(...)[b, heads[h]]`` over query rows
        ``i*block_q : (i+1)*block_q`` and keys ``j*block_k : (j+1)*block_k``. Tiles the mask
        leaves empty are 0. The full weight matrix never exists: the scores of at most
        ``block_q x max_run`` entries per head do, at one time.
    """
    problem = _problem(q, k, mask, scale, score_mod)
    block_q, block_k = _block_sizes(block)
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    positive_int("max_run", max_run)
    head_index = _indices("heads", heads, problem.q_heads, problem.index_device)
    given_lse = _checked_lse(lse, problem)
    if given_lse is not None:
        given_lse = given_lse.index_select(1, head_index.to(problem.device))

    scorer = _Scorer(problem, head_index)
    kinds = problem.block_kinds(block_q, block_k)
    plan = plan_runs(kinds, block_k, problem.nk, max(max_run, block_k))
    num_q_blocks, num_k_blocks = kinds.shape
    pooled = torch.zeros(problem.batch, len(head_index), num_q_blocks, num_k_blocks,
                         dtype=problem.compute_dtype, device=problem.device)
    for i, runs in enumerate(plan):
        if not runs:
            continue
        r0, r1 = i * block_q, min((i + 1) * block_q, problem.nq)
        row_index = torch.arange(r0, r1, device=problem.index_device)
        q_rows = scorer.query_rows(row_index)
        if given_lse is None:
            row_lse = _streaming_lse(scorer, q_rows, row_index, runs)
        else:
            row_lse = given_lse[:, :, r0:r1, None]
        row_lse = scoring.safe_lse(row_lse)
        for c0, c1, partial in runs:
            probs = scorer.scores(q_rows, row_index, c0, c1, masked=partial).sub_(row_lse).exp_()
            j0 = c0 // block_k
            pooled[..., i, j0:j0 + _ceil_div(c1 - c0, block_k)] = _pool_tiles(probs, block_k, reduce)
    return pooled


# --------------------------------------------------------------------------------------------
# Scores of a sub-matrix: rows x key range, for chosen heads
# --------------------------------------------------------------------------------------------


class _Scorer:
    """Computes the scores :func:`qkv.attention` sees, for chosen heads, any rows and a key range."""

    def __init__(self, problem: Problem, heads: Tensor):
        p = self.problem = problem
        self.heads = heads
        self.cdt = p.compute_dtype
        dev = p.device
        all_heads = len(heads) == p.q_heads and bool((heads.cpu() == torch.arange(p.q_heads)).all())
        self.q = p.q if all_heads else p.q.index_select(1, heads.to(dev))  # no copy of q when all heads
        self.kv_heads = (heads // p.group).to(dev)
        idx = p.index_device
        self.b = torch.arange(p.batch, device=idx).view(-1, 1, 1, 1)
        self.h = heads.view(1, -1, 1, 1)
        if p.bias is not None and p.bias.shape[1] > 1:
            self.bias = p.bias.index_select(1, heads.to(dev))
        else:
            self.bias = p.bias

    def query_rows(self, rows: Tensor) -> Tensor:
        """The selected heads' queries at query rows ``rows``, times the scale: ``(B, H, R, D)``, compute dtype."""
        return self.q.index_select(2, rows.to(self.q.device)).to(self.cdt) * self.problem.scale

    def scores(self, q_rows: Tensor, rows: Tensor, c0: int, c1: int, masked: bool) -> Tensor:
        """Scores ``(B, H, R, c1 - c0)`` of ``q_rows`` (from :meth:`query_rows`) against keys
        ``c0:c1``; the bool mask is applied only when ``masked`` (tiles known to be full skip it)."""
        p = self.problem
        keys = p.k[:, :, c0:c1].index_select(1, self.kv_heads).to(self.cdt)
        s = torch.matmul(q_rows, keys.transpose(-1, -2))
        if p.score_mod is None and p.bias is None and (p.mask is None or not masked):
            return s
        q_pos = p.positions.queries(rows.view(1, 1, -1, 1))
        k_pos = p.positions.keys(torch.arange(c0, c1, device=p.index_device).view(1, 1, 1, -1))
        hide = scoring.hidden_entries(p, self.b, self.h, q_pos, k_pos, masked=masked)
        bias = None if self.bias is None else self._bias_tile(rows, c0, c1)
        return scoring.score_tile(p, s, self.b, self.h, q_pos, k_pos, bias, hide)

    def _bias_tile(self, rows: Tensor, c0: int, c1: int) -> Tensor:
        bias = self.bias
        if bias.shape[2] > 1:
            bias = bias.index_select(2, rows.to(bias.device))
        return bias[..., c0:c1] if bias.shape[3] > 1 else bias


def _streaming_lse(scorer: _Scorer, q_rows: Tensor, rows: Tensor, runs) -> Tensor:
    """``(B, H, R, 1)`` log-sum-exp of the rows' scores over the planned key runs (online max/sum)."""
    state = scoring.OnlineSoftmax(q_rows.shape[:-1], scorer.cdt, q_rows.device)
    for c0, c1, partial in runs:
        state.step(scorer.scores(q_rows, rows, c0, c1, masked=partial))
    return state.lse()


def _pool_tiles(probs: Tensor, block_k: int, reduce: str) -> Tensor:
    """Reduce ``(B, H, R, C)`` weights over rows and over consecutive groups of ``block_k`` keys
    (the last group may be shorter): ``(B, H, ceil(C / block_k))``."""
    *lead, rows, cols = probs.shape
    tiles = _ceil_div(cols, block_k)
    if cols % block_k:
        probs = torch.nn.functional.pad(probs, (0, tiles * block_k - cols))  # zeros: neutral for sum and max of p >= 0
    grouped = probs.view(*lead, rows, tiles, block_k)
    if reduce == "max":
        return grouped.amax(dim=(-3, -1))
    widths = torch.clamp(cols - torch.arange(tiles, device=probs.device) * block_k, max=block_k)
    return grouped.sum(dim=(-3, -1)) / (rows * widths).to(probs.dtype)


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _problem(q, k, mask, scale, score_mod) -> Problem:
    """Validate as :func:`qkv.attention` does; ``v`` is a one-column view of ``k`` (unused)."""
    if not isinstance(k, Tensor):
        raise TypeError(f"k must be a torch.Tensor, got {type(k).__name__}")
    return make_problem(q, k, k[..., :1], mask, scale=scale, score_mod=score_mod)


def _block_sizes(block) -> tuple[int, int]:
    sizes = (block, block) if isinstance(block, int) and not isinstance(block, bool) else block
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in sizes)):
        raise ValueError(f"block must be a positive int or a pair (block_q, block_k) of them, got {block!r}")
    return int(sizes[0]), int(sizes[1])


def _indices(name: str, value, size: int, device: torch.device) -> Tensor:
    """Row or head indices as a 1-D int64 tensor on ``device``; ``None`` means all ``size``."""
    if value is None:
        return torch.arange(size, device=device)
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got bool")
    if isinstance(value, int):
        t = torch.tensor([value])
    elif isinstance(value, Tensor):
        if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
        if value.dim() > 1:
            raise ValueError(f"{name} must be a scalar or 1-D, got shape {tuple(value.shape)}")
        t = value.reshape(-1).cpu()
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        t = torch.tensor(list(value), dtype=torch.int64)
    else:
        raise TypeError(f"{name} must be an int, a sequence of ints or an integer tensor, got {value!r}")
    if t.numel() == 0:
        raise ValueError(f"{name} must name at least one index")
    if int(t.min()) < -size or int(t.max()) >= size:
        raise ValueError(f"{name} must lie in [-{size}, {size}), got {t.tolist()}")
    return torch.remainder(t.to(torch.int64), size).to(device)


def _checked_lse(lse, problem: Problem) -> Tensor | None:
    if lse is None:
        return None
    if not isinstance(lse, Tensor) or not lse.is_floating_point():
        raise TypeError(f"lse must be a floating tensor (from qkv.attention(..., return_lse=True)) or None, "
                        f"got {type(lse).__name__ if not isinstance(lse, Tensor) else lse.dtype}")
    expected = (problem.batch, problem.q_heads, problem.nq)
    if tuple(lse.shape) != expected:
        raise ValueError(f"lse must have shape (B, Hq, Nq) = {expected}, got {tuple(lse.shape)}")
    return lse.to(device=problem.device, dtype=problem.compute_dtype)
