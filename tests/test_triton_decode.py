"""Split-KV decode (contiguous, through the backend) and paged attention read in place, against
the float64 reference. Runs on CUDA, or on CPU under TRITON_INTERPRET=1 (see test_triton.py)."""

from __future__ import annotations

import pytest
import torch

import qkv
from qkv.cache import PagedKVCache
from tests.test_triton import CUDA, DEVICE, check, pytestmark  # noqa: F401  (the same skip)

CONTEXT = 4096 if CUDA else 75


@pytest.mark.parametrize("mask", [None, "window", "document"])
def test_decode_through_the_backend(mask):
    if mask == "window":
        mask = qkv.sliding_window(20)
    elif mask == "document":
        mask = qkv.document((torch.arange(CONTEXT) * 3 // CONTEXT).to(DEVICE), causal=True)
    check(B=2, Hq=4, Hkv=2, Nq=2, Nk=CONTEXT, mask=mask, grad=False)  # 2 queries x 2 heads per key head


def test_decode_head_dim_512():
    check(B=1, Hq=2, Hkv=1, Nq=1, Nk=CONTEXT // 2, D=512, mask=qkv.sliding_window(20), grad=False)


def test_decode_alibi_and_mqa():
    from qkv import scores

    check(B=1, Hq=4, Hkv=1, Nq=1, Nk=CONTEXT, mask=qkv.causal(), score_mod=scores.alibi(4), grad=False)


def _pool(lengths, page_size=8, hkv=2, dim=32, dtype=torch.float32, seed=0):
    """A PagedKVCache whose sequences hold random keys/values in shuffled pages."""
    g = torch.Generator().manual_seed(seed)
    pages = sum(-(-n // page_size) for n in lengths) + 3
    pool = PagedKVCache(1, pages, page_size, hkv, dim, dtype=dtype, device=DEVICE)
    pool._free = torch.randperm(pages, generator=g).tolist()  # pages handed out in random order
    seqs = [pool.add_sequence() for _ in lengths]
    pool.reserve(seqs, list(lengths))
    for s, n in zip(seqs, lengths):
        pool._lengths[s] = n
    pool.k_pages.copy_(torch.randn(pool.k_pages.shape, generator=g).to(dtype))
    pool.v_pages.copy_(torch.randn(pool.v_pages.shape, generator=g).to(dtype))
    return pool, seqs


def assert_each_sequence_matches_the_reference(out, lse, q, pool, seqs, mask):
    """``out`` and ``lse`` of every sequence of a paged batch against the float64 reference on that
    sequence's own keys and values."""
    for b, s in enumerate(seqs):
        k, v = pool.sequence_kv(s, 0)
        want, want_lse = qkv.attention(q[b:b + 1].double(), k[None].double(), v[None].double(), mask,
                                       backend="reference", return_lse=True)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("mask", [None, "window_with_sinks"])
def test_paged_attention_reads_pages_in_place(mask):
    from qkv.backends.triton import paged_attention
    from qkv.backends.triton.decode import pool_tables

    lengths = [CONTEXT, 5, CONTEXT // 2 + 3]
    pool, seqs = _pool(lengths)
    table, lens = pool_tables(pool, seqs)
    hq, nq = 4, 1
    q = torch.randn(len(seqs), hq, nq, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    m = None if mask is None else qkv.sliding_window(9) | qkv.key_padding(2)  # window + 2 sink tokens
    out, lse = paged_attention(q, pool.k_pages[0], pool.v_pages[0], table, lens, m, return_lse=True)
    assert_each_sequence_matches_the_reference(out, lse, q, pool, seqs, m)


def test_paged_attention_rejects_bad_tables():
    from qkv.backends.triton import paged_attention

    pool, seqs = _pool([20])
    q = torch.randn(1, 2, 1, 32, device=DEVICE)
    with pytest.raises(ValueError, match="lengths"):
        paged_attention(q, pool.k_pages[0], pool.v_pages[0], torch.zeros(1, 1, dtype=torch.int32, device=DEVICE),
                        torch.tensor([20], device=DEVICE))
    with pytest.raises(ValueError, match="block_table"):
        paged_attention(q, pool.k_pages[0], pool.v_pages[0], torch.zeros(1, 3, device=DEVICE),
                        torch.tensor([20], device=DEVICE))


def test_paged_and_contiguous_decode_agree_on_ragged_windows_with_sinks():
    """The same keys read through shuffled pages (page-aligned tiles and not) or from a
    contiguous cache give the same out and lse, per sequence of a ragged batch, with a window
    and sink tokens and two new queries per sequence."""
    from qkv.backends.triton import paged_attention
    from qkv.backends.triton.decode import pool_tables

    lengths = [CONTEXT, 9, CONTEXT // 2 + 3]
    mask = qkv.sliding_window(11) | (qkv.key_padding(3) & qkv.causal())
    q = torch.randn(3, 2, 2, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)  # 2 query heads, 1 KV head
    for page_size in (16, 8):  # 16: every 16-key tile inside one page (the interpreter's tiles)
        pool, seqs = _pool(lengths, page_size=page_size, hkv=1, seed=3)
        table, lens = pool_tables(pool, seqs)
        paged, paged_lse = paged_attention(q, pool.k_pages[0], pool.v_pages[0], table, lens, mask, return_lse=True,
                                           max_length=max(lengths))
        assert_each_sequence_matches_the_reference(paged, paged_lse, q, pool, seqs, mask)
        if page_size == 16:  # the contiguous decode kernel on the same keys
            for b in (0, 2):
                k, v = pool.sequence_kv(seqs[b], 0)
                out, lse = qkv.attention(q[b:b + 1], k[None], v[None], mask, backend="triton", return_lse=True)
                torch.testing.assert_close(paged[b:b + 1], out, rtol=1e-6, atol=1e-6)
                torch.testing.assert_close(paged_lse[b:b + 1], lse, rtol=1e-6, atol=1e-6)


def test_ragged_paged_decode_visits_only_the_tiles_a_window_and_its_sinks_see(monkeypatch):
    """The launch lists, per sequence, the sink tile and the window's tiles (nothing between or
    beyond the length), and the kernel reads nothing else: dropping a visible tile from the list
    drops exactly its keys from the result."""
    from qkv.backends.triton import configs, decode

    # The kernel walks the list of its own tile size: the first configuration's, without autotuning
    # (16 keys in the interpreter, 32 for float32 on CUDA).
    monkeypatch.setenv("QKV_TRITON_AUTOTUNE", "0")
    bn = configs.candidates("decode", 32, float32=True)[0].block_n
    lengths = [CONTEXT, 40, 7]
    pool, seqs = _pool(lengths, page_size=16, seed=4)
    table, lens = decode.pool_tables(pool, seqs)
    q = torch.randn(3, 2, 1, 32, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    window, sinks = 20, 2
    mask = qkv.sliding_window(window) | (qkv.key_padding(sinks) & qkv.causal())
    plan = decode.PagedDecode(q, table, lens, mask, page_size=16, kv_heads=2)
    tiles, counts, _ = plan.launch.tile_list(bn)
    for b, n in enumerate(lengths):
        want = sorted({0} | set(range(max(0, n - 1 - window) // bn, (n - 1) // bn + 1)))
        assert tiles[b, :counts[b]].tolist() == want, (b, n)
    # Keep only the newest tile of sequence 0: its output is attention over those keys alone.
    newest = tiles[0, counts[0] - 1].item()
    tiles[0, 0] = newest
    counts[0] = 1
    out, _ = plan(q, pool.k_pages[0], pool.v_pages[0])
    k, v = pool.sequence_kv(seqs[0], 0)
    first = newest * bn
    alone = qkv.attention(q[:1].double(), k[None, :, first:].double(), v[None, :, first:].double(),
                          mask, backend="reference", q_offset=lengths[0] - 1, k_offset=first)
    torch.testing.assert_close(out[:1].double(), alone, rtol=1e-5, atol=2e-6)


def _decode_model(dtype, **options):
    from tests.decoders import make_model

    return make_model(num_layers=1, **options).to(dtype)


@pytest.mark.parametrize("options", [dict(window=6, sinks=2), dict(positional="alibi", sink=True)],
                         ids=["rope_window_sinks", "alibi_learned_sink"])
def test_paged_batch_decode_steps_read_pages_in_place(options):
    """A model's decode steps over a PagedKVCache take the paged kernel (no gather) and match the
    float64 model within 2x of the gathering float32 path's error."""
    window = dict(window=options.pop("window", None), sinks=options.pop("sinks", 0))
    ids = torch.randint(0, 37, (3, 24), generator=torch.Generator().manual_seed(6))
    lengths = torch.tensor([7, 19, 12])
    outs, reads = {}, {}
    for name, dtype, in_place in (("in place", torch.float32, True), ("gathered", torch.float32, False),
                                  ("float64", torch.float64, True)):
        model = _decode_model(dtype, **options).to(DEVICE)
        pool = PagedKVCache(num_pages=48, page_size=4, **model.cache_spec())
        pool._free = torch.randperm(48, generator=torch.Generator().manual_seed(7)).tolist()
        batch = pool.batch([pool.add_sequence() for _ in range(3)], read_in_place=in_place, **window)
        with torch.no_grad():
            model(ids[:, :19].to(DEVICE), batch, lengths=lengths)
            steps = [model(ids[torch.arange(3), lengths + t][:, None].to(DEVICE), batch) for t in range(2)]
        outs[name], reads[name] = torch.cat(steps, 1).double(), batch.last_read
    assert reads["in place"] == "in place"
    assert reads["gathered"] == "gathered"
    assert reads["float64"].startswith("gathered: ") and "float64" in reads["float64"]  # the reason is kept
    err = (outs["in place"] - outs["float64"]).abs().max().item()
    base = (outs["gathered"] - outs["float64"]).abs().max().item()
    assert err <= 2 * base + 64 * torch.finfo(torch.float32).eps * outs["float64"].abs().max().item(), (err, base)
