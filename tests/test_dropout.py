"""Dropout: reproducible from a generator, identical across backends, unbiased, differentiable."""

import pytest
import torch

import qkv

pytestmark = pytest.mark.usefixtures("small_tiled_backends")


def rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)


def test_same_generator_state_same_result_and_backends_agree():
    q, k, v = rand(2, 4, 33, 8, seed=1), rand(2, 2, 40, 8, seed=2), rand(2, 2, 40, 8, seed=3)
    outs = {}
    for backend in ["reference", "tiled", "tiled_16x8", "tiled_8x16"]:
        outs[backend] = qkv.attention(q, k, v, qkv.causal(), dropout_p=0.25,
                                      generator=torch.Generator().manual_seed(42), backend=backend)
    for backend, out in outs.items():
        torch.testing.assert_close(out, outs["reference"], rtol=0, atol=1e-12, msg=backend)
    other = qkv.attention(q, k, v, qkv.causal(), dropout_p=0.25, generator=torch.Generator().manual_seed(43))
    assert not torch.allclose(other, outs["reference"])


def test_keep_rate_and_expectation():
    # Each weight survives with probability 1 - p and is scaled by 1/(1-p): averaged over many
    # seeds the output approaches the output without dropout.
    q, k, v = rand(1, 1, 16, 8, seed=4), rand(1, 1, 16, 8, seed=5), rand(1, 1, 16, 8, seed=6)
    p = 0.4
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        mean = sum(qkv.attention(q, k, v, dropout_p=p, generator=gen) for _ in range(2000)) / 2000
        plain = qkv.attention(q, k, v)
        weights = qkv.attention_weights(q, k, v)
        from qkv import dropout

        keep = dropout.keep_mask(123, p, torch.arange(4).view(-1, 1, 1, 1), torch.arange(8).view(1, -1, 1, 1), 8,
                                 torch.arange(64).view(1, 1, -1, 1), torch.arange(64).view(1, 1, 1, -1))
    assert abs(keep.double().mean().item() - (1 - p)) < 0.01  # 131072 draws: 5 sigma is ~0.007
    assert (mean - plain).abs().max() < 0.1 * weights.max()
    assert (mean - plain).abs().max() > 0  # and it is random


@pytest.mark.parametrize("backend", ["reference", "tiled_16x8"])
def test_dropout_gradcheck(backend):
    q, k, v = rand(1, 2, 6, 4, seed=7), rand(1, 2, 9, 4, seed=8), rand(1, 2, 9, 4, seed=9)

    def f(q, k, v):
        return qkv.attention(q, k, v, qkv.causal(), dropout_p=0.3, generator=torch.Generator().manual_seed(5),
                             backend=backend)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_dropout_p_is_validated():
    q = torch.randn(1, 1, 2, 4)
    for bad in (-0.1, 1.0, 1.5, "0.1"):
        with pytest.raises(ValueError, match="dropout_p must be a number in \\[0, 1\\)"):
            qkv.attention(q, q, q, dropout_p=bad)
