"""Linear attention against its naive O(N^2) formulation, recurrent decoding against the chunked
form, and Performer's random features: unbiased, and closer to softmax with more features."""

import math

import pytest
import torch

import qkv
from qkv.linear import (LinearAttentionState, PerformerFeatures, draw_projection, elu_plus_one, linear_attention,
                        performer_attention)
from tests.oracle import textbook_attention

F64 = torch.float64


def naive(q, k, v, phi, *, causal=False, lengths=None):
    """``phi(Q) phi(K)^T``, masked, row-normalised, times ``V``: the N x N formulation, in float64."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    weights = phi(q) @ phi(k).transpose(-1, -2)  # (B, H, Nq, Nk)
    nq, nk = q.shape[2], k.shape[2]
    allowed = torch.ones(q.shape[0], 1, nq, nk, dtype=torch.bool)
    for b in range(q.shape[0]):
        for i in range(nq):
            for j in range(nk):
                if causal and j > i + nk - nq:
                    allowed[b, 0, i, j] = False
                if lengths is not None and j >= lengths[b]:
                    allowed[b, 0, i, j] = False
    weights = weights * allowed
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights @ v / torch.where(total > 0, total, 1.0), 0.0)


def inputs(seed, batch=2, hq=4, hkv=2, nq=29, nk=29, d=8, dv=6, dtype=F64, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=F64).to(dtype).requires_grad_(grad)  # noqa: E731
    return t(batch, hq, nq, d), t(batch, hkv, nk, d), t(batch, hkv, nk, dv)


def performer_phi(features, scale):
    return lambda x: features(x, scale)


SHAPES = [dict(nq=29, nk=29), dict(nq=7, nk=23), dict(nq=23, nk=9), dict(nq=1, nk=12), dict(hq=3, hkv=3)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_elu_linear_attention_equals_the_naive_formulation(shape, causal, padded):
    q, k, v = inputs(hash((str(shape), causal, padded)) % 1000, **shape)
    nk = k.shape[2]
    lengths = [nk, max(1, nk - 5)] if padded else None
    mask = None
    if causal:
        mask = qkv.causal()
    if padded:
        mask = qkv.key_padding(lengths) if mask is None else mask & qkv.key_padding(lengths)
    want = naive(q, k, v, elu_plus_one, causal=causal, lengths=lengths)
    for chunk in (1, 5, 64):
        got = linear_attention(q, k, v, mask, chunk_size=chunk)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
def test_performer_equals_the_naive_formulation_of_its_features(causal):
    q, k, v = inputs(5, nq=17, nk=21)
    features = PerformerFeatures(8, 24, seed=3, dtype=F64)
    scale = 0.4
    lengths = [21, 13]
    key_mask = torch.arange(21)[None, None, None, :] < torch.tensor(lengths)[:, None, None, None]  # (B, 1, 1, Nk)
    mask = qkv.key_padding(lengths) & qkv.causal() if causal else key_mask
    want = naive(q, k, v, performer_phi(features, scale), causal=causal, lengths=lengths)
    got = performer_attention(q, k, v, mask, features=features, scale=scale, chunk_size=4)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_gradients_equal_the_naive_formulation():
    q, k, v = inputs(9, nq=19, nk=19, grad=True)
    g = torch.Generator().manual_seed(1)
    probe = torch.randn(2, 4, 19, 6, generator=g, dtype=F64)
    grads = [torch.autograd.grad((f() * probe).sum(), (q, k, v)) for f in (
        lambda: linear_attention(q, k, v, qkv.causal(), chunk_size=4),
        lambda: naive(q, k, v, elu_plus_one, causal=True))]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("feature", ["elu", "performer"])
def test_recurrent_decoding_equals_the_chunked_form(feature):
    q, k, v = inputs(11, nq=40, nk=40)
    fmap = "elu" if feature == "elu" else PerformerFeatures(8, 16, seed=2, dtype=F64)
    full = linear_attention(q, k, v, qkv.causal(), feature_map=fmap, chunk_size=8)
    state = LinearAttentionState(fmap)
    steps = [state.update(q[:, :, :13], k[:, :, :13], v[:, :, :13])]  # a prompt, chunked
    steps += [state.update(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1]) for i in range(13, 40)]
    torch.testing.assert_close(torch.cat(steps, dim=2), full, atol=1e-12, rtol=1e-10)
    assert state.length == 40 and state.s.shape == (2, 2, 8 if feature == "elu" else 16, 6)


def test_low_precision_stays_within_twice_plain_math():
    q, k, v = inputs(4, nq=64, nk=64, d=16, dv=16)
    exact = linear_attention(q, k, v, qkv.causal())
    for dtype in (torch.bfloat16, torch.float16):
        ql, kl, vl = q.to(dtype), k.to(dtype), v.to(dtype)
        got = linear_attention(ql, kl, vl, qkv.causal())
        assert got.dtype == dtype
        w = (elu_plus_one(ql) @ elu_plus_one(kl.repeat_interleave(2, 1)).transpose(-1, -2)).tril()
        plain = (w / w.sum(-1, keepdim=True)) @ vl.repeat_interleave(2, 1)
        assert (got.double() - exact).abs().max() <= 2 * (plain.double() - exact).abs().max()


def test_performer_kernel_estimate_is_unbiased():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, generator=g, dtype=F64) * 0.7
    scale = 0.5
    truth = math.exp(float(x @ y) * scale)
    draws = 20000
    w = draw_projection(4, 4 * draws, torch.Generator().manual_seed(0))  # independent orthogonal blocks
    fx = torch.exp(w @ (x * scale ** 0.5) - (x * x).sum() * scale / 2)
    fy = torch.exp(w @ (y * scale ** 0.5) - (y * y).sum() * scale / 2)
    est = (fx * fy).view(draws, 4).mean(1)  # the m = 4 estimate of each draw
    stderr = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - truth) < 4 * stderr, (float(est.mean()), truth, float(stderr))
    assert stderr < 0.01 * truth  # a meaningful test: the mean is pinned to within a few percent


def test_performer_error_falls_with_the_number_of_features():
    q, k, v = inputs(2, batch=1, hq=2, hkv=2, nq=48, nk=48, d=16, dv=16)
    q, k = q * 0.5, k * 0.5
    exact = textbook_attention(q, k, v)
    errors = []
    for m in (8, 64, 512):
        err = [(performer_attention(q, k, v, num_features=m, seed=s) - exact).abs().mean() for s in range(6)]
        errors.append(float(torch.stack(err).mean()))
    assert errors[0] > 2 * errors[1] > 4 * errors[2], errors


def test_performer_features_are_orthogonal_seeded_and_redrawable():
    f = PerformerFeatures(16, 40, seed=7, dtype=F64)
    w = f.projection.clone()
    block = w[:16] / w[:16].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(16, dtype=F64), atol=1e-10, rtol=0)
    assert torch.equal(w, PerformerFeatures(16, 40, seed=7, dtype=F64).projection)
    assert not torch.equal(w, PerformerFeatures(16, 40, seed=8, dtype=F64).projection)
    g = PerformerFeatures(16, 40, seed=7, dtype=F64)
    f.redraw()
    g.redraw()
    assert torch.equal(f.projection, g.projection) and not torch.equal(f.projection, w)
    f.redraw(seed=7)
    assert torch.equal(f.projection, w)


@pytest.mark.parametrize("mask, message", [
    (qkv.sliding_window(3), "supports None, qkv.causal"),
    (torch.zeros(1, 1, 5, 5), "additive float mask"),
    (torch.ones(1, 1, 5, 5, dtype=torch.bool), r"\(B, 1, 1, Nk\)"),
])
def test_unsupported_masks_raise(mask, message):
    q = k = v = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=message):
        linear_attention(q, k, v, mask)


def test_bad_inputs_raise():
    q = torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        linear_attention(q, torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8))
    with pytest.raises(ValueError, match="num_features"):
        PerformerFeatures(8, 0)
    with pytest.raises(ValueError, match="feature_map"):
        linear_attention(q, q, q, feature_map="relu")


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("performer", [False, True])
def test_padded_keys_never_matter_even_if_nan(causal, performer):
    """As in qkv.attention: keys the padding hides do not reach any output, even NaN or inf ones
    (a padded batch's unused slots hold whatever was there)."""
    q, k, v = inputs(5, nq=9, nk=9)
    mask = qkv.key_padding([9, 4]) if not causal else qkv.causal() & qkv.key_padding([9, 4])
    attend = (lambda *a: performer_attention(*a, num_features=16)) if performer else linear_attention
    clean = attend(q, k, v, mask)
    k, v = k.clone(), v.clone()
    k[1, :, 4:], v[1, :, 4:] = float("nan"), float("inf")
    torch.testing.assert_close(attend(q, k, v, mask), clean, atol=1e-12, rtol=1e-12)
