"""The sparse-attention families: dense renderings against definitions written out element by
element, exact analytic block views, and every exact backend against the float64 formula."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.masks import EMPTY, TileGrid, count_tiles
from qkv.positions import Positions
from tests.oracle import dense_from_predicate, textbook_attention
from tests.strategies import Case, make_mod
from tests.test_backends import assert_close, run, supporting

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

B, H = 2, 4


def bound(mask, nq, nk, batch=B, heads=H):
    return mask.bind(batch, heads, nq, nk, torch.device("cpu"))


def dense(mask, nq, nk, batch=B, heads=H):
    return bound(mask, nq, nk, batch, heads).dense(batch, heads, nq, nk).expand(batch, heads, nq, nk)


def _bigbird_predicate(mask, nk):
    """BigBird's rule on blocks, written out; the random blocks come from the mask's layout, whose
    own properties are checked in ``test_bigbird_random_blocks``."""
    bs, n_blocks = mask.block_size, -(-nk // mask.block_size)
    layout = mask.layout(n_blocks)

    def pred(b, h, q, k):
        if q < 0:
            return False
        i, j = q // bs, k // bs
        return (abs(i - j) <= mask.window_blocks // 2 or i < mask.global_blocks or j < mask.global_blocks
                or bool(layout[i, j]))
    return pred


def patterns(nq, nk):
    """(mask, predicate over positions) for each family, sized for an (nq, nk) problem."""
    glob = sorted({0, nk // 2})
    bird = qkv.bigbird(block_size=3, window_blocks=3, global_blocks=1, random_blocks=2, seed=nq + nk)
    return [
        (qkv.longformer(6, glob), lambda b, h, q, k: abs(q - k) <= 3 or q in glob or k in glob),
        (qkv.longformer(2, []), lambda b, h, q, k: abs(q - k) <= 1),
        (bird, _bigbird_predicate(bird, nk)),
        (qkv.bigbird(block_size=4, window_blocks=1, global_blocks=0, random_blocks=1, seed=3),
         _bigbird_predicate(qkv.bigbird(4, 1, 0, 1, 3), nk)),
        (qkv.dilated_window(3, 1, dilation=2),
         lambda b, h, q, k: any(q - k == j * 2 for j in range(-1, 4))),
        (qkv.dilated_window(2, 2, dilation=[1, 2, 3, 5]),
         lambda b, h, q, k: any(q - k == j * [1, 2, 3, 5][h] for j in range(-2, 3))),
        (qkv.sparse_strided(3), lambda b, h, q, k: k <= q and (q - k <= 3 or (q - k) % 3 == 0)),
        (qkv.sparse_strided(4, causal=False), lambda b, h, q, k: abs(q - k) <= 4 or (q - k) % 4 == 0),
        (qkv.sparse_strided(1), lambda b, h, q, k: k <= q),
        (qkv.sparse_fixed(4, summary=1), lambda b, h, q, k: k <= q and (q // 4 == k // 4 or k % 4 == 3)),
        (qkv.sparse_fixed(5, summary=2, causal=False), lambda b, h, q, k: q // 5 == k // 5 or k % 5 >= 3),
        (qkv.sparse_fixed(3, summary=3), lambda b, h, q, k: k <= q),
    ]


SIZES = [(13, 13), (7, 19), (19, 7), (1, 9), (24, 24)]


@pytest.mark.parametrize("nq,nk", SIZES)
def test_patterns_match_their_definition(nq, nk):
    for mask, pred in patterns(nq, nk):
        expected = dense_from_predicate(pred, B, H, nq, nk)
        assert torch.equal(dense(mask, nq, nk), expected), repr(mask)


@settings(max_examples=40)
@given(nq=st.integers(1, 48), nk=st.integers(1, 48), bq=st.sampled_from([1, 2, 3, 4, 8, 16]),
       bk=st.sampled_from([1, 2, 3, 5, 8, 16]))
def test_block_views_are_exact(nq, nk, bq, bk):
    for mask, _ in patterns(nq, nk):
        m = bound(mask, nq, nk)
        kinds = m.block_kinds(TileGrid(nq, nk, bq, bk), B, H)
        truth = count_tiles(dense(mask, nq, nk), bq, bk)
        assert torch.equal(kinds.expand_as(truth), truth), f"{mask!r} nq={nq} nk={nk} tiles {bq}x{bk}"


def _predicate_at(pred, batch, heads, nq, nk, q_off, k_off):
    """Bool ``(B, H, Nq, Nk)``: ``pred`` at query position ``q_off[b] + i``, key ``k_off[b] + j``."""
    out = torch.zeros(batch, heads, nq, nk, dtype=torch.bool)
    for b in range(batch):
        for h in range(heads):
            for i in range(nq):
                for j in range(nk):
                    out[b, h, i, j] = bool(pred(b, h, q_off[b] + i, k_off[b] + j))
    return out


@settings(max_examples=8)
@given(nq=st.integers(1, 14), nk=st.integers(1, 14), q_off=st.lists(st.integers(-6, 30), min_size=B, max_size=B),
       k_off=st.lists(st.integers(0, 30), min_size=B, max_size=B), per_batch=st.booleans(),
       bq=st.sampled_from([2, 3, 8]), bk=st.sampled_from([2, 5, 8]))
def test_patterns_at_explicit_positions(nq, nk, q_off, k_off, per_batch, bq, bk):
    """Query row i of batch b at position q_off[b] + i, key column j at k_off[b] + j (a chunk of a
    longer sequence, a decoding step): the definition holds there, and the block view stays exact."""
    if not per_batch:
        q_off, k_off = [q_off[0]] * B, [k_off[0]] * B
    offsets = (torch.tensor(q_off), torch.tensor(k_off)) if per_batch else (q_off[0], k_off[0])
    pos = Positions.make(B, nq, nk, *offsets)
    top = max(max(q_off) + nq, max(k_off) + nk)  # the patterns' tables must reach every position
    for mask, pred in patterns(top, top):
        got = mask.dense(B, H, nq, nk, positions=pos).expand(B, H, nq, nk)
        assert torch.equal(got, _predicate_at(pred, B, H, nq, nk, q_off, k_off)), repr(mask)
        m = mask.bind(B, H, nq, nk, torch.device("cpu"), positions=pos)
        kinds = m.block_kinds(TileGrid(nq, nk, bq, bk, positions=pos), B, H)
        truth = count_tiles(got, bq, bk)
        assert torch.equal(kinds.expand_as(truth), truth), f"{mask!r} at {pos!r}, tiles {bq}x{bk}"


def test_bigbird_random_blocks():
    mask = qkv.bigbird(block_size=8, window_blocks=3, global_blocks=2, random_blocks=3, seed=11)
    layout = mask.layout(20)
    i = torch.arange(20)
    fixed = ((i[:, None] - i[None, :]).abs() <= 1) | (i[:, None] < 2) | (i[None, :] < 2)
    extra = layout & ~fixed
    assert (extra[2:].sum(1) == 3).all()  # exactly 3 random key blocks per ordinary query block
    assert not extra[:2].any()  # global query blocks already see everything
    assert torch.equal(layout, qkv.bigbird(8, 3, 2, 3, seed=11).layout(20))  # reproducible
    assert not torch.equal(layout, qkv.bigbird(8, 3, 2, 3, seed=12).layout(20))  # seeded
    # Fewer candidates than random_blocks: every remaining block is taken.
    assert qkv.bigbird(8, 3, 0, 10, seed=0).layout(6).all()


def test_patterns_cost_follows_density():
    n, tile = 16384, 128
    grid = TileGrid(n, n, tile, tile)
    for mask in (qkv.longformer(512, [0]), qkv.bigbird(64), qkv.dilated_window(128, 128, dilation=2),
                 qkv.sparse_fixed(2048)):
        kinds = bound(mask, n, n, 1, 1).block_kinds(grid, 1, 1)
        assert (kinds != EMPTY).float().mean().item() < 0.15, repr(mask)


@st.composite
def pattern_cases(draw):
    """Attention problems under one of the patterns (sometimes composed with causal or padding),
    with grouped heads, a score modifier or bias, on fresh float64 inputs."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    batch, kv_heads = draw(st.integers(1, 2)), draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2]))
    nq, nk = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    d, dv = draw(st.sampled_from([8, 16])), draw(st.sampled_from([8, 12]))
    choice = draw(st.integers(0, 11))
    mask, _ = patterns(nq, nk)[choice]
    if choice == 5 and heads != 4:  # that entry has one dilation per head for 4 heads
        mask = qkv.dilated_window(2, 2, dilation=3)
    extra = draw(st.sampled_from(["none", "causal", "padding"]))
    if extra == "causal":
        mask = mask & qkv.causal()
    elif extra == "padding":
        mask = mask & qkv.key_padding(torch.randint(1, nk + 1, (batch,), generator=g))
    mod_kind = draw(st.sampled_from(["none", "alibi", "relative"]))
    score_mod, bias, learnable = make_mod(mod_kind, heads, batch, nq, nk, torch.float64, g, True)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_(True)  # noqa: E731
    kwargs = {"mask": mask, "score_mod": score_mod}
    if draw(st.booleans()):  # a chunk of a longer sequence: explicit positions
        kwargs["k_offset"] = draw(st.integers(0, 9))
        kwargs["q_offset"] = kwargs["k_offset"] + draw(st.integers(-3, nk + 3))
        extra += f" q_offset={kwargs['q_offset']} k_offset={kwargs['k_offset']}"
    return Case(t(batch, heads, nq, d), t(batch, kv_heads, nk, d), t(batch, kv_heads, nk, dv), kwargs,
                f"B={batch} H={heads}/{kv_heads} Nq={nq} Nk={nk} mask={mask!r} {extra} mod={mod_kind}", learnable)


@settings(max_examples=25)
@given(case=pattern_cases())
def test_every_backend_matches_the_float64_formula_under_each_pattern(case):
    mask = case.kwargs["mask"]
    if case.kwargs["score_mod"] is None:
        b, hq, nq, nk = case.q.shape[0], case.q.shape[1], case.q.shape[2], case.k.shape[2]
        offsets = {key: case.kwargs[key] for key in ("q_offset", "k_offset") if key in case.kwargs}
        pos = Positions.make(b, nq, nk, **offsets) if offsets else None
        allowed = mask.dense(b, hq, nq, nk, positions=pos).expand(b, hq, nq, nk)
        want = textbook_attention(case.q, case.k, case.v, allowed=allowed)
        got = qkv.attention(case.q, case.k, case.v, mask, backend="reference", **offsets)
        assert_close("reference vs formula", got.detach(), want.detach(), case.label)
    ref_out, ref_lse, ref_grads = run(case, "reference", True)
    names = supporting(case, True)
    assert {"tiled", "tiled_16x8", "tiled_8x16"} <= set(names)
    for name in names:
        out, lse, grads = run(case, name, True)
        assert_close(f"{name} out", out, ref_out, case.label)
        assert_close(f"{name} lse", lse, ref_lse, case.label)
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            assert (g is None) == (rg is None)
            if g is not None:
                assert_close(f"{name} grad[{i}]", g, rg, case.label)


@pytest.mark.parametrize("make, message", [
    (lambda: qkv.bigbird(block_size=0), "block_size"),
    (lambda: qkv.bigbird(window_blocks=2), "odd"),
    (lambda: qkv.bigbird(random_blocks=-1), "random_blocks"),
    (lambda: qkv.dilated_window(2, dilation=0), "dilation"),
    (lambda: qkv.dilated_window(-1), "left"),
    (lambda: qkv.sparse_strided(0), "stride"),
    (lambda: qkv.sparse_fixed(4, summary=5), "summary"),
    (lambda: qkv.longformer(-2), "window"),
])
def test_bad_pattern_arguments_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_patterns_that_do_not_fit_raise():
    q = k = v = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="dilation has 2 entries"):
        qkv.attention(q, k, v, qkv.dilated_window(2, dilation=[1, 2]))
    with pytest.raises(ValueError, match="global_tokens"):
        qkv.attention(q, k, v, qkv.longformer(4, [9]))
