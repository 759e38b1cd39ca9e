"""Score modifiers: each equals its formula, composes in order, and validates its arguments."""

import pytest
import torch

import qkv
from qkv import scores
from qkv.masks import position_grid


def grid(h=4, nq=5, nk=7):
    return position_grid(1, h, nq, nk, torch.device("cpu"))


def test_alibi_adds_slope_times_relative_position():
    s = torch.randn(1, 4, 5, 7, dtype=torch.float64)
    b, h, q, k = grid()
    slopes = scores.alibi_slopes(4)
    got = scores.alibi(4)(s, b, h, q, k)
    want = s + slopes.view(1, 4, 1, 1) * (k - q)
    torch.testing.assert_close(got, want)
    sym = scores.alibi(slopes, symmetric=True)(s, b, h, q, k)
    torch.testing.assert_close(sym, s - slopes.view(1, 4, 1, 1) * (k - q).abs())


def test_softcap_bounds_scores():
    s = torch.linspace(-100, 100, 41, dtype=torch.float64).view(1, 1, 1, -1)
    capped = scores.softcap(5.0)(s, *grid(1, 1, 41))
    assert capped.abs().max() <= 5.0  # tanh(20) rounds to 1 in float64
    torch.testing.assert_close(capped, 5.0 * torch.tanh(s / 5.0))


def test_relative_bias_clips_distances():
    table = torch.arange(2 * 3 + 1, dtype=torch.float64)  # M = 3
    s = torch.zeros(1, 1, 5, 7, dtype=torch.float64)
    b, h, q, k = grid(1)
    got = scores.relative_bias(table)(s, b, h, q, k)
    want = (k - q).clamp(-3, 3) + 3
    torch.testing.assert_close(got, want.to(torch.float64).expand_as(got))


def test_chain_applies_in_order():
    s = torch.randn(1, 2, 3, 3, dtype=torch.float64) * 10
    b, h, q, k = grid(2, 3, 3)
    m = scores.chain(scores.alibi(2), scores.softcap(1.0))
    torch.testing.assert_close(m(s, b, h, q, k), scores.softcap(1.0)(scores.alibi(2)(s, b, h, q, k), b, h, q, k))


def test_plain_callables_are_accepted():
    q = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    out = qkv.attention(q, q, q, score_mod=lambda s, b, h, qi, ki: s * 0.5, backend="tiled")
    torch.testing.assert_close(out, qkv.attention(q, q, q, scale=0.5 / 8 ** 0.5, backend="reference"))


@pytest.mark.parametrize("make,message", [
    (lambda: scores.softcap(0), "cap must be a finite positive"),
    (lambda: scores.softcap(float("inf")), "cap must be a finite positive"),
    (lambda: scores.alibi_slopes(0), "positive int"),
    (lambda: scores.alibi(torch.ones(2, 2)), "1-D floating"),
    (lambda: scores.relative_bias(torch.ones(3, 4)), "must be odd"),
    (lambda: scores.relative_bias(torch.ones(3, dtype=torch.long)), "floating tensor"),
    (lambda: scores.chain(), "one or more"),
    (lambda: scores.as_score_mod(3), "score_mod must be"),
    (lambda: scores.ScoreMod(lambda s, b, h, q, k: s, work=-1), "work must be a finite number >= 0"),
    (lambda: scores.ScoreMod(lambda s, b, h, q, k: s, work=float("inf")), "work must be a finite number >= 0"),
    (lambda: scores.ScoreMod(lambda s, b, h, q, k: s, work="4"), "work must be a finite number >= 0"),
    (lambda: scores.ScoreMod(lambda s, b, h, q, k: s, work=True), "work must be a finite number >= 0"),
])
def test_bad_score_mod_arguments(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


def test_per_head_tables_must_match_heads():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="alibi: slopes has 8 entries, expected one per query head \\(4\\)"):
        qkv.attention(q, q, q, score_mod=scores.alibi(8))
    with pytest.raises(ValueError, match="relative_bias: table has 2 entries"):
        qkv.attention(q, q, q, score_mod=scores.relative_bias(torch.zeros(2, 5)))


def test_modifiers_state_their_work_and_a_chain_adds_it_up():
    """``work`` (elementwise operations per score) is what the cost models charge a modifier."""
    alibi, cap = scores.alibi(4), scores.softcap(5.0)
    assert (alibi.work, scores.alibi(4, symmetric=True).work, cap.work) == (4.0, 6.0, 5.0)
    assert scores.relative_bias(torch.randn(4, 9)).work == 6.0
    assert scores.chain(alibi, cap).work == 9.0
    assert scores.as_score_mod(lambda s, b, h, q, k: s).work == 4.0  # a user function: the default


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_a_modifier_returning_another_float_dtype_is_converted_back(backend):
    """A float64 table added to float32 scores promotes them; the result is the scores' dtype
    again (not a dtype error from inside the backend)."""
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    table = torch.randn(9, dtype=torch.float64, requires_grad=True)
    mod = scores.ScoreMod(lambda s, b, h, qi, ki, t: s + t[ki - qi + 4], (table,))
    out = qkv.attention(q, k, v, score_mod=mod, backend=backend)
    expected = qkv.attention(q, k, v, score_mod=scores.relative_bias(table.detach().float()), backend="reference")
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert table.grad is not None and torch.isfinite(table.grad).all()
