"""The triton backend's tile lists and bit-packed masks (host side, no Triton kernel runs): a mask
the kernels cannot evaluate is stored on its partial tiles only, bit for bit."""

import torch

import qkv
from qkv.backends.triton.blocks import pack_partial_tiles, tile_kinds
from qkv.masks import PARTIAL, position_grid
from qkv.problem import make_problem


def test_bit_packed_masks_hold_exactly_the_partial_tiles():
    n, bq, bk = 512, 16, 16
    q = torch.randn(2, 2, n, 8)
    mask = qkv.from_function(lambda b, h, i, j: (i - j >= 0) & (i - j < 40 + 9 * h) & ((i + j + b) % 7 != 0), "f")
    p = make_problem(q, q, q, mask)
    kinds = tile_kinds(p, bq, bk)
    tile_map, bits = pack_partial_tiles(p, kinds, bq, bk)
    partial = int((kinds == PARTIAL).sum())
    assert bits.shape == (partial, bq, bk // 8)                  # memory: the partial tiles, not N^2
    assert bits.numel() < (kinds.numel() * bq * bk // 8) // 4
    allowed = p.mask.allowed(*position_grid(2, 2, n, n, torch.device("cpu")))  # (2, 2, n, n)
    for b, h, i, j in (kinds == PARTIAL).nonzero().tolist():
        packed = bits[tile_map[b, h, i, j]]
        unpacked = ((packed[:, :, None].int() >> torch.arange(8)) & 1).bool().reshape(bq, bk)
        assert torch.equal(unpacked, allowed[b, h, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk])
    assert (tile_map[kinds != PARTIAL] == -1).all()
