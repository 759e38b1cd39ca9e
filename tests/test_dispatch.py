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
