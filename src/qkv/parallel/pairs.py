"""One block of ring attention: local query piece x key piece, at global positions.

Ring attention never sees the whole score matrix; each step attends a run of local queries to a
run of keys in hand. :class:`GlobalMask` turns the user's ``mask`` (written for the whole
sequence) into the arguments of that :func:`qkv.attention` call, and answers, without touching any
data, whether the block has anything to compute (the mask's block view at global positions).

- ``None`` or a :class:`qkv.Mask`: passed through with ``q_offset`` / ``k_offset``, so causal,
  windows, documents (ids indexed by position) and custom masks see global positions.
- A bool or float tensor broadcastable to ``(B, H, N, N)`` over the *whole* sequence: the block's
  rows and columns are sliced out (the tensor is ``N x N``, so this is for small problems). A float
  tensor is an additive bias; its gradient (this rank's queries' share) flows back.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

import qkv
from qkv.layout import TileKind
from qkv.masks import Mask
from qkv.problem import make_problem


class GlobalMask:
    """The user's mask for the whole sequence of ``total`` positions, ``batch`` x ``heads``."""

    def __init__(self, mask, batch: int, heads: int, total: int, device):
        self.batch, self.heads, self.total = batch, heads, total
        self._chunk_grid: tuple[int, Tensor] | None = None
        self.mask: Mask | None = None
        self.tensor: Tensor | None = None  # bool mask or float bias, 4-D, global positions
        if mask is None or isinstance(mask, Mask):
            self.mask = mask
            if mask is not None:  # fail early, with the mask's own message, on every rank alike
                mask.bind(batch, heads, total, total, torch.device("cpu"))
            return
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be None, a qkv Mask, or a bool/float tensor over the whole sequence, "
                            f"got {type(mask).__name__}")
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be bool (True = may attend) or floating (added to the scores), "
                            f"got {mask.dtype}")
        if mask.dim() > 4:
            raise ValueError(f"mask: expected at most 4 dims (B, H, N, N), got shape {tuple(mask.shape)}")
        if mask.device != torch.device(device):
            raise ValueError(f"mask is on {mask.device}, but q is on {device}")
        t = mask
        while t.dim() < 4:
            t = t.unsqueeze(0)
        expected = (batch, heads, total, total)
        for size, want, name in zip(t.shape, expected, ("batch", "heads", "N", "N")):
            if size not in (1, want):
                raise ValueError(f"mask: a tensor mask covers the whole sequence: shape {tuple(mask.shape)} does not "
                                 f"broadcast to (B, H, N, N) = {expected} ({name}: {size} vs {want})")
        self.tensor = t

    @property
    def is_bias(self) -> bool:
        return self.tensor is not None and self.tensor.is_floating_point()

    def with_bias(self, bias: Tensor) -> GlobalMask:
        """This mask with its bias tensor replaced (a detached leaf, for the backward pass)."""
        other = copy.copy(self)
        other.tensor = bias
        return other

    def _slice(self, q0: int, q1: int, k0: int, k1: int) -> Tensor:
        t = self.tensor
        t = t[:, :, q0:q1] if t.shape[2] > 1 else t
        return t[..., k0:k1] if t.shape[3] > 1 else t

    def is_empty(self, q0: int, q1: int, k0: int, k1: int) -> bool:
        """True when no query in positions ``q0 ..< q1`` may see any key in ``k0 ..< k1``."""
        if q1 <= q0 or k1 <= k0:
            return True
        if self.tensor is not None:
            return self.tensor.dtype == torch.bool and not bool(self._slice(q0, q1, k0, k1).any())
        if self.mask is None:
            return False
        grid = self._chunk_grid
        if grid is not None and (q1 - q0, k1 - k0) == (grid[0], grid[0]) and q0 % grid[0] == 0 == k0 % grid[0]:
            return bool(grid[1][q0 // grid[0], k0 // grid[0]] == TileKind.EMPTY)
        return bool((self._block_kinds(q0, q1 - q0, k0, k1 - k0, q1 - q0, k1 - k0) == TileKind.EMPTY).all())

    def _block_kinds(self, q0: int, nq: int, k0: int, nk: int, block_q: int, block_k: int) -> Tensor:
        """The mask's merged block view of queries ``q0 ..< q0 + nq`` x keys ``k0 ..< k0 + nk`` in
        ``(block_q x block_k)`` tiles, on meta tensors (no data)."""
        meta = torch.device("meta")
        q = torch.empty(self.batch, self.heads, nq, 1, device=meta)
        k = torch.empty(self.batch, 1, nk, 1, device=meta)
        return make_problem(q, k, k, self.mask, q_offset=q0, k_offset=k0).block_kinds(block_q, block_k)

    def prepare(self, chunk: int) -> None:
        """Compute the block view of the whole sequence in ``chunk x chunk`` tiles at once (when
        every piece is one such chunk), so that :meth:`is_empty` is a lookup."""
        if self.mask is not None and chunk > 0 and self.total % chunk == 0:
            self._chunk_grid = (chunk, self._block_kinds(0, self.total, 0, self.total, chunk, chunk))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, q0: int, k0: int, *, score_mod, scale, backend):
        """``qkv.attention`` of ``q`` (positions ``q0 ..``) over ``k, v`` (positions ``k0 ..``),
        returning ``(out, lse)``."""
        mask = self._slice(q0, q0 + q.shape[2], k0, k0 + k.shape[2]) if self.tensor is not None else self.mask
        return qkv.attention(q, k, v, mask, q_offset=q0, k_offset=k0, score_mod=score_mod, scale=scale,
                             backend=backend, return_lse=True)
