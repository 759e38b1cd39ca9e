"""Finite-difference gradient checks in float64 on small shapes (torch.autograd.gradcheck), for
the tiled backend's hand-written backward: q, k, v, the log-sum-exp output, an additive float
mask, and the learnable tensors of score modifiers. The first tile shape checks the whole Jacobian,
the second with gradcheck's fast mode (the Jacobian projected on random vectors on both sides: a
wrong gradient shows there too, in a third of the time)."""

import pytest
import torch

import qkv
from qkv import scores

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

BACKENDS = ["tiled_16x8", "tiled_8x16"]


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


def qkv_inputs(nq=11, nk=19, heads=2, kv_heads=1, d=4, dv=3):
    """Small enough for finite differences, large enough to cross tiles of 8 and 16 (GQA too)."""
    return rand(2, heads, nq, d, seed=1), rand(2, kv_heads, nk, d, seed=2), rand(2, kv_heads, nk, dv, seed=3)


def finite_lse(out, lse):
    return out, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


MASKS = {
    "none": None,
    "causal": qkv.causal(),
    "window|global": qkv.sliding_window(4, 2) | qkv.global_tokens([0, 9]),
    "document&padding": qkv.document([0] * 7 + [1] * 6 + [2] * 6, causal=True) & qkv.key_padding([19, 12]),
    "prefix": qkv.prefix_lm(5),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", MASKS.values(), ids=MASKS.keys())
def test_gradcheck_q_k_v_and_lse(backend, mask):
    q, k, v = qkv_inputs()

    def f(q, k, v):
        return finite_lse(*qkv.attention(q, k, v, mask, return_lse=True, backend=backend))

    assert torch.autograd.gradcheck(f, (q, k, v), fast_mode=backend != BACKENDS[0])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_shape", [(2, 2, 11, 19), (1, 2, 1, 19), (11, 19)])
def test_gradcheck_additive_mask(backend, bias_shape):
    q, k, v = qkv_inputs()
    bias = rand(*bias_shape, seed=4)
    assert torch.autograd.gradcheck(lambda q, k, v, b: qkv.attention(q, k, v, b, backend=backend), (q, k, v, bias),
                                    fast_mode=backend != BACKENDS[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_score_mod_tensors(backend):
    q, k, v = qkv_inputs()
    table = rand(2, 7, seed=5)
    slopes = (scores.alibi_slopes(2) * 2).requires_grad_()

    def f(q, k, v, table, slopes):
        mod = scores.chain(scores.relative_bias(table), scores.alibi(slopes), scores.softcap(3.0))
        return qkv.attention(q, k, v, qkv.causal(), score_mod=mod, backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v, table, slopes), fast_mode=backend != BACKENDS[0])


def test_gradcheck_reference_oracle():
    """The oracle's gradients (PyTorch autograd through the materialised formula) are checked once
    here, on a mask, a learnable bias table and lse; the property tests compare the rest to it."""
    q, k, v = qkv_inputs()
    table = rand(2, 7, seed=6)

    def f(q, k, v, table):
        out, lse = qkv.attention(q, k, v, MASKS["document&padding"], score_mod=scores.relative_bias(table),
                                 return_lse=True, backend="reference")
        return finite_lse(out, lse)

    assert torch.autograd.gradcheck(f, (q, k, v, table))


def test_double_backward_through_tiled_is_refused_not_wrong():
    q, k, v = qkv_inputs()
    out = qkv.attention(q, k, v, backend="tiled")
    (gq,) = torch.autograd.grad(out.sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        gq.sum().backward()
