"""The ``triton`` backend against the float64 reference (the 2x rule of test_low_precision).

Runs where Triton can run: on CUDA at full size, or on CPU under ``TRITON_INTERPRET=1`` at tiny
sizes (``tests/test_triton_interpreter.py`` runs this module that way from the default suite; the
interpreter must be switched on before Python starts). Elsewhere every test skips with the reason.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

import qkv
from qkv import scores
from qkv.backends import REGISTRY
from qkv.masks import position_grid
from qkv.problem import make_problem

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
pytestmark = pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs a CUDA device, or TRITON_INTERPRET=1 "
                                "(tests/test_triton_interpreter.py runs this module under the interpreter)")
DEVICE = "cuda" if CUDA else "cpu"
#: Sequence length: tiny in the interpreter (16x16 tiles), full size on a GPU.
N = 1024 if CUDA else 32


def _tensor(shape, dtype, g):
    return torch.randn(shape, generator=g, dtype=torch.float64).to(DEVICE, dtype).requires_grad_()


def _grads(out, lse, wrt, g):
    proj = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
    loss = (out.double() * proj).sum()
    if lse is not None:
        finite = torch.where(torch.isfinite(lse), lse.double(), torch.zeros_like(lse, dtype=torch.float64))
        loss = loss + (finite * torch.randn(lse.shape, generator=g, dtype=torch.float64).to(DEVICE)).sum()
    return [x.double() for x in torch.autograd.grad(loss, wrt)]


def _rounding(x, dtype):
    return (x.to(dtype).double() - x).abs().max().item() if x.numel() else 0.0


def check(B=1, Hq=2, Hkv=None, Nq=N, Nk=None, D=32, Dv=None, mask=None, dtype=torch.float32, grad=True,
          score_mod=None, learnable=(), seed=0, return_lse=True, **kw):
    """Triton's out, lse and gradients (q, k, v and ``learnable``) within 2x of plain math's error
    in ``dtype`` (plus a few eps), against float64 math on the same values."""
    Hkv, Nk, Dv = Hkv or Hq, Nk or Nq, Dv or D
    g = torch.Generator().manual_seed(seed)
    q, k, v = (_tensor(s, dtype, g) for s in ((B, Hq, Nq, D), (B, Hkv, Nk, D), (B, Hkv, Nk, Dv)))
    learnable = list(learnable)
    args = dict(mask=mask, score_mod=score_mod, **kw)

    def run(backend, q, k, v):
        out, lse = qkv.attention(q, k, v, **args, return_lse=True, backend=backend)
        if not grad:
            return out.detach().double(), lse.detach().double(), []
        grads = _grads(out, lse if return_lse else None, [q, k, v, *learnable], torch.Generator().manual_seed(1))
        return out.detach().double(), lse.detach().double(), grads

    def cast(dt):
        return [t.detach().to(dt).requires_grad_(grad) for t in (q, k, v)]

    got = run("triton", *cast(dtype))
    ref = run("reference", *cast(torch.float64))
    # Plain math in dtype (the same loss): the error budget.
    problem = make_problem(*cast(dtype), **args)
    positions = position_grid(B, Hq, Nq, Nk, torch.device(DEVICE))
    allowed = None if problem.mask is None else problem.mask.allowed(*positions)

    def plain(q, k, v):
        group = Hq // Hkv
        s = q @ k.repeat_interleave(group, 1).transpose(-1, -2) * problem.scale
        if problem.score_mod is not None:
            s = problem.score_mod(s, *positions)
        if allowed is not None:
            s = s.masked_fill(~allowed, float("-inf"))
        out = torch.softmax(s, dim=-1).nan_to_num(0.0) @ v.repeat_interleave(group, 1)
        return out, torch.logsumexp(s, dim=-1)

    bq, bk, bv = cast(dtype)
    base_out, base_lse = plain(bq, bk, bv)
    base_grads = [x.nan_to_num(0.0) for x in _grads(base_out, base_lse if return_lse else None,
                                                    [bq, bk, bv, *learnable], torch.Generator().manual_seed(1))] \
        if grad else None
    eps = (32 if dtype == torch.float32 else 8) * torch.finfo(dtype).eps
    base_out = base_out.detach().double()
    tol = 2 * (base_out - ref[0]).abs().max().item() + 2 * _rounding(ref[0], dtype) + eps * ref[0].abs().max().item()
    err = (got[0] - ref[0]).abs().max().item()
    assert err <= tol, f"out: {err:.3g} > {tol:.3g}"
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(ref[1])), "lse: -inf rows differ"
    finite = torch.isfinite(ref[1])
    lse_err = (got[1][finite] - ref[1][finite]).abs().max().item() if finite.any() else 0.0
    assert lse_err <= 64 * torch.finfo(torch.float32).eps * max(1.0, ref[1][finite].abs().max().item()), lse_err
    floor = eps * max([rg.abs().max().item() for rg in ref[2] if rg.numel()] + [1e-30])
    for i, (gg, rg, bg) in enumerate(zip(got[2], ref[2], base_grads or [])):
        assert not torch.isnan(gg).any(), f"NaN in gradient {i}"
        tol_g = 2 * (bg - rg).abs().max().item() + 2 * _rounding(rg, dtype) + floor
        err = (gg - rg).abs().max().item()
        assert err <= tol_g, f"grad[{i}]: {err:.3g} > {tol_g:.3g}"
    return got


def _ids(batch, n, cuts):
    return torch.stack([(torch.arange(n)[None, :] >= torch.tensor(c)[:, None]).sum(0) for c in cuts])[:batch]


MASKS = {
    "causal": lambda n: qkv.causal(),
    "window": lambda n: qkv.sliding_window(7, 3),
    "key_padding": lambda n: qkv.key_padding([n - 9, 5]),
    "document_causal": lambda n: qkv.document(_ids(2, n, [[11, n - 5], [17, n]]).to(DEVICE), causal=True),
    "prefix_lm": lambda n: qkv.prefix_lm([9, n // 2]),
    "window_or_global": lambda n: qkv.sliding_window(4) | qkv.global_tokens([0, n // 2]),
    "block_sparse": lambda n: qkv.block_sparse(
        torch.rand(2, 2, -(-n // 8), -(-n // 8), generator=torch.Generator().manual_seed(3)).to(DEVICE) > 0.5, 8),
    "composed": lambda n: (~qkv.sliding_window(3) & qkv.causal()) | qkv.key_padding([4, 6]),
    "from_tensor": lambda n: qkv.from_tensor(torch.rand(2, 1, n, n, generator=torch.Generator().manual_seed(4))
                                             .to(DEVICE) > 0.3),
    "from_function": lambda n: qkv.from_function(lambda b, h, q, k: (q + 2 * k + h + b) % 5 != 0, "mod5"),
}


#: Masks whose parameters differ per batch element (per head): run them with B = 2 (2 heads).
PER_HEAD = {"block_sparse", "from_function"}
PER_BATCH = {"key_padding", "composed", "document_causal", "prefix_lm", "block_sparse", "from_tensor", "from_function"}


@pytest.mark.parametrize("name", list(MASKS))
def test_masks_forward_and_backward(name):
    check(B=2 if name in PER_BATCH else 1, Hq=2 if name in PER_HEAD else 1, mask=MASKS[name](N))


def test_gqa_rectangular_dv_and_grads_of_lse():
    check(B=1, Hq=4, Hkv=2, Nq=N // 2 + 3, Nk=N, D=32, Dv=16, mask=qkv.causal())  # Nq < Nk, bottom-right
    check(B=1, Hq=3, Hkv=1, Nq=N, Nk=N // 2 + 1, D=16, Dv=32, mask=qkv.causal())  # MQA, Nq > Nk: rows see nothing


def test_fully_masked_rows_give_zeros_and_minus_inf():
    out, lse, grads = check(B=2, Hq=2, mask=qkv.key_padding([0, 11]))
    assert torch.isneginf(lse[0]).all() and (out[0] == 0).all() and (grads[0][0] == 0).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    check(B=1, Hq=2, Hkv=1, mask=qkv.sliding_window(9), dtype=dtype)


@pytest.mark.parametrize("dim", [64, 80, 128, 256])
def test_head_dims(dim):
    check(B=1, Hq=1, Nq=N // 2, D=dim, mask=qkv.causal())


def test_head_dim_512_forward_only():
    check(B=1, Hq=1, Nq=N // 2, D=512, mask=qkv.causal(), grad=False)
    q = torch.randn(1, 1, 8, 512, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="gradients for head dims up to 256"):
        qkv.attention(q, q, q, backend="triton")


def test_alibi_slopes_get_gradients():
    slopes = scores.alibi_slopes(4).to(DEVICE).requires_grad_()
    check(B=1, Hq=4, Hkv=2, mask=qkv.causal(), score_mod=scores.alibi(slopes), learnable=[slopes])


def test_softcap_after_symmetric_alibi():
    slopes = (scores.alibi_slopes(2) * 4).to(DEVICE).requires_grad_()
    check(B=1, Hq=2, score_mod=scores.chain(scores.alibi(slopes, symmetric=True), scores.softcap(3.0)),
          learnable=[slopes], scale=2.0)


@pytest.mark.parametrize("per_head", [True, False])
def test_relative_bias_table_gets_gradients(per_head):
    g = torch.Generator().manual_seed(5)
    table = torch.randn((2, 11) if per_head else (11,), generator=g).to(DEVICE).requires_grad_()
    check(B=1, Hq=2, mask=qkv.sliding_window(12, 12), score_mod=scores.chain(scores.relative_bias(table),
                                                                             scores.softcap(4.0)), learnable=[table])


@pytest.fixture
def atomic_dq(monkeypatch):
    """The backward's non-deterministic mode (configs.set_deterministic(False)) for one test."""
    from qkv.backends.triton import configs

    monkeypatch.setattr(configs, "_DETERMINISTIC", False)


@pytest.mark.parametrize("mode", ["deterministic", "atomic_dq"])
def test_dropout_drops_the_same_weights_as_tiled(mode, request):
    """With v = identity the output is the dropped weight matrix itself (both backward modes)."""
    if mode == "atomic_dq":
        request.getfixturevalue("atomic_dq")
    B, H, n = 1, 2, 32
    q = torch.randn(B, H, n, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(B, H, n, 16, device=DEVICE, requires_grad=True)
    v = torch.eye(n, device=DEVICE).expand(B, H, n, n).contiguous().requires_grad_()
    outs = {}
    for name in ("triton", "tiled"):
        out = qkv.attention(q, k, v, qkv.causal(), dropout_p=0.3, generator=torch.Generator().manual_seed(11),
                            backend=name)
        grads = torch.autograd.grad((out * torch.arange(out.numel(), device=DEVICE).view(out.shape).sin()).sum(),
                                    (q, k, v))
        outs[name] = out.detach(), grads
    (ot, gt), (oi, gi) = outs["triton"], outs["tiled"]
    assert torch.equal(ot == 0, oi == 0)  # the same weights dropped
    visible = torch.ones(n, n, dtype=torch.bool, device=DEVICE).tril().expand_as(ot)
    assert 0.2 < (ot == 0)[visible].float().mean() < 0.4  # about dropout_p of the visible weights dropped
    torch.testing.assert_close(ot, oi, rtol=1e-5, atol=1e-6)
    for a, b in zip(gt, gi):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_unsupported_problems_say_why():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    backend = REGISTRY["triton"]
    assert "float64" in " ".join(backend.unsupported(make_problem(q.double(), q.double(), q.double())))
    assert "bias" in " ".join(backend.unsupported(make_problem(q, q, q, torch.zeros(8, 8, device=DEVICE))))
    custom = backend.unsupported(make_problem(q, q, q, score_mod=lambda s, b, h, i, j: s * 2))
    assert "custom function" in " ".join(custom)
    scaled = functools.partial(lambda s, b, h, i, j, c: s * c, c=2)  # a callable without __name__
    partial = backend.unsupported(make_problem(q, q, q, score_mod=scaled))
    assert "custom function" in " ".join(partial)
    assert not backend.unsupported(make_problem(q, q, q, qkv.causal()))


@pytest.mark.parametrize("mask", ["composed", "from_function"])
def test_atomic_dq_backward(mask, atomic_dq):
    """set_deterministic(False): dq summed with atomics in the dk/dv kernel, same 2x rule (GQA,
    Nq != Nk, per-batch masks, a bit-packed one)."""
    check(B=2, Hq=2, Hkv=1, Nq=N - 5, Nk=N, mask=MASKS[mask](N))


def test_learnable_score_tensors_keep_the_deterministic_backward(atomic_dq):
    slopes = scores.alibi_slopes(2).to(DEVICE).requires_grad_()
    check(B=1, Hq=2, mask=qkv.causal(), score_mod=scores.alibi(slopes), learnable=[slopes])


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy matmul over NaN keys
@pytest.mark.parametrize("mode", ["deterministic", "atomic_dq"])
def test_hidden_nan_keys_and_values_never_reach_outputs_or_gradients(mode, request):
    """docs/attention.md's guarantees: padding keys/values (even NaN) influence nothing."""
    if mode == "atomic_dq":
        request.getfixturevalue("atomic_dq")
    lengths = [N - 7, 9]
    q = torch.randn(2, 2, N, 16, device=DEVICE, requires_grad=True)
    k, v = torch.randn(2, 2, N, 16, device=DEVICE), torch.randn(2, 2, N, 16, device=DEVICE)
    for b, n in enumerate(lengths):
        k[b, :, n:], v[b, :, n:] = float("nan"), float("inf")
    k.requires_grad_(), v.requires_grad_()
    mask = qkv.key_padding(lengths) & qkv.causal()
    out, lse = qkv.attention(q, k, v, mask, backend="triton", return_lse=True)
    dq, dk, dv = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
    assert torch.isfinite(out).all() and not torch.isnan(lse).any()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all()
    for b, n in enumerate(lengths):
        assert (dk[b, :, n:] == 0).all() and (dv[b, :, n:] == 0).all()
    ref = qkv.attention(q.detach().double(), k.detach().double(), v.detach().double(), mask, backend="reference")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6)


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_nan_at_a_visible_score_makes_the_row_nan():
    q, k, v = (torch.randn(1, 1, N, 16, device=DEVICE) for _ in range(3))
    k[0, 0, 3, 0] = float("nan")
    out, lse = qkv.attention(q, k, v, qkv.causal(), backend="triton", return_lse=True)
    assert torch.isnan(out[0, 0, 3:]).all() and torch.isnan(lse[0, 0, 3:]).all()
    assert torch.isfinite(out[0, 0, :3]).all()


@pytest.mark.parametrize("mask", ["window", "function"])
def test_explicit_positions_per_batch_element(mask):
    """q_offset / k_offset per batch element (a key chunk of a longer sequence, ragged rows)."""
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(2, 2, N, 16, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    m = qkv.sliding_window(9) & qkv.causal() if mask == "window" else \
        qkv.from_function(lambda b, h, i, j: (j <= i) & ((i - j) % 3 != 1), "every_third")
    slopes = scores.alibi_slopes(2).to(DEVICE)
    kw = dict(q_offset=torch.tensor([7, N + 5], device=DEVICE), k_offset=torch.tensor([0, 20], device=DEVICE),
              score_mod=scores.alibi(slopes))
    results = []
    for backend, dt in (("triton", torch.float32), ("reference", torch.float64)):
        args = [t.detach().to(dt).requires_grad_() for t in (q, k, v)]
        out, lse = qkv.attention(*args, m, backend=backend, return_lse=True, **kw)
        grads = torch.autograd.grad((out * torch.cos(torch.arange(out.numel(), device=DEVICE).view(out.shape))
                                     .to(dt)).sum(), args)
        results.append((out, lse, *grads))
    for got, want in zip(*results):
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=3e-6)


def test_strided_inputs_give_the_same_result():
    """(B, N, H, D) projections viewed as (B, H, N, D): no copy, same numbers, same gradients."""
    g = torch.Generator().manual_seed(9)
    base = [torch.randn(1, N, 2, 32, generator=g).to(DEVICE) for _ in range(3)]
    views = [t.clone().requires_grad_() for t in base]
    dense = [t.transpose(1, 2).contiguous().detach().requires_grad_() for t in base]
    results = []
    for q, k, v in ([t.transpose(1, 2) for t in views], dense):
        out = qkv.attention(q, k, v, qkv.causal(), backend="triton")
        grads = torch.autograd.grad((out * torch.arange(out.numel(), device=DEVICE).view(out.shape).cos()).sum(),
                                    [q, k, v])
        results.append([out, *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

