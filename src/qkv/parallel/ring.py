"""Exact attention over a sequence sharded across ranks: K/V shards travel round a ring.

Each rank holds the queries, keys and values of its shard of the sequence (see
:mod:`qkv.parallel.sharding`). At step ``s`` rank ``r`` holds the K/V shard of rank ``r - s``: it
attends its queries to it through :func:`qkv.attention` at global positions, while the shard is
already on its way to rank ``r + 1`` and the next one is arriving from rank ``r - 1``. Partial
results are merged by their log-sum-exp (:func:`qkv.merge_partials`), so the result is exact::

    out_r = merge_s attention(q_r, k_{r-s}, v_{r-s})          lse_r = logsumexp_s lse_{r,s}

Steps whose blocks are all empty under the mask are skipped, and shards travel only as far as some
rank needs them (:mod:`qkv.parallel.plan`).

Backward runs the ring again. With the final ``out``, ``lse`` and the upstream ``dout``, ``dlse``,
each block's share of the gradient is the gradient of its own partial result ``(o_s, lse_s)`` for
the upstream pair ``(w dout, w (rowdot(dout, o_s) - rowdot(dout, out) + dlse))`` where
``w = exp(lse_s - lse)`` is the block's weight in the merge; it is obtained by autograd through the
block's :func:`qkv.attention` call (any backend, mask, score modifier). ``dq`` stays home; ``dk``,
``dv`` of shard ``j`` are accumulated as the shard travels and the total returns to rank ``j``.

Message order. Each rank sends only to ``r + 1`` (K/V shards, accumulators on their way) and, once
per shard, an accumulator home to its owner, at step ``reach[j]``; the owner posts that receive at
the same step, after its ring receives. So every pair of ranks posts matching sends and receives in
the same order (NCCL matches point-to-point messages by order, gloo by tag), nobody ever waits for
a message whose receive is posted later, and at most two accumulators per rank are in flight.
"""

from __future__ import annotations

import copy
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from qkv.masks import Mask
from qkv.merge import merge_partials
from qkv.problem import make_problem
from qkv.scores import ScoreMod, as_score_mod

from .comm import GRAD, HOME, KV, Ring
from .pairs import GlobalMask
from .plan import RingPlan, build_plan
from .sharding import check_layout, pieces_from_lengths

_DTYPE_CODES = {torch.float64: 0, torch.float32: 1, torch.bfloat16: 2, torch.float16: 3}


@dataclass
class RingStats:
    """What one call did on this rank (pass one as ``stats=`` to fill it).

    ``plan`` is the schedule (steps run, blocks computed and skipped); per step, ``*_sent`` the
    bytes this rank sent, ``*_compute_s`` the time spent computing and ``*_wait_s`` the time spent
    waiting for messages, both read from ``clock`` (``time.thread_time`` measures this thread's CPU
    time, which oversubscribed CPUs do not inflate; CUDA is synchronised around each step)."""

    clock: Callable[[], float] = time.perf_counter
    plan: RingPlan | None = None
    forward_sent: list = field(default_factory=list)
    backward_sent: list = field(default_factory=list)
    forward_compute_s: list = field(default_factory=list)
    forward_wait_s: list = field(default_factory=list)
    backward_compute_s: list = field(default_factory=list)
    backward_wait_s: list = field(default_factory=list)

    @property
    def forward_bytes_sent(self) -> int:
        return sum(self.forward_sent)

    @property
    def backward_bytes_sent(self) -> int:
        return sum(self.backward_sent)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, group=None, layout: str = "contiguous",
                   score_mod=None, return_lse: bool = False, scale: float | None = None, backend: str | None = None,
                   timeout=None, stats: RingStats | None = None):
    r"""Attention of this rank's queries over the whole sharded sequence, exact.

    Every rank of ``group`` calls it at once with its own shard; together they compute
    ``qkv.attention`` of the whole sequence, each rank receiving the rows of its queries.

    Args:
        q: this rank's queries ``(B, Hq, n, D)``; ``n`` may differ between ranks (contiguous).
        k, v: this rank's keys ``(B, Hkv, n, D)`` and values ``(B, Hkv, n, Dv)`` (same positions as
            ``q``); ``Hq`` a multiple of ``Hkv`` (GQA).
        mask: ``None``, a :class:`qkv.Mask` written for the whole sequence (positions are global:
            causal, windows, document ids indexed by position, ...), or a bool/float tensor
            broadcastable to ``(B, H, N, N)`` over the whole sequence.
        group: the process group of the ring (default: the world).
        layout: how the sequence is sharded, ``"contiguous"`` or ``"zigzag"``
            (see :func:`qkv.parallel.shard_sequence`).
        score_mod: a score modifier (global positions); tensors it declares get this rank's share
            of their gradient (sum it over the group, as for any replicated parameter).
        return_lse: also return the log-sum-exp ``(B, Hq, n)`` of this rank's rows.
        scale, backend: as in :func:`qkv.attention`, for every block.
        timeout: seconds (or a ``timedelta``) to wait for any one message before raising; default
            the process group's timeout.
        stats: a :class:`RingStats` to fill with bytes sent, steps, compute and wait times.

    Returns:
        ``out (B, Hq, n, Dv)`` (and ``lse``), this rank's rows in local order. Differentiable:
        backward runs the ring again (every rank must call backward, as with DDP).
    """
    ring = Ring(group, timeout)
    try:  # local checks; a rank that fails them still joins the shape exchange, so no peer waits for it
        problem, comm_device = _check_local(ring, q, k, v, scale, layout)
        shape = [q.shape[0], q.shape[1], k.shape[1], q.shape[2], q.shape[3], v.shape[3], _DTYPE_CODES[q.dtype], 0]
        local_error = None
    except (TypeError, ValueError) as error:
        comm_device, shape, local_error = ring.comm_device(None), [0] * 7 + [1], error
    everyone = ring.all_gather_ints(shape, comm_device)
    if local_error is not None:
        raise local_error
    _check_same_problem(everyone, ring.rank)
    lengths = [s[3] for s in everyone]
    pieces = pieces_from_lengths(lengths, layout)
    total = sum(lengths)
    gmask = GlobalMask(mask, q.shape[0], q.shape[1], total, q.device)
    mod = as_score_mod(score_mod)
    if mod is not None:  # checked against the whole sequence; built-in constant tables moved to q's device
        mod = mod.bind(q.shape[0], q.shape[1], total, total, q.device)
    plan = _plan(mask, gmask, pieces)
    run = _Ring(ring, plan, gmask, mod, problem.scale, backend, stats)
    if stats is not None:
        stats.plan = plan
    extras = [*(mod.tensors if mod is not None else ()), *([gmask.tensor] if gmask.is_bias else [])]
    out, lse = _RingFunction.apply(run, q, k, v, *extras)
    return (out, lse) if return_lse else out


#: Plans by user mask object (as the block-layout cache: the same mask object, e.g. one causal()
#: shared by a model's layers, reuses its plan; a mask's tables must not be mutated in place).
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_PLANS_PER_MASK = 8


def _plan(mask, gmask: GlobalMask, pieces) -> RingPlan:
    if not isinstance(mask, Mask):  # None (cheap) or a tensor (its contents may change)
        return build_plan(pieces, gmask.is_empty)
    key = (tuple(tuple(p) for p in pieces), gmask.batch, gmask.heads)
    plans = _PLANS.setdefault(mask, {})
    if key not in plans:
        if len(plans) >= _PLANS_PER_MASK:
            plans.pop(next(iter(plans)))
        sizes = {b - a for runs in pieces for a, b in runs}
        if len(sizes) == 1:  # equal pieces: one block view of the whole sequence serves every block
            gmask.prepare(sizes.pop())
        plans[key] = build_plan(pieces, gmask.is_empty)
    return plans[key]


def _check_local(ring: Ring, q, k, v, scale, layout):
    """This rank's own arguments (shapes, dtypes, devices, layout): ``(problem, message device)``."""
    problem = make_problem(q, k, v, scale=scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must hold the same positions of the sequence (self-attention), got "
                         f"{q.shape[2]} queries and {k.shape[2]} keys on rank {ring.rank}")
    check_layout(layout)
    comm_device = ring.comm_device(q.device)
    if comm_device != q.device:
        raise ValueError(f"q is on {q.device}, but the process group's backend ({comm_device.type} messages) "
                         "cannot send it; use NCCL for CUDA tensors, gloo for CPU tensors")
    return problem, comm_device


def _check_same_problem(everyone: list[list[int]], rank: int) -> None:
    failed = [r for r, s in enumerate(everyone) if s[7]]
    if failed:
        raise ValueError(f"ring_attention: rank {', '.join(map(str, failed))} of the group passed invalid arguments "
                         f"(the error is raised there); seen on rank {rank}")
    names = ("batch size", "query heads", "key/value heads", None, "head_dim", "value head_dim", "dtype")
    for i, name in enumerate(names):
        if name is None:
            continue
        values = [s[i] for s in everyone]
        if len(set(values)) > 1:
            raise ValueError(f"ring_attention: every rank must pass the same {name}; got {values} by rank "
                             f"(seen on rank {rank})")


class _Ring:
    """One call's ring: the plan, the blocks' attention, forward and backward passes."""

    def __init__(self, ring: Ring, plan: RingPlan, mask: GlobalMask, score_mod: ScoreMod | None, scale: float,
                 backend, stats: RingStats | None):
        self.ring, self.plan, self.mask, self.score_mod = ring, plan, mask, score_mod
        self.scale, self.backend, self.stats = scale, backend, stats
        self.rank, self.world = ring.rank, ring.world_size
        self.lengths = plan.lengths()

    # ------------------------------------------------------------------ layout of a shard in hand

    def local_runs(self, rank: int) -> list[tuple[int, int, int]]:
        """``(local start, length, global start)`` of each piece of ``rank``'s shard."""
        runs, offset = [], 0
        for a, b in self.plan.pieces[rank]:
            runs.append((offset, b - a, a))
            offset += b - a
        return runs

    def shard_numel(self, rank: int, k: Tensor, v: Tensor) -> int:
        b, h = k.shape[0], k.shape[1]
        return b * h * self.lengths[rank] * (k.shape[3] + v.shape[3])

    @staticmethod
    def pack(k: Tensor, v: Tensor, dtype=None) -> Tensor:
        return torch.cat([k.reshape(-1), v.reshape(-1)]).to(dtype or k.dtype)

    def unpack(self, buf: Tensor, rank: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        b, h, n = k.shape[0], k.shape[1], self.lengths[rank]
        nk = b * h * n * k.shape[3]
        return buf[:nk].view(b, h, n, k.shape[3]), buf[nk:].view(b, h, n, v.shape[3])

    def attend(self, q, k, v, q0, k0, score_mod=None, mask=None):
        mask = self.mask if mask is None else mask
        return mask.attend(q, k, v, q0, k0, score_mod=self.score_mod if score_mod is None else score_mod,
                           scale=self.scale, backend=self.backend)

    def kv_messages(self, step: int, current: Tensor | None, k: Tensor, v: Tensor):
        """Messages of ``step``: send the shard in hand on, receive the next one. Returns
        ``(messages, next buffer or None)``."""
        plan, r, messages, incoming = self.plan, self.rank, [], None
        if plan.holds(r, step + 1):
            incoming = k.new_empty(self.shard_numel(plan.shard(r, step + 1), k, v))
            messages.append(("recv", incoming, self.ring.prev, KV))
        if plan.forwards(r, step):
            messages.append(("send", current, self.ring.next, KV))
        return messages, incoming

    def _clock(self) -> float:
        return self.stats.clock() if self.stats is not None else 0.0

    def _timed(self, key: str, start: float) -> None:
        if self.stats is not None:
            getattr(self.stats, key).append(self.stats.clock() - start)

    def _count_sent(self, key: str, before: int) -> int:
        if self.stats is not None:
            getattr(self.stats, key).append(self.ring.bytes_sent - before)
        return self.ring.bytes_sent

    def _sync(self, device) -> None:
        if self.stats is not None and device.type == "cuda":
            torch.cuda.synchronize(device)

    # ---------------------------------------------------------------------------------- forward

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        plan, r = self.plan, self.rank
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        q_runs = self.local_runs(r)
        outs: list = [None] * len(q_runs)
        lses: list = [None] * len(q_runs)
        current = self.pack(k, v)
        sent_before = self.ring.bytes_sent
        for step in range(plan.steps):
            messages, incoming = self.kv_messages(step, current, k, v)
            pending = self.ring.start(messages, f"the K/V shard of rank {plan.shard(r, step + 1)} (forward step "
                                                f"{step + 1} of {plan.steps}) from rank {self.ring.prev}")
            self._sync(q.device)
            t0 = self._clock()
            j = plan.shard(r, step)
            if plan.computes(r, step):
                kj, vj = self.unpack(current, j, k, v)
                k_runs = self.local_runs(j)
                for a, c in plan.blocks[r][j]:
                    (qs, qn, q0), (ks, kn, k0) = q_runs[a], k_runs[c]
                    o, lse = self.attend(q[:, :, qs:qs + qn], kj[:, :, ks:ks + kn], vj[:, :, ks:ks + kn], q0, k0)
                    o = o.to(cdt)
                    if outs[a] is None:
                        outs[a], lses[a] = o, lse
                    else:
                        outs[a], lses[a] = merge_partials([outs[a], o], [lses[a], lse])
            self._sync(q.device)
            self._timed("forward_compute_s", t0)
            t0 = self._clock()
            self.ring.wait(pending)
            self._timed("forward_wait_s", t0)
            sent_before = self._count_sent("forward_sent", sent_before)
            current = incoming
        out_parts, lse_parts = [], []
        b, h, dv = q.shape[0], q.shape[1], v.shape[3]
        for (qs, qn, _), o, lse in zip(q_runs, outs, lses):
            if o is None:  # nothing visible anywhere: zeros and -inf, as qkv.attention
                o = q.new_zeros(b, h, qn, dv, dtype=cdt)
                lse = q.new_full((b, h, qn), float("-inf"), dtype=cdt)
            out_parts.append(o)
            lse_parts.append(lse.to(cdt))
        return torch.cat(out_parts, dim=2).to(q.dtype), torch.cat(lse_parts, dim=2)

    # --------------------------------------------------------------------------------- backward

    def block_grads(self, q_piece, k_piece, v_piece, q0, k0, dout, delta, dlse, lse, needs, leaves):
        """Gradients of one block, for the leaves that need them: ``(dq, dk, dv, *extras)``."""
        with torch.enable_grad():
            ql = q_piece.detach().requires_grad_(needs[0])
            kl = k_piece.detach().requires_grad_(needs[1])
            vl = v_piece.detach().requires_grad_(needs[2])
            o, lse_s = self.attend(ql, kl, vl, q0, k0, leaves["score_mod"], leaves["mask"])
            seen = torch.isfinite(lse)
            w = torch.where(seen, torch.exp(lse_s.to(lse.dtype) - torch.where(seen, lse, 0.0)), 0.0)
            g_out = (w.unsqueeze(-1) * dout).to(o.dtype)
            g_lse = w * ((dout * o.to(dout.dtype)).sum(-1) - delta + (0.0 if dlse is None else dlse))
            inputs = [t for t in (ql, kl, vl, *leaves["extras"]) if t.requires_grad]
            grads = torch.autograd.grad((o, lse_s), inputs, (g_out, g_lse.to(lse_s.dtype)), allow_unused=True)
        grads = iter(grads)
        return [next(grads) if t.requires_grad else None for t in (ql, kl, vl, *leaves["extras"])]

    def backward(self, q, k, v, out, lse, dout, dlse, needs, extras):
        plan, r, ring = self.plan, self.rank, self.ring
        cdt = lse.dtype
        dout = dout.to(cdt)
        delta = (dout * out.to(cdt)).sum(-1)
        dlse = None if dlse is None else dlse.to(cdt)
        leaf_extras = [t.detach().requires_grad_(n) for t, n in zip(extras, needs[3:])]
        n_mod = len(self.score_mod.tensors) if self.score_mod is not None else 0
        mod = None
        if self.score_mod is not None:  # the same modifier over leaf copies of its tensors
            mod = copy.copy(self.score_mod)
            mod.tensors = tuple(leaf_extras[:n_mod])
        mask = self.mask.with_bias(leaf_extras[n_mod]) if self.mask.is_bias else self.mask
        leaves = {"score_mod": mod, "mask": mask, "extras": leaf_extras}
        d_extras = [torch.zeros_like(t, dtype=cdt) if n else None for t, n in zip(extras, needs[3:])]
        dq = torch.zeros(q.shape, dtype=cdt, device=q.device)
        q_runs = self.local_runs(r)
        current = self.pack(k, v)
        own = None                    # dk/dv of this rank's own keys from its own queries
        sends = []                    # accumulators in flight
        coming_home = back = None     # the total for this rank's own keys, posted at step reach[r]
        sent_before = ring.bytes_sent
        for step in range(plan.steps):
            j = plan.shard(r, step)
            holds = plan.holds(r, step)
            grad_in = None
            if holds and step >= 2:   # the accumulator of shard j, from the rank before
                grad_in = torch.empty(self.shard_numel(j, k, v), dtype=cdt, device=q.device)
            messages, incoming = self.kv_messages(step, current, k, v)
            if grad_in is not None:
                messages.insert(0, ("recv", grad_in, ring.prev, GRAD))
            pending = ring.start(messages, f"K/V and gradients of rank {j} (backward step {step + 1} of "
                                           f"{plan.steps}) from rank {ring.prev}")
            if step == plan.reach[r] > 0:  # the accumulator of this rank's keys comes home this step
                source = (r + step) % self.world
                back = torch.empty(self.shard_numel(r, k, v), dtype=cdt, device=q.device)
                coming_home = ring.start([("recv", back, source, HOME)],
                                         f"the K/V gradients of this rank's keys from rank {source}")
            self._sync(q.device)
            t0 = self._clock()
            contribution = None
            if plan.computes(r, step):
                kj, vj = self.unpack(current, j, k, v)
                contribution = torch.zeros(self.shard_numel(j, k, v), dtype=cdt, device=q.device)
                dkj, dvj = self.unpack(contribution, j, k, v)  # views: filled in place, sent as one buffer
                k_runs = self.local_runs(j)
                for a, c in plan.blocks[r][j]:
                    (qs, qn, q0), (ks, kn, k0) = q_runs[a], k_runs[c]
                    rows, cols = slice(qs, qs + qn), slice(ks, ks + kn)
                    g = self.block_grads(q[:, :, rows], kj[:, :, cols], vj[:, :, cols], q0, k0, dout[:, :, rows],
                                         delta[:, :, rows], None if dlse is None else dlse[:, :, rows],
                                         lse[:, :, rows], needs, leaves)
                    for target, grad in ((dq[:, :, rows], g[0]), (dkj[:, :, cols], g[1]), (dvj[:, :, cols], g[2])):
                        if grad is not None:
                            target += grad
                    for i, grad in enumerate(g[3:]):
                        if grad is not None and d_extras[i] is not None:
                            d_extras[i] += grad
            self._sync(q.device)
            self._timed("backward_compute_s", t0)
            t0 = self._clock()
            ring.wait(pending)
            self._timed("backward_wait_s", t0)
            if step == 0:
                own = contribution
            elif holds:
                acc = grad_in if grad_in is not None else torch.zeros(self.shard_numel(j, k, v), dtype=cdt,
                                                                      device=q.device)
                if contribution is not None:
                    acc += contribution
                home = plan.reach[j] == step
                sends.append(ring.start([("send", acc, j if home else ring.next, HOME if home else GRAD)],
                                        f"delivery of the K/V gradients of rank {j}"))
                if len(sends) > 2:  # at most two accumulators in flight: memory stays O(shard)
                    ring.wait(sends.pop(0))
            sent_before = self._count_sent("backward_sent", sent_before)
            current = incoming
        total = own
        if plan.reach[r] > 0:
            ring.wait(coming_home)
            total = back if total is None else total.add_(back)
        for pending in sends:
            ring.wait(pending)
        if total is None:
            dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        else:
            dk, dv = self.unpack(total, r, k, v)
        return (dq.to(q.dtype) if needs[0] else None, dk.to(k.dtype) if needs[1] else None,
                dv.to(v.dtype) if needs[2] else None,
                *[None if g is None else g.to(t.dtype) for g, t in zip(d_extras, extras)])


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run: _Ring, q, k, v, *extras):
        with torch.no_grad():
            out, lse = run.forward(q, k, v)
        ctx.run = run
        ctx.save_for_backward(q, k, v, out, lse, *extras)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, *extras = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        grads = ctx.run.backward(q, k, v, out, lse, dout, dlse, list(ctx.needs_input_grad[1:]), extras)
        return (None, *grads)
