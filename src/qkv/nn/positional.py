"""Positional information: absolute embeddings, rotary embeddings (RoPE) and ALiBi.

Positions are integers ``0, 1, 2, ...`` counted from each sequence's first token, so a decoding
step at position ``t`` passes ``positions=t`` (or a ``(B, 1)`` tensor when sequences differ in
length) and gets exactly the angles a full forward pass gives token ``t``.

- :class:`SinusoidalEmbedding`: the fixed ``sin``/``cos`` table of Vaswani et al. (2017).
- :class:`LearnedPositionalEmbedding`: a trained table (GPT-2, BERT), at most ``max_positions``.
- :class:`RotaryEmbedding`: RoPE (Su et al., 2021, "RoFormer") rotates query/key pairs by
  ``position * theta_i``, ``theta_i = base ** (-2i / rotary_dim)``, so that ``<R_m q, R_n k>``
  depends on ``m - n`` only. Partial rotation (``rotary_dim < head_dim``, GPT-NeoX), position
  interpolation (``scaling="linear"``, Chen et al., 2023: positions divided by the factor) and
  NTK-aware scaling (``scaling="ntk"``, bloc97, 2023: ``base * factor ** (d / (d - 2))``).
- :class:`ALiBi`: per-head linear distance biases (Press et al., 2022) as a :mod:`qkv.scores` modifier.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import scores
from ..validate import positive_int

ROPE_SCALINGS = (None, "linear", "ntk")

#: RoPE tables cover positions up to this many (``2 * TABLE_LIMIT * rotary_dim`` values at most);
#: beyond, angles are computed for the positions at hand. ``TABLE_MIN``: the smallest table.
TABLE_LIMIT = 1 << 16
TABLE_MIN = 256


def position_tensor(positions, n: int, device) -> Tensor:
    """Positions of ``n`` tokens as int64 ``(N,)`` or ``(B, N)``: from None (``0..n-1``), an int
    offset (``offset..offset+n-1``), or an integer tensor ``(N,)`` / ``(B, N)``."""
    if positions is None:
        return torch.arange(n, device=device)
    if isinstance(positions, int) and not isinstance(positions, bool):
        return torch.arange(positions, positions + n, device=device)
    if not isinstance(positions, Tensor) or positions.is_floating_point() or positions.is_complex() \
            or positions.dtype == torch.bool:
        raise TypeError(f"positions must be None, an int offset or an integer tensor, got "
                        f"{positions.dtype if isinstance(positions, Tensor) else type(positions).__name__}")
    if positions.dim() not in (1, 2) or positions.shape[-1] != n:
        raise ValueError(f"positions must have shape (N,) or (B, N) with N={n}, got {tuple(positions.shape)}")
    return positions.to(device=device, dtype=torch.int64)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding, applied by calling it on queries or keys.

    Args:
        head_dim: the per-head width ``D`` of the tensors it rotates.
        rotary_dim: how many leading dims of each head rotate (even, ``<= D``; default ``D``);
            the rest pass through unchanged (partial rotary).
        base: the angle base (10000 in RoFormer and LLaMA 2; 500000 in LLaMA 3).
        scaling: None, ``"linear"`` (position interpolation) or ``"ntk"`` (NTK-aware base change),
            to stretch a trained context by ``scaling_factor``.
        scaling_factor: the stretch (``>= 1``).
        interleaved: rotate pairs ``(x[2i], x[2i+1])`` (RoFormer, GPT-J) instead of
            ``(x[i], x[i + rotary_dim/2])`` (GPT-NeoX, LLaMA; the default).

    Angles are computed in float64 from integer positions, so large offsets lose no precision, and
    rounded once to the dtype of the rotated tensors. Their cos/sin are kept in a table (grown on
    demand, in that dtype); :meth:`rotation` looks a step's positions up once, and the
    :class:`Rotation` it returns serves the queries and keys of every layer.
    """

    def __init__(self, head_dim: int, *, rotary_dim: int | None = None, base: float = 10000.0,
                 scaling: str | None = None, scaling_factor: float = 1.0, interleaved: bool = False):
        super().__init__()
        positive_int("head_dim", head_dim)
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not isinstance(rotary_dim, int) or isinstance(rotary_dim, bool) or rotary_dim <= 0 \
                or rotary_dim % 2 or rotary_dim > head_dim:
            raise ValueError(f"rotary_dim must be a positive even int <= head_dim ({head_dim}), got {rotary_dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1 or math.isinf(base):
            raise ValueError(f"base must be a finite number > 1, got {base!r}")
        if scaling not in ROPE_SCALINGS:
            raise ValueError(f"scaling must be one of {ROPE_SCALINGS}, got {scaling!r}")
        if isinstance(scaling_factor, bool) or not isinstance(scaling_factor, (int, float)) \
                or not 1.0 <= scaling_factor < math.inf:
            raise ValueError(f"scaling_factor must be a finite number >= 1, got {scaling_factor!r}")
        if scaling == "ntk" and rotary_dim <= 2:
            raise ValueError("scaling='ntk' needs rotary_dim > 2")
        self.head_dim, self.rotary_dim = head_dim, rotary_dim
        self.base, self.scaling, self.scaling_factor = float(base), scaling, float(scaling_factor)
        self.interleaved = bool(interleaved)
        self._table: tuple[Tensor, Tensor] | None = None  # see table(); not state: rebuilt on demand

    @property
    def effective_base(self) -> float:
        """The base after NTK-aware scaling (``base`` otherwise)."""
        if self.scaling == "ntk":
            return self.base * self.scaling_factor ** (self.rotary_dim / (self.rotary_dim - 2))
        return self.base

    def inverse_frequencies(self, device=None) -> Tensor:
        """``theta_i = base ** (-2i / rotary_dim)`` for ``i < rotary_dim / 2``, float64."""
        exponents = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64, device=device) / self.rotary_dim
        return self.effective_base ** -exponents

    def angles(self, positions: Tensor) -> Tensor:
        """Rotation angles ``(..., rotary_dim / 2)`` (float64) for integer ``positions (...)``."""
        scaled = positions.to(torch.float64)
        if self.scaling == "linear":
            scaled = scaled / self.scaling_factor
        return scaled.unsqueeze(-1) * self.inverse_frequencies(positions.device)

    def table(self, length: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        """``cos, sin`` of the angles of positions ``0 .. >= length-1``, each ``(L, rotary_dim / 2)``
        in ``dtype`` on ``device``: computed in float64 and rounded once, so a row is exactly what
        :meth:`angles` gives that position. Kept (one table, the last dtype and device asked for)
        and regrown, to the next power of two, when a longer one is needed."""
        cached = self._table
        if cached is None or cached[0].shape[0] < length or cached[0].dtype != dtype or cached[0].device != device:
            size = max(TABLE_MIN, 1 << max(0, length - 1).bit_length())
            theta = self.angles(torch.arange(size, device=device))
            cos, sin = theta.cos().to(dtype), theta.sin().to(dtype)
            cached = self._table = (cos, sin, *Rotation.expand(cos, sin, self.interleaved))
        return cached[0], cached[1]

    def expanded_table(self, length: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
        """:meth:`table` in the per-dim form a :class:`Rotation` applies (``(L, rotary_dim)``
        each; see :meth:`Rotation.expand`), kept with it."""
        self.table(length, dtype, device)
        return self._table[2], self._table[3]

    def rotation(self, positions, num_tokens: int, *, dtype: torch.dtype, device, end: int | None = None) -> Rotation:
        """The :class:`Rotation` of ``num_tokens`` tokens at ``positions`` (None, an int offset, ``(N,)``
        or ``(B, N)``), to apply to queries and keys alike. ``end``: a bound on the positions (all
        ``< end``) if the caller knows one, which saves reading a position tensor's maximum. Up to
        ``TABLE_LIMIT`` positions come from the cached :meth:`table`; beyond it angles are computed."""
        if positions is None or (isinstance(positions, int) and not isinstance(positions, bool)):
            first = 0 if positions is None else positions
            if 0 <= first and first + num_tokens <= TABLE_LIMIT:
                full_cos, signed_sin = self.expanded_table(first + num_tokens, dtype, device)  # a step: two slices
                return Rotation.from_expanded(full_cos[first:first + num_tokens], signed_sin[first:first + num_tokens],
                                              self.interleaved)
        pos = position_tensor(positions, num_tokens, device)
        if end is None:
            end = int(pos.max()) + 1 if pos.numel() else 0
            use_table = end <= TABLE_LIMIT and int(pos.min()) >= 0
        else:
            use_table = end <= TABLE_LIMIT
        if use_table:
            full_cos, signed_sin = self.expanded_table(end, dtype, device)
            return Rotation.from_expanded(full_cos[pos], signed_sin[pos], self.interleaved)
        theta = self.angles(pos)
        return Rotation(theta.cos().to(dtype), theta.sin().to(dtype), self.interleaved)

    def forward(self, x: Tensor, positions=None) -> Tensor:
        """Rotate ``x (B, H, N, head_dim)``; ``positions``: None, an int offset, ``(N,)`` or ``(B, N)``."""
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"x must have shape (batch, heads, seq, {self.head_dim}), got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        return self.rotation(positions, x.shape[2], dtype=x.dtype, device=x.device)(x)

    def extra_repr(self) -> str:
        parts = [f"head_dim={self.head_dim}", f"rotary_dim={self.rotary_dim}", f"base={self.base:g}"]
        if self.scaling:
            parts.append(f"scaling={self.scaling!r}, scaling_factor={self.scaling_factor:g}")
        if self.interleaved:
            parts.append("interleaved=True")
        return ", ".join(parts)


class Rotation:
    """The RoPE rotation of some tokens, computed once and applied to queries and keys of every layer.

    ``cos``, ``sin``: ``(N, rotary_dim / 2)`` or ``(B, N, rotary_dim / 2)`` in the dtype of the
    tensors it rotates (from :meth:`RotaryEmbedding.rotation`). Calling it on ``x (B, H, N, D)``
    rotates the first ``rotary_dim`` dims of each head, exactly as :class:`RotaryEmbedding` does:
    pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)``, computed as
    ``x * [cos, cos] + swap(x) * [-sin, sin]`` (the same floating-point operations, fewer kernels).
    """

    def __init__(self, cos: Tensor, sin: Tensor, interleaved: bool = False):
        self._set(*self.expand(cos, sin, interleaved), interleaved)

    @staticmethod
    def expand(cos: Tensor, sin: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
        """``cos, sin (..., rotary_dim / 2)`` as the per-dim factors ``(..., rotary_dim)`` of
        ``x * full_cos + swap(x) * signed_sin``."""
        if interleaved:  # pairs (x[2i], x[2i+1])
            return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
        return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)  # pairs (x[i], x[i + rotary_dim/2])

    @classmethod
    def from_expanded(cls, full_cos: Tensor, signed_sin: Tensor, interleaved: bool = False) -> Rotation:
        """A rotation from factors :meth:`expand` made (``(N, rotary_dim)`` or ``(B, N, rotary_dim)``)."""
        rotation = cls.__new__(cls)
        rotation._set(full_cos, signed_sin, interleaved)
        return rotation

    def _set(self, full_cos: Tensor, signed_sin: Tensor, interleaved: bool) -> None:
        if full_cos.dim() == 2:
            full_cos, signed_sin = full_cos[None], signed_sin[None]
        self.interleaved = bool(interleaved)
        self.num_tokens, self.rotary_dim = full_cos.shape[1], full_cos.shape[2]
        self.cos, self.sin = full_cos.unsqueeze(1), signed_sin.unsqueeze(1)  # (B|1, 1, N, rotary_dim)
        self._heads_last = None  # (B|1, N, 1, rotary_dim) each, made on first use

    def __call__(self, x: Tensor) -> Tensor:
        """Rotate ``x (B, H, N, D)``."""
        if x.dim() != 4 or x.shape[2] != self.num_tokens or x.shape[-1] < self.rotary_dim:
            raise ValueError(f"rotation: expected x (B, H, N={self.num_tokens}, >= {self.rotary_dim}), "
                             f"got {tuple(x.shape)}")
        return self._rotate(x, self.cos, self.sin)

    def heads_last(self, x: Tensor) -> Tensor:
        """Rotate ``x (B, N, H, D)`` (heads after tokens, as a projection's output unflattens):
        the same numbers as :meth:`__call__` on ``x.transpose(1, 2)``, transposed back. Queries
        and keys stacked along ``H`` (one fused projection) rotate in one go."""
        if x.dim() != 4 or x.shape[1] != self.num_tokens or x.shape[-1] < self.rotary_dim:
            raise ValueError(f"rotation: expected x (B, N={self.num_tokens}, H, >= {self.rotary_dim}), "
                             f"got {tuple(x.shape)}")
        factors = self._heads_last
        if factors is None:
            factors = self._heads_last = (self.cos.transpose(1, 2), self.sin.transpose(1, 2))
        return self._rotate(x, *factors)

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if cos.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"positions has batch size {cos.shape[0]}, expected 1 or {x.shape[0]}")
        rotary = x.shape[-1] == self.rotary_dim
        rot = x if rotary else x[..., :self.rotary_dim]
        if self.interleaved:
            swapped = rot.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        else:
            swapped = rot.roll(self.rotary_dim // 2, dims=-1)
        rotated = rot * cos + swapped * sin
        return rotated if rotary else torch.cat((rotated, x[..., self.rotary_dim:]), dim=-1)


class SinusoidalEmbedding(nn.Module):
    """Fixed embeddings ``pe[p, 2i] = sin(p / base ** (2i / dim))``, ``pe[p, 2i+1] = cos(...)``.

    ``forward(positions) -> (*positions.shape, dim)`` in ``dtype`` (default float32).
    """

    def __init__(self, dim: int, *, base: float = 10000.0):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0 or dim % 2:
            raise ValueError(f"dim must be a positive even int, got {dim!r}")
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not base > 1:
            raise ValueError(f"base must be a number > 1, got {base!r}")
        self.dim, self.base = dim, float(base)

    def forward(self, positions: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        positions = _integer_positions(positions)
        freqs = self.base ** -(torch.arange(0, self.dim, 2, dtype=torch.float64, device=positions.device) / self.dim)
        theta = positions.to(torch.float64).unsqueeze(-1) * freqs
        return torch.stack((theta.sin(), theta.cos()), dim=-1).flatten(-2).to(dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, base={self.base:g}"


class LearnedPositionalEmbedding(nn.Module):
    """A trained table of ``max_positions`` embeddings (``weight (max_positions, dim)``).

    ``forward(positions) -> (*positions.shape, dim)``; a position outside ``[0, max_positions)``
    raises ``ValueError`` (the table has no row for it).
    """

    def __init__(self, max_positions: int, dim: int):
        super().__init__()
        self.max_positions = positive_int("max_positions", max_positions)
        positive_int("dim", dim)
        self.table = nn.Embedding(max_positions, dim)

    def forward(self, positions: Tensor) -> Tensor:
        positions = _integer_positions(positions)
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= self.max_positions):
            raise ValueError(f"positions must lie in [0, max_positions={self.max_positions}), got values in "
                             f"[{int(positions.min())}, {int(positions.max())}]")
        return self.table(positions)


class ALiBi(nn.Module):
    """ALiBi slopes for ``num_heads`` heads as a buffer (moves with the model), served as a
    :func:`qkv.scores.alibi` modifier: bias ``slope[h] * (k - q)``, or ``-slope[h] * |k - q|``
    with ``symmetric=True`` (bidirectional encoders)."""

    def __init__(self, num_heads: int, *, symmetric: bool = False):
        super().__init__()
        self.symmetric = bool(symmetric)
        self.register_buffer("slopes", scores.alibi_slopes(num_heads))

    def score_mod(self) -> scores.ScoreMod:
        return scores.alibi(self.slopes, symmetric=self.symmetric)

    def extra_repr(self) -> str:
        return f"num_heads={self.slopes.numel()}, symmetric={self.symmetric}"


def _integer_positions(positions) -> Tensor:
    if not isinstance(positions, Tensor) or positions.is_floating_point() or positions.is_complex() \
            or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got "
                        f"{positions.dtype if isinstance(positions, Tensor) else type(positions).__name__}")
    return positions.to(torch.int64)
