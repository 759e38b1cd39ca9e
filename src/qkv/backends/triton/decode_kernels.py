"""Split-KV decode kernel (flash-decoding), over a contiguous or a paged KV cache.

One program per (split, batch element, key/value head): the ``G`` query heads sharing the key
head and the ``Nq`` query rows are stacked into one tile of ``G * Nq`` rows (so each key is read
once for all of them), and the program walks its share of the key tiles, up to that sequence's
length. Paged: key column ``j`` of sequence ``b`` is read in place from page
``BT[b, j // PAGE_SIZE]`` at offset ``j % PAGE_SIZE`` (no gather into a contiguous copy). Each
split writes its un-merged output and log-sum-exp; :mod:`.decode` merges them by ``lse``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _dot, _operand, _scores, _seen_columns

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _decode_kernel(Q, K, V, O_PART, LSE_PART, QOFF, KOFF, KLEN, BT, KINDS,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sbt, skind, page_size,
                   MASK_INTS, MASK_DATA, truth, SLOPES, cap, TABLE, table_sh, max_dist,
                   Hq, Hkv, G, Nq, D: tl.constexpr, Dv: tl.constexpr, scale, tiles_per_split, num_splits,
                   BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                   PAGED: tl.constexpr, USE_KINDS: tl.constexpr,
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
    first = split * tiles_per_split
    last = tl.minimum(first + tiles_per_split, tl.cdiv(klen, BN))
    for kj in range(first, last):
        visit = True
        if USE_KINDS:
            visit = tl.load(KINDS + b * skind + kj) != 0
        if visit:
            cols = kj * BN + offs_n[None, :]
            col_ok = cols < klen
            c1 = cols.reshape(BN, 1)
            if PAGED:
                page = tl.load(BT + b * sbt + c1 // page_size, mask=c1 < klen, other=0)
                k_rows = K + page.to(tl.int64) * skb + hk * skh + (c1 % page_size) * skn
                v_rows = V + page.to(tl.int64) * svb + hk * svh + (c1 % page_size) * svn
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
