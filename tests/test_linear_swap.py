"""One option swaps a module's attention: linear, Performer, or exact within a sparse pattern."""

import pytest
import torch

import qkv
from qkv.linear import linear_attention
from qkv.nn import MultiHeadAttention

F64 = torch.float64


def module_and_input(seed=0, **kwargs):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(32, 4, num_kv_heads=2, dtype=F64, **kwargs)
    x = torch.randn(2, 21, 32, dtype=F64)
    return mha, x


def by_hand(mha, x, attend):
    _, q, k, v = mha._project_heads_last(x, x, x)  # (B, N, H, D) each
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = attend(q, k, v)
    return mha.out_proj(out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1))


@pytest.mark.parametrize("causal", [False, True])
def test_linear_option_runs_linear_attention(causal):
    mha, x = module_and_input(attention="linear")
    mask = qkv.causal() if causal else qkv.key_padding([21, 15])
    want = by_hand(mha, x, lambda q, k, v: linear_attention(q, k, v, mask))
    torch.testing.assert_close(mha(x, mask=mask), want, atol=1e-12, rtol=1e-12)


def test_sparse_pattern_option_is_exact_attention_within_the_pattern():
    pattern = qkv.bigbird(block_size=4, window_blocks=1, global_blocks=1, random_blocks=1)
    mha, x = module_and_input(attention=pattern)
    mask = qkv.key_padding([21, 17])
    want = by_hand(mha, x, lambda q, k, v: qkv.attention(q, k, v, pattern & mask))
    torch.testing.assert_close(mha(x, mask=mask), want, atol=1e-12, rtol=1e-12)
    weights = mha(x, mask=mask, need_weights=True, average_attn_weights=False)[1]
    allowed = (pattern & mask).bind(2, 4, 21, 21, "cpu").dense(2, 4, 21, 21)
    assert (weights[~allowed.expand_as(weights)] == 0).all() and (weights.sum(-1) - 1).abs().max() < 1e-12


def test_performer_option_approaches_exact_attention_as_features_grow():
    mha, x = module_and_input()
    exact = mha(x).detach()
    errors = []
    for m in (8, 1024):
        mha.set_attention("performer", num_features=m, feature_seed=1)
        assert mha.performer.num_features == m and "performer.projection" in mha.state_dict()
        errors.append((mha(x) - exact).abs().mean().item())
    assert errors[1] < errors[0] / 3, errors
    mha.set_attention("exact")
    assert mha.performer is None and "performer.projection" not in mha.state_dict()
    torch.testing.assert_close(mha(x), exact, atol=0, rtol=0)


def test_approximate_attention_refuses_what_it_cannot_compute():
    mha, x = module_and_input(attention="linear")
    with pytest.raises(ValueError, match="need_weights"):
        mha(x, need_weights=True)
    with pytest.raises(ValueError, match="score_mod"):
        mha(x, score_mod=qkv.scores.softcap(2.0))
    with pytest.raises(ValueError, match="supports None, qkv.causal"):
        mha(x, mask=qkv.sliding_window(4))
    with pytest.raises(ValueError, match="attention must be one of"):
        MultiHeadAttention(32, 4, attention="flash")
