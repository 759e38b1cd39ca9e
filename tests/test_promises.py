"""The guarantees of docs/attention.md ("Guarantees"), on every backend and dtype:

* a row with nothing to attend to gives zeros, ``lse = -inf`` and zero gradients (also when the
  kernel underneath returns something else, as cuDNN does in float16/bfloat16);
* keys and values at positions the mask hides from every query never influence any output or
  gradient, even NaN or inf (padded batches, unused cache slots);
* NaN or inf that reaches a visible score makes that row's output and lse NaN, alike everywhere.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import qkv
from qkv.backends import sdpa as sdpa_module
from qkv.cache import PagedKVCache
from qkv.problem import make_problem
from tests.decoders import TOL, make_model
from tests.strategies import cases

BACKENDS = ["reference", "tiled", "sdpa"]
LOW = [torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")


def randn(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape).to(dtype).requires_grad_(grad)


def max_abs(t) -> float:
    return t.abs().max().item() if t.numel() else 0.0


def grads(out, inputs, weight):
    return torch.autograd.grad((out.float() * weight).sum(), inputs, allow_unused=True)


# -- 1. empty rows --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", LOW + [torch.float32])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nq", [1, 37])
def test_rows_with_nothing_to_attend_are_zero_with_zero_gradients(backend, dtype, nq):
    q, k, v = randn(2, 4, nq, 16, dtype=dtype, grad=True), randn(2, 4, 50, 16, dtype=dtype, grad=True), \
        randn(2, 4, 50, 16, dtype=dtype, grad=True)
    out = qkv.attention(q, k, v, qkv.key_padding([0, 30]), backend=backend)
    assert out[0].abs().max().item() == 0.0 and bool(torch.isfinite(out[1]).all())
    dq, dk, dv = grads(out, (q, k, v), torch.randn(out.shape))
    assert dq[0].abs().max().item() == 0.0 and dk[0].abs().max().item() == 0.0 and dv[0].abs().max().item() == 0.0
    assert dq[1].abs().max().item() > 0 and dk[1, :, 30:].abs().max().item() == 0.0


def _kernel_with_garbage_rows(real):
    """An SDPA that, like cuDNN in float16/bfloat16, returns non-zero values (depending on q, so
    that their gradients are non-zero too) in rows whose mask hides every key."""

    def fake(q, k, v, attn_mask=None, **kwargs):
        out = real(q, k, v, attn_mask=attn_mask, **kwargs)
        if attn_mask is None:
            return out
        seen = attn_mask.any(-1, keepdim=True) if attn_mask.dtype == torch.bool else \
            (attn_mask != -INF).any(-1, keepdim=True)
        garbage = 0.76 + q.sum(-1, keepdim=True) * 0.1
        return torch.where(seen, out, garbage.to(out.dtype))

    return fake


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("float_mask", [False, True])
def test_sdpa_zeroes_empty_rows_whatever_the_kernel_returns(monkeypatch, dtype, float_mask):
    monkeypatch.setattr(sdpa_module.F, "scaled_dot_product_attention",
                        _kernel_with_garbage_rows(F.scaled_dot_product_attention))
    q, k, v = (randn(2, 4, n, 64, dtype=dtype, grad=True) for n in (30, 40, 40))
    mask = qkv.key_padding([0, 25])
    if float_mask:
        padded = torch.arange(40) >= torch.tensor([0, 25])[:, None, None, None]
        mask = torch.zeros(2, 1, 1, 40, dtype=dtype).masked_fill(padded, -INF)
    out = qkv.attention(q, k, v, mask, backend="sdpa")
    expected = qkv.attention(*(t.double() for t in (q, k, v)), mask if not float_mask else mask.double(),
                             backend="reference")
    assert out[0].abs().max().item() == 0.0
    torch.testing.assert_close(out[1].double(), expected[1], atol=2e-2, rtol=2e-2)
    dq, dk, dv = grads(out, (q, k, v), torch.randn(out.shape))
    assert dq[0].abs().max().item() == 0.0 and dk[0].abs().max().item() == 0.0
    assert bool(torch.isfinite(dq).all())
    # A one-token decode step over a sequence with nothing visible.
    out = qkv.attention(q[:, :, -1:], k, v, mask, backend="sdpa")
    assert out[0].abs().max().item() == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (cuDNN's SDPA kernel)")
@pytest.mark.parametrize("dtype", LOW)
def test_cuda_empty_rows_are_zero(dtype):
    q, k, v = (torch.randn(2, 4, 300, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    for backend in (None, "sdpa", "tiled", "reference"):
        out = qkv.attention(q, k, v, qkv.key_padding([0, 200]), backend=backend)
        assert out[0].abs().max().item() == 0.0, backend
        dq, = torch.autograd.grad(out.float().sum(), q)
        assert dq[0].abs().max().item() == 0.0 and bool(torch.isfinite(dq).all()), backend
        step = qkv.attention(q[:, :, -1:], k, v, qkv.key_padding([0, 200]), backend=backend)
        assert step[0].abs().max().item() == 0.0, backend


# -- 2. garbage in hidden keys -------------------------------------------------------------------

def _poison(t, where, value):
    t = t.detach().clone()
    t[where] = value
    return t.requires_grad_()


@pytest.mark.parametrize("value", [NAN, INF, -INF])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask_kind", ["padding", "float", "causal_window"])
def test_garbage_in_hidden_keys_changes_nothing(backend, dtype, value, mask_kind):
    B, H, N, D = 2, 2, 64, 16
    q, k, v = (randn(B, H, N, D, dtype=dtype, grad=True) for _ in range(3))
    hidden = torch.zeros(B, 1, N, 1, dtype=torch.bool)
    hidden[:, :, 60:] = True
    hidden[1, :, 40:] = True
    if mask_kind == "padding":
        mask = qkv.key_padding([60, 40])
    elif mask_kind == "float":
        mask = torch.randn(B, 1, 1, N).to(dtype).masked_fill(hidden.transpose(-1, -2), -INF)
    else:  # hides keys 60.. (Nq < Nk: the queries sit at positions 0..39)
        mask = qkv.sliding_window(20) & qkv.key_padding([60, 40])
        q = randn(B, H, 40, D, dtype=dtype, grad=True)
    weight = torch.randn(q.shape[:-1] + (D,))
    clean = qkv.attention(q, k, v, mask, backend=backend)
    where = hidden.expand(B, H, N, D)
    k2, v2 = _poison(k, where, value), _poison(v, where, value)
    dirty = qkv.attention(q, k2, v2, mask, backend=backend)
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0)
    (dq, dk, dv), (dq2, dk2, dv2) = grads(clean, (q, k, v), weight), grads(dirty, (q, k2, v2), weight)
    torch.testing.assert_close(dq2, dq, atol=0, rtol=0)
    torch.testing.assert_close(dk2, dk, atol=0, rtol=0)
    torch.testing.assert_close(dv2, dv, atol=0, rtol=0)
    assert dk2[where].abs().max().item() == 0.0 and dv2[where].abs().max().item() == 0.0


def test_garbage_in_unused_paged_cache_slots_changes_nothing():
    """Pages reused from freed sequences (here: NaN, +inf) hold keys no query of the batch may see."""
    model = make_model()
    ids = torch.randint(0, 37, (3, 16))
    lengths = torch.tensor([3, 11, 7])
    results = []
    for garbage in (0.0, NAN, INF):
        pool = PagedKVCache(num_pages=40, page_size=4, **model.cache_spec())
        pool.k_pages.fill_(garbage)
        pool.v_pages.fill_(garbage)
        batch = pool.batch([pool.add_sequence() for _ in range(3)])
        logits = [model(ids[:, :11], batch, lengths=lengths)]
        for t, backend in enumerate(("sdpa", "tiled", "reference")):
            logits.append(model(ids[torch.arange(3), lengths + t][:, None], batch, backend=backend))
        results.append(logits)
    for other in results[1:]:
        for a, b in zip(results[0][1:], other[1:]):
            torch.testing.assert_close(b, a, **TOL)
        for row, n in enumerate(lengths.tolist()):
            torch.testing.assert_close(other[0][row, :n], results[0][0][row, :n], **TOL)


def test_garbage_in_unused_contiguous_cache_slots_changes_nothing():
    from qkv.cache import KVCache

    model = make_model()
    ids = torch.randint(0, 37, (2, 12))
    lengths = torch.tensor([4, 9])
    results = []
    for garbage in (0.0, NAN):
        cache = KVCache(batch_size=2, capacity=16, **model.cache_spec())
        cache.k.fill_(garbage)
        cache.v.fill_(garbage)
        first = model(ids[:, :9], cache, lengths=lengths)
        steps = [model(ids[torch.arange(2), lengths + t][:, None], cache, backend=b)
                 for t, b in enumerate(("sdpa", "tiled", "reference"))]
        results.append((first, steps))
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, **TOL)


def test_garbage_in_empty_streaming_cache_slots_changes_nothing():
    from qkv.cache import StreamingKVCache

    model = make_model()
    ids = torch.randint(0, 37, (2, 9))
    results = []
    for garbage in (0.0, NAN):
        cache = StreamingKVCache(batch_size=2, sinks=2, window=6, **model.cache_spec())
        cache.k.fill_(garbage)  # slots not yet holding a token (position -1)
        cache.v.fill_(garbage)
        results.append([model(ids[:, :3], cache)] + [model(ids[:, t:t + 1], cache, backend=b)
                                                       for t, b in zip(range(3, 9), BACKENDS * 2)])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, **TOL)


# -- 3. NaN that reaches a visible score ----------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [8, 140])
def test_nan_reaching_a_visible_score_is_nan_on_every_backend(dtype, n):
    q, k, v = (randn(1, 2, n, 64, dtype=dtype) for _ in range(3))
    bad_q = q.clone()
    bad_q[0, 0, 2] = NAN
    bad_q[0, 1, 3, 0] = INF
    bias = torch.zeros(n, n, dtype=dtype)
    bias[4, 1] = NAN
    bias[5, 0] = INF
    bias[6] = -INF  # hidden, not poisoned: an empty row
    poisoned_q = torch.zeros(2, n, dtype=torch.bool)
    poisoned_q[0, 2] = poisoned_q[1, 3] = True
    poisoned_bias = torch.zeros(2, n, dtype=torch.bool)
    poisoned_bias[:, 4:6] = True
    empty = torch.zeros(2, n, dtype=torch.bool)
    empty[:, 6] = True
    for backend in BACKENDS:
        for args, rows, zero in (((bad_q, k, v, qkv.causal()), poisoned_q, None),
                                 ((q, k, v, bias), poisoned_bias, empty)):
            out = qkv.attention(*args, backend=backend)[0]
            assert bool(out[rows].isnan().all()), backend
            finite = ~rows if zero is None else ~rows & ~zero
            assert bool(torch.isfinite(out[finite]).all()), backend
            if zero is not None:
                assert out[zero].abs().max().item() == 0.0, backend
    for backend in ("reference", "tiled"):
        _, lse = qkv.attention(bad_q, k, v, qkv.causal(), return_lse=True, backend=backend)
        assert bool(lse[0, 0, 2].isnan()) and bool(lse[0, 1, 3].isnan()) and bool(torch.isfinite(lse[0, 0, 3:]).all())
        _, lse = qkv.attention(q, k, v, bias, return_lse=True, backend=backend)
        assert bool(lse[0, :, 4:6].isnan().all()) and bool((lse[0, :, 6] == -INF).all())


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_nan_from_a_score_mod_propagates(backend):
    q, k, v = (randn(1, 1, 20, 8) for _ in range(3))

    def poison_row_3(score, b, h, qpos, kpos):
        return torch.where((qpos == 3) & (kpos == 1), NAN, score)

    out, lse = qkv.attention(q, k, v, qkv.causal(), score_mod=poison_row_3, return_lse=True, backend=backend)
    assert bool(out[0, 0, 3].isnan().all()) and bool(lse[0, 0, 3].isnan())
    assert bool(torch.isfinite(out[0, 0, 4:]).all()) and bool(torch.isfinite(lse[0, 0, 4:]).all())


# -- Dv = 0 ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["reference", "tiled", None])
def test_zero_value_dim_still_returns_the_real_lse(backend):
    q, k = randn(2, 2, 5, 8, dtype=torch.float64, grad=True), randn(2, 2, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 2, 7, 0, dtype=torch.float64)
    out, lse = qkv.attention(q, k, v, qkv.causal(), return_lse=True, backend=backend)
    assert out.shape == (2, 2, 5, 0)
    dense = qkv.causal().bind(2, 2, 5, 7, "cpu").dense(2, 2, 5, 7)
    expected = torch.logsumexp((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~dense, -INF), -1)
    torch.testing.assert_close(lse, expected)
    lse.sum().backward()
    assert q.grad.abs().max() > 0


# -- the fuzz test: masks x backends x dtypes, with NaN/inf in hidden keys ------------------------

def _hidden_keys(case):
    """Bool ``(B, Hkv, Nk)``: keys no query of any head of their group may see."""
    p = make_problem(case.q, case.k, case.v, **case.kwargs)
    B, Hq, Nq, Nk = p.batch, p.q_heads, p.nq, p.nk
    seen = torch.ones(B, Hq, Nq, Nk, dtype=torch.bool)
    if p.mask is not None:
        seen = seen & p.mask.dense(B, Hq, Nq, Nk)
    if p.bias is not None:
        seen = seen & (p.bias != -INF)
    return ~seen.reshape(B, p.kv_heads, p.group * Nq, Nk).any(2), ~seen.any(-1)


@settings(max_examples=40)
@given(data=st.data(), backend=st.sampled_from(BACKENDS), dtype=st.sampled_from([torch.float64, torch.float32,
                                                                                 torch.bfloat16, torch.float16]),
       value=st.sampled_from([NAN, INF, -INF, 3e4]))
def test_fuzz_hidden_garbage_and_empty_rows(data, backend, dtype, value):
    mods = ["none", "bias"] if backend == "sdpa" else ["none", "alibi", "softcap", "relative", "bias"]
    case = data.draw(cases(dtype=dtype, grad=True, mod_kinds=mods, max_n=24))
    if isinstance(case.kwargs["mask"], torch.Tensor) and case.kwargs["mask"].is_floating_point():
        bias = case.kwargs["mask"].detach()  # hide some entries with -inf
        drop = torch.rand(bias.shape) < 0.3
        case.kwargs["mask"] = bias.masked_fill(drop, -INF).requires_grad_(bias.requires_grad)
        case.learnable = [case.kwargs["mask"]] if bias.requires_grad else []
    hidden, empty_rows = _hidden_keys(case)
    kwargs = dict(case.kwargs, backend=backend)
    clean = qkv.attention(case.q, case.k, case.v, **kwargs)
    where = hidden[..., None].expand_as(case.k)
    k2 = _poison(case.k, where, value)
    v2 = _poison(case.v, hidden[..., None].expand_as(case.v), value)
    dirty = qkv.attention(case.q, k2, v2, **kwargs)
    torch.testing.assert_close(dirty, clean, atol=0, rtol=0, equal_nan=False, msg=case.label)
    assert bool(torch.isfinite(clean).all()), case.label
    assert max_abs(dirty.masked_select(empty_rows[..., None])) == 0.0, case.label
    weight = torch.randn(clean.shape)
    g_clean = grads(clean, (case.q, case.k, case.v), weight)
    g_dirty = grads(dirty, (case.q, k2, v2), weight)
    for a, b, name in zip(g_clean, g_dirty, "qkv"):
        torch.testing.assert_close(b, a, atol=0, rtol=0, msg=f"d{name}: {case.label}")
    assert max_abs(g_dirty[1].masked_select(where)) == 0.0, case.label
    assert max_abs(g_dirty[0].masked_select(empty_rows[..., None].expand_as(case.q))) == 0.0, case.label


# -- 4. block views and estimates that cost O(tiles) ----------------------------------------------

def test_a_forced_backend_is_checked_not_estimated(monkeypatch):
    from qkv.backends import REGISTRY

    def no_estimates(self, *args, **kwargs):
        raise AssertionError("estimated although the backend was forced")

    for backend in REGISTRY.values():
        monkeypatch.setattr(type(backend), "estimate", no_estimates)
    monkeypatch.setattr(qkv.masks.TensorMask, "block_kinds", no_estimates)
    q = randn(1, 2, 300, 16)
    mask = torch.rand(300, 300) > 0.5
    report = qkv.explain_dispatch(q, q, q, mask, backend="sdpa")
    assert report.chosen == "sdpa" and report.forced and "not estimated (backend forced)" in str(report)
    qkv.attention(q, q, q, mask, backend="sdpa")
    with pytest.raises(ValueError, match="backend='sdpa' cannot run this problem: return_lse.*Backends that can: "
                                         "reference, tiled"):
        qkv.attention(q, q, q, mask, backend="sdpa", return_lse=True)


def test_tile_counting_reads_the_mask_in_bands_without_an_int_copy(monkeypatch):
    from qkv import masks

    big = torch.rand(1, 1, 1000, 700) > 0.3
    expected = masks.count_tiles(big, 128, 64)
    monkeypatch.setattr(masks, "_EVAL_CHUNK_ELEMENTS", 128 * 64 * 11)  # one tile row per band
    real_to = torch.Tensor.to

    def no_int_copies(self, *args, **kwargs):
        if self.numel() > 128 * 704 * 2 and any(a in (torch.int32, torch.int64) for a in args):
            raise AssertionError("converted a whole mask to an integer dtype")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", no_int_copies)
    banded = masks.count_tiles(big, 128, 64)
    assert torch.equal(banded, expected)
    dense = big[0, 0]
    for i in range(8):
        for j in range(11):
            tile = dense[i * 128:(i + 1) * 128, j * 64:(j + 1) * 64]
            kind = masks.EMPTY if not tile.any() else masks.FULL if tile.all() else masks.PARTIAL
            assert int(banded[0, 0, i, j]) == int(kind)


def test_the_tiled_estimate_charges_float_masks():
    """Refitted with benchmarks/tiled_bias_cost.py: a float mask made the tiled forward x1.24-1.62
    slower at N = 1k-16k (AVX-512 machine), x1.17-1.38 at 1k-2k (AVX2); the estimate must say so
    (it said x1.00)."""
    from qkv.backends import REGISTRY

    q = torch.empty(1, 4, 4096, 64, device="meta")
    plain = REGISTRY["tiled"].estimate(make_problem(q, q, q))
    biased = REGISTRY["tiled"].estimate(make_problem(q, q, q, torch.empty(4096, 4096, device="meta")))
    assert 1.3 < biased / plain < 1.8


def test_the_estimates_charge_a_score_modifier_by_its_work():
    """Measured with benchmarks/score_mod_cost.py (one AVX2 thread, N = 1k-2k): a modifier costs
    tiled ~1.4 ns per visited score and unit of work (a temporary per operation), compiled flex
    ~0.8 (fused), the reference as much as tiled on every score. The estimates said +0 before."""
    from qkv.backends import REGISTRY, costs
    from qkv.backends.flex import RATES as FLEX_RATES

    q = torch.empty(1, 4, 4096, 64, device="meta")
    heavy = qkv.scores.ScoreMod(lambda s, b, h, q, k: s, work=10.0)
    free = qkv.scores.ScoreMod(lambda s, b, h, q, k: s, work=0.0)
    scores = 4 * 4096 * 4096
    cpu = costs.RATES["cpu"]
    for name, per_work in (("tiled", cpu.mod_score_per_work), ("reference", cpu.mod_score_per_work),
                           ("flex", FLEX_RATES["cpu"].mod_per_work)):
        backend = REGISTRY[name]
        extra = backend.estimate(make_problem(q, q, q, score_mod=heavy)) - backend.estimate(make_problem(q, q, q, score_mod=free))
        threads = costs.parallel(make_problem(q, q, q))
        assert extra == pytest.approx(scores * 10.0 * per_work / threads, rel=1e-6), name
    assert 1.5 < cpu.mod_score_per_work / FLEX_RATES["cpu"].mod_per_work < 2.5


def test_flex_keeps_nan_values_at_hidden_keys_out():
    """Flex multiplies hidden weights (zero) by their values, so the backend must keep NaN/inf
    values at hidden keys away from the kernel; visible NaN still propagates."""
    from qkv.backends.flex import FlexBackend

    flex = FlexBackend(compiled=False)
    q, k, v = randn(2, 2, 20, 16), randn(2, 2, 64, 16), randn(2, 2, 64, 16)
    k[:, :, 60:], v[:, :, 60:] = NAN, INF
    v[:, :, 50] = NAN  # hidden for batch 1 (length 40), visible for batch 0
    mask = qkv.key_padding([60, 40])
    out, _ = flex.run(make_problem(q, k, v, mask))
    want = qkv.attention(q, k[:, :, :40], v[:, :, :40], backend="reference")
    assert bool(torch.isfinite(out[1]).all())
    torch.testing.assert_close(out[1], want[1], atol=1e-5, rtol=1e-5)
    assert bool(torch.isnan(out[0]).all())  # a visible NaN value reaches every row of batch 0
