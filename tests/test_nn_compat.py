"""qkv.nn.compat.MultiheadAttention and MultiHeadAttention.from_torch against torch.nn.MultiheadAttention.

Both sides run in float64 on the same random weights (random biases too), so outputs, weights and
gradients agree to ~1e-15; 1e-10 allows for different summation orders. Masks never hide every key
of a row (there torch gives NaN and qkv zeros, a documented difference, tested separately).
"""

import pytest
import torch
from torch import nn

from qkv.nn import MultiHeadAttention
from qkv.nn.compat import MultiheadAttention

TOL = dict(atol=1e-10, rtol=1e-10)
E, H, B, L, S = 12, 3, 2, 5, 7


def torch_mha(seed=0, **kwargs) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    module = nn.MultiheadAttention(E, H, **kwargs).double().eval()
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return module


def torch_masks(case: str, nq: int, nk: int, gen: torch.Generator):
    """(attn_mask, key_padding_mask) in torch's conventions (True / -inf = excluded)."""
    def bool_attn(shape):
        excluded = torch.rand(shape, generator=gen) < 0.4
        excluded[..., 0] = False  # every row keeps key 0
        return excluded

    def kpm_bool():
        excluded = torch.rand(B, nk, generator=gen) < 0.4
        excluded[:, 0] = False
        return excluded

    def as_float(excluded):
        return torch.randn(excluded.shape, generator=gen, dtype=torch.float64).masked_fill(excluded, float("-inf"))

    return {
        "none": (None, None),
        "kpm_bool": (None, kpm_bool()),
        "kpm_float": (None, as_float(kpm_bool())),
        "attn_bool_2d": (bool_attn((nq, nk)), None),
        "attn_float_2d": (as_float(bool_attn((nq, nk))), None),
        "attn_bool_3d": (bool_attn((B * H, nq, nk)), None),
        "attn_float_3d": (as_float(bool_attn((B * H, nq, nk))), None),
        "both_bool": (bool_attn((nq, nk)), kpm_bool()),
        "attn_float_kpm_bool": (as_float(bool_attn((B * H, nq, nk))), kpm_bool()),
    }[case]


MASK_CASES = ["none", "kpm_bool", "kpm_float", "attn_bool_2d", "attn_float_2d", "attn_bool_3d", "attn_float_3d",
              "both_bool", "attn_float_kpm_bool"]
WEIGHT_MODES = {"no_weights": dict(need_weights=False), "averaged": dict(need_weights=True),
                "per_head": dict(need_weights=True, average_attn_weights=False)}


def assert_same_call(theirs, ours, *args, **kwargs):
    out_t, w_t = theirs(*args, **kwargs)
    out_o, w_o = ours(*args, **kwargs)
    torch.testing.assert_close(out_o, out_t, **TOL)
    if w_t is None:
        assert w_o is None
    else:
        assert w_o.dtype == w_t.dtype
        torch.testing.assert_close(w_o, w_t, **TOL)


MISMATCHED_MASKS = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask:UserWarning")


@MISMATCHED_MASKS
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_case", MASK_CASES)
@pytest.mark.parametrize("weights", list(WEIGHT_MODES))
def test_self_attention_matches_torch(batch_first, mask_case, weights):
    theirs = torch_mha(batch_first=batch_first)
    ours = MultiheadAttention.from_torch(theirs)
    gen = torch.Generator().manual_seed(MASK_CASES.index(mask_case) * 10 + list(WEIGHT_MODES).index(weights))
    x = torch.randn((B, L, E) if batch_first else (L, B, E), generator=gen, dtype=torch.float64)
    attn_mask, kpm = torch_masks(mask_case, L, L, gen)
    assert_same_call(theirs, ours, x, x, x, key_padding_mask=kpm, attn_mask=attn_mask, **WEIGHT_MODES[weights])


@MISMATCHED_MASKS
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_case", ["none", "kpm_bool", "attn_float_3d", "attn_float_kpm_bool"])
@pytest.mark.parametrize("dims", [dict(), dict(kdim=5, vdim=9), dict(kdim=E, vdim=4)])
def test_cross_attention_matches_torch(batch_first, mask_case, dims):
    theirs = torch_mha(batch_first=batch_first, **dims)
    ours = MultiheadAttention.from_torch(theirs)
    gen = torch.Generator().manual_seed(7)
    shape = (lambda n, d: (B, n, d)) if batch_first else (lambda n, d: (n, B, d))
    q = torch.randn(shape(L, E), generator=gen, dtype=torch.float64)
    k = torch.randn(shape(S, dims.get("kdim", E)), generator=gen, dtype=torch.float64)
    v = torch.randn(shape(S, dims.get("vdim", E)), generator=gen, dtype=torch.float64)
    attn_mask, kpm = torch_masks(mask_case, L, S, gen)
    assert_same_call(theirs, ours, q, k, v, key_padding_mask=kpm, attn_mask=attn_mask)
    assert_same_call(theirs, ours, q, k, v, key_padding_mask=kpm, attn_mask=attn_mask, average_attn_weights=False)


def test_no_bias_unbatched_and_float32():
    theirs = torch_mha(bias=False)
    ours = MultiheadAttention.from_torch(theirs)
    assert ours.attn.qkv_proj.bias is None
    x = torch.randn(L, E, dtype=torch.float64)
    causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
    assert_same_call(theirs, ours, x, x, x, attn_mask=causal, is_causal=True)
    theirs32, ours32 = theirs.float(), MultiheadAttention.from_torch(theirs.float())
    x32 = torch.randn(B, L, E).transpose(0, 1)
    out_t, _ = theirs32(x32, x32, x32)
    out_o, _ = ours32(x32, x32, x32)
    torch.testing.assert_close(out_o, out_t, atol=1e-5, rtol=1e-5)  # float32 sums in different orders


def test_gradients_match_torch():
    theirs = torch_mha(batch_first=True, kdim=5, vdim=6)
    ours = MultiheadAttention.from_torch(theirs)
    q = torch.randn(B, L, E, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, S, 5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, S, 6, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[0, -2:] = True
    g_t = torch.autograd.grad(theirs(q, k, v, key_padding_mask=kpm)[0].pow(2).sum(),
                              (q, k, v, theirs.q_proj_weight, theirs.in_proj_bias, theirs.out_proj.weight))
    g_o = torch.autograd.grad(ours(q, k, v, key_padding_mask=kpm)[0].pow(2).sum(),
                              (q, k, v, ours.attn.q_proj.weight, ours.attn.q_proj.bias, ours.attn.out_proj.weight))
    for a, b in zip(g_o[:4], g_t[:4]):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(g_o[4], g_t[4][:E], **TOL)
    torch.testing.assert_close(g_o[5], g_t[5], **TOL)


def test_from_torch_module_in_qkv_conventions():
    """MultiHeadAttention.from_torch: batch-first inputs, qkv masks (True = may attend)."""
    theirs = torch_mha(batch_first=True)
    ours = MultiHeadAttention.from_torch(theirs)
    assert isinstance(ours, MultiHeadAttention) and not ours.training
    x = torch.randn(B, L, E, dtype=torch.float64)
    kpm = torch.tensor([[False] * L, [False] * (L - 2) + [True] * 2])
    expected, _ = theirs(x, x, x, key_padding_mask=kpm)
    torch.testing.assert_close(ours(x, mask=~kpm[:, None, None, :]), expected, **TOL)


def test_dropout_and_training_mode_carry_over():
    theirs = torch_mha(dropout=0.25).train()
    ours = MultiheadAttention.from_torch(theirs)
    assert ours.training and ours.attn.dropout == 0.25


def test_constructor_mirrors_torch():
    ours = MultiheadAttention(E, H, kdim=4, vdim=4, batch_first=True, dtype=torch.float64)
    assert (ours.embed_dim, ours.num_heads, ours.batch_first) == (E, H, True)
    assert not ours.attn.fused_qkv and ours.attn.k_proj.weight.dtype == torch.float64
    assert MultiheadAttention(E, H).attn.fused_qkv


def test_fully_masked_row_gives_zeros_not_nan():
    theirs = torch_mha(batch_first=True)
    ours = MultiheadAttention.from_torch(theirs)
    x = torch.randn(1, L, E, dtype=torch.float64)
    mask = torch.zeros(L, L, dtype=torch.bool)
    mask[2] = True
    out, w = ours(x, x, x, attn_mask=mask)
    assert torch.isfinite(out).all() and bool((w[0, 2] == 0).all())
    torch.testing.assert_close(out[0, 2], theirs.out_proj.bias)


def test_unsupported_and_bad_arguments():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiheadAttention(E, H, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(E, H, add_zero_attn=True))
    with pytest.raises(TypeError, match="torch.nn.MultiheadAttention"):
        MultiHeadAttention.from_torch(nn.Linear(2, 2))
    ours = MultiheadAttention(E, H)
    x = torch.randn(L, B, E)
    with pytest.raises(ValueError, match="is_causal"):
        ours(x, x, x, is_causal=True)
    with pytest.raises(ValueError, match="attn_mask must have shape"):
        ours(x, x, x, attn_mask=torch.zeros(L, L + 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="key_padding_mask must have shape"):
        ours(x, x, x, key_padding_mask=torch.zeros(B, L + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask must be bool or floating, got torch.int64"):
        ours(x, x, x, key_padding_mask=torch.zeros(B, L, dtype=torch.long))
    with pytest.raises(TypeError, match="attn_mask must be bool or floating, got torch.int32"):
        ours(x, x, x, attn_mask=torch.zeros(L, L, dtype=torch.int32), key_padding_mask=torch.zeros(B, L).bool())
    with pytest.raises(ValueError, match="query must be a 2-D"):
        ours(torch.randn(1, L, B, E), x, x)


def torch_encoder_layer(seed=0, **kwargs) -> nn.TransformerEncoderLayer:
    """A layer eligible for torch's fused fast path in eval mode (batch-first, even heads, relu)."""
    torch.manual_seed(seed)
    layer = nn.TransformerEncoderLayer(E + 4, 4, 24, dropout=0.0, batch_first=True, **kwargs).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return layer


@pytest.fixture
def torch_fast_path_forbidden(monkeypatch):
    """Fail if torch's fused encoder-layer kernel runs; count the calls that reach qkv."""
    import qkv.nn.attention

    def forbidden(*args, **kwargs):
        raise AssertionError("torch's fused fast path ran instead of qkv")

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return qkv_attention(*args, **kwargs)

    qkv_attention = qkv.nn.attention._attention
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", forbidden)
    monkeypatch.setattr(qkv.nn.attention, "_attention", counted)
    return calls


@pytest.mark.parametrize("grad", [False, True])
def test_inside_a_torch_encoder_layer_in_eval_mode(grad, torch_fast_path_forbidden):
    """torch's fast-path check reads in_proj_bias and _qkv_same_embed_dim, declines, and calls qkv."""
    theirs = torch_encoder_layer()
    x = torch.randn(B, L, E + 4, dtype=torch.float64)
    kpm = torch.tensor([[False] * L, [False] * (L - 2) + [True] * 2])
    expected = theirs(x, src_key_padding_mask=kpm)  # grad on: torch declines its fast path too
    ours = torch_encoder_layer()
    ours.self_attn = MultiheadAttention.from_torch(ours.self_attn)
    with torch.set_grad_enabled(grad):
        out = ours(x, src_key_padding_mask=kpm)
    assert len(torch_fast_path_forbidden) == 1
    torch.testing.assert_close(out, expected, **TOL)


def test_inside_a_torch_encoder(torch_fast_path_forbidden):
    theirs = nn.TransformerEncoder(torch_encoder_layer(), 2, enable_nested_tensor=False)
    x = torch.randn(B, L, E + 4, dtype=torch.float64)
    kpm = torch.tensor([[False] * L, [False] * (L - 2) + [True] * 2])
    expected = theirs(x, src_key_padding_mask=kpm)
    layer = torch_encoder_layer()
    layer.self_attn = MultiheadAttention.from_torch(layer.self_attn)
    with pytest.warns(UserWarning, match="_qkv_same_embed_dim was not True"):
        ours = nn.TransformerEncoder(layer, 2)               # nested tensors declined, for the same reason
    with torch.no_grad():
        out = ours(x, src_key_padding_mask=kpm)
    assert len(torch_fast_path_forbidden) == 2
    torch.testing.assert_close(out, expected, **TOL)


def test_in_proj_bias_reads_like_torch():
    for kwargs in (dict(), dict(kdim=5, vdim=9)):
        theirs = torch_mha(**kwargs)
        ours = MultiheadAttention.from_torch(theirs)
        torch.testing.assert_close(ours.in_proj_bias, theirs.in_proj_bias, rtol=0, atol=0)
        assert ours._qkv_same_embed_dim is False
    fused = MultiheadAttention.from_torch(torch_mha())
    assert fused.in_proj_bias is fused.attn.qkv_proj.bias
    assert MultiheadAttention(E, H, bias=False).in_proj_bias is None
