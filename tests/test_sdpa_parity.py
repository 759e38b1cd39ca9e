"""Same outputs (and gradients) as torch.nn.functional.scaled_dot_product_attention on the
problems it supports: is_causal, bool and float masks, enable_gqa, custom scale."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

import qkv

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

BACKENDS = ["reference", "tiled", "tiled_16x8", "sdpa", None]


def rand(*shape, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()


def compare(ours, theirs, inputs, atol):
    torch.testing.assert_close(ours, theirs, rtol=0, atol=atol)
    g = torch.randn(ours.shape, generator=torch.Generator().manual_seed(1), dtype=ours.dtype)
    for a, b in zip(torch.autograd.grad(ours, inputs, g), torch.autograd.grad(theirs, inputs, g)):
        torch.testing.assert_close(a, b, rtol=0, atol=atol * 10)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-12), (torch.float32, 2e-6)])
def test_is_causal(backend, dtype, atol):
    q, k, v = (rand(2, 4, 37, 16, seed=s, dtype=dtype) for s in (1, 2, 3))
    compare(qkv.attention(q, k, v, qkv.causal(), backend=backend),
            F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), atol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_lower_right_when_lengths_differ(backend):
    q, k, v = rand(1, 2, 5, 16, seed=4), rand(1, 2, 12, 16, seed=5), rand(1, 2, 12, 16, seed=6)
    compare(qkv.attention(q, k, v, qkv.causal(), backend=backend),
            F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(5, 12)), (q, k, v), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bool_mask(backend):
    q, k, v = rand(2, 3, 20, 8, seed=7), rand(2, 3, 25, 8, seed=8), rand(2, 3, 25, 8, seed=9)
    mask = torch.rand(2, 1, 20, 25, generator=torch.Generator().manual_seed(0)) > 0.3
    compare(qkv.attention(q, k, v, mask, backend=backend),
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_mask_with_gradient(backend):
    q, k, v = rand(2, 3, 20, 8, seed=10), rand(2, 3, 25, 8, seed=11), rand(2, 3, 25, 8, seed=12)
    bias = rand(3, 20, 25, seed=13)
    compare(qkv.attention(q, k, v, bias, backend=backend),
            F.scaled_dot_product_attention(q, k, v, attn_mask=bias), (q, k, v, bias), 1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_enable_gqa_and_scale(backend, kv_heads):
    q, k, v = rand(2, 8, 19, 16, seed=14), rand(2, kv_heads, 23, 16, seed=15), rand(2, kv_heads, 23, 16, seed=16)
    compare(qkv.attention(q, k, v, scale=0.37, backend=backend),
            F.scaled_dot_product_attention(q, k, v, scale=0.37, enable_gqa=True), (q, k, v), 1e-12)
