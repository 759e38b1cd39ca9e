"""Positional encodings: RoPE against the textbook rotation matrix, its relative-position property,
partial rotation, scaling and offsets; sinusoidal and learned tables; ALiBi.

float64 throughout; the textbook builds a dense rotation matrix, so agreement is to ~1e-15 and
1e-12 is a comfortable bound.
"""

import math

import pytest
import torch

import qkv
from qkv.nn import ALiBi, LearnedPositionalEmbedding, RotaryEmbedding, SinusoidalEmbedding

TOL = dict(atol=1e-12, rtol=1e-12)


def textbook_rotation(d: int, rotary_dim: int, position: float, base: float, interleaved: bool) -> torch.Tensor:
    """The ``(d, d)`` matrix of RoFormer: 2x2 rotations by ``position * base ** (-2i / rotary_dim)``
    of the pairs ``(2i, 2i+1)`` (interleaved) or ``(i, i + rotary_dim/2)``, identity beyond ``rotary_dim``."""
    r = torch.eye(d, dtype=torch.float64)
    for i in range(rotary_dim // 2):
        angle = position * base ** (-2 * i / rotary_dim)
        a, b = (2 * i, 2 * i + 1) if interleaved else (i, i + rotary_dim // 2)
        r[a, a], r[a, b], r[b, a], r[b, b] = math.cos(angle), -math.sin(angle), math.sin(angle), math.cos(angle)
    return r


def apply_textbook(x, positions, rotary_dim, base, interleaved, position_scale=1.0):
    """Rotate ``x (B, H, N, D)`` token by token; ``positions (B, N)``."""
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for n in range(x.shape[2]):
            r = textbook_rotation(x.shape[-1], rotary_dim, float(positions[b, n]) * position_scale, base, interleaved)
            out[b, :, n] = x[b, :, n] @ r.T
    return out


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_dim", [8, 4, 2])
def test_rope_equals_textbook_rotation(interleaved, rotary_dim):
    rope = RotaryEmbedding(8, rotary_dim=rotary_dim, base=500.0, interleaved=interleaved)
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    expected = apply_textbook(x, positions, rotary_dim, 500.0, interleaved)
    torch.testing.assert_close(rope(x, positions), expected, **TOL)
    if rotary_dim < 8:  # partial rotary: the tail passes through untouched
        assert torch.equal(rope(x, positions)[..., rotary_dim:], x[..., rotary_dim:])


@pytest.mark.parametrize("interleaved", [False, True])
def test_rope_scores_depend_only_on_relative_position(interleaved):
    rope = RotaryEmbedding(16, interleaved=interleaved)
    q, k = torch.randn(2, 1, 1, 1, 16, dtype=torch.float64).unbind(0)

    def score(m, n):
        return float((rope(q, positions=m) * rope(k, positions=n)).sum())

    for m, n in [(5, 2), (0, 9), (1000, 1003)]:
        for shift in (1, 17, 4096):
            assert score(m + shift, n + shift) == pytest.approx(score(m, n), rel=1e-9, abs=1e-12)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)  # ...and does depend on it


def test_rope_offsets_int_vector_and_per_row():
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 2, 4, 8, dtype=torch.float64)
    by_offset = rope(x, positions=6)
    torch.testing.assert_close(by_offset, rope(x, torch.arange(6, 10)), **TOL)
    torch.testing.assert_close(by_offset, rope(x, torch.arange(6, 10).expand(2, 4)), **TOL)
    rows = torch.tensor([[0, 1, 2, 3], [6, 7, 8, 9]])
    mixed = rope(x, rows)
    torch.testing.assert_close(mixed[0], rope(x[:1], 0)[0], **TOL)
    torch.testing.assert_close(mixed[1], by_offset[1], **TOL)
    torch.testing.assert_close(rope(x), rope(x, 0), **TOL)


def test_decoding_step_gets_the_full_sequence_angles():
    rope = RotaryEmbedding(8)
    x = torch.randn(1, 2, 12, 8, dtype=torch.float64)
    full = rope(x)
    for t in range(12):
        torch.testing.assert_close(rope(x[:, :, t:t + 1], positions=t), full[:, :, t:t + 1], **TOL)


def test_linear_scaling_divides_positions():
    rope = RotaryEmbedding(8, scaling="linear", scaling_factor=4.0)
    x = torch.randn(1, 2, 6, 8, dtype=torch.float64)
    positions = torch.arange(6)[None]
    expected = apply_textbook(x, positions, 8, 10000.0, False, position_scale=0.25)
    torch.testing.assert_close(rope(x), expected, **TOL)


def test_ntk_scaling_changes_the_base():
    d, factor = 8, 8.0
    rope = RotaryEmbedding(d, scaling="ntk", scaling_factor=factor)
    new_base = 10000.0 * factor ** (d / (d - 2))
    assert rope.effective_base == pytest.approx(new_base)
    x = torch.randn(1, 1, 5, d, dtype=torch.float64)
    torch.testing.assert_close(rope(x, 3), apply_textbook(x, torch.arange(3, 8)[None], d, new_base, False), **TOL)
    # NTK-aware: the highest frequency is kept, the lowest is interpolated by exactly the factor
    plain = RotaryEmbedding(d).inverse_frequencies()
    scaled = rope.inverse_frequencies()
    assert scaled[0] == pytest.approx(plain[0]) and scaled[-1] == pytest.approx(plain[-1] / factor)


def test_large_positions_keep_precision_in_float32():
    rope = RotaryEmbedding(64)
    x = torch.randn(1, 1, 3, 64, dtype=torch.float64)
    positions = torch.tensor([1_000_000, 1_000_001, 2_000_000])
    exact = rope(x, positions)
    torch.testing.assert_close(rope(x.float(), positions), exact.float(), atol=2e-6, rtol=1e-5)


def test_rope_bad_arguments():
    for kwargs, match in [(dict(head_dim=0), "head_dim"), (dict(head_dim=8, rotary_dim=3), "rotary_dim"),
                          (dict(head_dim=8, rotary_dim=10), "rotary_dim"), (dict(head_dim=8, base=1.0), "base"),
                          (dict(head_dim=8, scaling="yarn"), "scaling"),
                          (dict(head_dim=8, scaling="linear", scaling_factor=0.5), "scaling_factor"),
                          (dict(head_dim=8, rotary_dim=2, scaling="ntk", scaling_factor=2.0), "ntk")]:
        with pytest.raises(ValueError, match=match):
            RotaryEmbedding(**kwargs)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 1, 3, 8)
    with pytest.raises(ValueError, match="x must have shape"):
        rope(torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match="positions must have shape"):
        rope(x, torch.arange(4))
    with pytest.raises(ValueError, match="batch size"):
        rope(x, torch.zeros(3, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="positions must be"):
        rope(x, torch.zeros(3))


def test_sinusoidal_table_equals_formula():
    emb = SinusoidalEmbedding(6, base=100.0)
    positions = torch.tensor([[0, 3, 50]])
    table = emb(positions, dtype=torch.float64)
    assert table.shape == (1, 3, 6)
    for j, p in enumerate([0, 3, 50]):
        for i in range(3):
            assert float(table[0, j, 2 * i]) == pytest.approx(math.sin(p / 100.0 ** (2 * i / 6)), abs=1e-14)
            assert float(table[0, j, 2 * i + 1]) == pytest.approx(math.cos(p / 100.0 ** (2 * i / 6)), abs=1e-14)
    with pytest.raises(ValueError, match="even"):
        SinusoidalEmbedding(5)
    with pytest.raises(TypeError, match="integer"):
        emb(torch.zeros(3))


def test_learned_embedding_looks_up_and_checks_range():
    emb = LearnedPositionalEmbedding(10, 4)
    positions = torch.tensor([[0, 9], [3, 3]])
    assert torch.equal(emb(positions), emb.table.weight[positions])
    with pytest.raises(ValueError, match=r"\[0, max_positions=10\)"):
        emb(torch.tensor([10]))
    with pytest.raises(ValueError, match="max_positions"):
        LearnedPositionalEmbedding(0, 4)


@pytest.mark.parametrize("symmetric", [False, True])
def test_alibi_module_serves_scores_alibi(symmetric):
    module = ALiBi(6, symmetric=symmetric)
    assert torch.equal(module.slopes, qkv.scores.alibi_slopes(6))
    q, k, v = (torch.randn(1, 6, 5, 4, dtype=torch.float64) for _ in range(3))
    ours = qkv.attention(q, k, v, score_mod=module.score_mod())
    expected = qkv.attention(q, k, v, score_mod=qkv.scores.alibi(6, symmetric=symmetric))
    torch.testing.assert_close(ours, expected, **TOL)
    assert dict(module.named_buffers()).keys() == {"slopes"}
