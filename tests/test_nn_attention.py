"""qkv.nn.MultiHeadAttention against the formula written out in float64.

Everything runs in float64, so the module and the oracle differ only by summation order
(~1e-15 relative); 1e-10 leaves room for that and catches any real error, which is O(1).
"""

import math

import pytest
import torch
import torch.nn.functional as F

import qkv
from qkv.nn import MultiHeadAttention, RotaryEmbedding
from tests.oracle import textbook_attention

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

TOL = dict(atol=1e-10, rtol=1e-10)


def random_mha(seed=0, **kwargs) -> MultiHeadAttention:
    torch.manual_seed(seed)
    mha = MultiHeadAttention(**kwargs).double()
    with torch.no_grad():  # random biases and norm weights, so that a mixed-up parameter shows
        for p in mha.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.dim() == 1 and p.numel() == mha.head_dim else 0.0))
    return mha


def projections(mha: MultiHeadAttention):
    """(Wq, bq), (Wk, bk), (Wv, bv) whichever layout the module uses."""
    if mha.fused_qkv:
        widths = [mha.num_heads * mha.head_dim] + [mha.num_kv_heads * mha.head_dim] * 2
        ws = mha.qkv_proj.weight.split(widths)
        bs = mha.qkv_proj.bias.split(widths) if mha.qkv_proj.bias is not None else (None,) * 3
        return list(zip(ws, bs))
    return [(p.weight, p.bias) for p in (mha.q_proj, mha.k_proj, mha.v_proj)]


def oracle(mha, query, key=None, value=None, allowed=None, bias=None, rope_positions=None, rope=None):
    """The module's computation written out, attention by tests.oracle.textbook_attention."""
    key = query if key is None else key
    value = key if value is None else value
    (wq, bq), (wk, bk), (wv, bv) = projections(mha)

    def heads(x, w, b, h):
        return F.linear(x, w, b).unflatten(-1, (h, mha.head_dim)).transpose(1, 2)

    q = heads(query, wq, bq, mha.num_heads)
    k, v = heads(key, wk, bk, mha.num_kv_heads), heads(value, wv, bv, mha.num_kv_heads)
    if mha.qk_norm:
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6) * mha.q_norm.weight
        k = k * torch.rsqrt(k.pow(2).mean(-1, keepdim=True) + 1e-6) * mha.k_norm.weight
    if rope is not None:
        q, k = rope(q, rope_positions), rope(k, rope_positions)
    out = textbook_attention(q, k, v, allowed=allowed, bias=bias)
    if mha.sink_logits is not None:  # softmax over [scores, sink]: explicit extra column
        group = mha.num_heads // mha.num_kv_heads
        s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) / math.sqrt(mha.head_dim)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        sink = mha.sink_logits.view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
        w = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
        out = w @ v.repeat_interleave(group, 1)
    out = out.transpose(1, 2).flatten(2)
    return mha.out_proj(out)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_self_attention_equals_formula(heads, kv_heads, fused, bias):
    mha = random_mha(embed_dim=16, num_heads=heads, num_kv_heads=kv_heads, fused_qkv=fused, bias=bias)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(mha(x), oracle(mha, x), **TOL)
    allowed = qkv.causal().dense(2, heads, 7, 7)
    torch.testing.assert_close(mha(x, mask=qkv.causal()), oracle(mha, x, allowed=allowed), **TOL)


@pytest.mark.parametrize("fused", [False, True])
def test_cross_attention_equals_formula(fused):
    mha = random_mha(embed_dim=12, num_heads=3, fused_qkv=fused)
    x, mem = torch.randn(2, 5, 12, dtype=torch.float64), torch.randn(2, 9, 12, dtype=torch.float64)
    torch.testing.assert_close(mha(x, mem), oracle(mha, x, mem), **TOL)
    value = torch.randn(2, 9, 12, dtype=torch.float64)
    torch.testing.assert_close(mha(x, mem, value), oracle(mha, x, mem, value), **TOL)


def test_kdim_vdim_and_head_dim():
    mha = random_mha(embed_dim=12, num_heads=2, kdim=5, vdim=7, head_dim=8)
    assert mha.q_proj.weight.shape == (16, 12) and mha.k_proj.weight.shape == (16, 5)
    assert mha.v_proj.weight.shape == (16, 7) and mha.out_proj.weight.shape == (12, 16)
    x, k, v = (torch.randn(3, n, d, dtype=torch.float64) for n, d in ((4, 12), (6, 5), (6, 7)))
    torch.testing.assert_close(mha(x, k, v), oracle(mha, x, k, v), **TOL)


def test_float_mask_and_score_mod():
    mha = random_mha(embed_dim=16, num_heads=4)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    bias = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(mha(x, mask=bias), oracle(mha, x, bias=bias), **TOL)
    slopes = qkv.scores.alibi_slopes(4).double()
    distance = (torch.arange(6)[None, :] - torch.arange(6)[:, None]).double()
    torch.testing.assert_close(mha(x, score_mod=qkv.scores.alibi(slopes)),
                               oracle(mha, x, bias=slopes.view(1, 4, 1, 1) * distance), **TOL)


def test_qk_norm_and_rope():
    mha = random_mha(embed_dim=16, num_heads=2, qk_norm=True)
    assert mha.q_norm.weight.shape == (8,)
    rope = RotaryEmbedding(8)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    torch.testing.assert_close(mha(x, rope=rope, positions=3),
                               oracle(mha, x, rope=rope, rope_positions=3), **TOL)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_sink_equals_softmax_with_extra_column(kv_heads):
    mha = random_mha(embed_dim=16, num_heads=4, num_kv_heads=kv_heads, sink=True)
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    allowed = qkv.causal().dense(2, 4, 6, 6)
    torch.testing.assert_close(mha(x, mask=qkv.causal()), oracle(mha, x, allowed=allowed), **TOL)
    # the sink's share shows in the weights: rows sum to below one
    _, w = mha(x, mask=qkv.causal(), need_weights=True, average_attn_weights=False)
    assert bool((w.sum(-1) < 1).all())


def test_sink_gradients_match_formula():
    mha = random_mha(embed_dim=8, num_heads=2, sink=True)
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    allowed = qkv.causal().dense(1, 2, 5, 5)
    grads = torch.autograd.grad(mha(x, mask=qkv.causal()).sum(), (x, mha.sink_logits))
    expected = torch.autograd.grad(oracle(mha, x, allowed=allowed).sum(), (x, mha.sink_logits))
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, **TOL)


@pytest.mark.parametrize("backend", ["reference", "tiled", "tiled_16x8"])
def test_gradients_match_formula(backend):
    mha = random_mha(embed_dim=12, num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 19, 12, dtype=torch.float64, requires_grad=True)
    allowed = qkv.causal().dense(2, 4, 19, 19)
    params = [x] + list(mha.parameters())
    grads = torch.autograd.grad(mha(x, mask=qkv.causal(), backend=backend).pow(2).sum(), params)
    expected = torch.autograd.grad(oracle(mha, x, allowed=allowed).pow(2).sum(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, **TOL)


def test_need_weights():
    mha = random_mha(embed_dim=16, num_heads=4, num_kv_heads=2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    out, w = mha(x, mask=qkv.causal(), need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(out, mha(x, mask=qkv.causal()), **TOL)
    (wq, bq), (wk, bk), _ = projections(mha)
    q = F.linear(x, wq, bq).unflatten(-1, (4, 4)).transpose(1, 2)
    k = F.linear(x, wk, bk).unflatten(-1, (2, 4)).transpose(1, 2).repeat_interleave(2, 1)
    s = (q @ k.transpose(-1, -2) / 2).masked_fill(~qkv.causal().dense(1, 1, 5, 5), float("-inf"))
    torch.testing.assert_close(w, torch.softmax(s, -1), **TOL)
    _, w_avg = mha(x, mask=qkv.causal(), need_weights=True)
    torch.testing.assert_close(w_avg, w.mean(1), **TOL)


def test_dropout_only_while_training():
    mha = random_mha(embed_dim=16, num_heads=4, dropout=0.5)
    x = torch.randn(2, 8, 16, dtype=torch.float64)
    mha.eval()
    torch.testing.assert_close(mha(x), oracle(mha, x), **TOL)
    mha.train()
    assert not torch.allclose(mha(x), oracle(mha, x))


def test_fused_and_separate_agree():
    fused = random_mha(embed_dim=16, num_heads=4, num_kv_heads=2, fused_qkv=True)
    separate = MultiHeadAttention(16, 4, num_kv_heads=2).double()
    with torch.no_grad():
        for (w, b), proj in zip(projections(fused), (separate.q_proj, separate.k_proj, separate.v_proj)):
            proj.weight.copy_(w)
            proj.bias.copy_(b)
        separate.out_proj.load_state_dict(fused.out_proj.state_dict())
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    torch.testing.assert_close(fused(x), separate(x), **TOL)


def test_state_dict_names():
    assert set(MultiHeadAttention(8, 2).state_dict()) == {
        f"{p}.{t}" for p in ("q_proj", "k_proj", "v_proj", "out_proj") for t in ("weight", "bias")}
    assert set(MultiHeadAttention(8, 2, fused_qkv=True, bias=False, qk_norm=True, sink=True).state_dict()) == {
        "qkv_proj.weight", "out_proj.weight", "q_norm.weight", "k_norm.weight", "sink_logits"}


@pytest.mark.parametrize("kwargs,match", [
    (dict(embed_dim=0, num_heads=1), "embed_dim"),
    (dict(embed_dim=10, num_heads=3), "divisible by num_heads"),
    (dict(embed_dim=8, num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(embed_dim=8, num_heads=2, kdim=4, fused_qkv=True), "fused_qkv"),
    (dict(embed_dim=8, num_heads=2, dropout=1.0), "dropout"),
    (dict(embed_dim=8, num_heads=2, head_dim=-1), "head_dim"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(**kwargs)


def test_bad_inputs():
    mha = MultiHeadAttention(8, 2)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"query must have shape \(batch, seq, 8\)"):
        mha(torch.randn(2, 3, 7))
    with pytest.raises(TypeError, match="query must be a floating"):
        mha(torch.ones(2, 3, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="share the batch size"):
        mha(x, torch.randn(3, 3, 8))
    with pytest.raises(ValueError, match="same length"):
        mha(x, torch.randn(2, 4, 8), torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match="rope"):
        mha(x, torch.randn(2, 4, 8), rope=RotaryEmbedding(4))
