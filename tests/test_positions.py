"""Explicit positions (q_offset / k_offset) and merge_partials.

The ground truth is the whole problem at the default positions (checked against the textbook
oracle elsewhere): attention of a key chunk placed at its offset must equal the corresponding
columns of the whole problem, renormalised; chunks merged by lse must equal the whole result
(outputs, lse and gradients, float64); per-batch offsets must equal one call per batch element.
"""

import pytest
import torch

import qkv
from qkv.backends import reference
from qkv.masks import EMPTY, FULL, PARTIAL, TileGrid, TileKind, count_tiles
from qkv.positions import Positions
from qkv.problem import make_problem

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

B, H, D = 2, 2, 8
N = 29  # keys of the whole problem
CHUNKS = [(0, 7), (7, 19), (19, 29)]  # uneven, covering 0..N
BACKENDS = ["reference", "tiled", "tiled_16x8", "tiled_8x16"]


def _data(nq, nk, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, D, generator=g, dtype=torch.float64) for n in (nq, nk, nk))
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _cases():
    seg = torch.tensor([[0] * 9 + [1] * 11 + [2] * 9, [0] * 4 + [1] * 20 + [2] * 5])
    return {
        "causal": (qkv.causal(), None),
        "window": (qkv.sliding_window(5, 2), None),
        "document": (qkv.document(seg), None),
        "document_causal": (qkv.document(seg, causal=True), None),
        "key_padding": (qkv.key_padding([17, 29]), None),
        "prefix_lm": (qkv.prefix_lm([6, 12]), None),
        "alibi_causal": (qkv.causal(), qkv.scores.alibi(H)),
        "alibi_symmetric": (None, qkv.scores.alibi(H, symmetric=True)),
        "global_window": (qkv.sliding_window(3) | qkv.global_tokens([0, 13]), None),
    }


def _masked_lse_loss(out, lse, seed):
    g = torch.Generator().manual_seed(seed)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum() + \
        (finite * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()


def _close(got, want, what):
    both_inf = torch.isinf(got) & torch.isinf(want) & (got == want)
    diff = torch.where(both_inf, torch.zeros_like(got), got - want).abs().max().item()
    assert diff < 1e-10, f"{what}: max diff {diff}"


@pytest.mark.parametrize("nq", [N, 11])
@pytest.mark.parametrize("name", list(_cases()))
def test_a_key_chunk_at_its_offset_is_those_columns_of_the_whole_problem(name, nq):
    mask, mod = _cases()[name]
    q, k, v = _data(nq, N, seed=hash(name) % 1000 + nq, grad=False)
    whole = make_problem(q, k, v, mask, score_mod=mod)
    scores = reference.scores(whole)  # (B, H, Nq, N), -inf where masked
    for backend in BACKENDS:
        for c0, c1 in CHUNKS:
            out, lse = qkv.attention(q, k[:, :, c0:c1], v[:, :, c0:c1], mask, score_mod=mod, return_lse=True,
                                     q_offset=N - nq, k_offset=c0, backend=backend)
            weights, want_lse = reference.softmax_with_lse(scores[..., c0:c1])
            _close(lse, want_lse, f"{name} {backend} chunk {c0}:{c1} lse")
            _close(out, weights @ v[:, :, c0:c1], f"{name} {backend} chunk {c0}:{c1} out")


@pytest.mark.parametrize("nq", [N, 11])
@pytest.mark.parametrize("name", list(_cases()))
def test_chunks_merged_by_lse_equal_the_whole_problem_with_gradients(name, nq):
    mask, mod = _cases()[name]
    q, k, v = _data(nq, N, seed=hash(name) % 1000 + 2 * nq)
    want_out, want_lse = qkv.attention(q, k, v, mask, score_mod=mod, return_lse=True, backend="reference")
    want_grads = torch.autograd.grad(_masked_lse_loss(want_out, want_lse, 3), (q, k, v))
    for backend in ("reference", "tiled_16x8"):
        parts = [qkv.attention(q, k[:, :, c0:c1], v[:, :, c0:c1], mask, score_mod=mod, return_lse=True,
                               q_offset=N - nq, k_offset=c0, backend=backend) for c0, c1 in CHUNKS]
        out, lse = qkv.merge_partials([o for o, _ in parts], [s for _, s in parts])
        _close(out, want_out, f"{name} {backend} merged out")
        _close(lse, want_lse, f"{name} {backend} merged lse")
        grads = torch.autograd.grad(_masked_lse_loss(out, lse, 3), (q, k, v))
        for g, w, what in zip(grads, want_grads, "qkv"):
            assert torch.isfinite(g).all()
            _close(g, w, f"{name} {backend} merged d{what}")


def _per_batch_masks():
    g = torch.Generator().manual_seed(5)
    seg = torch.tensor([[0] * 10 + [1] * 30, [0] * 25 + [1] * 15, [0] * 3 + [1] * 3 + [2] * 34])
    return {
        "causal": (qkv.causal(), None),
        "window": (qkv.sliding_window(4, 1), None),
        "document": (qkv.document(seg, causal=True), None),
        "alibi": (qkv.causal(), qkv.scores.alibi(H)),
        "global": (qkv.sliding_window(2) | qkv.global_tokens([1, 20]), None),
        "block_sparse": (qkv.block_sparse(torch.rand(10, 10, generator=g) > 0.4, 4), None),
        "tensor": (qkv.from_tensor(torch.rand(3, 1, 9, 13, generator=g) > 0.3), None),
        "key_padding": (qkv.key_padding([30, 12, 40]), None),
    }


@pytest.mark.parametrize("name", list(_per_batch_masks()))
def test_per_batch_offsets_equal_one_call_per_batch_element(name):
    mask, mod = _per_batch_masks()[name]
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(3, H, n, D, generator=g, dtype=torch.float64) for n in (9, 13, 13))
    q_off, k_off = torch.tensor([20, 3, 8]), torch.tensor([14, 0, 10])
    for backend in ("reference", "tiled_8x16", "sdpa"):
        kwargs = dict(score_mod=mod, q_offset=q_off, k_offset=k_off)
        problem = make_problem(q, k, v, mask, **kwargs)
        if qkv.backends.REGISTRY[backend].unsupported(problem):
            continue
        out = qkv.attention(q, k, v, mask, backend=backend, **kwargs)
        for b in range(3):
            one = _select_batch(mask, b)
            want = qkv.attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], one, score_mod=mod, backend="reference",
                                 q_offset=int(q_off[b]), k_offset=int(k_off[b]))
            _close(out[b:b + 1], want, f"{name} {backend} batch {b}")


def _select_batch(mask, b):
    """The same mask for batch element ``b`` alone (per-batch tables sliced)."""
    if isinstance(mask, qkv.masks.Document):
        return qkv.document(mask.segment_ids[b], causal=mask.causal)
    if isinstance(mask, qkv.masks.TensorMask):
        return qkv.from_tensor(mask.tensor[b:b + 1])
    if isinstance(mask, qkv.masks.KeyPadding):
        return qkv.key_padding(mask.lengths[b:b + 1])
    return mask


@pytest.mark.parametrize("per_batch", [False, True])
def test_block_views_at_offsets_are_exact(per_batch):
    nq, nk, bq, bk = 11, 17, 4, 3
    batch = 3 if per_batch else 1
    q_off = torch.tensor([20, 3, 8]) if per_batch else 9
    k_off = torch.tensor([14, 0, 10]) if per_batch else 5
    positions = Positions.make(batch, nq, nk, q_off, k_off)
    seg = torch.tensor([0] * 12 + [1] * 9 + [2] * 15)  # covers positions 0..35
    g = torch.Generator().manual_seed(1)
    masks = [qkv.causal(), qkv.sliding_window(4, 2), qkv.document(seg), qkv.key_padding(21), qkv.prefix_lm(15),
             qkv.global_tokens([2, 19, 22]), qkv.block_sparse(torch.rand(12, 12, generator=g) > 0.5, 3),
             qkv.from_tensor(torch.rand(batch, 1, nq, nk, generator=g) > 0.5)]
    for mask in masks:
        bound = mask.bind(batch, H, nq, nk, torch.device("cpu"), positions=positions)
        kinds = bound.block_kinds(TileGrid(nq, nk, bq, bk, positions=positions), batch, H)
        dense = mask.dense(batch, H, nq, nk, positions=positions).expand(batch, H, nq, nk)
        truth = count_tiles(dense, bq, bk)
        assert torch.equal(kinds.expand_as(truth), truth), repr(mask)


def test_sdpa_is_causal_is_used_exactly_when_rows_and_keys_start_together():
    from qkv.backends.sdpa import uses_is_causal

    q, k, v = _data(5, 12, seed=3, grad=False)
    top_left = make_problem(q, k, v, qkv.causal(), q_offset=4, k_offset=4)
    assert uses_is_causal(top_left) and not uses_is_causal(make_problem(q, k, v, qkv.causal()))
    got = qkv.attention(q, k, v, qkv.causal(), q_offset=4, k_offset=4, backend="sdpa")
    want = qkv.attention(q, k, v, qkv.causal(), q_offset=4, k_offset=4, backend="reference")
    _close(got, want, "sdpa top-left causal")


def test_default_offsets_are_bottom_right():
    q, k, v = _data(3, 7, seed=4, grad=False)
    p = make_problem(q, k, v)
    assert (p.q_offset, p.k_offset) == (4, 0) and p.positions.is_default
    p = make_problem(q, k, v, k_offset=10)
    assert (p.q_offset, p.k_offset) == (14, 10)
    p = make_problem(q, k, v, k_offset=torch.tensor([1, 2]))
    assert p.q_offset.tolist() == [5, 6]
    assert "q_offset=14 k_offset=10" in str(qkv.explain_dispatch(q, k, v, k_offset=10))


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(q_offset=1.5), TypeError, "q_offset must be an int"),
    (dict(k_offset=torch.tensor([1.0, 2.0])), TypeError, "k_offset must hold integers"),
    (dict(k_offset=torch.tensor([1, 2, 3])), ValueError, r"k_offset must be an int or a \(B,\)"),
    (dict(k_offset=-1), ValueError, "k_offset must be >= 0"),
    (dict(q_offset=True), TypeError, "q_offset must be an int"),
    (dict(q_offset=10 ** 20), ValueError, r"q_offset must lie in \[-2\*\*53, 2\*\*53\]"),
    (dict(k_offset=torch.tensor(1 << 60)), ValueError, r"k_offset must lie in \[-2\*\*53, 2\*\*53\]"),
])
def test_bad_offsets_raise_clear_errors(kwargs, error, message):
    q, k, v = _data(3, 7, seed=4, grad=False)
    with pytest.raises(error, match=message):
        qkv.attention(q, k, v, **kwargs)


def test_tables_must_cover_the_positions_used():
    q, k, v = _data(3, 7, seed=4, grad=False)
    with pytest.raises(ValueError, match="key positions 10..16 are not covered by segment_ids of length 12"):
        qkv.attention(q, k, v, qkv.document([0] * 12), k_offset=10)
    with pytest.raises(ValueError, match="does not cover query positions up to 16"):
        qkv.attention(q, k, v, qkv.block_sparse(torch.ones(3, 3, dtype=torch.bool), 4), k_offset=10)


class _OldStyleMask(qkv.Mask):
    """A user mask written before positions existed: bind() without a positions parameter."""

    def bind(self, batch, heads, nq, nk, device):
        return self

    def allowed(self, b, h, q, k):
        return k <= q


def test_a_mask_whose_bind_predates_positions_still_works_at_default_positions():
    q, k, v = _data(3, 7, seed=4, grad=False)
    _close(qkv.attention(q, k, v, _OldStyleMask()), qkv.attention(q, k, v, qkv.causal()), "old-style mask")
    with pytest.raises(ValueError, match="takes no positions"):
        qkv.attention(q, k, v, _OldStyleMask(), k_offset=3)


# --------------------------------------------------------------------------------------------
# merge_partials
# --------------------------------------------------------------------------------------------


def test_merge_partials_of_rows_that_saw_nothing_is_zero_with_zero_gradients():
    g = torch.Generator().manual_seed(9)
    outs = [torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2)]
    lses = [torch.randn(1, 2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    lses[0][0, 0, 1] = lses[1][0, 0, 1] = float("-inf")  # row seen by no part
    lses[0][0, 1, 2] = float("-inf")  # row seen by the second part only
    lses = [s.requires_grad_() for s in lses]
    out, lse = qkv.merge_partials(outs, lses)
    assert torch.equal(out[0, 0, 1], torch.zeros(4, dtype=torch.float64)) and lse[0, 0, 1] == float("-inf")
    _close(out[0, 1, 2], outs[1][0, 1, 2], "row seen by one part")
    _close(lse[0, 1, 2], lses[1][0, 1, 2], "its lse")
    grads = torch.autograd.grad(_masked_lse_loss(out, lse, 1), (*outs, *lses))
    assert all(torch.isfinite(x).all() for x in grads)
    assert all(x[0, 0, 1].abs().sum() == 0 for x in grads)


def test_merge_partials_keeps_dtypes_and_checks_arguments():
    g = torch.Generator().manual_seed(2)
    out = torch.randn(1, 1, 2, 3, generator=g).to(torch.bfloat16)
    lse = torch.randn(1, 1, 2, generator=g)
    merged, merged_lse = qkv.merge_partials([out], [lse])
    assert merged.dtype == torch.bfloat16 and merged_lse.dtype == torch.float32
    assert torch.equal(merged, out)
    with pytest.raises(ValueError, match="one lse per output"):
        qkv.merge_partials([out, out], [lse])
    with pytest.raises(ValueError, match=r"lses\[0\] has shape"):
        qkv.merge_partials([out], [lse[..., :1]])
    with pytest.raises(TypeError, match="sequence of tensors"):
        qkv.merge_partials(out, lse)


def test_merge_partials_keeps_a_visible_nan_nan():
    """A row whose scores met NaN has NaN lse in its part; merged with parts that saw nothing
    (lse -inf) it stays NaN, output and lse, as the whole problem gives (not lse -inf)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 1, 4, 8, generator=g, dtype=torch.float64) for _ in range(3))
    q[0, 0, 3] = float("nan")
    whole, whole_lse = qkv.attention(q, k, v, qkv.causal(), return_lse=True)
    parts = [qkv.attention(q, k[:, :, a:b], v[:, :, a:b], qkv.causal(), return_lse=True, q_offset=0, k_offset=a)
             for a, b in [(0, 2), (2, 4)]]
    out, lse = qkv.merge_partials([o for o, _ in parts], [s for _, s in parts])
    assert parts[1][1][0, 0, 0] == float("-inf") and whole_lse[0, 0, 3].isnan()
    assert lse[0, 0, 3].isnan() and out[0, 0, 3].isnan().all()
    _close(out[0, 0, :3], whole[0, 0, :3], "rows without NaN")
    _close(lse[0, 0, :3], whole_lse[0, 0, :3], "their lse")


# --------------------------------------------------------------------------------------------
# Binding contract and tile kinds
# --------------------------------------------------------------------------------------------


def test_alibi_slopes_from_a_head_count_follow_q_to_meta():
    q = torch.empty(1, 8, 16, 8, device="meta")
    d = qkv.explain_dispatch(q, q, q, qkv.causal(), score_mod=qkv.scores.alibi(8))
    assert d.chosen in ("tiled", "reference")
    with pytest.raises(ValueError, match="tensor on cpu, but q is on meta; move it"):
        qkv.explain_dispatch(q, q, q, score_mod=qkv.scores.alibi(torch.ones(8, requires_grad=True)))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_alibi_slopes_from_a_head_count_follow_q_to_cuda():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 16, 8, generator=g).cuda() for _ in range(3))
    got = qkv.attention(q, k, v, qkv.causal(), score_mod=qkv.scores.alibi(8))
    want = qkv.attention(q.cpu(), k.cpu(), v.cpu(), qkv.causal(), score_mod=qkv.scores.alibi(8))
    torch.testing.assert_close(got.cpu(), want, atol=1e-5, rtol=1e-5)


def test_unbound_masks_bind_themselves_or_say_so():
    dense = qkv.global_tokens([0]).dense(1, 1, 4, 4)
    want = torch.zeros(4, 4, dtype=torch.bool)
    want[0, :] = want[:, 0] = True
    assert torch.equal(dense.expand(1, 1, 4, 4)[0, 0], want)
    b, h, q, k = qkv.masks.position_grid(1, 1, 4, 4, None)
    with pytest.raises(ValueError, match="not bound to a problem"):
        qkv.document([0, 0, 1, 1], q_segment_ids=[0, 1, 1, 1]).allowed(b, h, q, k)
    with pytest.raises(ValueError, match="not bound to a problem"):
        qkv.from_tensor(torch.ones(4, 4, dtype=torch.bool)).allowed(b, h, q, k)


def test_tile_kinds_are_an_int_enum_with_the_old_names():
    assert issubclass(TileKind, int) and (EMPTY, PARTIAL, FULL) == (0, 1, 2)
    assert EMPTY is TileKind.EMPTY and qkv.masks.FULL is TileKind.FULL
    assert TileKind(1).name == "PARTIAL"


def test_built_in_tables_follow_q_through_wrapping_modifiers():
    q = torch.empty(1, 8, 16, 8, device="meta")
    slopes = qkv.scores.alibi(8)
    wrapped = qkv.scores.ScoreMod(lambda s, b, h, qq, kk, t: slopes.fn(s, b, h, qq, kk, t), slopes.tensors)
    for mod in (wrapped, qkv.scores.chain(slopes, qkv.scores.softcap(5.0))):
        bound = mod.bind(1, 8, 16, 16, q.device)
        assert bound.tensors[0].device.type == "meta" and mod.tensors[0].device.type == "cpu"
