"""Every backend against the float64 reference, forward and backward, over a property space of
shapes, grouped heads, masks (single and composed), score modifiers, biases and scales."""

import pytest
import torch
from hypothesis import given

import qkv
from qkv.backends import REGISTRY
from qkv.problem import make_problem
from tests.strategies import cases

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

TOL = 1e-9


def run(case, backend, return_lse):
    kwargs = dict(case.kwargs, return_lse=return_lse, backend=backend)
    result = qkv.attention(case.q, case.k, case.v, **kwargs)
    out, lse = result if return_lse else (result, None)
    # A fixed random projection of the outputs, so every output element matters to the gradient.
    g = torch.Generator().manual_seed(7)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    if lse is not None:
        finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = loss + (finite * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()
    grads = torch.autograd.grad(loss, case.inputs(), allow_unused=True)
    return out.detach(), None if lse is None else lse.detach(), grads


def supporting(case, return_lse):
    problem = make_problem(case.q, case.k, case.v, **case.kwargs, return_lse=return_lse)
    return [name for name, b in REGISTRY.items() if name != "reference" and not b.unsupported(problem)]


def assert_close(name, got, want, label):
    assert got.shape == want.shape, f"{name} shape {tuple(got.shape)} != {tuple(want.shape)} [{label}]"
    both_inf = torch.isinf(got) & torch.isinf(want) & (got == want)
    diff = torch.where(both_inf, torch.zeros_like(got), got - want).abs().max().item() if got.numel() else 0.0
    assert diff <= TOL, f"{name}: max abs diff {diff:.3g} [{label}]"


@pytest.mark.parametrize("return_lse", [False, True])
@given(case=cases())
def test_backends_match_reference_forward_and_backward(case, return_lse):
    ref_out, ref_lse, ref_grads = run(case, "reference", return_lse)
    assert not torch.isnan(ref_out).any()
    names = supporting(case, return_lse)
    assert {"tiled", "tiled_16x8", "tiled_8x16"} <= set(names)  # tiled supports every problem
    for name in names:
        out, lse, grads = run(case, name, return_lse)
        assert_close(f"{name} out", out, ref_out, case.label)
        if return_lse:
            assert_close(f"{name} lse", lse, ref_lse, case.label)
        for i, (g, rg) in enumerate(zip(grads, ref_grads)):
            assert (g is None) == (rg is None), f"{name}: gradient {i} missing [{case.label}]"
            if g is not None:
                assert not torch.isnan(g).any(), f"{name}: NaN in gradient {i} [{case.label}]"
                assert_close(f"{name} grad[{i}]", g, rg, case.label)


@given(case=cases(grad=False))
def test_auto_dispatch_matches_reference(case):
    ref = qkv.attention(case.q, case.k, case.v, **case.kwargs, backend="reference")
    assert_close("auto", qkv.attention(case.q, case.k, case.v, **case.kwargs), ref, case.label)
