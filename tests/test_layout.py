"""Block layouts: per batch element and head, equal to counting the dense mask (CPU and meta),
FlexAttention's kv-block format, cached on the user's mask across calls, and per-sequence walks."""

import pytest
import torch

import qkv
from qkv.layout import EMPTY, FULL, PARTIAL, BlockLayout, merge_kinds, plan_runs
from qkv.masks import count_tiles
from qkv.problem import make_problem

pytestmark = pytest.mark.usefixtures("small_tiled_backends")

B, H = 2, 3


def _masks(nq, nk):
    g = torch.Generator().manual_seed(nq + nk)
    seg = torch.stack([torch.tensor([min(j // 5, 3) for j in range(nk)]),
                       torch.tensor([min(j // 9, 2) for j in range(nk)])])
    layout = torch.rand(B, H, 10, 10, generator=g) > 0.5
    heads = torch.tensor([0, 1, 2]).view(1, -1, 1, 1)
    masks = [qkv.causal(), qkv.sliding_window(3, 1), qkv.key_padding([nk // 2, nk]), qkv.document(seg),
             qkv.document(seg, causal=True), qkv.prefix_lm([2, 5]), qkv.global_tokens([0, nk - 1]),
             qkv.block_sparse(layout, 4), qkv.from_tensor(torch.rand(B, H, nq, nk, generator=g) > 0.4),
             qkv.from_function(lambda b, h, q, k: (k - q + h) % 3 != 0, "per_head")]
    return masks + [masks[0] & masks[2], masks[1] | masks[6], ~masks[3], masks[7] & ~masks[0]]


def _truth(mask, nq, nk, bq, bk):
    dense = mask.dense(B, H, nq, nk).expand(B, H, nq, nk)
    return count_tiles(dense, bq, bk)


def _is_sound(kinds, truth):
    return not ((kinds == EMPTY) & (truth != EMPTY)).any() and not ((kinds == FULL) & (truth != FULL)).any()


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("nq,nk,bq,bk", [(16, 16, 4, 4), (11, 23, 4, 8), (9, 20, 8, 3)])
def test_layout_per_batch_and_head_equals_the_dense_mask(device, nq, nk, bq, bk):
    q = torch.randn(B, H, nq, 4, device=device)
    k = torch.randn(B, H, nk, 4, device=device)
    for mask in _masks(nq, nk):
        if isinstance(mask, qkv.masks.TensorMask) and device == "meta":
            continue  # a materialised mask lives on q's device; nothing to count on meta
        layout = make_problem(q, k, k, mask).layout(bq, bk)
        assert layout.kinds.device.type == "cpu" and layout.kinds.dtype == torch.int8
        truth = _truth(mask, nq, nk, bq, bk)
        kinds = layout.kinds.expand_as(truth)
        assert _is_sound(kinds, truth), repr(mask)
        if not isinstance(mask, (qkv.masks._Combined, qkv.masks.PrefixLM)) and not getattr(mask, "causal", False):
            assert torch.equal(kinds, truth), repr(mask)
        assert torch.equal(layout.merged(), merge_kinds(truth)) or _is_sound(layout.merged(), merge_kinds(truth))


def test_per_head_masks_keep_their_own_tiles():
    nq = nk = 16
    per_head = qkv.from_function(lambda b, h, q, k: (h == 0) | (k == q), "head0_full")
    layout = make_problem(torch.randn(1, 2, nq, 4), torch.randn(1, 2, nk, 4), torch.randn(1, 2, nk, 4),
                          per_head).layout(4, 4)
    assert layout.kinds.shape == (1, 2, 4, 4)
    assert (layout.kinds[0, 0] == FULL).all() and (layout.kinds[0, 1] == EMPTY).sum() == 12


def test_kv_blocks_are_flex_from_kv_blocks_arguments():
    g = torch.Generator().manual_seed(3)
    kinds = torch.randint(0, 3, (2, 3, 5, 7), generator=g).to(torch.int8)
    blocks = BlockLayout(kinds, 4, 4, 20, 28).kv_blocks()
    for num, idx, kind in ((blocks.kv_num_blocks, blocks.kv_indices, PARTIAL),
                           (blocks.full_kv_num_blocks, blocks.full_kv_indices, FULL)):
        assert num.dtype == idx.dtype == torch.int32 and num.shape == (2, 3, 5) and idx.shape == (2, 3, 5, 7)
        for b in range(2):
            for h in range(3):
                for i in range(5):
                    want = [j for j in range(7) if kinds[b, h, i, j] == kind]
                    n = int(num[b, h, i])
                    assert idx[b, h, i, :n].tolist() == want
                    assert sorted(idx[b, h, i].tolist()) == list(range(7))  # padding: the other tiles
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    mask = flex.BlockMask.from_kv_blocks(blocks.kv_num_blocks, blocks.kv_indices, blocks.full_kv_num_blocks,
                                         blocks.full_kv_indices, BLOCK_SIZE=4)
    assert torch.equal(mask.to_dense().bool(), kinds != EMPTY)


class _CountingCausal(qkv.masks.Causal):
    """Causal, counting how often its block view is computed."""

    def __init__(self):
        self.calls = 0

    def block_kinds(self, grid, batch, heads):
        self.calls += 1
        return super().block_kinds(grid, batch, heads)


def test_a_second_call_with_the_same_mask_and_shapes_reuses_the_layout():
    mask = _CountingCausal()
    q, k, v = (torch.randn(1, 2, 40, 8, dtype=torch.float64) for _ in range(3))
    first = make_problem(q, k, v, mask).layout(16, 8)
    for _layer in range(3):  # a model's layers: same mask object, same shapes
        qkv.attention(q, k, v, mask, backend="tiled_16x8")
    assert make_problem(q, k, v, mask).layout(16, 8) is first and mask.calls == 1
    make_problem(q[:, :, :20], k, v, mask).layout(16, 8)  # other shapes: built again
    make_problem(q, k, v, mask, k_offset=3).layout(16, 8)  # other positions: built again
    assert mask.calls == 3


def test_a_table_changed_in_place_is_not_served_stale():
    ids = torch.tensor([0] * 20 + [1] * 20)
    mask = qkv.document(ids)
    q, k, v = (torch.randn(1, 1, 40, 8, dtype=torch.float64) for _ in range(3))
    before = make_problem(q, k, v, mask).layout(8, 8)
    ids[10:] = 1
    after = make_problem(q, k, v, mask).layout(8, 8)
    assert after is not before
    got = qkv.attention(q, k, v, mask, backend="tiled_16x8")
    torch.testing.assert_close(got, qkv.attention(q, k, v, qkv.document(ids.clone()), backend="reference"))


def test_each_sequence_skips_its_own_empty_document_tiles():
    n, block = 64, 8
    # Sequence 0: documents of 8 tokens; sequence 1: documents of 32. Merged over the batch, only
    # the tiles empty in both could be skipped.
    ids = torch.stack([torch.arange(n) // 8, torch.arange(n) // 32])
    mask = qkv.document(ids, causal=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    layout = make_problem(q, k, v, mask).layout(block, block)
    own = [int((merge_kinds(layout.kinds[b]) != EMPTY).sum()) for b in range(2)]
    assert own == [8, 2 * (4 * 5 // 2)]  # diagonal tiles; two triangles of 4 tiles a side
    merged_walk = 2 * int((layout.merged() != EMPTY).sum())
    assert layout.visited_tiles(block) == sum(own) < merged_walk
    out = qkv.attention(q, k, v, mask, backend="tiled")
    want = qkv.attention(q, k, v, mask, backend="reference")
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    g1 = torch.autograd.grad(out.sum(), (q, k, v))
    g2 = torch.autograd.grad(want.sum(), (q, k, v))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_per_batch_walks_sum_the_gradients_of_shared_score_mod_tensors():
    n = 48
    ids = torch.stack([torch.arange(n) // 16, torch.zeros(n, dtype=torch.int64)])
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, n, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    mod = qkv.scores.relative_bias(table)
    assert len(make_problem(q, k, v, qkv.document(ids), score_mod=mod).layout(16, 8).runs(24)) == 2  # per batch
    results = []
    for backend in ("tiled_16x8", "reference"):
        out, lse = qkv.attention(q, k, v, qkv.document(ids), score_mod=mod, backend=backend, return_lse=True)
        loss = out.square().sum() + lse.sum()
        results.append((out, torch.autograd.grad(loss, (q, k, v, table))))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-12, rtol=0)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, atol=1e-11, rtol=0)


def test_plan_runs_lives_next_to_the_layout():
    import qkv.inspect.maps as maps

    assert maps.plan_runs is plan_runs
    kinds = torch.tensor([[EMPTY, FULL, FULL, PARTIAL, EMPTY, FULL]], dtype=torch.int8)
    assert plan_runs(kinds, 4, 22, 8) == [[(4, 12, False), (12, 16, True), (20, 22, False)]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layout_and_kv_blocks_live_on_the_data_device():
    ids = torch.stack([torch.arange(256) // 64, torch.arange(256) // 128]).cuda()
    q = torch.randn(2, 2, 256, 16, device="cuda")
    layout = make_problem(q, q, q, qkv.document(ids, causal=True), q_offset=torch.tensor([0, 0]).cuda(),
                          k_offset=torch.tensor([0, 0]).cuda()).layout(64, 64)
    blocks = layout.kv_blocks()
    assert layout.kinds.is_cuda and blocks.kv_indices.is_cuda and blocks.full_kv_num_blocks.is_cuda
    cpu = make_problem(q.cpu(), q.cpu(), q.cpu(), qkv.document(ids.cpu(), causal=True)).layout(64, 64)
    assert torch.equal(layout.kinds.cpu(), cpu.kinds)
