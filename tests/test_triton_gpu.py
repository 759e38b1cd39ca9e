"""Checks that only a GPU can make: run-to-run determinism of the triton backend's backward.

The interpreter runs every program in order, so it cannot show run-to-run differences; these
tests skip without CUDA (test_triton.py's correctness tests run there and in the interpreter).
"""

import pytest
import torch

import qkv

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA device (run-to-run behaviour of GPU kernels)")
N = 1024
DEVICE = "cuda"


def _grads(mask):
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 4, N, 64, generator=g).to(DEVICE, torch.bfloat16).requires_grad_() for _ in range(3))
    dout = torch.randn(2, 4, N, 64, generator=g).to(DEVICE, torch.bfloat16)
    runs = []
    for _ in range(3):
        out = qkv.attention(q, k, v, mask, backend="triton")
        runs.append(torch.autograd.grad(out, (q, k, v), dout))
    return runs


def test_backward_is_deterministic_by_default():
    runs = _grads(qkv.sliding_window(100) | qkv.key_padding(N // 3))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_atomic_dq_mode_is_opt_in_and_torch_deterministic_mode_overrides_it():
    from qkv.backends.triton import configs

    configs.set_deterministic(False)
    try:
        assert not configs.deterministic()
        torch.use_deterministic_algorithms(True)
        try:
            assert configs.deterministic()
            runs = _grads(qkv.causal())
            assert all(torch.equal(a, b) for other in runs[1:] for a, b in zip(runs[0], other))
        finally:
            torch.use_deterministic_algorithms(False)
    finally:
        configs.set_deterministic(True)
