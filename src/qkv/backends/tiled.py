"""The flash-attention algorithm in plain PyTorch: O(N) memory, empty tiles skipped.

Forward, for each block of ``block_q`` query rows: walk the key tiles that the mask's block view
marks non-empty, in *runs* (consecutive full tiles merged into one matmul of up to ``max_run``
keys; partial tiles merged likewise but tested element by element), and keep the online-softmax
state per row: running max ``m``, running sum ``l`` and un-normalised output ``acc``::

    s = q_i k_run^T * scale  (+ score_mod, + bias, masked on partial tiles)
    m' = max(m, rowmax(s));  p = exp(s - m');  l = l * exp(m - m') + rowsum(p)
    acc = acc * exp(m - m') + p v_run

then ``out = acc / l`` and ``lse = m + log(l)``. Only ``(block_q x max_run)`` scores exist at
once. Backward recomputes the probabilities tile by tile from ``lse`` (FlashAttention-2's
recurrence): ``dS = P * (dP - rowsum(dO * O) + dlse)``.

Grouped heads (GQA/MQA) are handled without copying keys: the ``G`` query heads that share a
key/value head are stacked along the row axis, so each tile is one ``(G * block_q) x run``
matmul against its key head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import dropout as _dropout
from .. import scoring
from ..layout import plan_runs  # noqa: F401  (re-exported: qkv.backends.tiled.plan_runs)
from ..problem import Problem
from . import costs
from .capabilities import Capabilities, reasons

NEG_INF = float("-inf")


@dataclass(frozen=True)
class TileSizes:
    """``block_q`` query rows per step, ``block_k`` keys per tile of the block view, and at most
    ``max_run`` keys per matmul when consecutive tiles of one kind are merged."""

    block_q: int = 128
    block_k: int = 128
    max_run: int = 2048


class _Tiling:
    """Everything one walk needs to compute tiles: the problem's batch elements ``b0:b1`` in
    grouped layout, and the key runs they visit."""

    def __init__(self, problem: Problem, sizes: TileSizes, b0: int, b1: int | None, runs):
        p = self.problem = problem
        self.sizes = sizes
        self.batch = slice(b0, b1)
        self.B, self.Hkv, self.G = (p.batch if b1 is None else b1) - b0, p.kv_heads, p.group
        self.cdt = p.compute_dtype
        dev = p.index_device
        self.runs = runs
        self.positions = p.positions.select(b0, b1)
        self.b_idx = torch.arange(b0, b0 + self.B, device=dev).view(-1, 1, 1, 1)
        self.bias5 = self.bias_shape = None
        if p.bias is not None:
            bias = p.bias if p.bias.shape[0] == 1 else p.bias[b0:b1]
            self.bias_shape = bias.shape
            hb = bias.shape[1]
            shape = (bias.shape[0], self.Hkv, self.G) if hb > 1 else (bias.shape[0], 1, 1)
            self.bias5 = bias.reshape(*shape, *bias.shape[2:])
        self.keys_seen = None if self.bias5 is None else keys_seen_through_bias(self.bias5)

    def visible_kv(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``k, v`` in compute dtype, zero at keys a ``-inf`` bias hides from every query."""
        k, v = k.to(self.cdt), v.to(self.cdt)
        if self.keys_seen is not None:
            k, v = torch.where(self.keys_seen, k, 0), torch.where(self.keys_seen, v, 0)
        return k, v

    def rows(self, i: int) -> tuple[int, int]:
        r0 = i * self.sizes.block_q
        return r0, min(r0 + self.sizes.block_q, self.problem.nq)

    def stack_rows(self, x: Tensor, r0: int, r1: int) -> Tensor:
        """``(B, Hq, Nq, d)`` -> rows ``r0:r1`` as ``(B, Hkv, G * rows, d)`` in compute dtype."""
        B, Hkv, G = self.B, self.Hkv, self.G
        block = x.reshape(B, Hkv, G, x.shape[2], x.shape[3])[:, :, :, r0:r1]
        return block.reshape(B, Hkv, G * (r1 - r0), x.shape[3]).to(self.cdt)

    def unstack_rows(self, x: Tensor, r0: int, r1: int) -> Tensor:
        """Inverse of :meth:`stack_rows` (without the slicing): ``(B, Hq, rows, d)``."""
        return x.reshape(self.B, self.Hkv * self.G, r1 - r0, x.shape[-1])

    def query_index(self, r0: int, r1: int) -> tuple[Tensor, Tensor, Tensor]:
        """Head, query position and query row for the stacked rows, each ``(1, ., G * rows, 1)``."""
        p, G, dev = self.problem, self.G, self.problem.index_device
        rows = torch.arange(r0, r1, device=dev).repeat(G).view(1, 1, -1, 1)
        g = torch.arange(G, device=dev).repeat_interleave(r1 - r0).view(1, 1, -1, 1)
        h = torch.arange(self.Hkv, device=dev).view(1, -1, 1, 1) * G + g
        return h, self.positions.queries(rows), rows

    def key_positions(self, c0: int, c1: int) -> Tensor:
        """Positions of keys ``c0:c1``, ``(B|1, 1, 1, c1 - c0)``."""
        return self.positions.keys(torch.arange(c0, c1, device=self.problem.index_device).view(1, 1, 1, -1))

    def bias_tile(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """The bias for stacked rows ``r0:r1`` and keys ``c0:c1``, broadcastable to the scores."""
        t = self.bias5
        t = t[..., r0:r1, :] if t.shape[3] > 1 else t
        t = t[..., c0:c1] if t.shape[4] > 1 else t
        if t.shape[2] * t.shape[3] == 1:
            return t.reshape(t.shape[0], t.shape[1], 1, t.shape[4])
        t = t.expand(t.shape[0], t.shape[1], self.G, r1 - r0, t.shape[4])
        return t.reshape(t.shape[0], t.shape[1], self.G * (r1 - r0), t.shape[4])

    def reduce_to_bias(self, ds: Tensor, r0: int, r1: int) -> Tensor:
        """Sum a stacked ``(B, Hkv, G*rows, keys)`` score gradient to the bias's broadcast shape."""
        ds = ds.reshape(self.B, self.Hkv, self.G, r1 - r0, ds.shape[-1])
        target = list(self.bias5.shape)
        if target[3] > 1:
            target[3] = r1 - r0
        if target[4] > 1:
            target[4] = ds.shape[-1]
        dims = [d for d in range(5) if target[d] == 1 and ds.shape[d] > 1]
        return ds.sum(dim=dims, keepdim=True) if dims else ds

    def hidden(self, r0, r1, c0, c1, partial: bool) -> tuple[Tensor | None, Tensor | None]:
        """The entries of a tile that the mask hides (on partial runs; with a score modifier also
        those a ``-inf`` bias hides), as a bool tensor broadcastable to the stacked scores, and per
        key ``(B|1, Hkv|1, keys, 1)`` whether any row of this block sees it; ``(None, None)`` when
        nothing is hidden. Keys that a ``-inf`` bias hides from every query are zeroed once for the
        whole call (:func:`keys_seen_through_bias`)."""
        p = self.problem
        with_bias = self.bias5 is not None and p.score_mod is not None  # else s + (-inf) is -inf already
        if not partial and not with_bias:
            return None, None
        h, qpos, _ = self.query_index(r0, r1)
        bias = self.bias_tile(r0, r1, c0, c1) if with_bias else None
        hide = scoring.hidden_entries(p, self.b_idx, h, qpos, self.key_positions(c0, c1), bias, masked=partial)
        if hide is None:
            return None, None
        return hide, ~hide.all(dim=-2, keepdim=True).transpose(-1, -2)

    @staticmethod
    def visible_only(x: Tensor, seen: Tensor | None) -> Tensor:
        """Keys or values of a tile with zeros where no row of the block sees the key: garbage
        (NaN, inf) in hidden slots never reaches an output or a gradient."""
        return x if seen is None else torch.where(seen, x, 0)

    def modified_scores(self, s: Tensor, r0, r1, c0, c1, hide: Tensor | None, mod_tensors=None) -> Tensor:
        """Apply score modifier, bias and the hidden entries (see :meth:`hidden`) to raw scaled scores."""
        p = self.problem
        if p.score_mod is None and self.bias5 is None and hide is None:
            return s
        h, qpos, _ = self.query_index(r0, r1)
        bias = None if self.bias5 is None else self.bias_tile(r0, r1, c0, c1)
        return scoring.score_tile(p, s, self.b_idx, h, qpos, self.key_positions(c0, c1), bias, hide, mod_tensors)

    def dropout_scale(self, r0: int, r1: int, c0: int, c1: int) -> Tensor:
        """Keep-mask times ``1 / (1 - p)`` for stacked rows ``r0:r1`` and keys ``c0:c1``."""
        p = self.problem
        h, _, rows = self.query_index(r0, r1)
        cols = torch.arange(c0, c1, device=p.index_device).view(1, 1, 1, -1)
        keep = _dropout.keep_mask(p.seed, p.dropout_p, self.b_idx, h, p.q_heads, rows, cols)
        return keep.to(self.cdt) / (1.0 - p.dropout_p)


#: Bias elements compared at once by :func:`keys_seen_through_bias`.
_BAND_ELEMENTS = 1 << 24


def keys_seen_through_bias(bias5: Tensor) -> Tensor:
    """``(B|1, Hkv|1, Nk|1, 1)``: the key is not ``-inf`` for some query (and query head of its
    group) in the grouped bias ``(B|1, Hkv|1, G|1, Nq|1, Nk|1)``; read a band of rows at a time."""
    rows = bias5.shape[3]
    band = max(1, _BAND_ELEMENTS // max(1, bias5[..., :1, :].numel()))
    seen = None
    for r0 in range(0, rows, band):
        part = (bias5[..., r0:r0 + band, :] != NEG_INF).any(dim=3).any(dim=2)
        seen = part if seen is None else seen | part
    return seen.unsqueeze(-1)


def _forward(t: _Tiling, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    p = t.problem
    out = torch.zeros(t.B, p.q_heads, p.nq, p.v_dim, dtype=p.dtype, device=p.device)
    lse = torch.full((t.B, p.q_heads, p.nq), NEG_INF, dtype=t.cdt, device=p.device)
    k, v = t.visible_kv(k, v)
    for i, runs in enumerate(t.runs):
        if not runs:
            continue
        r0, r1 = t.rows(i)
        qi = t.stack_rows(q, r0, r1) * p.scale
        state = scoring.OnlineSoftmax(qi.shape[:-1], t.cdt, p.device)
        acc = torch.zeros(*qi.shape[:-1], p.v_dim, dtype=t.cdt, device=p.device)
        for c0, c1, partial in runs:
            hide, seen = t.hidden(r0, r1, c0, c1, partial)
            kj, vj = t.visible_only(k[:, :, c0:c1], seen), t.visible_only(v[:, :, c0:c1], seen)
            probs, alpha = state.step(t.modified_scores(qi @ kj.transpose(-1, -2), r0, r1, c0, c1, hide))
            if p.dropout_p > 0:
                probs = probs * t.dropout_scale(r0, r1, c0, c1)
            acc.mul_(alpha).add_(probs @ vj)
        out[:, :, r0:r1] = t.unstack_rows(state.normalise(acc), r0, r1).to(p.dtype)
        lse[:, :, r0:r1] = t.unstack_rows(state.lse(), r0, r1).squeeze(-1)
    return out, lse


def _backward(t: _Tiling, q, k, v, out, lse, dout, dlse, needs):
    """Gradients for (q, k, v, bias, *score_mod tensors), recomputing probabilities from ``lse``."""
    p = t.problem
    cdt = t.cdt
    k, v = t.visible_kv(k, v)
    dq = torch.zeros(t.B, p.q_heads, p.nq, p.head_dim, dtype=cdt, device=p.device)
    dk = torch.zeros(t.B, p.kv_heads, p.nk, p.head_dim, dtype=cdt, device=p.device)
    dv = torch.zeros(t.B, p.kv_heads, p.nk, p.v_dim, dtype=cdt, device=p.device)
    dbias = torch.zeros_like(t.bias5, dtype=cdt) if needs["bias"] else None
    mod = p.score_mod
    mod_grads_wanted = mod is not None and any(needs["mod"])
    dmod = [torch.zeros_like(x, dtype=cdt) if w else None for x, w in zip(mod.tensors, needs["mod"])] if mod else []
    detached_mod = [x.detach().requires_grad_(w) for x, w in zip(mod.tensors, needs["mod"])] if mod else None
    for i, runs in enumerate(t.runs):
        if not runs:
            continue
        r0, r1 = t.rows(i)
        qi = t.stack_rows(q, r0, r1) * p.scale
        do = t.stack_rows(dout, r0, r1)
        o = t.stack_rows(out, r0, r1)
        li = t.stack_rows(lse.unsqueeze(-1), r0, r1)
        li = scoring.safe_lse(li)  # rows that saw nothing: P = 0
        delta = (do * o).sum(dim=-1, keepdim=True)
        if dlse is not None:
            delta = delta - t.stack_rows(dlse.unsqueeze(-1), r0, r1)
        dqi = torch.zeros_like(qi)
        for c0, c1, partial in runs:
            hide, seen = t.hidden(r0, r1, c0, c1, partial)
            kj, vj = t.visible_only(k[:, :, c0:c1], seen), t.visible_only(v[:, :, c0:c1], seen)
            raw = qi @ kj.transpose(-1, -2)
            if mod_grads_wanted or (mod is not None and needs["q_or_k"]):
                with torch.enable_grad():
                    raw_leaf = raw.detach().requires_grad_(needs["q_or_k"])
                    s_mod = t.modified_scores(raw_leaf, r0, r1, c0, c1, hide, detached_mod)
                s = s_mod.detach()
            else:
                s_mod = None
                s = t.modified_scores(raw, r0, r1, c0, c1, hide)
            probs = scoring.exp_(s - li)
            dp = do @ vj.transpose(-1, -2)
            if p.dropout_p > 0:
                scale_keep = t.dropout_scale(r0, r1, c0, c1)
                dv[:, :, c0:c1] += (probs * scale_keep).transpose(-1, -2) @ do
                dp = dp * scale_keep
            else:
                dv[:, :, c0:c1] += probs.transpose(-1, -2) @ do
            ds = probs * (dp - delta)
            if dbias is not None:
                reduced = t.reduce_to_bias(ds, r0, r1)
                rs = slice(r0, r1) if dbias.shape[3] > 1 else slice(None)
                cs = slice(c0, c1) if dbias.shape[4] > 1 else slice(None)
                dbias[..., rs, cs] += reduced
            if s_mod is not None:
                wrt = [x for x in (raw_leaf, *detached_mod) if x.requires_grad]
                grads = iter(torch.autograd.grad(s_mod, wrt, ds))
                ds = next(grads) if raw_leaf.requires_grad else None
                for n, x in enumerate(detached_mod):
                    if x.requires_grad:
                        dmod[n] += next(grads)
            if ds is not None:
                dqi += ds @ kj
                dk[:, :, c0:c1] += ds.transpose(-1, -2) @ qi
        dq[:, :, r0:r1] = t.unstack_rows(dqi * p.scale, r0, r1)
    if dbias is not None:
        dbias = dbias.reshape(t.bias_shape).to(p.bias.dtype)
    return (dq.to(q.dtype), dk.to(p.dtype), dv.to(p.dtype), dbias,
            *[None if g is None else g.to(x.dtype) for g, x in zip(dmod, mod.tensors if mod else [])])


class _TiledFunction(torch.autograd.Function):
    """The walks of all batch groups as one autograd node."""

    @staticmethod
    def forward(ctx, tilings: list[_Tiling], q, k, v, bias, *mod_tensors):
        parts = [_forward(t, q[t.batch], k[t.batch], v[t.batch]) for t in tilings]
        out, lse = (parts[0] if len(parts) == 1 else (torch.cat([o for o, _ in parts]), torch.cat([s for _, s in parts])))
        ctx.tilings = tilings
        ctx.save_for_backward(q, k, v, out, lse)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        needs = {
            "bias": ctx.needs_input_grad[4],
            "mod": list(ctx.needs_input_grad[5:]),
            "q_or_k": ctx.needs_input_grad[1] or ctx.needs_input_grad[2],
        }
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        parts = [_backward(t, q[t.batch], k[t.batch], v[t.batch], out[t.batch], lse[t.batch], dout[t.batch],
                           None if dlse is None else dlse[t.batch], needs) for t in ctx.tilings]
        if len(parts) == 1:
            return (None, *parts[0])
        bias = ctx.tilings[0].problem.bias
        grads = [torch.cat(g) for g in zip(*(part[:3] for part in parts))]
        dbias = [part[3] for part in parts]
        if dbias[0] is not None:
            dbias = torch.cat(dbias) if bias.shape[0] > 1 else sum(dbias)
        else:
            dbias = None
        dmod = [None if g[0] is None else sum(g) for g in zip(*(part[4:] for part in parts))]
        return (None, *grads, dbias, *dmod)


def _count_walk(p: Problem, layout, s: TileSizes) -> tuple[int, int, int, int]:
    """Scores the walk visits, those of them on partial tiles, its runs, and its partial runs
    (where the mask is evaluated: a few more small tensor operations per run), for the estimate."""
    visited = partial = steps = partial_steps = 0
    for b0, b1, plan in layout.runs(s.max_run):
        count = (p.batch if b1 is None else b1 - b0) * p.q_heads
        for i, runs in enumerate(plan):
            rows = min(s.block_q, p.nq - i * s.block_q)
            for c0, c1, is_partial in runs:
                visited += count * rows * (c1 - c0)
                partial += count * rows * (c1 - c0) if is_partial else 0
                partial_steps += is_partial
            steps += len(runs)
    return visited, partial, steps, partial_steps


class TiledBackend:
    """Flash attention in PyTorch (see module docstring); runs on any device, any dtype."""

    def __init__(self, sizes: TileSizes | None = None, name: str = "tiled"):
        self.sizes = sizes or TileSizes()
        self.name = name

    capabilities = Capabilities()  # everything, on any device

    def unsupported(self, problem: Problem) -> list[str]:
        return reasons(self.capabilities, problem)

    def estimate(self, problem: Problem) -> float:
        """Visited scores (more on partial tiles) plus a fixed cost per run of the walk that
        :meth:`run` takes. Small problems, and masks whose block view would have to be found by
        evaluating them element by element, are estimated as if every tile were partial rather
        than building the layout just to estimate."""
        p, s = problem, self.sizes
        r = costs.rates(p)
        heads = p.q_heads
        small = p.mask is None or p.nq * p.nk <= costs.SMALL_PROBLEM_SCORES
        if small or not p.mask.analytic_block_view:
            visited = p.nq * p.nk * p.batch * heads
            partial = 0 if small else visited
            q_tiles, k_tiles = -(-p.nq // s.block_q), -(-p.nk // s.block_k)
            steps = q_tiles * -(-k_tiles * s.block_k // s.max_run)
            partial_steps = 0 if p.mask is None else steps
        else:
            layout = p.layout(s.block_q, s.block_k)
            visited, partial, steps, partial_steps = layout.kept(("tiled counts", s.max_run, p.batch, heads),
                                                                 lambda: _count_walk(p, layout, s))
        bias = r.tiled_bias_score if p.bias is not None else 0.0
        work = p.mask.work if p.mask is not None else 0.0
        mod = r.mod_score_per_work * costs.score_mod_work(p)
        arithmetic = (visited * (r.tiled_score + r.tiled_score_per_dim * (p.head_dim + p.v_dim) + bias + mod)
                      + partial * (r.tiled_partial_score + r.tiled_partial_per_work * work))
        overhead = steps * r.tiled_step + partial_steps * r.tiled_partial_step_per_work * work
        return costs.with_backward(p, arithmetic / costs.parallel(p) + overhead, r.tiled_backward)

    def run(self, problem: Problem) -> tuple[Tensor, Tensor]:
        s = self.sizes
        tilings = [_Tiling(problem, s, b0, b1, runs)
                   for b0, b1, runs in problem.layout(s.block_q, s.block_k).runs(s.max_run)]
        mod_tensors = problem.score_mod.tensors if problem.score_mod is not None else ()
        return _TiledFunction.apply(tilings, problem.q, problem.k, problem.v, problem.bias, *mod_tensors)
