"""Where the rows and columns of one attention call sit: the one row/column -> position rule.

Key column ``j`` of batch element ``b`` sits at position ``k_offset[b] + j`` and query row ``i`` at
``q_offset[b] + i``. Each offset is an int (the same for every batch element) or a ``(B,)`` int64
tensor. The default, ``q_offset = k_offset + Nk - Nq`` with ``k_offset = 0``, aligns the queries
bottom-right: the last query and the last key share a position (the newest tokens of a decoding
step, the square picture when ``Nq == Nk``). A key chunk of a longer sequence (ring attention,
split-KV decoding) passes its own ``k_offset``.

Every mask, score modifier and backend turns rows and columns into positions through
:class:`Positions` (:meth:`Positions.queries`, :meth:`Positions.keys`, :meth:`Positions.grid`),
so there is one rule and no place recomputes ``Nk - Nq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

Offset = int | Tensor


#: The largest offset magnitude: position arithmetic (a window's ``q - left``) stays in int64.
MAX_OFFSET = 1 << 53


def _check_offset(name: str, value, batch: int, device: torch.device) -> Offset:
    """An int, or a ``(B,)`` int64 tensor on ``device`` (a one-element tensor becomes an int)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a (B,) integer tensor, got bool")
    if isinstance(value, int):
        if abs(value) > MAX_OFFSET:
            raise ValueError(f"{name} must lie in [-2**53, 2**53] (positions are int64), got {value}")
        return value
    if isinstance(value, (list, tuple)):
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            raise TypeError(f"{name} must be an int or a (B,) integer tensor, got {value!r}")
        value = torch.tensor(value, dtype=torch.int64)
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be an int or a (B,) integer tensor, got {type(value).__name__}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got dtype {value.dtype}")
    if value.dim() == 0:
        return _check_offset(name, int(value), batch, device)
    if value.dim() != 1 or value.shape[0] != batch:
        raise ValueError(f"{name} must be an int or a (B,) = ({batch},) tensor, got shape {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.int64)


def _as_column(offset: Offset) -> Offset:
    """``(B,)`` offsets as ``(B, 1, 1, 1)``, to broadcast against 4-D index tensors."""
    return offset.view(-1, 1, 1, 1) if isinstance(offset, Tensor) else offset


def _span(offset: Offset) -> tuple[int, int]:
    if isinstance(offset, Tensor):
        return int(offset.min()), int(offset.max())  # one host sync per call, at bind time
    return offset, offset


@dataclass(frozen=True, eq=False)
class Positions:
    """The query and key offsets of one call (see the module docstring).

    ``explicit`` says whether the caller gave an offset (a mask may then check its tables against
    the positions actually used rather than against ``Nk``).
    """

    nq: int
    nk: int
    q_offset: Offset
    k_offset: Offset = 0
    explicit: bool = False

    @staticmethod
    def default(nq: int, nk: int) -> Positions:
        """Bottom-right alignment: keys at ``0 .. Nk-1``, query row ``i`` at ``i + Nk - Nq``."""
        return Positions(nq, nk, nk - nq, 0)

    @staticmethod
    def make(batch: int, nq: int, nk: int, q_offset=None, k_offset=0, device=None) -> Positions:
        """Validated positions from user arguments (``q_offset=None``: ``k_offset + Nk - Nq``)."""
        device = torch.device("cpu") if device is None else torch.device(device)
        explicit = q_offset is not None or not (isinstance(k_offset, int) and k_offset == 0)
        k_off = _check_offset("k_offset", k_offset, batch, device)
        if isinstance(k_off, int) and k_off < 0:
            raise ValueError(f"k_offset must be >= 0 (keys sit at positions k_offset + j), got {k_off}")
        if isinstance(k_off, Tensor) and k_off.device.type == "cpu" and bool((k_off < 0).any()):
            raise ValueError(f"k_offset must be >= 0 (keys sit at positions k_offset + j), got {k_off.tolist()}")
        q_off = k_off + (nk - nq) if q_offset is None else _check_offset("q_offset", q_offset, batch, device)
        return Positions(nq, nk, q_off, k_off, explicit)

    @property
    def is_default(self) -> bool:
        """True for the bottom-right rule with keys from position 0."""
        return (isinstance(self.k_offset, int) and self.k_offset == 0
                and isinstance(self.q_offset, int) and self.q_offset == self.nk - self.nq)

    @property
    def scalar(self) -> bool:
        """Both offsets are ints (the same for every batch element)."""
        return isinstance(self.q_offset, int) and isinstance(self.k_offset, int)

    @property
    def diagonal(self) -> int | None:
        """``q_offset - k_offset`` when it is one int for the whole batch, else None: the key column
        of query row 0's own position (0 for top-left alignment, ``Nk - Nq`` for bottom-right)."""
        return self.q_offset - self.k_offset if self.scalar else None

    def queries(self, rows: Tensor) -> Tensor:
        """Positions of query ``rows`` (4-D, e.g. ``(1, 1, R, 1)``): ``(B|1, 1, R, 1)``."""
        return rows + _as_column(self.q_offset)

    def keys(self, cols: Tensor) -> Tensor:
        """Positions of key ``cols`` (4-D, e.g. ``(1, 1, 1, C)``): ``(B|1, 1, 1, C)``."""
        return cols + _as_column(self.k_offset)

    def query_rows(self, b: Tensor, q: Tensor) -> Tensor:
        """Inverse of :meth:`queries`: the row of query position ``q`` in batch element ``b``."""
        return q - (self.q_offset[b] if isinstance(self.q_offset, Tensor) else self.q_offset)

    def key_cols(self, b: Tensor, k: Tensor) -> Tensor:
        """Inverse of :meth:`keys`: the column of key position ``k`` in batch element ``b``."""
        return k - (self.k_offset[b] if isinstance(self.k_offset, Tensor) else self.k_offset)

    def grid(self, batch: int, heads: int, device=None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Index tensors over the whole score matrix: ``b (B,1,1,1)``, ``h (1,H,1,1)``,
        ``q (B|1,1,Nq,1)`` and ``k (B|1,1,1,Nk)`` (positions)."""
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h = torch.arange(heads, device=device).view(1, -1, 1, 1)
        q = self.queries(torch.arange(self.nq, device=device).view(1, 1, -1, 1))
        k = self.keys(torch.arange(self.nk, device=device).view(1, 1, 1, -1))
        return b, h, q, k

    def query_span(self) -> tuple[int, int]:
        """Lowest and highest query position (``hi < lo`` when ``Nq == 0``)."""
        lo, hi = _span(self.q_offset)
        return lo, hi + self.nq - 1

    def key_span(self) -> tuple[int, int]:
        """Lowest and highest key position (``hi < lo`` when ``Nk == 0``)."""
        lo, hi = _span(self.k_offset)
        return lo, hi + self.nk - 1

    def select(self, b0: int, b1: int | None) -> Positions:
        """The positions of batch elements ``b0:b1`` (tensor offsets sliced)."""
        cut = (lambda o: o[b0:b1] if isinstance(o, Tensor) else o)
        return Positions(self.nq, self.nk, cut(self.q_offset), cut(self.k_offset), self.explicit)

    def to(self, device) -> Positions:
        """The same positions with tensor offsets on ``device``."""
        move = (lambda o: o.to(device) if isinstance(o, Tensor) else o)
        return Positions(self.nq, self.nk, move(self.q_offset), move(self.k_offset), self.explicit)

    def cache_key(self) -> tuple | None:
        """A hashable summary of the positions, for caching what depends on them; None when an
        offset is a tensor off the CPU (reading it would cost a host sync: not cached)."""
        def value(o):
            if not isinstance(o, Tensor):
                return o
            return tuple(o.tolist()) if o.device.type == "cpu" else None

        q, k = value(self.q_offset), value(self.k_offset)
        return None if q is None or k is None else (self.nq, self.nk, q, k)

    def __repr__(self):
        show = (lambda o: o.tolist() if isinstance(o, Tensor) else o)
        return f"Positions(q_offset={show(self.q_offset)}, k_offset={show(self.k_offset)})"


__all__ = ["Positions"]
