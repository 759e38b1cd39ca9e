"""Masks: element-wise semantics against plain-Python predicates, and block views.

A block view must be *sound* (a tile called EMPTY has no allowed element, a tile called FULL has no
disallowed one); built-ins whose view is analytic must also be *exact* (equal to counting the
dense mask), since a PARTIAL where EMPTY was possible is lost speed.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.masks import EMPTY, FULL, PARTIAL, Document, PrefixLM, TileGrid, count_tiles
from tests.oracle import dense_from_predicate

B, H = 2, 3


def dense(mask, nq, nk, batch=B, heads=H):
    bound = mask.bind(batch, heads, nq, nk, torch.device("cpu"))
    return bound.dense(batch, heads, nq, nk).expand(batch, heads, nq, nk)


def block_view(mask, nq, nk, bq, bk, batch=B, heads=H):
    bound = mask.bind(batch, heads, nq, nk, torch.device("cpu"))
    kinds = bound.block_kinds(TileGrid(nq, nk, bq, bk), batch, heads)
    return kinds.expand(batch, heads, *kinds.shape[2:])


def _cases(nq, nk):
    """(mask, predicate) pairs for every built-in, sized for an (nq, nk) problem."""
    lengths = [nk // 2, nk]
    seg = [min(j // 5, 3) for j in range(nk)]
    q_seg = [min(i // 4, 3) for i in range(nq)]
    g = torch.Generator().manual_seed(nq * 1000 + nk)
    layout = torch.rand(10, 10, generator=g) > 0.5
    glob = [0, nk - 1] if nk > 1 else [0]
    off = nk - nq
    cases = [
        (qkv.causal(), lambda b, h, q, k: k <= q),
        (qkv.sliding_window(3, 1), lambda b, h, q, k: q - 3 <= k <= q + 1),
        (qkv.sliding_window(0), lambda b, h, q, k: k == q),
        (qkv.key_padding(lengths), lambda b, h, q, k: k < lengths[b]),
        (qkv.key_padding(0), lambda b, h, q, k: False),
        (qkv.document(seg, q_segment_ids=q_seg), lambda b, h, q, k: q_seg[q - off] == seg[k]),
        (qkv.document(seg, causal=True, q_segment_ids=q_seg),
         lambda b, h, q, k: q_seg[q - off] == seg[k] and k <= q),
        (qkv.prefix_lm(3), lambda b, h, q, k: q >= 0 and (k < 3 or k <= q)),  # negative positions see nothing
        (qkv.global_tokens(glob), lambda b, h, q, k: q in glob or k in glob),
        (qkv.block_sparse(layout, 4), lambda b, h, q, k: q >= 0 and bool(layout[q // 4, k // 4])),
        (qkv.from_function(lambda b, h, q, k: (q + k + h) % 3 != 0, "mod3"),
         lambda b, h, q, k: (q + k + h) % 3 != 0),
    ]
    if nq <= nk:
        cases.append((qkv.document(seg), lambda b, h, q, k: seg[q] == seg[k]))
    return cases


SIZES = [(13, 13), (7, 19), (19, 7), (1, 9), (16, 16)]


@pytest.mark.parametrize("nq,nk", SIZES)
def test_builtin_masks_match_their_definition(nq, nk):
    for mask, pred in _cases(nq, nk):
        expected = dense_from_predicate(pred, B, H, nq, nk)
        assert torch.equal(dense(mask, nq, nk), expected), repr(mask)


@pytest.mark.parametrize("nq,nk", SIZES)
def test_combinators_follow_boolean_algebra(nq, nk):
    cases = _cases(nq, nk)
    for (m1, _), (m2, _) in zip(cases, cases[1:] + cases[:1]):
        d1, d2 = dense(m1, nq, nk), dense(m2, nq, nk)
        assert torch.equal(dense(m1 & m2, nq, nk), d1 & d2)
        assert torch.equal(dense(m1 | m2, nq, nk), d1 | d2)
        assert torch.equal(dense(~m1, nq, nk), ~d1)


def test_causal_is_bottom_right_aligned():
    # One query over four keys is the newest token: it sees all of them.
    assert dense(qkv.causal(), 1, 4, 1, 1).flatten().tolist() == [True] * 4
    # Three queries, two keys: the first query sits before every key and sees nothing.
    rows = dense(qkv.causal(), 3, 2, 1, 1)[0, 0].tolist()
    assert rows == [[False, False], [True, False], [True, True]]


def _check_view(mask, nq, nk, bq, bk, exact):
    kinds = block_view(mask, nq, nk, bq, bk)
    truth = count_tiles(dense(mask, nq, nk), bq, bk)
    assert kinds.shape == truth.shape
    assert not ((kinds == EMPTY) & (truth != EMPTY)).any(), f"{mask!r}: EMPTY tile that is not empty"
    assert not ((kinds == FULL) & (truth != FULL)).any(), f"{mask!r}: FULL tile that is not full"
    if exact:
        assert torch.equal(kinds, truth), f"{mask!r}: block view not exact"


@given(nq=st.integers(1, 40), nk=st.integers(1, 40), bq=st.sampled_from([1, 3, 4, 8, 16]),
       bk=st.sampled_from([1, 2, 5, 8, 16]))
def test_block_views_are_exact_for_builtins(nq, nk, bq, bk):
    for mask, _ in _cases(nq, nk):
        # Sorted, consecutive segment ids make the document view exact; a function mask is counted.
        # Views built from two parts (causal documents, prefix-LM) are only sound: two partial
        # tiles can combine into an empty (&) or a full (|) one.
        two_parts = isinstance(mask, PrefixLM) or (isinstance(mask, Document) and mask.causal)
        _check_view(mask, nq, nk, bq, bk, exact=not two_parts)


@given(nq=st.integers(1, 30), nk=st.integers(1, 30), bq=st.sampled_from([2, 4, 8]), bk=st.sampled_from([3, 4, 8]),
       i=st.integers(0, 11), j=st.integers(0, 11), op=st.sampled_from(["and", "or", "not"]))
def test_block_views_of_compositions_are_sound(nq, nk, bq, bk, i, j, op):
    cases = _cases(nq, nk)
    a, b = cases[i % len(cases)][0], cases[j % len(cases)][0]
    mask = {"and": a & b, "or": a | b, "not": ~a}[op]
    _check_view(mask, nq, nk, bq, bk, exact=False)


def test_document_view_with_unsorted_ids_is_evaluated_exactly():
    seg = [0, 1, 0, 1, 2, 2, 0, 1, 2, 0, 1, 1]
    _check_view(qkv.document(seg), 12, 12, 4, 4, exact=True)


def test_tensor_mask_block_view_handles_broadcast_dims():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(B, 1, 1, 21, generator=g) > 0.3  # key padding style: same for all rows
    _check_view(qkv.from_tensor(t), 17, 21, 4, 8, exact=True)


def test_per_batch_views_merge_conservatively():
    from qkv.masks import merge_over_batch_and_heads

    kinds = torch.tensor([[[[EMPTY, FULL, FULL]]], [[[EMPTY, FULL, EMPTY]]]], dtype=torch.int8)
    assert merge_over_batch_and_heads(kinds).tolist() == [[EMPTY, FULL, PARTIAL]]


def test_a_window_over_a_long_sequence_skips_most_tiles():
    n, w, tile = 65536, 1024, 128
    kinds = qkv.sliding_window(w).block_kinds(TileGrid(n, n, tile, tile), 1, 1)
    visited = (kinds != EMPTY).float().mean().item()
    assert visited < 1.5 * (w + tile) / n, visited  # about 1/57 of dense, not all of it


@pytest.mark.parametrize("make,message", [
    (lambda: qkv.sliding_window(-1), "left must be >= 0"),
    (lambda: qkv.sliding_window(2, -3), "right must be >= 0"),
    (lambda: qkv.sliding_window(2.5), "left must be an int"),
    (lambda: qkv.key_padding([1.5]), "integers"),
    (lambda: qkv.block_sparse(torch.ones(2, 2), 4), "bool tensor"),
    (lambda: qkv.block_sparse(torch.ones(2, 2, dtype=torch.bool), 0), "block_size"),
    (lambda: qkv.from_tensor(torch.ones(2, 2)), "bool tensor"),
    (lambda: qkv.causal() & 3, "cannot combine"),
])
def test_bad_mask_arguments_raise_clear_errors(make, message):
    with pytest.raises((TypeError, ValueError), match=message):
        make()


@pytest.mark.parametrize("mask,message", [
    (qkv.key_padding([3, 4, 5]), "3 entries, expected 1 or batch=2"),
    (qkv.key_padding([3, 99]), r"lengths must lie in \[0, Nk=10\]"),
    (qkv.document(list(range(7))), "length 7, expected Nk=10"),
    (qkv.global_tokens([10]), r"indices must lie in \[0, Nk=10\)"),
    (qkv.block_sparse(torch.ones(1, 1, dtype=torch.bool), 4), "does not cover Nk=10"),
    (qkv.from_tensor(torch.ones(3, 10, dtype=torch.bool)), "does not broadcast"),
])
def test_masks_that_do_not_fit_the_problem_raise(mask, message):
    with pytest.raises(ValueError, match=message):
        mask.bind(2, 3, 10, 10, torch.device("cpu"))


def test_document_without_query_ids_needs_nq_at_most_nk():
    with pytest.raises(ValueError, match="pass q_segment_ids"):
        qkv.document([0] * 5).bind(1, 1, 8, 5, torch.device("cpu"))
