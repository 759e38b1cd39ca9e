"""Pool attention weights that already exist into ``(block_q x block_k)`` tiles.

:func:`~qkv.inspect.pooled_attention_map` computes a pooled map from ``q`` and ``k`` without the
full matrix; a model that returned its weights (``output_attentions=True``, a few hundred tokens)
has the matrix already, and :func:`pool_weights` pools it the same way: the same tiles, the same
ragged last tile (averaged over the entries it has), ``mean`` or ``max``. A long map pooled this
way draws as a picture a person can read (:func:`~qkv.inspect.plot_attention_grid` with ``block=``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def pool_weights(weights: Tensor, block: int | tuple[int, int], reduce: str = "mean") -> Tensor:
    """Pool ``(..., Nq, Nk)`` weights over tiles: ``(..., ceil(Nq / block_q), ceil(Nk / block_k))``.

    Entry ``[..., i, j]`` is the mean (or max) of ``weights[..., i*block_q:(i+1)*block_q,
    j*block_k:(j+1)*block_k]``, as :func:`~qkv.inspect.pooled_attention_map` returns for the same
    attention. ``block`` is an int (square tiles) or ``(block_q, block_k)``.
    """
    if not isinstance(weights, Tensor) or not weights.is_floating_point() or weights.dim() < 2:
        raise TypeError(f"weights must be a floating tensor (..., Nq, Nk), got "
                        f"{weights.dtype if isinstance(weights, Tensor) else type(weights).__name__}")
    sizes = (block, block) if isinstance(block, int) and not isinstance(block, bool) else block
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in sizes)):
        raise ValueError(f"block must be a positive int or a pair (block_q, block_k) of them, got {block!r}")
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce must be 'mean' or 'max', got {reduce!r}")
    block_q, block_k = sizes
    *lead, nq, nk = weights.shape
    tiles_q, tiles_k = -(-nq // block_q), -(-nk // block_k)
    padded = torch.nn.functional.pad(weights, (0, tiles_k * block_k - nk, 0, tiles_q * block_q - nq))
    grouped = padded.reshape(*lead, tiles_q, block_q, tiles_k, block_k)
    if reduce == "max":  # padding is 0, below or equal to every weight
        return grouped.amax(dim=(-3, -1))
    rows = torch.clamp(nq - torch.arange(tiles_q, device=weights.device) * block_q, max=block_q)
    cols = torch.clamp(nk - torch.arange(tiles_k, device=weights.device) * block_k, max=block_k)
    return grouped.sum(dim=(-3, -1)) / (rows[:, None] * cols[None, :]).to(weights.dtype)
