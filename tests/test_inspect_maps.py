"""qkv.inspect maps: chosen rows and block-pooled maps equal indexing and pooling of the dense
``qkv.attention_weights`` (float64, fresh random inputs), for any mask, score modifier and GQA."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import qkv
from qkv.inspect import attention_rows, pooled_attention_map
from qkv.inspect import maps as maps_module
from qkv.masks import EMPTY


def random_inputs(batch=2, q_heads=4, kv_heads=2, nq=37, nk=45, dim=8, dtype=torch.float64, seed=None):
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    q = torch.randn(batch, q_heads, nq, dim, generator=g, dtype=dtype)
    k = torch.randn(batch, kv_heads, nk, dim, generator=g, dtype=dtype) * 1.5
    return q, k


def dense_pool(weights, block_q, block_k, reduce):
    """Pool ``(B, H, Nq, Nk)`` weights over tiles by explicit loops (ragged tails: real entries only)."""
    b, h, nq, nk = weights.shape
    out = torch.zeros(b, h, math.ceil(nq / block_q), math.ceil(nk / block_k), dtype=weights.dtype)
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            tile = weights[:, :, i * block_q:(i + 1) * block_q, j * block_k:(j + 1) * block_k]
            out[:, :, i, j] = tile.mean(dim=(-2, -1)) if reduce == "mean" else tile.amax(dim=(-2, -1))
    return out


def document_ids(nk):
    """A few sorted segments of uneven lengths over ``nk`` keys."""
    return torch.arange(nk) * 7 // (3 * nk + 1) + (torch.arange(nk) >= nk // 5).long()


MASKS = {
    "none": lambda nq, nk: None,
    "causal": lambda nq, nk: qkv.causal(),
    "window": lambda nq, nk: qkv.sliding_window(5, 2),
    "causal&window|global": lambda nq, nk: ((qkv.causal() & qkv.sliding_window(7))
                                            | qkv.global_tokens([0, min(11, nk - 1)])),
    "~causal": lambda nq, nk: ~qkv.causal(),
    "document_causal": lambda nq, nk: qkv.document(document_ids(nk), causal=True) if nq <= nk else qkv.causal(),
    "key_padding_with_empty_rows": lambda nq, nk: qkv.key_padding([0, max(nk - 9, 1)]),
    "prefix_lm": lambda nq, nk: qkv.prefix_lm(6),
    "block_sparse": lambda nq, nk: qkv.block_sparse(
        torch.tensor([[1, 0, 0, 1, 0], [1, 1, 0, 0, 1], [0, 1, 1, 0, 0], [1, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
                     dtype=torch.bool), math.ceil(nk / 5)),
    "from_function_per_head": lambda nq, nk: qkv.from_function(lambda b, h, q, k: (q - k) % (h + 2) != 1),
    "bool_tensor": lambda nq, nk: torch.rand(2, 1, nq, nk, generator=torch.Generator().manual_seed(nq)) > 0.4,
    "float_bias": lambda nq, nk: torch.randn(1, 4, nq, nk, dtype=torch.float64),
}

SHAPES = [(37, 45), (45, 37), (33, 33), (1, 45)]


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("nq,nk", SHAPES)
def test_rows_equal_rows_of_dense_weights(mask_name, nq, nk):
    q, k = random_inputs(nq=nq, nk=nk)
    mask = MASKS[mask_name](nq, nk)
    dense = qkv.attention_weights(q, k, mask=mask)
    rows = [0, nq // 2, nq - 1]
    got = attention_rows(q, k, mask, rows=rows, heads=[3, 0], chunk=16)
    torch.testing.assert_close(got, dense[:, [3, 0]][:, :, rows], rtol=1e-12, atol=1e-14)
    got_all_heads = attention_rows(q, k, mask, rows=-1)
    torch.testing.assert_close(got_all_heads, dense[:, :, -1:], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mask_name", MASKS)
@pytest.mark.parametrize("nq,nk", SHAPES)
@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_pooled_map_equals_pooled_dense_weights(mask_name, nq, nk, reduce):
    q, k = random_inputs(nq=nq, nk=nk)
    mask = MASKS[mask_name](nq, nk)
    dense = qkv.attention_weights(q, k, mask=mask)
    for block in [(8, 6), (16, 16), (5, 64)]:  # ragged tails both ways; one tile wider than Nk
        got = pooled_attention_map(q, k, mask, block=block, reduce=reduce, max_run=12)
        torch.testing.assert_close(got, dense_pool(dense, *block, reduce), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_grouped_heads_and_score_mods(kv_heads):
    q, k = random_inputs(kv_heads=kv_heads, nq=29, nk=41)
    score_mod = qkv.scores.chain(qkv.scores.alibi(4), qkv.scores.softcap(3.0))
    mask = qkv.causal() | qkv.global_tokens([2])
    dense = qkv.attention_weights(q, k, mask=mask, score_mod=score_mod, scale=0.3)
    rows = attention_rows(q, k, mask, rows=[4, 28], heads=[1, 2], score_mod=score_mod, scale=0.3)
    torch.testing.assert_close(rows, dense[:, [1, 2]][:, :, [4, 28]], rtol=1e-12, atol=1e-14)
    pooled = pooled_attention_map(q, k, mask, block=(7, 9), heads=[2, 1], score_mod=score_mod, scale=0.3)
    torch.testing.assert_close(pooled, dense_pool(dense[:, [2, 1]], 7, 9, "mean"), rtol=1e-12, atol=1e-14)


def test_given_lse_from_a_forward_pass_gives_the_same_weights():
    q, k = random_inputs(nq=40, nk=40)
    v = torch.randn(2, 2, 40, 5, dtype=torch.float64)
    mask = qkv.sliding_window(6) | qkv.global_tokens([0])
    _, lse = qkv.attention(q, k, v, mask, return_lse=True, backend="tiled")
    dense = qkv.attention_weights(q, k, mask=mask)
    torch.testing.assert_close(attention_rows(q, k, mask, rows=[3, 39], lse=lse), dense[:, :, [3, 39]],
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(pooled_attention_map(q, k, mask, block=8, reduce="max", lse=lse),
                               dense_pool(dense, 8, 8, "max"), rtol=1e-12, atol=1e-14)


def test_rows_that_see_nothing_are_zero():
    q, k = random_inputs(nq=20, nk=12)  # causal: the first 8 query rows sit before key 0
    rows = attention_rows(q, k, qkv.causal(), rows=list(range(20)))
    assert rows[:, :, :8].abs().max() == 0
    torch.testing.assert_close(rows[:, :, 8:].sum(-1), torch.ones(2, 4, 12, dtype=torch.float64))
    pooled = pooled_attention_map(q, k, qkv.causal(), block=4)
    assert pooled[:, :, :2].abs().max() == 0
    assert not torch.isnan(pooled).any()


@pytest.mark.parametrize("nq,nk", [(5, 0), (0, 5)])
@pytest.mark.parametrize("mask", [None, "causal"])
def test_empty_sequences_give_empty_maps(nq, nk, mask):
    """Nk = 0 or Nq = 0: a pooled map with no tiles along that side (not a reshape error)."""
    q, k = torch.randn(1, 2, nq, 8), torch.randn(1, 2, nk, 8)
    mask = qkv.causal() if mask else None
    assert pooled_attention_map(q, k, mask, block=2).shape == (1, 2, math.ceil(nq / 2), math.ceil(nk / 2))
    if nq:
        assert attention_rows(q, k, mask, rows=0).shape == (1, 2, 1, 0)


def test_mean_pooled_rows_keep_their_mass():
    """Every row's weights sum to 1, so a band of rows keeps its mass: sum_j mean_ij * width_j == 1
    (ragged last tiles included)."""
    q, k = random_inputs(nq=30, nk=30)
    pooled = pooled_attention_map(q, k, qkv.causal(), block=(8, 7))
    widths = torch.tensor([7, 7, 7, 7, 2], dtype=torch.float64)
    torch.testing.assert_close((pooled * widths).sum(-1), torch.ones(2, 4, 4, dtype=torch.float64))


def test_empty_tiles_are_never_scored(monkeypatch):
    q, k = random_inputs(nq=64, nk=64)
    mask = qkv.sliding_window(8)
    block = 8
    kinds = qkv.masks.merge_over_batch_and_heads(
        mask.block_kinds(qkv.masks.TileGrid(64, 64, block, block), 2, 4))
    seen = []
    original = maps_module._Scorer.scores

    def recording(self, q_rows, rows, c0, c1, masked):
        seen.append((int(rows[0]) // block, c0 // block, -(-c1 // block)))
        return original(self, q_rows, rows, c0, c1, masked)

    monkeypatch.setattr(maps_module._Scorer, "scores", recording)
    pooled = pooled_attention_map(q, k, mask, block=block)
    assert seen, "no tile was scored"
    for i, j0, j1 in seen:
        assert all(kinds[i, j] != EMPTY for j in range(j0, j1))
    assert sum(j1 - j0 for _, j0, j1 in seen) == 2 * int((kinds != EMPTY).sum())  # lse pass + weight pass
    assert pooled[..., kinds == EMPTY].abs().max() == 0


def test_float32_inputs_match_float32_dense_weights():
    q, k = random_inputs(nq=50, nk=50, dtype=torch.float32)
    dense = qkv.attention_weights(q, k, mask=qkv.causal())
    got = pooled_attention_map(q, k, qkv.causal(), block=16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, dense_pool(dense, 16, 16, "mean"), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(attention_rows(q, k, qkv.causal(), rows=[7]), dense[:, :, [7]],
                               rtol=1e-5, atol=1e-6)


@given(nq=st.integers(1, 40), nk=st.integers(1, 40), block_q=st.integers(1, 20), block_k=st.integers(1, 20),
       mask_name=st.sampled_from(sorted(MASKS)), reduce=st.sampled_from(["mean", "max"]),
       seed=st.integers(0, 2**31))
def test_pooled_map_property(nq, nk, block_q, block_k, mask_name, reduce, seed):
    mask = MASKS[mask_name](nq, nk)
    q, k = random_inputs(nq=nq, nk=nk, seed=seed)
    dense = qkv.attention_weights(q, k, mask=mask)
    got = pooled_attention_map(q, k, mask, block=(block_q, block_k), reduce=reduce, max_run=block_k * 2)
    torch.testing.assert_close(got, dense_pool(dense, block_q, block_k, reduce), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("call,message", [
    (lambda q, k: attention_rows(q, k, rows=[0, 99]), "rows must lie in"),
    (lambda q, k: attention_rows(q, k, rows=[]), "rows must name at least one"),
    (lambda q, k: attention_rows(q, k, rows=1.5), "rows must be an int"),
    (lambda q, k: attention_rows(q, k, rows=0, heads=torch.tensor([0.0])), "heads must hold integers"),
    (lambda q, k: attention_rows(q, k, rows=0, heads=[4]), "heads must lie in"),
    (lambda q, k: attention_rows(q, k, rows=0, lse=torch.zeros(2, 4)), r"lse must have shape \(B, Hq, Nq\)"),
    (lambda q, k: attention_rows(q, k, rows=0, chunk=0), "chunk must be a positive int"),
    (lambda q, k: pooled_attention_map(q, k, block=0), "block must be a positive int"),
    (lambda q, k: pooled_attention_map(q, k, block=(4, 4, 4)), "block must be a positive int"),
    (lambda q, k: pooled_attention_map(q, k, reduce="sum"), "reduce must be 'mean' or 'max'"),
    (lambda q, k: pooled_attention_map(q, k[:, :, :, :3]), "q and k must have the same head_dim"),
    (lambda q, k: pooled_attention_map(q, k, qkv.key_padding([99])), "key_padding: lengths must lie"),
])
def test_bad_arguments_raise_clear_errors(call, message):
    q, k = random_inputs(nq=10, nk=10)
    with pytest.raises((ValueError, TypeError), match=message):
        call(q, k)
