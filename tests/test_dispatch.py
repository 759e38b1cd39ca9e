"""The dispatcher: every backend states what it cannot do, auto picks among the rest, and the
decision can be explained without running anything."""

import torch

import qkv
from qkv.backends import REGISTRY
from qkv.dispatch import choose
from qkv.problem import make_problem


def meta(*shape):
    return torch.empty(*shape, device="meta")


def test_explain_dispatch_on_meta_tensors_runs_nothing():
    q, k = meta(1, 8, 16384, 64), meta(1, 8, 16384, 64)
    report = qkv.explain_dispatch(q, k, k, qkv.sliding_window(512))
    assert report.chosen == "tiled"  # skipping ~97% of tiles beats a dense masked SDPA
    text = str(report)
    assert "chosen:  tiled" in text and "sliding_window(512, 0)" in text
    assert "sdpa" in text and "meta tensors: nothing to run" in text


def test_reasons_are_listed_for_every_backend_that_cannot_run():
    q = torch.randn(1, 2, 8, 16)
    report = qkv.explain_dispatch(q, q, q, score_mod=qkv.scores.softcap(10.0), return_lse=True)
    assert report.estimates["sdpa"] is None
    assert any("score_mod" in r for r in report.reasons["sdpa"])
    assert any("return_lse" in r for r in report.reasons["sdpa"])
    assert report.chosen in ("tiled", "reference")
    assert "cannot run: score_mod" in str(report)


def test_auto_picks_the_lowest_estimate_among_supporting_backends():
    q = torch.randn(2, 4, 64, 32)
    for mask in (None, qkv.causal(), qkv.sliding_window(8), qkv.key_padding([10, 64])):
        problem = make_problem(q, q, q, mask)
        d = choose(problem)
        able = {n: e for n, e in d.estimates.items() if e is not None}
        assert d.chosen == min(able, key=able.get)
        assert set(d.estimates) == set(REGISTRY)


def test_forced_backend_is_used():
    q = torch.randn(1, 1, 8, 8)
    d = qkv.explain_dispatch(q, q, q, backend="reference")
    assert d.chosen == "reference" and d.forced and "forced" in str(d)


def test_sdpa_refuses_a_dense_mask_it_would_have_to_build_beyond_the_limit():
    q = meta(8, 16, 32768, 64)
    report = qkv.explain_dispatch(q, q, q, qkv.sliding_window(128))
    assert any("GiB" in r for r in report.reasons["sdpa"])


def test_a_forced_backend_is_checked_alone_and_not_estimated(monkeypatch):
    asked = []
    for name, backend in REGISTRY.items():
        for method in ("unsupported", "estimate"):
            original = getattr(backend, method)
            monkeypatch.setattr(backend, method, lambda p, _o=original, _n=name, _m=method: asked.append((_n, _m))
                                or _o(p))
    q = torch.randn(1, 2, 8, 16)
    d = qkv.explain_dispatch(q, q, q, qkv.causal(), backend="tiled")
    assert d.backend is REGISTRY["tiled"] and d.chosen == "tiled"
    assert asked == [("tiled", "unsupported")] and all(e is None for e in d.estimates.values())


def test_a_function_mask_is_never_evaluated_just_to_estimate():
    calls = []

    def banded(b, h, q, k):
        calls.append(1)
        return (q - k).abs() < 64

    q = meta(1, 4, 8192, 64)
    d = qkv.explain_dispatch(q, q, q, qkv.from_function(banded))
    assert calls == [] and d.estimates["tiled"] is not None
    d = qkv.explain_dispatch(q, q, q, qkv.from_function(banded) & qkv.causal(), backend="tiled")
    assert calls == []


def test_dispatch_returns_the_backend_object_and_capabilities_give_the_reasons():
    from qkv.backends.capabilities import Capabilities, reasons

    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    d = choose(make_problem(q, q, q))
    assert d.backend is REGISTRY[d.chosen]
    caps = Capabilities(backward=False, dtypes=(torch.float16,), head_dims=(32, 256),
                        why={"backward": "forward-only kernel"})
    said = reasons(caps, make_problem(q, q, q))
    assert said == ["backward: forward-only kernel",
                    "dtype: not supported (got torch.float32; supported: float16)",
                    "head_dim: not supported (got 16; supported: 32..256)"]
    with torch.no_grad():
        assert not any(r.startswith("backward") for r in reasons(caps, make_problem(q, q, q)))
    assert reasons(REGISTRY["sdpa"].capabilities, None) == [
        "score_mod: SDPA has no score modifier hook",
        "return_lse: SDPA's public API does not return the log-sum-exp",
        "dropout_p > 0: SDPA draws its own dropout mask, which `generator` cannot reproduce and which "
        "differs from the other backends'"]


def _count_estimates(monkeypatch):
    asked = []
    for name, backend in REGISTRY.items():
        original = backend.estimate
        monkeypatch.setattr(backend, "estimate", lambda p, _o=original, _n=name: asked.append(_n) or _o(p))
    return asked


def test_a_running_call_remembers_its_choice_on_the_mask_object(monkeypatch):
    """qkv.attention's calls with one mask object and one signature estimate once; the choice is
    the one explain_dispatch computes afresh, and a changed table, shape or reset estimates again."""
    from qkv import fastpath

    fastpath.clear()
    monkeypatch.setattr(REGISTRY["flex"], "compile_pending", lambda p: False)  # no ski rental in play
    asked = _count_estimates(monkeypatch)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    ids = torch.tensor([0] * 13 + [1] * 27)
    mask = qkv.document(ids)
    first = qkv.attention(q, k, v, mask)
    estimated = len(asked)
    assert estimated > 0
    assert torch.equal(qkv.attention(q, k, v, mask), first) and len(asked) == estimated  # remembered
    d = qkv.explain_dispatch(q, k, v, mask)
    assert len(asked) == 2 * estimated  # explain estimates afresh ...
    assert choose(make_problem(q, k, v, mask), learn=True).chosen == d.chosen  # ... and agrees
    ids[20:] = 2  # a table changed in place is a different mask
    qkv.attention(q, k, v, mask)
    assert len(asked) == 3 * estimated
    qkv.attention(q[:, :, :30], k, v, mask)  # another shape
    assert len(asked) == 4 * estimated
    fastpath.clear()  # after the cost model changed
    qkv.attention(q, k, v, mask)
    assert len(asked) == 5 * estimated
    counts = []
    for _ in range(2):  # with a score modifier: never remembered
        before = len(asked)
        qkv.attention(q, k, v, mask, score_mod=qkv.scores.softcap(5.0))
        counts.append(len(asked) - before)
    assert counts[0] == counts[1] > 0


def test_a_choice_is_not_remembered_while_a_compile_is_pending(monkeypatch):
    """flex's ski rental learns from every automatic choice until its compile has paid off."""
    monkeypatch.setattr(REGISTRY["flex"], "compile_pending", lambda p: True)
    asked = _count_estimates(monkeypatch)
    q = torch.randn(1, 2, 40, 16)
    mask = qkv.sliding_window(8)
    qkv.attention(q, q, q, mask)
    once = len(asked)
    qkv.attention(q, q, q, mask)
    assert len(asked) == 2 * once


def test_registering_a_backend_forgets_remembered_decisions(monkeypatch):
    """A backend registered after calls were decided is considered from the next call on, by the
    fast path and by the choices remembered on mask objects alike."""
    from qkv import backends
    from qkv.backends.reference import ReferenceBackend

    class Cheapest(ReferenceBackend):
        name = "cheapest"

        def estimate(self, problem):
            return 0.0

    q = torch.randn(1, 2, 1, 16)
    k = torch.randn(1, 2, 30, 16)
    mask = qkv.sliding_window(8)
    monkeypatch.setattr(REGISTRY["flex"], "compile_pending", lambda p: False)
    for _ in range(2):
        qkv.attention(q, k, k), qkv.attention(q, k, k, mask)  # decided and remembered
    ran = []
    cheapest = Cheapest()
    monkeypatch.setattr(cheapest, "run", lambda p: ran.append(p) or ReferenceBackend.run(cheapest, p))
    try:
        backends.register(cheapest)
        qkv.attention(q, k, k)
        qkv.attention(q, k, k, mask)
        assert len(ran) == 2
    finally:
        REGISTRY.pop("cheapest")
        backends.register(REGISTRY["reference"])  # forget again: decisions made with "cheapest"
