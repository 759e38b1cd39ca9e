"""Attention dropout from a counter-based hash.

Whether weight ``(b, h, i, j)`` is dropped is a pure function of ``(seed, b, h, i, j)``, not of
the order in which tiles are visited. Every backend therefore drops the same weights for the same
seed, a tiled backward pass regenerates exactly the mask of its forward pass, and one
``torch.Generator`` draw (the seed) makes a call reproducible.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
_MULT = 0x45D9F3B  # < 2**27, so (x < 2**32) * _MULT fits in int64 without overflow


def _mix32(x):
    """A 32-bit integer hash (two xor-shift-multiply rounds) on ints or int64 tensors in ``[0, 2**32)``."""
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    x = (((x >> 16) ^ x) * _MULT) & _MASK32
    return (x >> 16) ^ x


def draw_seed(generator: torch.Generator | None, device: torch.device) -> int:
    """One 31-bit seed from ``generator`` (or the default generator of ``device``)."""
    gen_device = generator.device if generator is not None else device
    if gen_device.type == "meta":
        gen_device = torch.device("cpu")
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=gen_device).item())


def mixed_seed(seed: int) -> int:
    """The seed as the hash's first input, itself hashed: an int in ``[0, 2**31)`` (an int32
    kernel argument, so the Triton kernels never specialise on its width). Unhashed,
    ``(b * heads + h) ^ seed`` gave seed ``s`` on head 0 exactly the mask of seed ``s ^ 1`` on
    head 1: calls whose seeds differ in a few low bits shared their masks, head for head."""
    return int(_mix32(seed & _MASK32)) >> 1


def keep_mask(seed: int, p: float, b: Tensor, h: Tensor, heads: int, row: Tensor, col: Tensor) -> Tensor:
    """Bool tensor, True where a weight is kept, for broadcastable index tensors.

    ``b, h`` are batch and query-head indices (``heads`` query heads in all), ``row`` the query row
    and ``col`` the key index. Each weight is kept with probability ``1 - p``.
    """
    x = _mix32((b * heads + h) ^ mixed_seed(seed))
    x = _mix32(x ^ row)
    x = _mix32(x ^ col)
    return x >= int(p * 2**32)
