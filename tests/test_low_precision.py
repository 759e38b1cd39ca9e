"""float32 / bfloat16 / float16: the error against float64 is at most ~2x the error of plain
PyTorch math in the same dtype, for outputs and gradients (FlashAttention's test rule), plus a small
epsilon: twice the dtype's rounding of the true values, and a few units of the dtype's epsilon at
the values' scale (8 eps in half precision; 32 eps ~ 4e-6 relative in float32, where plain math is
sometimes nearly exact by luck on tiny problems and the 2x ratio alone is noise; and for gradients
that are zero in theory). 500 examples per dtype pass with HYPOTHESIS_PROFILE=thorough."""

import pytest
import torch
from hypothesis import given

import qkv
from qkv.backends import REGISTRY
from qkv.masks import position_grid
from qkv.problem import make_problem
from tests.oracle import naive_in_dtype
from tests.strategies import cases

pytestmark = pytest.mark.usefixtures("small_tiled_backends")


def _cast(t, dtype):
    return t.detach().to(dtype).requires_grad_()


def _run(q, k, v, kwargs, backend, learnable):
    out = qkv.attention(q, k, v, **kwargs, backend=backend)
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(out.shape, generator=g, dtype=torch.float64)
    loss = (out.double() * proj).sum()
    return out.detach().double(), [x.double() for x in torch.autograd.grad(loss, [q, k, v, *learnable])]


def _baseline(q, k, v, kwargs, problem, learnable_count):
    """Plain math in the low-precision dtype; its outputs and gradients."""
    mask, bias = problem.mask, problem.bias
    positions = position_grid(problem.batch, problem.q_heads, problem.nq, problem.nk, torch.device("cpu"))
    allowed = None if mask is None else mask.allowed(*positions)
    out = naive_in_dtype(q, k, v, allowed, bias, kwargs.get("scale"), problem.score_mod, positions)
    g = torch.Generator().manual_seed(3)
    loss = (out.double() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    wrt = [q, k, v] + ([bias] if learnable_count else [])
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    return out.detach().double(), [None if x is None else x.double().nan_to_num(0.0) for x in grads]


def _rounding(x, dtype):
    return (x.to(dtype).double() - x).abs().max().item() if x.numel() else 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(case=cases(mod_kinds=["none", "alibi", "softcap", "bias"]))
def test_low_precision_error_is_within_twice_plain_math(case, dtype):
    q, k, v = (_cast(t, dtype) for t in (case.q, case.k, case.v))
    kwargs = dict(case.kwargs)
    learnable = []
    if case.learnable:  # a float bias: the low-precision run gets it in that dtype
        kwargs["mask"] = _cast(kwargs["mask"], dtype)
        learnable = [kwargs["mask"]]
    # The truth: float64 math on exactly the values the low-precision run sees.
    q64, k64, v64 = (_cast(t, torch.float64) for t in (q, k, v))
    kw64 = dict(kwargs, mask=_cast(kwargs["mask"], torch.float64)) if learnable else kwargs
    ref_out, ref_grads = _run(q64, k64, v64, kw64, "reference", [kw64["mask"]] if learnable else [])

    problem = make_problem(q, k, v, **kwargs)
    base_out, base_grads = _baseline(*(_cast(t, dtype) for t in (q, k, v)), kwargs, problem, len(learnable))
    eps = (32 if dtype == torch.float32 else 8) * torch.finfo(dtype).eps
    tol_out = 2 * (base_out - ref_out).abs().max().item() + 2 * _rounding(ref_out, dtype) \
        + eps * ref_out.abs().max().item()

    for name, backend in REGISTRY.items():
        if backend.unsupported(problem):
            continue
        qq, kk, vv = (_cast(t, dtype) for t in (q, k, v))
        kw = dict(kwargs, mask=_cast(kwargs["mask"], dtype)) if learnable else kwargs
        out, grads = _run(qq, kk, vv, kw, name, [kw["mask"]] if learnable else [])
        assert out.dtype == torch.float64 and not torch.isnan(out).any()
        err = (out - ref_out).abs().max().item()
        assert err <= tol_out, f"{name} {dtype} out: {err:.3g} > {tol_out:.3g} [{case.label}]"
        floor = eps * max(rg.abs().max().item() for rg in ref_grads if rg.numel())
        for i, (g, rg, bg) in enumerate(zip(grads, ref_grads, base_grads)):
            assert not torch.isnan(g).any(), f"{name}: NaN grad {i} [{case.label}]"
            tol = 2 * (bg - rg).abs().max().item() + 2 * _rounding(rg, dtype) + floor
            err = (g - rg).abs().max().item()
            assert err <= tol, f"{name} {dtype} grad[{i}]: {err:.3g} > {tol:.3g} [{case.label}]"
