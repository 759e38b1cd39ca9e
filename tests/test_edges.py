"""Behaviour at the edges: rows with nothing to attend to, empty sequences, Nq != Nk."""

import pytest
import torch

import qkv

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

ALL = ["reference", "tiled", "tiled_16x8", "sdpa"]


def rand(*shape, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)


@pytest.mark.parametrize("backend", ALL)
def test_fully_masked_rows_give_zeros_and_zero_gradients(backend):
    q, k, v = rand(2, 2, 6, 8, seed=1), rand(2, 2, 6, 8, seed=2), rand(2, 2, 6, 8, seed=3)
    mask = qkv.key_padding([0, 4])  # batch 0 has no visible key at all
    out = qkv.attention(q, k, v, mask, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert not torch.isnan(out).any()
    out.sum().backward()
    assert torch.equal(q.grad[0], torch.zeros_like(q.grad[0]))
    assert not any(torch.isnan(t.grad).any() for t in (q, k, v))
    assert torch.equal(k.grad[0], torch.zeros_like(k.grad[0]))
    assert (k.grad[1, :, 4:] == 0).all() and (v.grad[1, :, 4:] == 0).all()  # padding gets nothing


@pytest.mark.parametrize("backend", ["reference", "tiled", "tiled_16x8"])
def test_fully_masked_rows_have_lse_minus_inf(backend):
    q, k, v = rand(1, 1, 5, 8, seed=4), rand(1, 1, 3, 8, seed=5), rand(1, 1, 3, 8, seed=6)
    out, lse = qkv.attention(q, k, v, qkv.causal(), return_lse=True, backend=backend)
    # Nq=5 > Nk=3: rows 0 and 1 sit at positions -2 and -1, before every key.
    assert lse[0, 0, :2].tolist() == [float("-inf")] * 2
    assert torch.isfinite(lse[0, 0, 2:]).all()
    assert (out[0, 0, :2] == 0).all()
    (out.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert not torch.isnan(q.grad).any() and (q.grad[0, 0, :2] == 0).all()


def test_float_mask_of_minus_inf_rows_is_safe():
    q, k, v = rand(1, 1, 3, 4, seed=7), rand(1, 1, 3, 4, seed=8), rand(1, 1, 3, 4, seed=9)
    bias = torch.zeros(3, 3, dtype=torch.float64)
    bias[1] = float("-inf")
    for backend in ALL:
        out = qkv.attention(q, k, v, bias, backend=backend)
        assert (out[0, 0, 1] == 0).all() and not torch.isnan(out).any(), backend


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("shape_q,shape_k", [((2, 2, 0, 8), (2, 2, 5, 8)), ((2, 2, 4, 8), (2, 2, 0, 8)),
                                             ((0, 2, 4, 8), (0, 2, 5, 8))])
def test_empty_sequences(backend, shape_q, shape_k):
    q, k = rand(*shape_q, seed=10), rand(*shape_k, seed=11)
    v = rand(*shape_k, seed=12)
    out, lse = qkv.attention(q, k, v, qkv.causal(), return_lse=True, backend=backend)
    assert out.shape == (shape_q[0], shape_q[1], shape_q[2], 8)
    assert (out == 0).all() and (lse == float("-inf")).all()
    out.sum().backward()
    assert (q.grad == 0).all() and (v.grad == 0).all()


def test_decode_step_equals_last_row_of_full_causal_attention():
    q, k, v = rand(1, 4, 9, 16, seed=13, grad=False), rand(1, 2, 9, 16, seed=14, grad=False), rand(1, 2, 9, 16, seed=15, grad=False)
    full = qkv.attention(q, k, v, qkv.causal())
    for backend in ALL:
        step = qkv.attention(q[:, :, -1:], k, v, qkv.causal(), backend=backend)
        torch.testing.assert_close(step, full[:, :, -1:], rtol=0, atol=1e-12, msg=backend)
        chunk = qkv.attention(q[:, :, -3:], k, v, qkv.causal(), backend=backend)
        torch.testing.assert_close(chunk, full[:, :, -3:], rtol=0, atol=1e-12, msg=backend)


def test_cross_attention_with_different_lengths_and_value_dim():
    q, k, v = rand(2, 4, 7, 16, seed=16), rand(2, 1, 13, 16, seed=17), rand(2, 1, 13, 24, seed=18)
    ref = qkv.attention(q, k, v, backend="reference")
    assert ref.shape == (2, 4, 7, 24)
    for backend in ALL:
        torch.testing.assert_close(qkv.attention(q, k, v, backend=backend), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", [None, "reference", "tiled", "sdpa"])
@pytest.mark.parametrize("mask", [None, "causal"])
@pytest.mark.parametrize("shape_q,shape_k", [((2, 2, 4, 8), (2, 2, 0, 8)), ((2, 2, 0, 8), (2, 2, 5, 8)),
                                             ((1, 2, 1, 8), (1, 2, 0, 8))])
def test_empty_sequences_without_lse(backend, mask, shape_q, shape_k):
    """The fast path's calls (no mask or causal, no lse) with an empty sequence: zeros, not an error."""
    q, k, v = rand(*shape_q, seed=13, grad=False), rand(*shape_k, seed=14, grad=False), rand(*shape_k, seed=15, grad=False)
    out = qkv.attention(q, k, v, qkv.causal() if mask else None, backend=backend)
    assert out.shape == (shape_q[0], shape_q[1], shape_q[2], 8) and (out == 0).all()
