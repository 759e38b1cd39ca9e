"""Decoding: split-KV attention of a few query tokens over a long (contiguous or paged) cache.

:func:`decode_problem` serves a :class:`~qkv.problem.Problem` (the backend's path for inference
calls with few queries); :func:`paged_attention` reads a :class:`~qkv.cache.PagedKVCache`'s pages
in place through a block table, with ragged lengths per sequence, and :class:`PagedDecode` is the
same prepared once for a decode step and run for every layer (what a ``PagedBatch`` step uses).

:class:`DecodeLaunch` holds everything but the tensors read: positions, the mask and score
programs, and per tile size the list of key tiles each sequence can see (only where the mask can
hide whole tiles: a sliding window, sink tokens, documents; built from the mask's block view, so
tiles outside a window or before the sinks are never visited and the splits share the visible
ones evenly). The key tiles are split among programs so that a batch of one still fills the GPU;
the splits' outputs are merged by log-sum-exp in one more launch (``_merge_kernel``).
"""

from __future__ import annotations

import functools
import math

import torch
import triton
from torch import Tensor

from ...masks import EMPTY
from ...problem import Problem, make_problem
from . import PagedUnsupported, configs
from .blocks import _list_of, positions, tile_kinds
from .decode_kernels import _decode_kernel, _merge_kernel
from .programs import BITS, CAUSAL, PROGRAM, MaskProgram, ScoreProgram, mask_program, score_program

configs.patch_interpreter()

#: Most stacked query rows (query heads per key head x query tokens) a decode program holds.
MAX_DECODE_ROWS = 64
#: Most splits of one sequence's key tiles (the merge reads them one at a time).
MAX_SPLITS = 128


def merge_splits(outs: Tensor, lses: Tensor) -> tuple[Tensor, Tensor]:
    """Merge ``outs (..., S, Dv)`` / ``lses (..., S)`` over the split axis by log-sum-exp (what
    ``_merge_kernel`` computes, in PyTorch; for tests). Rows no split saw anything of: zeros, ``-inf``."""
    top = lses.amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    w = torch.exp(lses - top)
    total = w.sum(-1, keepdim=True)
    seen = total != 0  # NaN propagates
    out = (w[..., None] * outs).sum(-2) / torch.where(seen, total, torch.ones_like(total))
    lse = torch.where(seen, top + torch.log(torch.where(seen, total, torch.ones_like(total))),
                      torch.full_like(total, float("-inf")))
    return out, lse.squeeze(-1)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _splits(batch_heads: int, key_tiles: int, device: torch.device) -> int:
    """Enough splits for ~2 programs per SM (a few in the interpreter, to exercise the merge)."""
    if device.type != "cuda":
        return max(1, min(key_tiles, 3))
    return max(1, min(key_tiles, MAX_SPLITS, math.ceil(2 * _sm_count(device) / batch_heads)))


def _runs_on(device: torch.device) -> bool:
    """Whether the kernels can run on ``device`` (CUDA; the CPU under the interpreter)."""
    return device.type == "cuda" or configs.interpreting()


def _skips_tiles(mask: MaskProgram) -> bool:
    """Whether the mask can hide whole key tiles of the newest queries (not causal alone, whose
    visible keys are exactly those up to each sequence's length)."""
    return mask.mode == PROGRAM and any(code not in (0, CAUSAL) for code in mask.codes)


class DecodeLaunch:
    """The arguments of a decode launch apart from q, k and v (see the module docstring).

    Args:
        p: the problem (shapes, dtype, scale, bound mask, score modifier, positions per batch
            element: query row ``i`` of ``b`` at ``q_offset[b] + i``, key column ``j`` at
            ``k_offset[b] + j``).
        mask, score: its compiled programs (``mask`` not bit-packed).
        klen: ``(B,)`` int32 keys per batch element (on the device); ``max_len`` bounds them (host int).
        block_table, page_size: paged keys (``block_table (B, W)`` int32), or None.
    """

    def __init__(self, p: Problem, mask: MaskProgram, score: ScoreProgram, klen: Tensor, max_len: int, *,
                 block_table: Tensor | None = None, page_size: int = 1, num_splits: int | None = None):
        if mask.mode == BITS:
            raise PagedUnsupported(f"mask {p.mask!r} is not built from qkv's built-in masks")
        self.p, self.mask, self.score = p, mask, score
        self.qoff, self.koff = positions(p)
        self.klen, self.max_len = klen, max_len
        self.block_table, self.page_size, self.num_splits = block_table, page_size, num_splits
        dev = p.device
        self.dummy_i = torch.zeros(1, dtype=torch.int32, device=dev)
        dummy_f = torch.zeros(1, dtype=torch.float32, device=dev)
        tensors = p.score_mod.tensors if p.score_mod is not None else ()
        self.slopes = dummy_f if score.slopes_index is None else \
            tensors[score.slopes_index].detach().float().contiguous()
        self.table = dummy_f if score.table_index is None else tensors[score.table_index].detach().float().contiguous()
        self.table_sh = self.table.shape[1] if self.table.dim() == 2 else 0
        self.mask_ints = mask.ints if mask.mode == PROGRAM else torch.zeros(8, dtype=torch.int32, device=dev)
        self.mask_data = mask.data if mask.mode == PROGRAM else self.dummy_i
        self.skip = _skips_tiles(mask)
        self.dot = 1 if p.dtype == torch.float32 else (2 if configs.interpreting() else 0)
        self._lists: dict[int, tuple[Tensor, Tensor, int]] = {}

    def tile_list(self, block_n: int) -> tuple[Tensor, Tensor, int] | None:
        """``(tiles (B, nKB) int32, counts (B,) int32, max count)``: per batch element the key
        tiles (of ``block_n`` keys) that some query head may see, ascending, within its length;
        None where no tile can be skipped (no mask, causal). One host sync (the max count)."""
        if not self.skip:
            return None
        if block_n not in self._lists:
            p = self.p
            kinds = tile_kinds(p, p.nq, block_n)  # (B|1, H|1, 1, nKB)
            nkb = kinds.shape[-1]
            within = torch.arange(nkb, device=kinds.device)[None, :] * block_n < self.klen.to(kinds.device)[:, None]
            visible = (kinds.amax(dim=(1, 2)) != EMPTY).expand(p.batch, nkb) & within
            counts, tiles = _list_of(visible)
            tiles, counts = tiles.to(p.device), counts.to(p.device)
            self._lists[block_n] = (tiles, counts, int(counts.max()) if counts.numel() else 0)
        return self._lists[block_n]

    def key(self, paged: int) -> tuple:
        p = self.p
        return (str(p.device), "decode", p.head_dim, p.v_dim, p.dtype, self.mask.mask_class, self.score.score_class,
                paged, self.rows)

    @property
    def rows(self) -> int:
        """The decode tile's rows: the stacked query rows, padded to a power of two (>= 16)."""
        return max(16, triton.next_power_of_2(self.p.group * self.p.nq))

    def paged_mode(self, block_n: int) -> int:
        if self.block_table is None:
            return 0
        return 2 if self.page_size % block_n == 0 else 1

    def run(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``(out (B, Hq, Nq, Dv) in q's dtype, lse (B, Hq, Nq) float32)``. ``k``, ``v``:
        ``(B, Hkv, Nk, D|Dv)``, or pages ``(num_pages, Hkv, page_size, D|Dv)``, unit last stride."""
        p = self.p
        out = torch.empty(p.batch, p.q_heads, p.nq, p.v_dim, dtype=q.dtype, device=q.device)
        lse = torch.empty(p.batch, p.q_heads, p.nq, dtype=torch.float32, device=q.device)
        options = configs.candidates("decode", max(p.head_dim, p.v_dim), p.dtype == torch.float32)
        run = lambda cfg: self._run(cfg, q, k, v, out, lse)  # noqa: E731
        cfg = configs.pick(self.key(self.paged_mode(options[0].block_n)), options, run)
        run(cfg)
        return out, lse

    def _run(self, cfg: configs.Config, q, k, v, out, lse) -> None:
        p = self.p
        B, Hq, Hkv, G, Nq = p.batch, p.q_heads, p.kv_heads, p.group, p.nq
        block_n = cfg.block_n
        listed = self.tile_list(block_n)
        if listed is None:
            tiles, counts, visible = self.dummy_i, self.dummy_i, -(-self.max_len // block_n)
        else:
            tiles, counts, visible = listed
        visible = max(1, visible)
        splits = self.num_splits or _splits(B * Hkv, visible, p.device)
        per_split = -(-visible // splits)
        splits = -(-visible // per_split)
        o_part = torch.empty(B, Hq, Nq, splits, p.v_dim, dtype=torch.float32, device=p.device)
        lse_part = torch.empty(B, Hq, Nq, splits, dtype=torch.float32, device=p.device)
        bt = self.dummy_i if self.block_table is None else self.block_table
        c, s = self.mask.codes, self.score
        bd, bdv = max(16, triton.next_power_of_2(p.head_dim)), max(16, triton.next_power_of_2(p.v_dim))
        _decode_kernel[(splits, B * Hkv)](
            q, k, v, o_part, lse_part, self.qoff, self.koff, self.klen, bt, tiles, counts,
            *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], bt.stride(0) if bt.dim() == 2 else 0,
            tiles.stride(0) if tiles.dim() == 2 else 0, self.page_size,
            self.mask_ints, self.mask_data, self.mask.truth, self.slopes, s.cap_value, self.table, self.table_sh,
            s.max_distance, Hq, Hkv, G, Nq, p.head_dim, p.v_dim, p.scale, per_split, splits,
            BM=self.rows, BN=block_n, BD=bd, BDV=bdv, PAGED=self.paged_mode(block_n), USE_LIST=listed is not None,
            MASK_MODE=self.mask.mode, L0=c[0], L1=c[1], L2=c[2], L3=c[3], L4=c[4], ALIBI=s.alibi, REL=s.rel,
            CAP=s.cap, POS_ALIBI=s.pos_alibi, POS_REL=s.pos_rel, POS_CAP=s.pos_cap, DOT=self.dot,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        _merge_kernel[(B * Hq * Nq,)](
            o_part, lse_part, out, lse, splits, *out.stride()[:3], Hq, Nq, p.v_dim,
            BS=max(2, triton.next_power_of_2(splits)), BDV=bdv, num_warps=1 if configs.interpreting() else 4)


def serves(p: Problem, mask) -> bool:
    """Whether the backend routes ``p`` to the decode kernel: inference, few stacked query rows,
    no dropout, a mask the kernel evaluates (not bit-packed)."""
    return (not p.requires_grad and p.dropout_p == 0 and p.group * p.nq <= MAX_DECODE_ROWS
            and mask.mode != BITS and p.nk >= 4 * p.nq)


def _unit_last(t: Tensor) -> Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def decode_problem(p: Problem, mask, score, num_splits: int | None = None) -> tuple[Tensor, Tensor]:
    """Split-KV attention for ``p`` (see :func:`serves`); returns ``(out, lse)``."""
    klen = torch.full((p.batch,), p.nk, dtype=torch.int32, device=p.device)
    launch = DecodeLaunch(p, mask, score, klen, p.nk, num_splits=num_splits)
    return launch.run(*(_unit_last(t) for t in (p.q, p.k, p.v)))


def _host_lengths(lengths, batch: int, device, max_length):
    """``(lengths (B,) int32 on device, max length)``; validated on the host when they are there
    (or when no ``max_length`` is given: one sync)."""
    t = torch.as_tensor(lengths)
    if t.shape != (batch,) or t.is_floating_point() or t.dtype == torch.bool:
        raise ValueError(f"paged_attention: lengths must be (B={batch},) integers, got {t.dtype} {tuple(t.shape)}")
    host = t if t.device.type == "cpu" else (None if max_length is not None else t.cpu())
    low = int(host.min()) if host is not None else None
    high = int(host.max()) if host is not None else int(max_length)
    if max_length is not None:
        if host is not None and high > max_length:
            raise ValueError(f"paged_attention: max_length={max_length} is below the longest length {high}")
        high = int(max_length)
    return t.to(device=device, dtype=torch.int32).contiguous(), low, high


class PagedDecode:
    """Attention of a few newest query tokens over paged keys and values, prepared once (block
    table, lengths, positions, mask and score programs, visible tiles) and run on any number of
    layers that share them: ``plan(q, k_pages, v_pages) -> (out, lse)``.

    Arguments as :func:`paged_attention`, with the pages' layout given instead of the pages:
    ``page_size``, ``kv_heads`` and ``v_dim``. Raises :class:`PagedUnsupported` (a ``ValueError``)
    for what the kernel does not serve, ``ValueError`` for malformed arguments.
    """

    def __init__(self, q: Tensor, block_table: Tensor, lengths, mask=None, *, page_size: int, kv_heads: int,
                 v_dim: int | None = None, scale: float | None = None, score_mod=None, max_length: int | None = None,
                 num_splits: int | None = None):
        if not isinstance(q, Tensor) or q.dim() != 4:
            raise ValueError(f"paged_attention: q must be a 4-D tensor (B, Hq, Nq, D), got "
                             f"{getattr(q, 'shape', type(q).__name__)}")
        B, Hq, Nq, D = q.shape
        v_dim = D if v_dim is None else v_dim
        if q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise PagedUnsupported(f"paged_attention: q is {q.dtype}; the kernel takes float32, bfloat16, float16")
        if not _runs_on(q.device):
            raise PagedUnsupported(f"paged_attention: q is on {q.device}; the kernel runs on CUDA "
                                   "(on CPU only under TRITON_INTERPRET=1)")
        if torch.is_grad_enabled() and q.requires_grad:
            raise PagedUnsupported("paged_attention: inference only (q requires grad)")
        if Hq % kv_heads or (Hq // kv_heads) * Nq > MAX_DECODE_ROWS:
            raise PagedUnsupported(f"paged_attention: query heads per key head x Nq = {Hq // max(kv_heads, 1)} x "
                                   f"{Nq} stacked rows; the kernel serves up to {MAX_DECODE_ROWS}" if Hq % kv_heads == 0
                                   else f"paged_attention: Hq={Hq} is not a multiple of Hkv={kv_heads}")
        if max(D, v_dim) > 512:
            raise PagedUnsupported(f"paged_attention: head dims up to 512, got {max(D, v_dim)}")
        if (not isinstance(block_table, Tensor) or block_table.dim() != 2 or block_table.shape[0] != B
                or block_table.is_floating_point() or block_table.dtype == torch.bool):
            raise ValueError(f"paged_attention: block_table must be an integer (B={B}, max_pages) tensor, got "
                             f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                             f"{tuple(getattr(block_table, 'shape', ()))}")
        klen, low, high = _host_lengths(lengths, B, q.device, max_length)
        room = block_table.shape[1] * page_size
        if (low is not None and low < Nq) or high > room or high < Nq:
            raise ValueError(f"paged_attention: lengths must lie in [Nq={Nq}, max_pages * page_size = {room}], got "
                             f"{torch.as_tensor(lengths).tolist() if low is not None else f'max_length={high}'}")
        self.shape = (B, Hq, Nq, D, kv_heads, page_size, v_dim)
        # A problem over the longest sequence validates the mask and score modifier (no copy of K/V)
        # and gives the mask's block view at each sequence's positions (its newest Nq tokens).
        k = q.new_empty(1).expand(B, kv_heads, high, D)
        v = q.new_empty(1).expand(B, kv_heads, high, v_dim)
        qoff = klen - Nq
        p = make_problem(q, k, v, mask, scale=scale, score_mod=score_mod, q_offset=qoff)
        score = score_program(p.score_mod)
        if isinstance(score, str):
            raise PagedUnsupported(f"paged_attention: {score}")
        mask_p = mask_program(p.mask, B, Nq, high, q.device)
        if mask_p.mode == BITS:
            raise PagedUnsupported(f"paged_attention: mask {p.mask!r} is not built from qkv's built-in masks")
        self.launch = DecodeLaunch(p, mask_p, score, klen, high, block_table=block_table.to(torch.int32).contiguous(),
                                   page_size=page_size, num_splits=num_splits)

    def __call__(self, q: Tensor, k_pages: Tensor, v_pages: Tensor) -> tuple[Tensor, Tensor]:
        B, Hq, Nq, D, Hkv, page_size, v_dim = self.shape
        for name, t, want in (("q", q, (B, Hq, Nq, D)), ("k_pages", k_pages, (None, Hkv, page_size, D)),
                              ("v_pages", v_pages, (None, Hkv, page_size, v_dim))):
            if not isinstance(t, Tensor) or t.dim() != 4 or any(w not in (None, s) for s, w in zip(t.shape, want)):
                shape = tuple("P" if w is None else w for w in want)
                raise ValueError(f"paged_attention: {name} must have shape {shape}, got "
                                 f"{getattr(t, 'shape', type(t).__name__)}")
        if q.dtype != self.launch.p.dtype or k_pages.dtype != q.dtype or v_pages.dtype != q.dtype:
            raise ValueError(f"paged_attention: q, k_pages, v_pages must share a dtype ({self.launch.p.dtype}), got "
                             f"{q.dtype}, {k_pages.dtype}, {v_pages.dtype}")
        with torch.no_grad():
            return self.launch.run(_unit_last(q), _unit_last(k_pages), _unit_last(v_pages))


def paged_attention(q: Tensor, k_pages: Tensor, v_pages: Tensor, block_table: Tensor, lengths, mask=None, *,
                    scale: float | None = None, score_mod=None, return_lse: bool = False,
                    num_splits: int | None = None, max_length: int | None = None):
    """Attention of ``q (B, Hq, Nq, D)`` over paged keys and values, read in place.

    Args:
        k_pages, v_pages: ``(num_pages, Hkv, page_size, D|Dv)`` (one layer of
            :attr:`qkv.cache.PagedKVCache.k_pages`).
        block_table: ``(B, max_pages)`` integer: sequence ``b``'s key ``j`` is in page
            ``block_table[b, j // page_size]`` at offset ``j % page_size``.
        lengths: ``(B,)`` keys per sequence (ragged). The queries are each sequence's newest
            ``Nq`` tokens: query ``i`` of sequence ``b`` is at position ``lengths[b] - Nq + i``.
        mask: None or a built-in :class:`qkv.Mask` over positions (``sliding_window(w)``,
            ``sliding_window(w) | (key_padding(sinks) & causal())``, ``document``, ...); sized for
            ``Nk = max(lengths)``. Key tiles it hides from every query of a sequence (outside a
            window, between the sinks and the window) are not read. Causality is implied by the
            lengths for ``Nq == 1``; pass ``qkv.causal()`` for several queries.
        scale, score_mod: as in :func:`qkv.attention` (ALiBi, soft-cap, relative bias).
        max_length: a bound on ``lengths`` known on the host (spares reading device lengths back).

    Returns ``out (B, Hq, Nq, Dv)`` (and ``lse (B, Hq, Nq)`` with ``return_lse``). Inference only.
    """
    for name, t in (("k_pages", k_pages), ("v_pages", v_pages)):
        if not isinstance(t, Tensor) or t.dim() != 4:
            raise ValueError(f"paged_attention: {name} must be a 4-D tensor, got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    if v_pages.shape[:3] != k_pages.shape[:3] or (isinstance(q, Tensor) and k_pages.shape[-1] != q.shape[-1]):
        raise ValueError(f"paged_attention: k_pages {tuple(k_pages.shape)} / v_pages {tuple(v_pages.shape)} do not "
                         f"match q {tuple(getattr(q, 'shape', ()))} as (num_pages, Hkv, page_size, D)")
    plan = PagedDecode(q, block_table, lengths, mask, page_size=k_pages.shape[2], kv_heads=k_pages.shape[1],
                       v_dim=v_pages.shape[-1], scale=scale, score_mod=score_mod, max_length=max_length,
                       num_splits=num_splits)
    out, lse = plan(q, k_pages, v_pages)
    return (out, lse) if return_lse else out


def pool_tables(pool, seqs: list[int]) -> tuple[Tensor, Tensor]:
    """``(block_table (B, max_pages) int32, lengths (B,) int32)`` of ``seqs`` in a
    :class:`~qkv.cache.PagedKVCache`, on the pool's device, for :func:`paged_attention`."""
    tables = [pool.block_table(s) for s in seqs]
    width = max(1, max(len(t) for t in tables))
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=pool.device)
    lengths = torch.tensor([pool.length(s) for s in seqs], dtype=torch.int32, device=pool.device)
    return table, lengths
