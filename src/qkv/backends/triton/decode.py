"""Decoding: split-KV attention of a few query tokens over a long (contiguous or paged) cache.

:func:`decode_problem` serves a :class:`~qkv.problem.Problem` (the backend's path for inference
calls with few queries); :func:`paged_attention` reads a :class:`~qkv.cache.PagedKVCache`'s pages
in place through a block table, with ragged lengths per sequence. The key tiles are split among
programs so that a batch of one still fills the GPU; each split's output and log-sum-exp are
merged exactly (:func:`merge_splits`).
"""

from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

from ...masks import EMPTY
from ...problem import Problem, make_problem
from . import configs
from .blocks import tile_kinds
from .decode_kernels import _decode_kernel
from .blocks import positions
from .programs import BITS, mask_program, score_program

configs.patch_interpreter()

#: Most stacked query rows (query heads per key head x query tokens) a decode program holds.
MAX_DECODE_ROWS = 64


def merge_splits(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ``outs (..., S, Dv)`` / ``lses (..., S)`` over the split axis by log-sum-exp.
    Rows no split saw anything of: zeros and ``-inf``."""
    top = lses.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - top)
    total = w.sum(-1, keepdim=True)
    seen = total != 0  # NaN propagates
    out = (w[..., None] * outs).sum(-2) / torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, top + torch.log(torch.where(seen, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


def _splits(batch_heads: int, key_tiles: int, device: torch.device) -> int:
    """Enough splits for ~2 programs per SM (a few in the interpreter, to exercise the merge)."""
    if device.type != "cuda":
        return max(1, min(key_tiles, 3))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(key_tiles, math.ceil(2 * sms / batch_heads)))


def _block_n(head_dim: int, dtype: torch.dtype) -> int:
    """Keys per tile: 64, or 32 for wide heads and for float32 (IEEE dots need more registers)."""
    if configs.interpreting():
        return 16
    return 64 if head_dim <= 128 and dtype != torch.float32 else 32


def _launch(p: Problem, mask, score, k, v, qoff, koff, klen, block_table, page_size, kinds, num_splits):
    B, Hq, Hkv, G, Nq = p.batch, p.q_heads, p.kv_heads, p.group, p.nq
    block_n = _block_n(max(p.head_dim, p.v_dim), p.dtype)
    max_len = int(klen.max()) if klen.numel() else 0
    key_tiles = max(1, -(-max_len // block_n))
    splits = num_splits or _splits(B * Hkv, key_tiles, p.device)
    per_split = -(-key_tiles // splits)
    splits = -(-key_tiles // per_split)
    o_part = torch.empty(B, Hq, Nq, splits, p.v_dim, dtype=torch.float32, device=p.device)
    lse_part = torch.empty(B, Hq, Nq, splits, dtype=torch.float32, device=p.device)
    dev = p.device
    dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
    dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
    tensors = p.score_mod.tensors if p.score_mod is not None else ()
    slopes = dummy_f if score.slopes_index is None else tensors[score.slopes_index].detach().float().contiguous()
    table = dummy_f if score.table_index is None else tensors[score.table_index].detach().float().contiguous()
    table_sh = table.shape[1] if table.dim() == 2 else 0
    mask_ints = mask.ints if mask.mode == 1 else torch.zeros(8, dtype=torch.int32, device=dev)
    mask_data = mask.data if mask.mode == 1 else dummy_i
    bt = dummy_i if block_table is None else block_table
    kind_t = dummy_i.to(torch.int8) if kinds is None else kinds
    q = p.q
    c = mask.codes
    dot = 1 if p.dtype == torch.float32 else (2 if configs.interpreting() else 0)
    _decode_kernel[(splits, B * Hkv)](
        q, k, v, o_part, lse_part, qoff, koff, klen, bt, kind_t,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], bt.stride(0) if bt.dim() == 2 else 0,
        kind_t.stride(0) if kind_t.dim() == 2 and kind_t.shape[0] > 1 else 0, page_size,
        mask_ints, mask_data, mask.truth, slopes, score.cap_value, table, table_sh, score.max_distance,
        Hq, Hkv, G, Nq, p.head_dim, p.v_dim, p.scale, per_split, splits,
        BM=max(16, triton.next_power_of_2(G * Nq)), BN=block_n, BD=max(16, triton.next_power_of_2(p.head_dim)),
        BDV=max(16, triton.next_power_of_2(p.v_dim)), PAGED=block_table is not None, USE_KINDS=kinds is not None,
        MASK_MODE=mask.mode, L0=c[0], L1=c[1], L2=c[2], L3=c[3], L4=c[4], ALIBI=score.alibi, REL=score.rel,
        CAP=score.cap, POS_ALIBI=score.pos_alibi, POS_REL=score.pos_rel, POS_CAP=score.pos_cap, DOT=dot,
        num_warps=4, num_stages=2)
    out, lse = merge_splits(o_part, lse_part)
    return out.to(p.dtype), lse


def serves(p: Problem, mask) -> bool:
    """Whether the backend routes ``p`` to the decode kernel: inference, few stacked query rows,
    no dropout, a mask the kernel evaluates (not bit-packed)."""
    return (not p.requires_grad and p.dropout_p == 0 and p.group * p.nq <= MAX_DECODE_ROWS
            and mask.mode != BITS and p.nk >= 4 * p.nq)


def decode_problem(p: Problem, mask, score, num_splits: int | None = None) -> tuple[Tensor, Tensor]:
    """Split-KV attention for ``p`` (see :func:`serves`); returns ``(out, lse)``."""
    qoff, koff = positions(p)
    klen = torch.full((p.batch,), p.nk, dtype=torch.int32, device=p.device)
    kinds = None
    if p.mask is not None:  # skip key tiles that no query head of a batch element sees
        block_n = _block_n(max(p.head_dim, p.v_dim), p.dtype)
        per = tile_kinds(p, p.nq, block_n)  # (B|1, H|1, 1, nKB)
        kinds = (per.amax(dim=(1, 2)) != EMPTY).to(torch.int8).contiguous()
    k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (p.k, p.v))
    return _launch(p, mask, score, k, v, qoff, koff, klen, None, 1, kinds, num_splits)


def paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, lengths: Tensor, mask=None,
                    *, scale: float | None = None, score_mod=None, return_lse: bool = False,
                    num_splits: int | None = None):
    """Attention of ``q (B, Hq, Nq, D)`` over paged keys and values, read in place.

    Args:
        k_pages, v_pages: ``(num_pages, Hkv, page_size, D|Dv)`` (one layer of
            :attr:`qkv.cache.PagedKVCache.k_pages`).
        block_table: ``(B, max_pages)`` integer: sequence ``b``'s key ``j`` is in page
            ``block_table[b, j // page_size]`` at offset ``j % page_size``.
        lengths: ``(B,)`` keys per sequence (ragged). The queries are each sequence's newest
            ``Nq`` tokens: query ``i`` of sequence ``b`` is at position ``lengths[b] - Nq + i``.
        mask: None or a built-in :class:`qkv.Mask` over positions (``sliding_window(w)``,
            ``sliding_window(w) | key_padding(sinks)``, ``document``, ...); sized for
            ``Nk = max(lengths)``. Causality is implied by the lengths for ``Nq == 1``; pass
            ``qkv.causal()`` for several queries.
        scale, score_mod: as in :func:`qkv.attention` (ALiBi, soft-cap, relative bias).

    Returns ``out (B, Hq, Nq, Dv)`` (and ``lse (B, Hq, Nq)`` with ``return_lse``). Inference only.
    """
    for name, t in (("q", q), ("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"paged_attention: {name} must be a 4-D tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    B, Hq, Nq, D = q.shape
    num_pages, Hkv, page_size, Dk = k_pages.shape
    if Dk != D or v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(f"paged_attention: k_pages {tuple(k_pages.shape)} / v_pages {tuple(v_pages.shape)} do not "
                         f"match q {tuple(q.shape)} as (num_pages, Hkv, page_size, D)")
    if block_table.dim() != 2 or block_table.shape[0] != B or block_table.is_floating_point():
        raise ValueError(f"paged_attention: block_table must be an integer (B={B}, max_pages) tensor, "
                         f"got {block_table.dtype} {tuple(block_table.shape)}")
    lengths = torch.as_tensor(lengths, device=q.device)
    if lengths.shape != (B,) or lengths.is_floating_point():
        raise ValueError(f"paged_attention: lengths must be (B={B},) integers, got {tuple(lengths.shape)}")
    max_len = int(lengths.max())
    if int(lengths.min()) < Nq or max_len > block_table.shape[1] * page_size:
        raise ValueError(f"paged_attention: lengths must lie in [Nq={Nq}, max_pages * page_size = "
                         f"{block_table.shape[1] * page_size}], got {lengths.tolist()}")
    # A problem over the longest sequence validates the mask and score modifier (no copy of K/V).
    k = k_pages.new_empty(1).expand(B, Hkv, max_len, D)
    v = v_pages.new_empty(1).expand(B, Hkv, max_len, v_pages.shape[-1])
    p = make_problem(q, k, v, mask, scale=scale, score_mod=score_mod)
    mask_p = mask_program(p.mask, B, Nq, max_len, q.device)
    if mask_p.mode == BITS:
        raise ValueError(f"paged_attention: mask {p.mask!r} is not built from qkv's built-in masks")
    score = score_program(p.score_mod)
    if isinstance(score, str):
        raise ValueError(f"paged_attention: {score}")
    klen = lengths.to(torch.int32).contiguous()
    qoff = (klen - Nq).contiguous()
    koff = torch.zeros(B, dtype=torch.int32, device=q.device)
    with torch.no_grad():
        out, lse = _launch(p, mask_p, score, k_pages, v_pages, qoff, koff, klen,
                           block_table.to(torch.int32).contiguous(), page_size, None, num_splits)
    return (out, lse) if return_lse else out


def pool_tables(pool, seqs: list[int]) -> tuple[Tensor, Tensor]:
    """``(block_table (B, max_pages) int32, lengths (B,) int32)`` of ``seqs`` in a
    :class:`~qkv.cache.PagedKVCache`, on the pool's device, for :func:`paged_attention`."""
    tables = [pool.block_table(s) for s in seqs]
    width = max(1, max(len(t) for t in tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=pool.device)
    lengths = torch.tensor([pool.length(s) for s in seqs], dtype=torch.int32, device=pool.device)
    return table, lengths
