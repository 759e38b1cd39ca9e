"""Block layouts: which ``(block_q x block_k)`` tiles of the score matrix a backend must visit.

:class:`TileKind` names the three kinds of tile (``&`` of two masks is the element-wise minimum of
their kinds, ``|`` the maximum, ``~`` swaps EMPTY and FULL).
"""

from __future__ import annotations

from enum import IntEnum


class TileKind(IntEnum):
    """Kind of one tile of a block view: no allowed element, some, or all."""

    EMPTY = 0
    PARTIAL = 1
    FULL = 2


__all__ = ["TileKind"]
