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


def test_seeds_a_bit_apart_do_not_share_masks_across_heads():
    """Seed ``s`` and seed ``s ^ 1`` give unrelated masks on every pair of heads (the unmixed
    ``(b * H + h) ^ seed`` gave seed ``s``'s head 0 exactly seed ``s ^ 1``'s head 1)."""
    from qkv.dropout import keep_mask

    b, h = torch.zeros(1, 1, 1, 1, dtype=torch.int64), torch.arange(4).view(1, 4, 1, 1)
    rows, cols = torch.arange(32).view(1, 1, 32, 1), torch.arange(32).view(1, 1, 1, 32)
    for seed in (1234, 98765, 2**30 + 7):
        a = keep_mask(seed, 0.5, b, h, 4, rows, cols)[0]
        c = keep_mask(seed ^ 1, 0.5, b, h, 4, rows, cols)[0]
        agree = (a[:, None] == c[None, :]).float().mean(dim=(-1, -2))  # (4, 4): heads of a x heads of c
        assert agree.max() < 0.6, (seed, agree)  # independent masks agree on ~half of 1024 weights
