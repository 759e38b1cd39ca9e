"""Split-KV decode kernels (flash-decoding), over a contiguous or a paged KV cache, and the merge.

:func:`_decode_kernel`: one program per (split, batch element, key/value head). The ``G`` query
heads sharing the key head and the ``Nq`` query rows are stacked into one tile of ``G * Nq`` rows
(so each key is read once for all of them), and the program walks its share of the batch
element's key tiles: tiles ``0 .. cdiv(len, BN) - 1``, or, with ``USE_LIST``, the entries of its
own list of visible tiles (``TILES[b, :NT[b]]``, ascending), so that a sliding window or sink
tokens over a long context visit only the tiles they can see and the splits share those evenly.

Paged (``PAGED`` 1): key column ``j`` of sequence ``b`` is read in place from page
``BT[b, j // page_size]`` at offset ``j % page_size`` (no gather into a contiguous copy).
``PAGED`` 2 is the same when every tile lies inside one page (``page_size % BN == 0``): one block
table entry per tile and contiguous rows.

Each split writes its un-merged output and log-sum-exp (float32); :func:`_merge_kernel` combines
a row's splits by ``lse`` in one launch and writes the output in its dtype.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _dot, _operand, _scores, _seen_columns

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _decode_kernel(Q, K, V, O_PART, LSE_PART, QOFF, KOFF, KLEN, BT, TILES, NT,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbt, stl, page_size,
                   MASK_INTS, MASK_DATA, truth, SLOPES, cap, TABLE, table_sh, max_dist,
                   Hq, Hkv, G, Nq, D: tl.constexpr, Dv: tl.constexpr, scale, tiles_per_split, num_splits,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   PAGED: tl.constexpr, USE_LIST: tl.constexpr,
                   MASK_MODE: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
                   L4: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, CAP: tl.constexpr,
                   POS_ALIBI: tl.constexpr, POS_REL: tl.constexpr, POS_CAP: tl.constexpr, DOT: tl.constexpr):
    split = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    r = tl.arange(0, BM)[:, None]
    row_ok = r < G * Nq
    g = tl.where(row_ok, r // Nq, 0)
    i = r % Nq
    h = hk * G + g
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_n = tl.arange(0, BN)
    q = tl.load(Q + b * sqb + h * sqh + i * sqm + offs_d[None, :], mask=row_ok & (offs_d[None, :] < D), other=0.0)
    qpos = tl.load(QOFF + b) + i
    koff = tl.load(KOFF + b)
    klen = tl.load(KLEN + b)
    m_i = tl.full([BM], NEG_INF, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    if USE_LIST:
        count = tl.load(NT + b)
    else:
        count = tl.cdiv(klen, BN)
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, count)
    for t in range(first, last):
        if USE_LIST:
            kj = tl.load(TILES + b * stl + t)
        else:
            kj = t
        cols = kj * BN + offs_n[None, :]
        col_ok = cols < klen
        c1 = cols.reshape(BN, 1)
        if PAGED == 2:  # the tile lies in one page: one table entry, contiguous rows
            page = tl.load(BT + b * sbt + (kj * BN) // page_size).to(tl.int64)
            within = (kj * BN) % page_size + offs_n[:, None]
            k_rows = K + page * skb + hk * skh + within * skn
            v_rows = V + page * svb + hk * svh + within * svn
        elif PAGED == 1:
            page = tl.load(BT + b * sbt + c1 // page_size, mask=c1 < klen, other=0).to(tl.int64)
            k_rows = K + page * skb + hk * skh + (c1 % page_size) * skn
            v_rows = V + page * svb + hk * svh + (c1 % page_size) * svn
        else:
            k_rows = K + b * skb + hk * skh + c1 * skn
            v_rows = V + b * svb + hk * svh + c1 * svn
        k = tl.load(k_rows + offs_d[None, :], mask=(c1 < klen) & (offs_d[None, :] < D), other=0.0)
        qk = _dot(q, tl.trans(k), DOT)
        s, dcap = _scores(qk, scale, b, h, i, cols, qpos, koff + cols, klen, 0, MASK_INTS, MASK_INTS, MASK_DATA,
                          truth, SLOPES, cap, TABLE, table_sh, max_dist, MASK_MODE != 0, False, BM, BN,
                          MASK_MODE, L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL, POS_CAP)
        s = tl.where(col_ok, s, NEG_INF)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_rows + offs_dv[None, :], mask=(c1 < klen) & (offs_dv[None, :] < Dv), other=0.0)
        v = tl.where(_seen_columns(s)[:, None], v, 0.0)
        acc = acc * alpha[:, None] + _dot(_operand(p, v, DOT), v, DOT)
        m_i = m_new
    seen = l_i != 0.0  # NaN (a NaN or inf visible score) propagates
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, tl.where(m_i == NEG_INF, 0.0, m_i) + tl.log(l_safe), NEG_INF)
    row = ((b * Hq + h) * Nq + i) * num_splits + split  # (BM, 1)
    tl.store(O_PART + row * Dv + offs_dv[None, :], out, mask=row_ok & (offs_dv[None, :] < Dv))
    tl.store(LSE_PART + row.reshape(BM), lse, mask=row_ok.reshape(BM))


@triton.jit
def _merge_kernel(O_PART, LSE_PART, O, LSE, num_splits, sob, soh, som, Hq, Nq, Dv: tl.constexpr,
                  BS: tl.constexpr, BDV: tl.constexpr):
    """One program per output row ``(b, h, i)``: ``out = sum_s w_s o_s / sum_s w_s`` with
    ``w_s = exp(lse_s - max lse)``; rows no split saw anything of get zeros and ``-inf``, and a
    NaN in any split makes the row NaN (as :func:`qkv.merge_partials`). The splits' outputs are
    summed one at a time (registers for one ``Dv`` row, whatever the split count)."""
    row = tl.program_id(0)
    s = tl.arange(0, BS)
    d = tl.arange(0, BDV)
    lse = tl.load(LSE_PART + row * num_splits + s, mask=s < num_splits, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(top == NEG_INF, 0.0, top)
    total = tl.sum(tl.exp(lse - top), 0)
    acc = tl.zeros([BDV], tl.float32)
    for j in range(0, num_splits):
        w = tl.exp(tl.load(LSE_PART + row * num_splits + j) - top)
        acc += w * tl.load(O_PART + (row * num_splits + j) * Dv + d, mask=d < Dv, other=0.0)
    seen = total != 0.0  # NaN propagates
    safe = tl.where(seen, total, 1.0)
    out = tl.where(seen, acc / safe, 0.0)
    merged = tl.where(seen, top + tl.log(safe), NEG_INF)
    b = row // (Hq * Nq)
    h = (row // Nq) % Hq
    i = row % Nq
    tl.store(O + b * sob + h * soh + i * som + d, out.to(O.dtype.element_ty), mask=d < Dv)
    tl.store(LSE + row, merged)
