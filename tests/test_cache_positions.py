"""PositionMask: the mask a cache attends with, over per-batch true positions.

Checked against a per-element Python predicate (tests.oracle), its block view for soundness
against the dense mask (an EMPTY tile must hold no allowed entry, a FULL tile no disallowed one),
and attention through it in every backend against the reference (float64, 1e-10).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.cache import PositionMask
from qkv.masks import EMPTY, FULL, TileGrid, count_tiles
from tests.oracle import dense_from_predicate, textbook_attention

pytestmark = pytest.mark.usefixtures("small_tiled_backends")


@st.composite
def position_problems(draw):
    """Random per-row query and key positions, some key slots empty (-1), optional window/sinks."""
    batch = draw(st.integers(1, 3))
    nq, nk = draw(st.integers(1, 12)), draw(st.integers(1, 20))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    q_pos = torch.randint(0, 30, (batch, nq), generator=gen)
    if draw(st.booleans()):
        q_pos = q_pos.sort(dim=1).values
    k_pos = torch.randint(-1, 30, (batch, nk), generator=gen)
    if draw(st.booleans()):
        k_pos = torch.arange(nk).expand(batch, nk).clone()
    windowed = draw(st.booleans())
    window = draw(st.integers(0, 8)) if windowed else None
    sinks = draw(st.integers(0, 4)) if windowed else 0
    return q_pos, k_pos, window, sinks


def predicate(q_pos, k_pos, window, sinks):
    def allowed(b, h, qi, kj):
        q, k = int(q_pos[b, qi - (k_pos.shape[1] - q_pos.shape[1])]), int(k_pos[b, kj])
        ok = 0 <= k <= q
        return ok and (window is None or k >= q - window or k < sinks)
    return allowed


@given(position_problems())
def test_allowed_equals_predicate(problem):
    q_pos, k_pos, window, sinks = problem
    mask = PositionMask(q_pos, k_pos, window=window, sinks=sinks)
    batch, nq, nk = q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]
    expected = dense_from_predicate(predicate(q_pos, k_pos, window, sinks), batch, 1, nq, nk)
    assert torch.equal(mask.dense(batch, 1, nq, nk), expected)


@given(position_problems(), st.sampled_from([(1, 1), (2, 3), (4, 4), (8, 2)]))
def test_block_kinds_are_sound(problem, blocks):
    q_pos, k_pos, window, sinks = problem
    mask = PositionMask(q_pos, k_pos, window=window, sinks=sinks)
    batch, nq, nk = q_pos.shape[0], q_pos.shape[1], k_pos.shape[1]
    dense = mask.dense(batch, 1, nq, nk)
    grid = TileGrid(nq, nk, *blocks)
    kinds = mask.block_kinds(grid, batch, 1)
    assert kinds.shape == (batch, 1, grid.num_q_blocks, grid.num_k_blocks)
    for i in range(grid.num_q_blocks):
        for j in range(grid.num_k_blocks):
            tile = dense[:, :, i * blocks[0]:(i + 1) * blocks[0], j * blocks[1]:(j + 1) * blocks[1]]
            for b in range(batch):
                if kinds[b, 0, i, j] == EMPTY:
                    assert not tile[b].any()
                if kinds[b, 0, i, j] == FULL:
                    assert tile[b].all()


def test_block_kinds_are_exact_for_a_contiguous_cache():
    """Sorted positions (a contiguous cache): tiles are classified exactly, as the causal mask's are."""
    lengths = torch.tensor([5, 17, 11])
    q_pos = lengths[:, None] + torch.arange(8)
    k_pos = torch.arange(25).expand(3, 25)
    kinds = PositionMask(q_pos, k_pos).block_kinds(TileGrid(8, 25, 4, 4), 3, 1)
    dense = PositionMask(q_pos, k_pos).dense(3, 1, 8, 25)
    assert torch.equal(kinds, count_tiles(dense, 4, 4))


@pytest.mark.parametrize("backend", ["reference", "tiled", "tiled_16x8", "tiled_8x16", "sdpa"])
def test_attention_through_position_mask(backend):
    gen = torch.Generator().manual_seed(0)
    batch, heads, nq, nk = 2, 4, 20, 45
    q_pos = torch.tensor([[10], [24]]) + torch.arange(nq)
    k_pos = torch.randperm(nk, generator=gen).expand(batch, nk).clone()
    k_pos[0, k_pos[0] > 29] = -1
    mask = PositionMask(q_pos, k_pos, window=9, sinks=3)
    q, k, v = (torch.randn(batch, h, n, 8, generator=gen, dtype=torch.float64)
               for h, n in ((heads, nq), (2, nk), (2, nk)))
    expected = textbook_attention(q, k, v, allowed=mask.dense(batch, heads, nq, nk))
    torch.testing.assert_close(qkv.attention(q, k, v, mask, backend=backend), expected, atol=1e-10, rtol=1e-10)


def test_remapped_score_mod_sees_true_positions():
    q_pos = torch.tensor([[7, 8], [3, 4]])
    k_pos = torch.tensor([[0, 5, 8, -1], [2, 0, 4, 3]])
    mask = PositionMask(q_pos, k_pos)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    mod = mask.remap_score_mod(qkv.scores.alibi(slopes))
    b, h, q, k = (torch.arange(n).view(*s) for n, s in ((2, (-1, 1, 1, 1)), (2, (1, -1, 1, 1)),
                                                          (2, (1, 1, -1, 1)), (4, (1, 1, 1, -1))))
    q = q + 2  # core positions of the two query rows with Nk=4
    out = mod(torch.zeros(2, 2, 2, 4, dtype=torch.float64), b, h, q, k)
    expected = slopes.view(1, 2, 1, 1) * (k_pos[:, None, None, :] - q_pos[:, None, :, None])
    torch.testing.assert_close(out, expected.double())
    assert mask.remap_score_mod(None) is None


def test_bind_checks_sizes():
    mask = PositionMask(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 5, dtype=torch.long))
    q = torch.randn(2, 1, 4, 8)
    with pytest.raises(ValueError, match=r"built for \(B, Nq, Nk\) = \(2, 3, 5\)"):
        qkv.attention(q, torch.randn(2, 1, 5, 8), torch.randn(2, 1, 5, 8), mask)
    with pytest.raises(ValueError, match="must share B"):
        PositionMask(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long))
