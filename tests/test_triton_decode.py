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
    for b, s in enumerate(seqs):
        k, v = pool.sequence_kv(s, 0)
        want, want_lse = qkv.attention(q[b:b + 1].double(), k[None].double(), v[None].double(), m,
                                       backend="reference", return_lse=True)
        torch.testing.assert_close(out[b:b + 1].double(), want, rtol=1e-5, atol=2e-6)
        torch.testing.assert_close(lse[b:b + 1].double(), want_lse, rtol=1e-5, atol=2e-6)


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
