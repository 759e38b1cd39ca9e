"""Launching the kernels for one :class:`~qkv.problem.Problem`, and the autograd function.

:class:`Launch` turns a problem into kernel arguments: positions per batch element, the compiled
mask and score programs, tile lists per tile configuration (and the bit-packed mask where needed),
dropout's seed and threshold. :class:`TritonAttention` runs the forward kernel and, in backward,
the dq kernel and the dk/dv kernel (deterministic: no atomics, every output tile written once).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor
from torch.autograd.function import once_differentiable

from ... import dropout as _dropout
from ...problem import Problem
from . import configs, kernels
from .blocks import TileLists, expanded_strides, kv_lists, pack_partial_tiles, positions, query_lists, tile_kinds
from .programs import BITS, MaskProgram, ScoreProgram

configs.patch_interpreter()


class _Tiles:
    """Tile lists (forward: key tiles per query tile; backward: query tiles per key tile) and, for
    masks served bit-packed, the tile map and bits, for one ``(block_m, block_n)``."""

    def __init__(self, problem: Problem, mask: MaskProgram, block_m: int, block_n: int):
        kinds = tile_kinds(problem, block_m, block_n)
        self.nqb, self.nkb = kinds.shape[-2], kinds.shape[-1]
        self.by_query: TileLists = query_lists(problem, block_m, block_n)
        self.by_key: TileLists = kv_lists(kinds.transpose(-1, -2))
        dev = problem.device
        if mask.mode == BITS:
            self.tile_map, self.bits = pack_partial_tiles(problem, kinds, block_m, block_n)
        else:
            self.tile_map = torch.zeros(1, 1, 1, 1, dtype=torch.int32, device=dev)
            self.bits = torch.zeros(1, dtype=torch.uint8, device=dev)
        self.tile_strides = expanded_strides(self.tile_map, problem.batch, problem.q_heads)

    def list_args(self, lists: TileLists, batch: int, heads: int) -> list:
        snb, snh = expanded_strides(lists.num_blocks, batch, heads)
        sib, sih = expanded_strides(lists.indices, batch, heads)
        return [lists.num_blocks, lists.indices, lists.full_num_blocks, lists.full_indices, snb, snh, sib, sih]


class Launch:
    """Kernel arguments for one problem (see module docstring)."""

    def __init__(self, problem: Problem, mask: MaskProgram, score: ScoreProgram):
        p = self.problem = problem
        self.mask, self.score = mask, score
        self.qoff, self.koff = positions(p)
        dev = p.device
        dummy = torch.zeros(1, dtype=torch.float32, device=dev)
        tensors = p.score_mod.tensors if p.score_mod is not None else ()
        self.slopes = dummy if score.slopes_index is None else \
            tensors[score.slopes_index].detach().to(torch.float32).contiguous()
        if score.table_index is None:
            self.table, self.table_sh = dummy, 0
        else:
            self.table = tensors[score.table_index].detach().to(torch.float32).contiguous()
            self.table_sh = self.table.shape[1] if self.table.dim() == 2 else 0
        self.width = 2 * score.max_distance + 1
        if mask.mode == 1:
            self.mask_ints, self.mask_data = mask.ints, mask.data
        else:
            self.mask_ints = torch.zeros(8, dtype=torch.int32, device=dev)
            self.mask_data = torch.zeros(1, dtype=torch.int32, device=dev)
        self.dropout = p.dropout_p > 0
        self.seed = _dropout.mixed_seed(p.seed) if self.dropout else 0  # the kernel's hash takes it mixed
        self.threshold = int(p.dropout_p * 2**32) if self.dropout else 0
        self.inv_keep = 1.0 / (1.0 - p.dropout_p)
        self._tiles: dict[tuple[int, int], _Tiles] = {}
        self.dot_mode = 1 if p.dtype == torch.float32 else (2 if configs.interpreting() else 0)

    # -- arguments ------------------------------------------------------------------------------

    def tiles(self, cfg: configs.Config) -> _Tiles:
        key = (cfg.block_m, cfg.block_n)
        if key not in self._tiles:
            self._tiles[key] = _Tiles(self.problem, self.mask, *key)
        return self._tiles[key]

    def common(self, t: _Tiles) -> list:
        s = self.score
        return [t.tile_map, *t.tile_strides, t.bits, self.mask_ints, self.mask_data, self.mask.truth,
                self.slopes, s.cap_value, self.table, self.table_sh, s.max_distance,
                self.seed, self.threshold, self.inv_keep]

    def constexprs(self, cfg: configs.Config) -> dict:
        p, s = self.problem, self.score
        c = self.mask.codes
        return dict(BM=cfg.block_m, BN=cfg.block_n, BD=max(16, triton.next_power_of_2(p.head_dim)),
                    BDV=max(16, triton.next_power_of_2(p.v_dim)), MASK_MODE=self.mask.mode,
                    L0=c[0], L1=c[1], L2=c[2], L3=c[3], L4=c[4], ALIBI=s.alibi, REL=s.rel, CAP=s.cap,
                    POS_ALIBI=s.pos_alibi, POS_REL=s.pos_rel, POS_CAP=s.pos_cap, DROPOUT=self.dropout,
                    EVEN_N=p.nk % cfg.block_n == 0, DOT=self.dot_mode,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    def key(self, direction: str) -> tuple:
        p = self.problem
        return (str(p.device), direction, p.head_dim, p.v_dim, p.dtype, self.mask.mask_class,
                self.score.score_class, self.dropout)

    def sizes(self, t: _Tiles) -> list:
        p = self.problem
        return [p.q_heads, p.group, p.nq, p.nk, t.nqb, t.nkb, p.head_dim, p.v_dim, p.scale]

    # -- forward --------------------------------------------------------------------------------

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        p = self.problem
        out = torch.empty(p.batch, p.q_heads, p.nq, p.v_dim, dtype=p.dtype, device=p.device)
        lse = torch.empty(p.batch, p.q_heads, p.nq, dtype=torch.float32, device=p.device)
        run = lambda cfg: self._forward(cfg, q, k, v, out, lse)  # noqa: E731
        cfg = configs.pick(self.key("fwd"), configs.candidates("fwd", max(p.head_dim, p.v_dim), p.dtype == torch.float32), run)
        run(cfg)
        return out, lse

    def _forward(self, cfg, q, k, v, out, lse):
        p = self.problem
        t = self.tiles(cfg)
        grid = (t.nqb, p.batch * p.q_heads)
        kernels._fwd_kernel[grid](
            q, k, v, out, lse, self.qoff, self.koff, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
            *out.stride()[:3], *t.list_args(t.by_query, p.batch, p.q_heads), *self.common(t), *self.sizes(t),
            **self.constexprs(cfg))

    # -- backward -------------------------------------------------------------------------------

    def backward(self, q, k, v, out, lse, dout, dlse, want_slopes: bool, want_table: bool):
        p = self.problem
        delta = (dout.to(torch.float32) * out.to(torch.float32)).sum(-1)
        if dlse is not None:
            delta = delta - dlse.to(torch.float32)
        delta = delta.contiguous()
        lse = lse.masked_fill(lse == float("-inf"), float("inf")).contiguous()  # rows that saw nothing: P = 0
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        wp = triton.next_power_of_2(self.width) if want_table else 1
        atomic = not (configs.deterministic() or want_slopes or want_table)
        bufs = {}

        def run(cfg):
            t = self.tiles(cfg)
            n_prog = p.batch * p.q_heads * t.nqb
            bufs["slope"] = torch.zeros(n_prog if want_slopes else 1, dtype=torch.float32, device=p.device)
            bufs["table"] = torch.zeros(n_prog * wp if want_table else 1, dtype=torch.float32, device=p.device)
            bufs["nqb"] = t.nqb
            const = self.constexprs(cfg)
            if atomic:  # dq from the dk/dv kernel, summed in float32
                bufs["dq"] = torch.zeros(p.batch, p.q_heads, p.nq, p.head_dim, dtype=torch.float32, device=p.device)
            else:
                bufs["dq"] = bufs["slope"]  # unused
                kernels._dq_kernel[(t.nqb, p.batch * p.q_heads)](
                    q, k, v, dout, dq, lse, delta, self.qoff, self.koff, bufs["slope"], bufs["table"],
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
                    *t.list_args(t.by_query, p.batch, p.q_heads), *self.common(t), *self.sizes(t),
                    WP=wp, SLOPE_GRAD=want_slopes, TABLE_GRAD=want_table, **const)
            kernels._dkdv_kernel[(t.nkb, p.batch * p.kv_heads)](
                q, k, v, dout, dk, dv, lse, delta, self.qoff, self.koff, bufs["dq"],
                *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3], *dk.stride()[:3],
                *dv.stride()[:3], *t.list_args(t.by_key, p.batch, p.q_heads), *self.common(t),
                p.q_heads, p.kv_heads, p.group, p.nq, p.nk, t.nqb, t.nkb, p.head_dim, p.v_dim, p.scale,
                ATOMIC_DQ=atomic, **const)

        key = self.key("bwd") + (("atomic dq",) if atomic else ())
        cfg = configs.pick(key, configs.candidates("bwd", max(p.head_dim, p.v_dim), p.dtype == torch.float32), run)
        run(cfg)
        if atomic:
            dq = bufs["dq"].to(q.dtype)
        dslopes = dtable = None
        if want_slopes:
            dslopes = bufs["slope"].view(p.batch, p.q_heads, bufs["nqb"]).sum((0, 2))
        if want_table:
            per = bufs["table"].view(p.batch, p.q_heads, bufs["nqb"], wp)[..., :self.width].sum((0, 2))
            dtable = per if self.table_sh else per.sum(0)
        return dq, dk, dv, dslopes, dtable


class TritonAttention(torch.autograd.Function):
    """``(out, lse)`` of a problem through the Triton kernels, differentiable in q, k, v and the
    score modifier's ALiBi slopes / relative-bias table."""

    @staticmethod
    def forward(ctx, launch: Launch, q, k, v, *mod_tensors):
        out, lse = launch.forward(q, k, v)
        ctx.launch = launch
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        launch: Launch = ctx.launch
        s = launch.score
        wants = ctx.needs_input_grad[4:]
        want_slopes = s.slopes_index is not None and wants[s.slopes_index]
        want_table = s.table_index is not None and wants[s.table_index]
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        dq, dk, dv, dslopes, dtable = launch.backward(q, k, v, out, lse, dout, dlse, want_slopes, want_table)
        mods = list(launch.problem.score_mod.tensors) if launch.problem.score_mod is not None else []
        grads = [None] * len(mods)
        if want_slopes:
            grads[s.slopes_index] = dslopes.to(mods[s.slopes_index].dtype)
        if want_table:
            grads[s.table_index] = dtable.to(mods[s.table_index].dtype)
        return (None, dq, dk, dv, *grads)
