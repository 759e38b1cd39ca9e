"""Score modifiers: functions that change attention scores before the softmax.

A modifier maps ``(score, b, h, q, k) -> score`` where ``score`` holds scaled scores
``q . k * scale`` (float32 or float64) and ``b, h, q, k`` are broadcastable int64 index tensors:
batch, query head, query position and key position (positions as in :mod:`qkv.positions`: by
default queries aligned bottom-right; ``q_offset``/``k_offset`` move them). Only broadcasting ops may be used, so a modifier serves a whole score
matrix or one tile of it.

Learnable tensors (a relative-position table, trainable ALiBi slopes) are declared in
:class:`ScoreMod` rather than captured by a closure: the function receives them as extra
arguments, which lets fused backends return their gradients.

Binding. A modifier binds to each call (:meth:`ScoreMod.bind`): built-in constant tables (the
ALiBi slopes made from a head count) follow ``q``'s device; tensors the user passed (learnable
tables, chosen slopes) must already be on it, or ``bind`` raises a ``ValueError`` saying so.
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from .validate import positive_int


#: Tables the built-ins made themselves (ALiBi slopes from a head count): safe to copy to q's device.
_BUILTIN_CONSTANTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()  # id -> tensor


class ScoreMod:
    """A score modifier ``fn(score, b, h, q, k, *tensors) -> score``.

    ``tensors`` are the tensors ``fn`` reads that may need gradients. ``fn`` returns floating
    scores of the shape it was given; another floating dtype (a float64 table added to float32
    scores) is converted back to the scores' dtype. Call it as
    ``mod(score, b, h, q, k)``; backends that recompute scores call :meth:`apply` with detached
    copies of the tensors to obtain their gradients. ``work`` is about how many elementwise
    operations ``fn`` does per score (a lookup counts as one); the cost models charge it per
    visited score, so that the dispatcher knows what a modifier costs each backend.
    """

    def __init__(self, fn: Callable[..., Tensor], tensors: tuple[Tensor, ...] = (), name: str | None = None,
                 check: Callable[[int, int, int, int], None] | None = None, constant: bool = False,
                 work: float = 4.0):
        if not callable(fn):
            raise TypeError(f"score_mod must be callable, got {type(fn).__name__}")
        if not isinstance(work, (int, float)) or isinstance(work, bool) or not work >= 0 or math.isinf(work):
            raise ValueError(f"ScoreMod: work must be a finite number >= 0, got {work!r}")
        self.fn, self.tensors, self.check, self.work = fn, tuple(tensors), check, float(work)
        self.name = name or getattr(fn, "__name__", "score_mod")
        if constant:
            for t in self.tensors:
                _BUILTIN_CONSTANTS[id(t)] = t

    @property
    def constants(self) -> tuple[bool, ...]:
        """Per tensor: a built-in constant table (moved to q's device at bind) rather than a user
        tensor. Known by the tensor itself, so modifiers that wrap another's tensors (``chain``,
        a cache's remapping to true positions) keep it."""
        return tuple(_BUILTIN_CONSTANTS.get(id(t)) is t for t in self.tensors)

    def apply(self, tensors, score: Tensor, b: Tensor, h: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = self.fn(score, b, h, q, k, *tensors)
        if not isinstance(out, Tensor) or not out.is_floating_point():
            got = f"a {out.dtype} tensor" if isinstance(out, Tensor) else type(out).__name__
            raise TypeError(f"score_mod {self.name}: must return the modified scores as a floating tensor, got {got}")
        if out.shape != score.shape:
            raise ValueError(f"score_mod {self.name}: must return scores of the shape it was given, "
                             f"{tuple(score.shape)}, got {tuple(out.shape)}")
        if out.dtype != score.dtype:  # e.g. a float64 table added to float32 scores: type promotion
            out = out.to(score.dtype)
        return out

    def __call__(self, score, b, h, q, k):
        return self.apply(self.tensors, score, b, h, q, k)

    def bind(self, batch: int, heads: int, nq: int, nk: int, device) -> ScoreMod:
        """Check the modifier against a problem's sizes (``ValueError`` if it does not fit) and
        return it ready for ``device``: constant tables moved there, user tensors checked."""
        device = torch.device(device)
        moved = []
        for t, constant in zip(self.tensors, self.constants):
            if t.device != device:
                if not constant:
                    raise ValueError(f"score_mod {self.name}: tensor on {t.device}, but q is on {device}; "
                                     f"move it to {device} first (learnable tensors are never copied)")
                t = t.to(device)
            moved.append(t)
        if self.check is not None:
            self.check(batch, heads, nq, nk)
        if all(a is b for a, b in zip(moved, self.tensors)):
            return self
        bound = copy.copy(self)
        bound.tensors = tuple(moved)
        return bound

    def __repr__(self):
        return self.name


def as_score_mod(mod) -> ScoreMod | None:
    """``None``, a :class:`ScoreMod`, or a plain callable ``fn(score, b, h, q, k)``."""
    if mod is None or isinstance(mod, ScoreMod):
        return mod
    if callable(mod):
        return ScoreMod(mod)
    raise TypeError(f"score_mod must be None, a qkv.scores.ScoreMod or a callable, got {type(mod).__name__}")


# --------------------------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------------------------


def alibi_slopes(num_heads: int) -> Tensor:
    """The standard ALiBi head slopes (Press et al., 2022, "Train Short, Test Long").

    For ``n`` a power of two: ``2 ** (-8 * i / n)`` for ``i = 1..n``. Otherwise the slopes of the
    largest power of two below ``n``, followed by every other slope of twice that power.
    """
    positive_int("alibi_slopes: num_heads", num_heads)

    def powers(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    base = 2 ** math.floor(math.log2(num_heads))
    slopes = powers(base) + powers(2 * base)[0::2][: num_heads - base]
    return torch.tensor(slopes, dtype=torch.float64)


def alibi(slopes: Tensor | int, symmetric: bool = False) -> ScoreMod:
    """ALiBi bias ``slope[h] * (k - q)`` (non-positive for visible keys of a causal mask).

    ``slopes`` is a ``(H,)`` tensor (may require grad) or a head count for :func:`alibi_slopes`.
    ``symmetric=True`` uses ``-slope[h] * |k - q|`` for bidirectional encoders.
    """
    constant = isinstance(slopes, int) and not isinstance(slopes, bool)
    if constant:
        slopes = alibi_slopes(slopes)
    if not isinstance(slopes, Tensor) or slopes.dim() != 1 or not slopes.is_floating_point():
        raise TypeError("alibi: slopes must be a 1-D floating tensor (one slope per query head) or an int")

    def alibi_bias(score, b, h, q, k, slopes):
        distance = -(k - q).abs() if symmetric else k - q
        # In the score's dtype before it meets the heads: an int64 tile times float slopes
        # converts every element of the (H, q, k) product, 3.5x the time (same values).
        return score + slopes.to(score.dtype)[h] * distance.to(score.dtype)

    return ScoreMod(alibi_bias, (slopes,), check=_one_per_head(slopes, "alibi: slopes"), constant=constant,
                    work=6.0 if symmetric else 4.0, name=f"alibi({slopes.numel()} heads{', symmetric' if symmetric else ''})")


def _one_per_head(table: Tensor, what: str):
    def check(batch, heads, nq, nk):
        if table.shape[0] != heads:
            raise ValueError(f"{what} has {table.shape[0]} entries, expected one per query head ({heads})")

    return check


# --------------------------------------------------------------------------------------------
# Soft-capping and relative position bias
# --------------------------------------------------------------------------------------------


def softcap(cap: float) -> ScoreMod:
    """Soft-capping ``cap * tanh(score / cap)`` (as in Gemma 2 and Grok), keeping scores in
    ``(-cap, cap)``."""
    if not isinstance(cap, (int, float)) or isinstance(cap, bool) or not cap > 0 or math.isinf(cap):
        raise ValueError(f"softcap: cap must be a finite positive number, got {cap!r}")
    cap = float(cap)

    def soft_cap(score, b, h, q, k):
        return torch.tanh(score / cap) * cap

    return ScoreMod(soft_cap, name=f"softcap({cap:g})", work=5.0)  # tanh counts as three


def relative_bias(table: Tensor) -> ScoreMod:
    """A learned bias per clipped relative distance: ``table[h, clamp(k - q, -M, M) + M]``.

    ``table`` is ``(H, 2M + 1)`` (one row per query head) or ``(2M + 1,)`` (shared by all heads);
    it may require grad. Distances beyond ``M`` share the edge entries, as in Shaw et al. (2018).
    """
    if not isinstance(table, Tensor) or not table.is_floating_point() or table.dim() not in (1, 2):
        raise TypeError("relative_bias: table must be a floating tensor of shape (H, 2M+1) or (2M+1,)")
    width = table.shape[-1]
    if width % 2 != 1:
        raise ValueError(f"relative_bias: table's last dim must be odd (2M+1), got {width}")
    max_distance = width // 2
    per_head = table.dim() == 2

    def rel_bias(score, b, h, q, k, table):
        # M from the table's own size, not a captured int: dynamo may make that a symbol, and
        # torch 2.13's CPU Flex template cannot lower -M of a symbol (docs/attention.md, flex)
        m = table.shape[-1] // 2
        index = (k - q).clamp(-m, m) + m
        bias = table[h, index] if per_head else table[index]
        return score + bias.to(score.dtype)

    return ScoreMod(rel_bias, (table,), name=f"relative_bias(max_distance={max_distance})", work=6.0,
                    check=_one_per_head(table, "relative_bias: table") if per_head else None)


def chain(*mods: ScoreMod | Callable) -> ScoreMod:
    """Apply several modifiers in order (e.g. ``chain(alibi(8), softcap(30.0))``)."""
    parts = [as_score_mod(m) for m in mods]
    if not parts or any(p is None for p in parts):
        raise ValueError("chain: expected one or more score modifiers")
    sizes = [len(p.tensors) for p in parts]

    def chained(score, b, h, q, k, *tensors):
        start = 0
        for part, n in zip(parts, sizes):
            score = part.apply(tensors[start:start + n], score, b, h, q, k)
            start += n
        return score

    def check(batch, heads, nq, nk):
        for p in parts:
            if p.check is not None:
                p.check(batch, heads, nq, nk)

    return ScoreMod(chained, tuple(t for p in parts for t in p.tensors),
                    name=" -> ".join(p.name for p in parts), check=check, work=sum(p.work for p in parts))


__all__ = ["ScoreMod", "alibi", "alibi_slopes", "softcap", "relative_bias", "chain", "as_score_mod"]
