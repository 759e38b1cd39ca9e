"""PagedKVCache: equals the contiguous cache (and so the full forward pass), grows page by page,
forks with shared pages and copy-on-write, frees, and fails cleanly when the pool runs out.

float64 models with O(1) random weights; the paged and contiguous paths attend over the same
values, so they agree to summation order (1e-10 bound)."""

import pytest
import torch

import qkv
from qkv.cache import CacheFullError, KVCache, PagedKVCache
from tests.decoders import TOL, make_model

pytestmark = pytest.mark.usefixtures("small_tiled_backends")



def new_pool(model, num_pages=32, page_size=4):
    return PagedKVCache(num_pages=num_pages, page_size=page_size, **model.cache_spec())


@pytest.mark.parametrize("page_size", [1, 3, 16])
@pytest.mark.parametrize("positional", ["rope", "alibi"])
def test_paged_equals_contiguous_for_a_ragged_batch(page_size, positional):
    model = make_model(positional=positional)
    ids = torch.randint(0, 37, (3, 20))
    lengths = torch.tensor([4, 13, 9])
    pool = new_pool(model, num_pages=64, page_size=page_size)
    batch = pool.batch([pool.add_sequence() for _ in range(3)])
    contiguous = KVCache(batch_size=3, capacity=24, **model.cache_spec())
    paged_logits = model(ids[:, :13], batch, lengths=lengths)
    contiguous_logits = model(ids[:, :13], contiguous, lengths=lengths)
    for row, n in enumerate(lengths.tolist()):  # padding rows' logits are meaningless in both
        torch.testing.assert_close(paged_logits[row, :n], contiguous_logits[row, :n], **TOL)
    for t in range(6):
        step = ids[torch.arange(3), lengths + t][:, None]
        torch.testing.assert_close(model(step, batch, backend="tiled_16x8"), model(step, contiguous), **TOL)
    for row, seq in enumerate(batch.seqs):
        n = int(lengths[row]) + 6
        assert pool.length(seq) == n and len(pool.block_table(seq)) == -(-n // page_size)
        k, v = pool.sequence_kv(seq, 1)
        torch.testing.assert_close(k, contiguous.k[1, row, :, :n], **TOL)
        torch.testing.assert_close(v, contiguous.v[1, row, :, :n], **TOL)


def test_pages_are_taken_one_at_a_time_and_freed():
    model = make_model()
    pool = new_pool(model, num_pages=10, page_size=4)
    seq = pool.add_sequence()
    assert pool.block_table(seq) == [] and pool.num_free_pages == 10
    model(torch.randint(0, 37, (1, 5)), pool.batch([seq]))
    assert len(pool.block_table(seq)) == 2 and pool.num_free_pages == 8
    for _ in range(3):
        model(torch.randint(0, 37, (1, 1)), pool.batch([seq]))
    assert pool.length(seq) == 8 and len(pool.block_table(seq)) == 2
    model(torch.randint(0, 37, (1, 1)), pool.batch([seq]))
    assert len(pool.block_table(seq)) == 3
    pool.free(seq)
    assert pool.num_free_pages == 10 and pool.sequences == []


def test_fork_shares_pages_then_diverges_with_copy_on_write():
    model = make_model()
    ids = torch.randint(0, 37, (1, 10))
    pool = new_pool(model, num_pages=16, page_size=4)
    parent = pool.add_sequence()
    model(ids, pool.batch([parent]))                          # 10 tokens: pages [a, b, c(half full)]
    free_before = pool.num_free_pages
    child = pool.fork(parent)
    assert pool.block_table(child) == pool.block_table(parent)
    assert pool.num_free_pages == free_before                 # nothing copied yet
    assert all(pool.owners(p) == 2 for p in pool.block_table(parent))
    # they diverge: different next tokens, decoded together in one batch
    a, b = torch.tensor([[3, 4, 5]]), torch.tensor([[30, 31, 32]])
    out = [model(torch.tensor([[x], [y]]), pool.batch([parent, child])) for x, y in zip(a[0], b[0])]
    out = torch.cat(out, 1)
    torch.testing.assert_close(out[0], model(torch.cat([ids, a], 1))[0, 10:], **TOL)
    torch.testing.assert_close(out[1], model(torch.cat([ids, b], 1))[0, 10:], **TOL)
    tp, tc = pool.block_table(parent), pool.block_table(child)
    assert tp[:2] == tc[:2] and all(pool.owners(p) == 2 for p in tp[:2])   # full pages stay shared
    assert tp[2] != tc[2] and pool.owners(tp[2]) == pool.owners(tc[2]) == 1  # the written page was copied
    assert pool.num_free_pages == free_before - 3             # one copy, then a 4th page for each
    # freeing the parent keeps the child whole
    pool.free(parent)
    assert all(pool.owners(p) == 1 for p in tc)
    nxt = model(torch.tensor([[7]]), pool.batch([child]))
    torch.testing.assert_close(nxt[0, 0], model(torch.cat([ids, b, torch.tensor([[7]])], 1))[0, -1], **TOL)


def test_fork_of_a_fork_and_parent_writing_first():
    model = make_model()
    ids = torch.randint(0, 37, (1, 6))
    pool = new_pool(model, num_pages=12, page_size=4)
    root = pool.add_sequence()
    model(ids, pool.batch([root]))
    kids = [pool.fork(root), pool.fork(root)]
    assert pool.owners(pool.block_table(root)[1]) == 3
    model(torch.tensor([[9]]), pool.batch([root]))            # root copies its last page; kids still share
    assert pool.owners(pool.block_table(kids[0])[1]) == 2
    for kid, token in zip(kids, (1, 2)):
        out = model(torch.tensor([[token]]), pool.batch([kid]))
        torch.testing.assert_close(out[0, 0], model(torch.cat([ids, torch.tensor([[token]])], 1))[0, -1], **TOL)
    assert len({pool.block_table(s)[1] for s in [root, *kids]}) == 3


def snapshot(pool):
    return (pool.k_pages.clone(), pool.v_pages.clone(), {s: pool.block_table(s) for s in pool.sequences},
            {s: pool.length(s) for s in pool.sequences}, pool.num_free_pages)


def assert_unchanged(pool, snap):
    assert torch.equal(pool.k_pages, snap[0]) and torch.equal(pool.v_pages, snap[1])
    assert {s: pool.block_table(s) for s in pool.sequences} == snap[2]
    assert {s: pool.length(s) for s in pool.sequences} == snap[3] and pool.num_free_pages == snap[4]


def test_pool_exhaustion_raises_and_leaves_every_sequence_intact():
    model = make_model()
    ids = torch.randint(0, 37, (2, 12))
    pool = new_pool(model, num_pages=5, page_size=4)
    a, b = pool.add_sequence(), pool.add_sequence()
    model(ids[:, :6], pool.batch([a, b]))                    # 2 pages each, 1 free
    snap = snapshot(pool)
    with pytest.raises(CacheFullError, match=r"needs 2 page\(s\) \(2 to grow, 0 to copy shared pages\) but 1 of 5"):
        model(ids[:, 6:9], pool.batch([a, b]))
    assert_unchanged(pool, snap)
    # a third sequence cannot start, and the first two still decode correctly
    c = pool.add_sequence()
    snap = snapshot(pool)
    with pytest.raises(CacheFullError):
        model(ids[:1, :9], pool.batch([c]))
    assert_unchanged(pool, snap)
    out = model(ids[:, 6:8], pool.batch([a, b]))            # fits: 8 tokens = 2 pages each
    torch.testing.assert_close(out, model(ids[:, :8])[:, 6:], **TOL)
    pool.free(b)
    model(ids[1:, :9], pool.batch([c]))                      # room again
    assert pool.length(c) == 9


def test_failure_inside_the_forward_pass_keeps_every_sequence():
    """Layer 0 writes into the pages begin reserved (and copied, for a forked sequence) before
    layer 1 fails: lengths and every cached token stay as they were, and decoding continues."""
    model = make_model()
    ids = torch.randint(0, 37, (2, 10))
    pool = new_pool(model, num_pages=12, page_size=4)
    a = pool.add_sequence()
    model(ids[:1, :6], pool.batch([a]))
    b = pool.fork(a)                                          # shares a's half-full page
    kv_before = {s: [pool.sequence_kv(s, layer) for layer in range(2)] for s in (a, b)}

    def fail(*_):
        raise RuntimeError("boom")

    handle = model.blocks[1].register_forward_pre_hook(fail)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.stack([ids[0, 6:8], ids[1, 6:8]]), pool.batch([a, b]))
    handle.remove()
    assert pool.length(a) == pool.length(b) == 6
    for s in (a, b):
        for layer in range(2):
            for got, before in zip(pool.sequence_kv(s, layer), kv_before[s][layer]):
                assert torch.equal(got, before)
    prefix_b = torch.cat([ids[:1, :6], ids[1:, 6:9]], 1)
    out = model(torch.stack([ids[0, 6:9], ids[1, 6:9]]), pool.batch([a, b]))
    torch.testing.assert_close(out[0], model(ids[:1, :9])[0, 6:], **TOL)
    torch.testing.assert_close(out[1], model(prefix_b)[0, 6:], **TOL)


def test_copy_on_write_counts_against_the_pool():
    model = make_model()
    pool = new_pool(model, num_pages=3, page_size=4)
    parent = pool.add_sequence()
    model(torch.randint(0, 37, (1, 6)), pool.batch([parent]))  # 2 pages, 1 free
    child = pool.fork(parent)
    other = pool.add_sequence()
    model(torch.randint(0, 37, (1, 1)), pool.batch([other]))   # takes the last page
    snap = snapshot(pool)
    with pytest.raises(CacheFullError, match=r"1 to copy shared pages\) but 0 of 3"):
        model(torch.tensor([[1]]), pool.batch([child]))
    assert_unchanged(pool, snap)
    pool.free(other)
    model(torch.tensor([[1], [2]]), pool.batch([child, parent]))  # one copy suffices for both writers
    assert pool.num_free_pages == 0 and pool.block_table(child)[0] == pool.block_table(parent)[0]


def test_sequence_and_batch_errors():
    model = make_model()
    pool = new_pool(model)
    a = pool.add_sequence()
    with pytest.raises(ValueError, match="sequence 7 is not in this cache"):
        pool.fork(7)
    with pytest.raises(ValueError, match="not in this cache"):
        pool.free(7)
    with pytest.raises(ValueError, match="at least one"):
        pool.batch([])
    with pytest.raises(ValueError, match="must not repeat"):
        pool.batch([a, a])
    view = pool.batch([a])
    pool.free(a)
    with pytest.raises(ValueError, match=f"sequence {a} is not in this cache"):
        model(torch.tensor([[1]]), view)
    for kwargs, match in [(dict(num_pages=0), "num_pages"), (dict(page_size=0), "page_size"),
                          (dict(dtype=torch.long), "dtype")]:
        args = dict(num_layers=1, num_pages=2, page_size=2, num_kv_heads=1, head_dim=2) | kwargs
        with pytest.raises((ValueError, TypeError), match=match):
            PagedKVCache(**args)


def _window_mask(window, sinks):
    return qkv.sliding_window(window) | qkv.from_function(lambda b, h, q, k: (k < sinks) & (k <= q), f"sinks{sinks}")


@pytest.mark.parametrize("sinks", [0, 3])
def test_window_and_sinks_equal_a_full_pass_under_their_mask(sinks):
    """A batch with window=4 (and sinks) sees what a full pass under that mask sees: ragged rows
    (explicit positions), then a uniform batch whose first steps hold fewer keys than sinks."""
    model = make_model()
    ids = torch.randint(0, 37, (3, 16), generator=torch.Generator().manual_seed(2))
    lengths = torch.tensor([5, 11, 2])
    pool = new_pool(model, num_pages=64, page_size=3)
    batch = pool.batch([pool.add_sequence() for _ in range(3)], window=4, sinks=sinks)
    prompt = model(ids[:, :11], batch, lengths=lengths)
    steps = [model(ids[torch.arange(3), lengths + t][:, None], batch) for t in range(4)]
    assert batch.last_read == "gathered"  # on the CPU: the pages are gathered
    mask = _window_mask(4, sinks)
    for row, n in enumerate(lengths.tolist()):
        full = model(ids[row:row + 1, :n + 4], mask=mask)[0]
        torch.testing.assert_close(prompt[row, :n], full[:n], **TOL)
        for t, step in enumerate(steps):
            torch.testing.assert_close(step[row, 0], full[n + t], **TOL)
    uniform = pool.batch([pool.add_sequence() for _ in range(2)], window=4, sinks=sinks)
    got = [model(ids[:2, :2], uniform)] + [model(ids[:2, t:t + 1], uniform) for t in range(2, 9)]
    torch.testing.assert_close(torch.cat(got, 1), model(ids[:2, :9], mask=mask), **TOL)


def test_window_and_sinks_are_checked():
    model = make_model()
    pool = new_pool(model)
    seq = pool.add_sequence()
    with pytest.raises(ValueError, match="window"):
        pool.batch([seq], window=0)
    with pytest.raises(ValueError, match="sinks"):
        pool.batch([seq], sinks=2)
    with pytest.raises(ValueError, match="sinks"):
        pool.batch([seq], window=4, sinks=-1)
    with pytest.raises(TypeError, match="read_in_place"):
        pool.batch([seq], read_in_place="yes")
