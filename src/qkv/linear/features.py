"""Feature maps ``phi`` of kernelised attention: ``softmax``-like weights ``phi(q) . phi(k)``.

- :func:`elu_plus_one`: ``elu(x) + 1`` (Katharopoulos et al. 2020, "Transformers are RNNs"), a
  positive map with as many features as the head has dimensions; it defines a different
  attention, not an estimate of softmax.
- :class:`PerformerFeatures`: FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with
  Performers"), positive orthogonal random features whose product estimates the softmax kernel
  ``exp(q . k * scale)`` without bias: ``phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)`` with the rows of
  ``W (m, D)`` Gaussian, drawn in orthogonal blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import positive_int


def elu_plus_one(x: Tensor) -> Tensor:
    """``elu(x) + 1``, elementwise (``(..., D) -> (..., D)``), always > 0."""
    return F.elu(x) + 1


def draw_projection(head_dim: int, num_features: int, generator: torch.Generator, *,
                    orthogonal: bool = True) -> Tensor:
    """``W (num_features, head_dim)`` float64 on CPU with Gaussian rows ``N(0, I)``.

    Orthogonal: blocks of ``head_dim`` rows are orthogonal to each other (the Q of a Gaussian
    matrix's QR), each row rescaled to the length of an independent Gaussian vector, so every row
    is still marginally ``N(0, I)`` (the estimate stays unbiased) but the rows of a block do not
    repeat each other's directions (lower variance)."""
    if not orthogonal:
        return torch.randn(num_features, head_dim, generator=generator, dtype=torch.float64)
    blocks = math.ceil(num_features / head_dim)
    gaussian = torch.randn(blocks, head_dim, head_dim, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]  # uniformly (Haar) distributed
    lengths = torch.randn(blocks, head_dim, head_dim, generator=generator, dtype=torch.float64).norm(dim=-1)
    rows = q.transpose(-1, -2) * lengths[..., None]  # (blocks, D, D): orthogonal rows of Gaussian lengths
    return rows.reshape(blocks * head_dim, head_dim)[:num_features]


class PerformerFeatures(nn.Module):
    """FAVOR+ positive random features for heads of ``head_dim``.

    Args:
        head_dim: ``D`` of the queries and keys.
        num_features: ``m``, random features per head (more: closer to softmax, slower).
        orthogonal: draw the rows in orthogonal blocks (FAVOR+); False draws them independently.
        seed: seeds the first draw; :meth:`redraw` draws again.
        device, dtype: of the projection (drawn in float64, then converted).

    The projection ``W (m, D)`` is a buffer (saved in ``state_dict``, moved by ``.to``), shared by
    every head. ``forward(x, scale)`` maps ``(..., D)`` to ``(..., m)``.
    """

    def __init__(self, head_dim: int, num_features: int = 256, *, orthogonal: bool = True, seed: int = 0,
                 device=None, dtype=torch.float32):
        super().__init__()
        self.head_dim = positive_int("head_dim", head_dim)
        self.num_features = positive_int("num_features", num_features)
        self.orthogonal = bool(orthogonal)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        self.seed, self.draws = seed, 0
        self.register_buffer("projection", self._draw(seed).to(device=device, dtype=dtype))

    def _draw(self, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        return draw_projection(self.head_dim, self.num_features, g, orthogonal=self.orthogonal)

    @torch.no_grad()
    def redraw(self, seed: int | None = None) -> None:
        """Draw a new projection: from ``seed``, or else the next of a sequence fixed by the first
        seed (so a run that redraws every ``k`` steps is reproducible)."""
        self.draws += 1
        if seed is None:
            seed = self.seed + 1_000_003 * self.draws
        self.projection.copy_(self._draw(seed).to(self.projection))

    def forward(self, x: Tensor, scale: float, *, stabilize: bool = False) -> Tensor:
        """``phi(x * sqrt(scale))`` so that ``phi(q) . phi(k)`` estimates ``exp(q . k * scale)``.

        ``stabilize`` divides each row by its largest feature (a per-row constant, which cancels
        in attention's normalisation); keys need no stabiliser: ``W x - |x|^2 / 2 <= |w|^2 / 2``
        bounds every feature whatever the input."""
        if x.shape[-1] != self.head_dim:
            raise ValueError(f"PerformerFeatures: expected head_dim {self.head_dim}, got {x.shape[-1]}")
        x = x * math.sqrt(scale)
        logits = x @ self.projection.to(x.dtype).T - (x * x).sum(-1, keepdim=True) / 2
        if stabilize:
            logits = logits - logits.amax(-1, keepdim=True).detach()
        return torch.exp(logits) / math.sqrt(self.num_features)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, num_features={self.num_features}, orthogonal={self.orthogonal}"
