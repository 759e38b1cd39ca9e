"""The oracle itself: the reference backend against the formula written out independently."""

import math

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv import scores
from tests.oracle import dense_from_predicate, textbook_attention


def rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("nq,nk", [(5, 5), (3, 8), (8, 3), (1, 6)])
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (4, 2), (3, 1)])
def test_reference_equals_textbook_formula(nq, nk, heads, kv_heads):
    q, k, v = rand(2, heads, nq, 8, seed=1), rand(2, kv_heads, nk, 8, seed=2), rand(2, kv_heads, nk, 5, seed=3)
    masks = {
        "none": (None, None),
        "causal": (qkv.causal(), lambda b, h, i, j: j <= i),
        "window": (qkv.sliding_window(2, 1), lambda b, h, i, j: i - 2 <= j <= i + 1),
        "padding": (qkv.key_padding([2, nk]), lambda b, h, i, j: j < [2, nk][b]),
    }
    for name, (mask, pred) in masks.items():
        allowed = None if pred is None else dense_from_predicate(pred, 2, heads, nq, nk)
        want = textbook_attention(q, k, v, allowed)
        got = qkv.attention(q, k, v, mask, backend="reference")
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12, msg=name)


def test_reference_equals_torch_math_sdpa_in_float64():
    q, k, v = rand(2, 3, 9, 16, seed=4), rand(2, 3, 11, 16, seed=5), rand(2, 3, 11, 16, seed=6)
    bias = rand(9, 11, seed=7)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    torch.testing.assert_close(qkv.attention(q, k, v, bias, backend="reference"), want, rtol=0, atol=1e-12)


def test_scale_default_is_inverse_sqrt_head_dim():
    q, k, v = rand(1, 1, 4, 9, seed=8), rand(1, 1, 4, 9, seed=9), rand(1, 1, 4, 9, seed=10)
    torch.testing.assert_close(qkv.attention(q, k, v, backend="reference"),
                               qkv.attention(q, k, v, scale=1 / math.sqrt(9), backend="reference"))
    torch.testing.assert_close(qkv.attention(q, k, v, scale=0.7, backend="reference"),
                               textbook_attention(q, k, v, scale=0.7), rtol=0, atol=1e-12)


def test_weights_are_a_distribution_and_match_the_output():
    q, k, v = rand(2, 2, 6, 8, seed=11), rand(2, 2, 7, 8, seed=12), rand(2, 2, 7, 8, seed=13)
    w = qkv.attention_weights(q, k, v, qkv.causal())
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6, dtype=torch.float64))
    assert (w[..., 0, 3:] == 0).all()  # row 0 sits at position 1: keys 2.. are hidden
    torch.testing.assert_close(w @ v, qkv.attention(q, k, v, qkv.causal()))


def test_lse_is_log_of_the_softmax_denominator():
    q, k, v = rand(1, 2, 5, 8, seed=14), rand(1, 2, 5, 8, seed=15), rand(1, 2, 5, 8, seed=16)
    _, lse = qkv.attention(q, k, v, return_lse=True, backend="reference")
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=0, atol=1e-12)


def test_alibi_slopes_are_the_published_ones():
    # Press et al. (2022): 8 heads -> 1/2, 1/4, ..., 1/256.
    assert scores.alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]
    # Non-power-of-two: the 4-head slopes, then every other 8-head slope.
    assert scores.alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
