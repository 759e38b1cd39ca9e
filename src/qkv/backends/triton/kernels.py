"""The Triton kernels: forward, and the two deterministic backward kernels (dq; dk and dv).

Every kernel walks tile lists (:mod:`.blocks`): per query tile (forward, dq) the PARTIAL key tiles
then the FULL ones; per key tile (dk/dv) the query tiles of every query head sharing the key head
(GQA without repeating keys, and no atomics: each program owns its output tile). A FULL tile has
no element test (only the ragged tail of the last key tile, when ``Nk % BN != 0``); a PARTIAL tile
evaluates the mask in-kernel (:func:`_mask_program`, or the bit-packed copy).

Scores, as in :mod:`qkv.backends.tiled`: ``s = q k^T * scale``, then the score program (ALiBi,
soft-cap, relative bias in the given order), then the mask (-inf). Online softmax keeps ``m``,
``l`` and the un-normalised output; ``lse = m + log l`` is saved and the backward recomputes
``P = exp(s - lse)``; ``dS = P * (dP - delta)`` with ``delta = rowsum(dO * O) - dlse``.

Positions: query row ``i`` of batch ``b`` is at ``QOFF[b] + i``, key column ``j`` at ``KOFF[b] + j``.
Dropout: the keep decision is :mod:`qkv.dropout`'s hash of ``(seed, b * Hq + h, row, column)``; the
launcher passes the seed already mixed (:func:`qkv.dropout.mixed_seed`).
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """DOT 0: native tensor-core dot (bf16/fp16); 1: float32 inputs, IEEE precision (no TF32);
    2: upcast to float32 first (the interpreter, whose half-precision dots and casts are unreliable)."""
    if DOT == 2:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif DOT == 1:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _operand(x, like, DOT: tl.constexpr):
    """``x`` in ``like``'s dtype as a dot operand (kept in float32 when DOT == 2)."""
    if DOT == 2:
        return x
    else:
        return x.to(like.dtype)


@triton.jit
def _mix32(x):
    mult = tl.full([], 0x45D9F3B, tl.uint32)
    x = ((x >> 16) ^ x) * mult
    x = ((x >> 16) ^ x) * mult
    return (x >> 16) ^ x


@triton.jit
def _keep(seed, bh, rows, cols, threshold):
    """True where the weight at (rows, cols) of head bh = b * Hq + h is kept (qkv.dropout)."""
    x = _mix32((bh ^ seed).to(tl.uint32))
    x = _mix32(x ^ rows.to(tl.uint32))
    x = _mix32(x ^ cols.to(tl.uint32))
    return x.to(tl.int64) >= threshold


@triton.jit
def _tanh(x):
    """tanh to float32 accuracy (libdevice is not available in the interpreter)."""
    ax = tl.abs(x)
    e = tl.exp(-2.0 * ax)
    big = (1.0 - e) / (1.0 + e)
    x2 = ax * ax
    small = ax * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (
        62.0 / 2835.0 + x2 * (-1382.0 / 155925.0))))))
    t = tl.where(ax < 0.25, small, big)
    return tl.where(x < 0, -t, t)


@triton.jit
def _seen_columns(s):
    """(BN,) True where some row of the tile may see the column."""
    return tl.max((s > NEG_INF).to(tl.int32), 0) > 0


@triton.jit
def _leaf(CODE: tl.constexpr, slot, MASK_INTS, MASK_DATA, b, h, rows, qpos, kpos):
    """One mask leaf on a tile: bool, broadcastable to (BM, BN). Codes: see programs.py."""
    base = MASK_INTS + slot * 8
    if CODE == 1:  # causal
        r = kpos <= qpos
    elif CODE == 2:  # sliding window
        left = tl.load(base)
        right = tl.load(base + 1)
        r = (kpos >= qpos - left) & (kpos <= qpos + right)
    elif CODE == 3:  # key prefix (key padding, prefix-LM's prefix)
        n = tl.load(MASK_DATA + tl.load(base) + b * tl.load(base + 1))
        r = (kpos < n) & (qpos == qpos)
    elif CODE == 4:  # document ids
        k_off = tl.load(base)
        k_stride = tl.load(base + 1)
        q_off = tl.load(base + 2)
        q_stride = tl.load(base + 3)
        by_row = tl.load(base + 4)
        q_len = tl.load(base + 5)
        k_len = tl.load(base + 6)
        qi = tl.where(by_row != 0, rows, qpos)
        q_ok = (qi >= 0) & (qi < q_len)
        k_ok = (kpos >= 0) & (kpos < k_len)
        qid = tl.load(MASK_DATA + q_off + b * q_stride + tl.where(q_ok, qi, 0), mask=q_ok, other=-1)
        kid = tl.load(MASK_DATA + k_off + b * k_stride + tl.where(k_ok, kpos, 0), mask=k_ok, other=-2)
        r = qid == kid
    elif CODE == 5:  # global tokens: flag[q] | flag[k], flags for positions 0..span-1, then a 0
        off = tl.load(base)
        span = tl.load(base + 1)
        qi = tl.where((qpos >= 0) & (qpos < span), qpos, span)
        ki = tl.where((kpos >= 0) & (kpos < span), kpos, span)
        r = (tl.load(MASK_DATA + off + qi) | tl.load(MASK_DATA + off + ki)) != 0
    else:  # CODE == 6: block-sparse layout[b, h, q // bs, k // bs], rows before position 0 see nothing
        off = tl.load(base)
        sb = tl.load(base + 1)
        sh = tl.load(base + 2)
        sr = tl.load(base + 3)
        bs = tl.load(base + 4)
        lq = tl.load(base + 5)
        qb = tl.where(qpos >= 0, qpos, 0) // bs
        kb = tl.where(kpos >= 0, kpos, 0) // bs
        ok = (qpos >= 0) & (qb < lq) & (kb < sr)
        cell = tl.load(MASK_DATA + off + b * sb + h * sh + qb * sr + kb, mask=ok, other=0)
        r = ok & (cell != 0)
    return r


@triton.jit
def _mask_program(MASK_INTS, MASK_DATA, truth, b, h, rows, qpos, kpos,
                  L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr, L4: tl.constexpr):
    """Evaluate up to five leaves, combine them through the truth table (32 bits, int32)."""
    idx = qpos * 0 + kpos * 0
    if L0 != 0:
        idx = idx | _leaf(L0, 0, MASK_INTS, MASK_DATA, b, h, rows, qpos, kpos).to(tl.int32)
    if L1 != 0:
        idx = idx | (_leaf(L1, 1, MASK_INTS, MASK_DATA, b, h, rows, qpos, kpos).to(tl.int32) << 1)
    if L2 != 0:
        idx = idx | (_leaf(L2, 2, MASK_INTS, MASK_DATA, b, h, rows, qpos, kpos).to(tl.int32) << 2)
    if L3 != 0:
        idx = idx | (_leaf(L3, 3, MASK_INTS, MASK_DATA, b, h, rows, qpos, kpos).to(tl.int32) << 3)
    if L4 != 0:
        idx = idx | (_leaf(L4, 4, MASK_INTS, MASK_DATA, b, h, rows, qpos, kpos).to(tl.int32) << 4)
    return ((truth >> idx) & 1) != 0


@triton.jit
def _scores(qk, scale, b, h, rows, cols, qpos, kpos, Nk, tile_id,
            BITS, MASK_INTS, MASK_DATA, truth, SLOPES, cap, TABLE, table_sh, max_dist,
            PARTIAL: tl.constexpr, EVEN_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
            MASK_MODE: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
            L4: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, CAP: tl.constexpr,
            POS_ALIBI: tl.constexpr, POS_REL: tl.constexpr, POS_CAP: tl.constexpr):
    """Modified, masked scores of one tile, and d(s)/d(qk*scale) (the soft-cap's derivative)."""
    s = qk * scale
    dcap = 1.0
    for step in tl.static_range(3):
        if ALIBI != 0 and POS_ALIBI == step:
            dist = (kpos - qpos).to(tl.float32)
            if ALIBI == 2:
                dist = -tl.abs(dist)
            s = s + tl.load(SLOPES + h) * dist
        if REL != 0 and POS_REL == step:
            rel = tl.minimum(tl.maximum(kpos - qpos, -max_dist), max_dist) + max_dist
            s = s + tl.load(TABLE + h * table_sh + rel)
        if CAP != 0 and POS_CAP == step:
            t = _tanh(s / cap)
            s = t * cap
            dcap = 1.0 - t * t
    if PARTIAL:
        if MASK_MODE == 1:
            allowed = _mask_program(MASK_INTS, MASK_DATA, truth, b, h, rows, qpos, kpos, L0, L1, L2, L3, L4)
        else:
            r = tl.arange(0, BM)[:, None]
            c = tl.arange(0, BN)[None, :]
            byte = tl.load(BITS + tile_id * (BM * (BN // 8)) + r * (BN // 8) + c // 8)
            allowed = ((byte.to(tl.int32) >> (c % 8)) & 1) != 0
        s = tl.where(allowed & (cols < Nk), s, NEG_INF)
    elif not EVEN_N:
        s = tl.where(cols < Nk, s, NEG_INF)
    return s, dcap


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, kj, K_head, V_head, skn, svn, scale, b, h, bh, rows, qpos, koff, Nk,
              D: tl.constexpr, Dv: tl.constexpr,
              tile_row, BITS, MASK_INTS, MASK_DATA, truth, SLOPES, cap, TABLE, table_sh, max_dist,
              seed, threshold, inv_keep,
              PARTIAL: tl.constexpr, EVEN_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BD: tl.constexpr, BDV: tl.constexpr,
              MASK_MODE: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
              L4: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, CAP: tl.constexpr,
              POS_ALIBI: tl.constexpr, POS_REL: tl.constexpr, POS_CAP: tl.constexpr,
              DROPOUT: tl.constexpr, DOT: tl.constexpr):
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    cols = kj * BN + offs_n[None, :]
    kpos = koff + cols
    k = tl.load(K_head + cols.reshape(BN, 1) * skn + offs_d[None, :],
                mask=(cols.reshape(BN, 1) < Nk) & (offs_d[None, :] < D), other=0.0)
    qk = _dot(q, tl.trans(k), DOT)
    tile_id = 0
    if MASK_MODE == 2 and PARTIAL:
        tile_id = tl.load(tile_row + kj)
    s, dcap = _scores(qk, scale, b, h, rows, cols, qpos, kpos, Nk, tile_id, BITS, MASK_INTS, MASK_DATA, truth,
                      SLOPES, cap, TABLE, table_sh, max_dist, PARTIAL, EVEN_N, BM, BN, MASK_MODE,
                      L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL, POS_CAP)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == NEG_INF, 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_keep(seed, bh, rows, cols, threshold), p * inv_keep, 0.0)
    v = tl.load(V_head + cols.reshape(BN, 1) * svn + offs_dv[None, :],
                mask=(cols.reshape(BN, 1) < Nk) & (offs_dv[None, :] < Dv), other=0.0)
    if PARTIAL:  # hidden keys never reach an output, even NaN/inf values (0 * NaN would)
        v = tl.where(_seen_columns(s)[:, None], v, 0.0)
    acc = acc * alpha[:, None] + _dot(_operand(p, v, DOT), v, DOT)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, QOFF, KOFF,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sob, soh, som,
                KVN, KVI, FKVN, FKVI, snb, snh, sib, sih,
                TMAP, stb, sth, BITS, MASK_INTS, MASK_DATA, truth,
                SLOPES, cap, TABLE, table_sh, max_dist, seed, threshold, inv_keep,
                Hq, G, Nq, Nk, nQB, nKB, D: tl.constexpr, Dv: tl.constexpr, scale,
                BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                MASK_MODE: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
                L4: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, CAP: tl.constexpr,
                POS_ALIBI: tl.constexpr, POS_REL: tl.constexpr, POS_CAP: tl.constexpr,
                DROPOUT: tl.constexpr, EVEN_N: tl.constexpr, DOT: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    rows = pid_m * BM + tl.arange(0, BM)[:, None]
    q = tl.load(Q + b * sqb + h * sqh + rows * sqm + offs_d[None, :],
                mask=(rows < Nq) & (offs_d[None, :] < D), other=0.0)
    qpos = tl.load(QOFF + b) + rows
    koff = tl.load(KOFF + b)
    K_head = K + b * skb + hk * skh
    V_head = V + b * svb + hk * svh
    m_i = tl.full([BM], NEG_INF, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    lists = b * snb + h * snh + pid_m
    row_of_lists = b * sib + h * sih + pid_m * nKB
    tile_row = TMAP + b * stb + h * sth + pid_m * nKB
    n_partial = tl.load(KVN + lists)
    for t in range(0, n_partial):
        kj = tl.load(KVI + row_of_lists + t)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kj, K_head, V_head, skn, svn, scale, b, h, bh, rows, qpos, koff,
                                  Nk, D, Dv, tile_row, BITS, MASK_INTS, MASK_DATA, truth, SLOPES, cap, TABLE,
                                  table_sh, max_dist, seed, threshold, inv_keep, True, EVEN_N, BM, BN, BD, BDV,
                                  MASK_MODE, L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL, POS_CAP,
                                  DROPOUT, DOT)
    n_full = tl.load(FKVN + lists)
    for t in range(0, n_full):
        kj = tl.load(FKVI + row_of_lists + t)
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, kj, K_head, V_head, skn, svn, scale, b, h, bh, rows, qpos, koff,
                                  Nk, D, Dv, tile_row, BITS, MASK_INTS, MASK_DATA, truth, SLOPES, cap, TABLE,
                                  table_sh, max_dist, seed, threshold, inv_keep, False, EVEN_N, BM, BN, BD, BDV,
                                  MASK_MODE, L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL, POS_CAP,
                                  DROPOUT, DOT)
    seen = l_i != 0.0  # NaN (a NaN or inf visible score) propagates
    l_safe = tl.where(seen, l_i, 1.0)
    out = tl.where(seen[:, None], acc / l_safe[:, None], 0.0)
    lse = tl.where(seen, tl.where(m_i == NEG_INF, 0.0, m_i) + tl.log(l_safe), NEG_INF)
    row_ok = rows < Nq
    tl.store(O + b * sob + h * soh + rows * som + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok & (offs_dv[None, :] < Dv))
    tl.store(LSE + bh * Nq + rows.reshape(BM), lse, mask=row_ok.reshape(BM))


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


@triton.jit
def _dq_tile(dq, dslope, dtab, q, do, lse, delta, kj, K_head, V_head, skn, svn, scale, b, h, bh, rows, qpos, koff,
             Nk, D: tl.constexpr, Dv: tl.constexpr, tile_row, BITS, MASK_INTS, MASK_DATA, truth, SLOPES, cap, TABLE,
             table_sh, max_dist,
             seed, threshold, inv_keep,
             PARTIAL: tl.constexpr, EVEN_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             BD: tl.constexpr, BDV: tl.constexpr, WP: tl.constexpr,
             MASK_MODE: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
             L4: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, CAP: tl.constexpr,
             POS_ALIBI: tl.constexpr, POS_REL: tl.constexpr, POS_CAP: tl.constexpr,
             DROPOUT: tl.constexpr, DOT: tl.constexpr, SLOPE_GRAD: tl.constexpr, TABLE_GRAD: tl.constexpr):
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    cols = kj * BN + offs_n[None, :]
    kpos = koff + cols
    k = tl.load(K_head + cols.reshape(BN, 1) * skn + offs_d[None, :],
                mask=(cols.reshape(BN, 1) < Nk) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V_head + cols.reshape(BN, 1) * svn + offs_dv[None, :],
                mask=(cols.reshape(BN, 1) < Nk) & (offs_dv[None, :] < Dv), other=0.0)
    qk = _dot(q, tl.trans(k), DOT)
    tile_id = 0
    if MASK_MODE == 2 and PARTIAL:
        tile_id = tl.load(tile_row + kj)
    s, dcap = _scores(qk, scale, b, h, rows, cols, qpos, kpos, Nk, tile_id, BITS, MASK_INTS, MASK_DATA, truth,
                      SLOPES, cap, TABLE, table_sh, max_dist, PARTIAL, EVEN_N, BM, BN, MASK_MODE,
                      L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL, POS_CAP)
    p = tl.exp(s - lse[:, None])
    dp = _dot(do, tl.trans(v), DOT)
    if DROPOUT:
        dp = tl.where(_keep(seed, bh, rows, cols, threshold), dp * inv_keep, 0.0)
    ds = tl.where(s == NEG_INF, 0.0, p * (dp - delta[:, None]))  # hidden: 0 even if dp is NaN
    if PARTIAL:
        k = tl.where(_seen_columns(s)[:, None], k, 0.0)
    if SLOPE_GRAD:
        dist = (kpos - qpos).to(tl.float32)
        if ALIBI == 2:
            dist = -tl.abs(dist)
        g = ds * dist
        if POS_ALIBI < POS_CAP:
            g = g * dcap
        dslope += tl.sum(tl.sum(g, 1), 0)
    if TABLE_GRAD:
        g = ds
        if POS_REL < POS_CAP:
            g = g * dcap
        rel = tl.minimum(tl.maximum(kpos - qpos, -max_dist), max_dist) + max_dist
        q_first = tl.min(tl.min(qpos + kpos * 0, 1), 0)
        q_last = tl.max(tl.max(qpos + kpos * 0, 1), 0)
        lo = tl.minimum(tl.maximum(koff + kj * BN - q_last, -max_dist), max_dist) + max_dist
        hi = tl.minimum(tl.maximum(koff + kj * BN + BN - 1 - q_first, -max_dist), max_dist) + max_dist
        w_index = tl.arange(0, WP)
        for w in range(lo, hi + 1):
            value = tl.sum(tl.sum(tl.where(rel == w, g, 0.0), 1), 0)
            dtab = tl.where(w_index == w, dtab + value, dtab)
    ds = ds * dcap
    dq += _dot(_operand(ds, k, DOT), k, DOT)
    return dq, dslope, dtab


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, QOFF, KOFF, DSLOPE, DTAB,
               sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom, sdqb, sdqh, sdqm,
               KVN, KVI, FKVN, FKVI, snb, snh, sib, sih,
               TMAP, stb, sth, BITS, MASK_INTS, MASK_DATA, truth,
               SLOPES, cap, TABLE, table_sh, max_dist, seed, threshold, inv_keep,
               Hq, G, Nq, Nk, nQB, nKB, D: tl.constexpr, Dv: tl.constexpr, scale,
               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, WP: tl.constexpr,
               MASK_MODE: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
               L4: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, CAP: tl.constexpr,
               POS_ALIBI: tl.constexpr, POS_REL: tl.constexpr, POS_CAP: tl.constexpr,
               DROPOUT: tl.constexpr, EVEN_N: tl.constexpr, DOT: tl.constexpr,
               SLOPE_GRAD: tl.constexpr, TABLE_GRAD: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hq
    h = bh % Hq
    hk = h // G
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    rows = pid_m * BM + tl.arange(0, BM)[:, None]
    row_ok = rows < Nq
    q = tl.load(Q + b * sqb + h * sqh + rows * sqm + offs_d[None, :], mask=row_ok & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + rows * sdom + offs_dv[None, :], mask=row_ok & (offs_dv[None, :] < Dv),
                 other=0.0)
    rows1 = rows.reshape(BM)
    lse = tl.load(LSE + bh * Nq + rows1, mask=rows1 < Nq, other=float("inf"))
    delta = tl.load(DELTA + bh * Nq + rows1, mask=rows1 < Nq, other=0.0)
    qpos = tl.load(QOFF + b) + rows
    koff = tl.load(KOFF + b)
    K_head = K + b * skb + hk * skh
    V_head = V + b * svb + hk * svh
    dq = tl.zeros([BM, BD], tl.float32)
    dslope = 0.0
    dtab = tl.zeros([WP], tl.float32)
    lists = b * snb + h * snh + pid_m
    row_of_lists = b * sib + h * sih + pid_m * nKB
    tile_row = TMAP + b * stb + h * sth + pid_m * nKB
    n_partial = tl.load(KVN + lists)
    for t in range(0, n_partial):
        kj = tl.load(KVI + row_of_lists + t)
        dq, dslope, dtab = _dq_tile(dq, dslope, dtab, q, do, lse, delta, kj, K_head, V_head, skn, svn, scale, b, h, bh,
                                    rows, qpos, koff, Nk, D, Dv, tile_row, BITS, MASK_INTS, MASK_DATA, truth, SLOPES,
                                    cap, TABLE, table_sh, max_dist, seed, threshold, inv_keep, True, EVEN_N, BM, BN,
                                    BD, BDV, WP, MASK_MODE, L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL,
                                    POS_CAP, DROPOUT, DOT, SLOPE_GRAD, TABLE_GRAD)
    n_full = tl.load(FKVN + lists)
    for t in range(0, n_full):
        kj = tl.load(FKVI + row_of_lists + t)
        dq, dslope, dtab = _dq_tile(dq, dslope, dtab, q, do, lse, delta, kj, K_head, V_head, skn, svn, scale, b, h, bh,
                                    rows, qpos, koff, Nk, D, Dv, tile_row, BITS, MASK_INTS, MASK_DATA, truth, SLOPES,
                                    cap, TABLE, table_sh, max_dist, seed, threshold, inv_keep, False, EVEN_N, BM, BN,
                                    BD, BDV, WP, MASK_MODE, L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL,
                                    POS_CAP, DROPOUT, DOT, SLOPE_GRAD, TABLE_GRAD)
    tl.store(DQ + b * sdqb + h * sdqh + rows * sdqm + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok & (offs_d[None, :] < D))
    if SLOPE_GRAD:
        tl.store(DSLOPE + bh * nQB + pid_m, dslope)
    if TABLE_GRAD:
        tl.store(DTAB + (bh * nQB + pid_m) * WP + tl.arange(0, WP), dtab)


@triton.jit
def _dkdv_tile(dk, dv, k, v, qi, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, sqm, sdom, scale, b, h, bh, cols,
               kpos, qoff, Nq, Nk, D: tl.constexpr, Dv: tl.constexpr, tile_col, nKB, BITS, MASK_INTS, MASK_DATA, truth,
               SLOPES, cap, TABLE, table_sh, max_dist, seed, threshold, inv_keep,
               PARTIAL: tl.constexpr, EVEN_N: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BD: tl.constexpr, BDV: tl.constexpr,
               MASK_MODE: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
               L4: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, CAP: tl.constexpr,
               POS_ALIBI: tl.constexpr, POS_REL: tl.constexpr, POS_CAP: tl.constexpr,
               DROPOUT: tl.constexpr, DOT: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    rows = qi * BM + tl.arange(0, BM)[:, None]
    row_ok = rows < Nq
    q = tl.load(Q_head + rows * sqm + offs_d[None, :], mask=row_ok & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO_head + rows * sdom + offs_dv[None, :], mask=row_ok & (offs_dv[None, :] < Dv), other=0.0)
    rows1 = rows.reshape(BM)
    lse = tl.load(LSE_head + rows1, mask=rows1 < Nq, other=float("inf"))
    delta = tl.load(DELTA_head + rows1, mask=rows1 < Nq, other=0.0)
    qpos = qoff + rows
    qk = _dot(q, tl.trans(k), DOT)
    tile_id = 0
    if MASK_MODE == 2 and PARTIAL:
        tile_id = tl.load(tile_col + qi * nKB)
    s, dcap = _scores(qk, scale, b, h, rows, cols, qpos, kpos, Nk, tile_id, BITS, MASK_INTS, MASK_DATA, truth,
                      SLOPES, cap, TABLE, table_sh, max_dist, PARTIAL, EVEN_N, BM, BN, MASK_MODE,
                      L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL, POS_CAP)
    p = tl.exp(s - lse[:, None])
    dp = _dot(do, tl.trans(v), DOT)
    if DROPOUT:
        keep = _keep(seed, bh, rows, cols, threshold)
        dv += _dot(tl.trans(_operand(tl.where(keep, p * inv_keep, 0.0), do, DOT)), do, DOT)
        dp = tl.where(keep, dp * inv_keep, 0.0)
    else:
        dv += _dot(tl.trans(_operand(p, do, DOT)), do, DOT)
    ds = tl.where(s == NEG_INF, 0.0, p * (dp - delta[:, None]) * dcap)
    dk += _dot(tl.trans(_operand(ds, q, DOT)), q, DOT)
    if ATOMIC_DQ:  # dq of these rows from this key tile, added into a float32 buffer (order varies run to run)
        k_seen = k
        if PARTIAL:  # keys hidden from every row of the tile (even NaN) never reach dq
            k_seen = tl.where(_seen_columns(s)[:, None], k, 0.0)
        dq = _dot(_operand(ds, k_seen, DOT), k_seen, DOT) * scale
        offs_d = tl.arange(0, BD)
        tl.atomic_add(DQ_head + rows * D + offs_d[None, :], dq, mask=row_ok & (offs_d[None, :] < D))
    return dk, dv


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, QOFF, KOFF, DQ_ACC,
                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdom,
                 sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
                 QN, QI, FQN, FQI, snb, snh, sib, sih,
                 TMAP, stb, sth, BITS, MASK_INTS, MASK_DATA, truth,
                 SLOPES, cap, TABLE, table_sh, max_dist, seed, threshold, inv_keep,
                 Hq, Hkv, G, Nq, Nk, nQB, nKB, D: tl.constexpr, Dv: tl.constexpr, scale,
                 BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr,
                 MASK_MODE: tl.constexpr, L0: tl.constexpr, L1: tl.constexpr, L2: tl.constexpr, L3: tl.constexpr,
                 L4: tl.constexpr, ALIBI: tl.constexpr, REL: tl.constexpr, CAP: tl.constexpr,
                 POS_ALIBI: tl.constexpr, POS_REL: tl.constexpr, POS_CAP: tl.constexpr,
                 DROPOUT: tl.constexpr, EVEN_N: tl.constexpr, DOT: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    kj = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // Hkv
    hk = bhk % Hkv
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    cols = kj * BN + tl.arange(0, BN)[None, :]
    col_ok = cols.reshape(BN, 1) < Nk
    k = tl.load(K + b * skb + hk * skh + cols.reshape(BN, 1) * skn + offs_d[None, :],
                mask=col_ok & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + b * svb + hk * svh + cols.reshape(BN, 1) * svn + offs_dv[None, :],
                mask=col_ok & (offs_dv[None, :] < Dv), other=0.0)
    kpos = tl.load(KOFF + b) + cols
    qoff = tl.load(QOFF + b)
    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    for g in range(0, G):
        h = hk * G + g
        bh = b * Hq + h
        Q_head = Q + b * sqb + h * sqh
        DO_head = DO + b * sdob + h * sdoh
        LSE_head = LSE + bh * Nq
        DELTA_head = DELTA + bh * Nq
        DQ_head = DQ_ACC + bh * Nq * D
        lists = b * snb + h * snh + kj
        row_of_lists = b * sib + h * sih + kj * nQB
        tile_col = TMAP + b * stb + h * sth + kj
        n_partial = tl.load(QN + lists)
        for t in range(0, n_partial):
            qi = tl.load(QI + row_of_lists + t)
            dk, dv = _dkdv_tile(dk, dv, k, v, qi, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, sqm, sdom, scale,
                                b, h, bh,
                                cols, kpos, qoff, Nq, Nk, D, Dv, tile_col, nKB, BITS, MASK_INTS, MASK_DATA, truth,
                                SLOPES, cap, TABLE, table_sh, max_dist, seed, threshold, inv_keep, True, EVEN_N,
                                BM, BN, BD, BDV, MASK_MODE, L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL,
                                POS_CAP, DROPOUT, DOT, ATOMIC_DQ)
        n_full = tl.load(FQN + lists)
        for t in range(0, n_full):
            qi = tl.load(FQI + row_of_lists + t)
            dk, dv = _dkdv_tile(dk, dv, k, v, qi, Q_head, DO_head, LSE_head, DELTA_head, DQ_head, sqm, sdom, scale,
                                b, h, bh,
                                cols, kpos, qoff, Nq, Nk, D, Dv, tile_col, nKB, BITS, MASK_INTS, MASK_DATA, truth,
                                SLOPES, cap, TABLE, table_sh, max_dist, seed, threshold, inv_keep, False, EVEN_N,
                                BM, BN, BD, BDV, MASK_MODE, L0, L1, L2, L3, L4, ALIBI, REL, CAP, POS_ALIBI, POS_REL,
                                POS_CAP, DROPOUT, DOT, ATOMIC_DQ)
    tl.store(DK + b * sdkb + hk * sdkh + cols.reshape(BN, 1) * sdkn + offs_d[None, :],
             (dk * scale).to(DK.dtype.element_ty), mask=col_ok & (offs_d[None, :] < D))
    tl.store(DV + b * sdvb + hk * sdvh + cols.reshape(BN, 1) * sdvn + offs_dv[None, :],
             dv.to(DV.dtype.element_ty), mask=col_ok & (offs_dv[None, :] < Dv))
