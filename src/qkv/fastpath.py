"""The fast path of :func:`qkv.attention`: a dispatch decision remembered per problem signature.

The general path validates every argument into a :class:`~qkv.problem.Problem`, asks every
backend what it cannot do and estimates each one's time: some 30 µs on a CPU, as long as the
attention of a small decoding step itself. But a model calls the same few problems again and
again (every layer, every step), and the commonest of them -- no mask, a causal mask that hides
nothing (one query) or that SDPA's ``is_causal`` expresses (a square problem), or a bool key mask
``(B|1, 1, 1, Nk)`` for one query (a decoding step over a fixed-size cache); no score modifier,
no dropout, no log-sum-exp, no offsets, no forced backend -- are ones SDPA runs whenever the
dispatcher picks it. For those, the dispatcher's choice is remembered per *signature*: batch,
heads, head dims, ``Nq``, the mask's kind, dtype, device, grad mode, whether a scale was given,
``backend`` (None, or ``"sdpa"`` forced), and ``Nk`` by its power-of-two bucket (a decoding
step's ``Nk`` grows by one each step).

A signature is decided once, by running the dispatcher itself on the problem at hand and at both
ends of its ``Nk`` bucket (the estimates are linear in ``Nk`` there); only if it picks ``sdpa``
everywhere does the fast path take such calls, and then it runs exactly what
:class:`~qkv.backends.sdpa.SdpaBackend` runs for them (same kernel call, same guarantee that a
row whose query holds NaN/inf is NaN). Anything else, and any argument the fast path does not
recognise at a glance, goes the general way, which validates and raises as always; so
:func:`qkv.explain_dispatch` tells the truth about every call.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends.sdpa import guarded_sdpa
from .masks import Causal

#: signature -> ``(is_causal, needs_nan_guard)`` if SDPA serves it, else None.
_DECISIONS: dict[tuple, tuple[bool, bool] | None] = {}
MAX_SIGNATURES = 4096

# Mask kinds in a signature.
_NONE, _CAUSAL_DECODE, _CAUSAL_SQUARE, _KEY_MASK = 0, 1, 2, 3


def clear() -> None:
    """Forget every remembered decision (after registering a backend or changing the cost model)."""
    _DECISIONS.clear()


def attend(q, k, v, mask, scale, backend=None) -> Tensor | None:
    """``qkv.attention(q, k, v, mask, scale=scale, backend=backend)`` if the fast path serves this
    call, else None. ``backend``: None or ``"sdpa"`` (forced: then the decision is whether SDPA
    can run the problem, as ``choose`` decides it). Called only without score modifier, dropout,
    generator, ``return_lse`` or offsets."""
    if backend is not None and backend != "sdpa":
        return None
    mask_batch = 0
    if mask is None:
        kind = _NONE
    elif type(mask) is Causal:
        kind = None
    elif type(mask) is Tensor and mask.dtype == torch.bool and mask.dim() == 4:
        kind, mask_batch = _KEY_MASK, mask.shape[0]
    else:
        return None
    if type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor:
        return None
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    nq, nk = qs[2], ks[2]
    if kind == _KEY_MASK:
        ms = mask.shape
        if nq != 1 or ms[1] != 1 or ms[2] != 1 or ms[3] != nk or mask_batch not in (1, qs[0]) \
                or mask.device != q.device:
            return None
    elif kind is None:
        if nq == 1:
            kind = _CAUSAL_DECODE  # the one query is the newest position: it sees every key
        elif nq == nk:
            kind = _CAUSAL_SQUARE
        else:
            return None
    dtype, device = q.dtype, q.device
    if k.dtype != dtype or v.dtype != dtype or k.device != device or v.device != device or vs[2] != nk:
        return None
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    key = (qs[0], qs[1], ks[1], qs[3], ks[0], ks[3], vs[0], vs[1], vs[3], nq, nk.bit_length(), kind, mask_batch,
           dtype, device, grad, scale is None, backend)
    try:
        decision = _DECISIONS[key]
    except KeyError:
        decision = _decide(key, q, k, v, mask, scale)
    if decision is None:
        return None
    if scale is None:
        scale = 1.0 / math.sqrt(qs[3])
    elif type(scale) is not float or not math.isfinite(scale):
        return None  # the general path accepts ints and says what is wrong with the rest
    is_causal, nan_guard = decision
    if kind == _KEY_MASK:  # a materialised mask, as SdpaBackend.run passes it
        return guarded_sdpa(q, k, v, mask, is_causal=False, scale=scale)
    return guarded_sdpa(q, k, v, None, is_causal=is_causal, scale=scale, nan_guard=nan_guard)


def _decide(key: tuple, q: Tensor, k: Tensor, v: Tensor, mask, scale) -> tuple[bool, bool] | None:
    from .dispatch import choose
    from .problem import make_problem

    decision = None
    nk, kind, backend = k.shape[2], key[11], key[-1]
    try:
        if 0 not in (*q.shape, *k.shape, *v.shape) and q.device.type != "meta":
            chosen = {choose(make_problem(q, k, v, mask, scale=scale), backend).chosen}
            if kind != _CAUSAL_SQUARE:  # Nq fixed, Nk anywhere in its bucket
                for end in (1 << (nk.bit_length() - 1), (1 << nk.bit_length()) - 1):
                    shape = (k.shape[0], k.shape[1], end)
                    k_end = _stand_in(k, (*shape, k.shape[3]))
                    v_end = _stand_in(v, (*shape, v.shape[3]))
                    mask_end = _stand_in(mask, (*mask.shape[:3], end)) if kind == _KEY_MASK else mask
                    chosen.add(choose(make_problem(q, k_end, v_end, mask_end, scale=scale), backend).chosen)
            if chosen == {"sdpa"}:
                decision = (kind == _CAUSAL_SQUARE, _needs_nan_guard(q, kind))
    except (TypeError, ValueError):
        decision = None  # the general path raises the error
    if len(_DECISIONS) >= MAX_SIGNATURES:
        _DECISIONS.clear()
    _DECISIONS[key] = decision
    return decision


def _stand_in(t: Tensor, shape: tuple) -> Tensor:
    """A tensor of ``shape`` like ``t`` (dtype, device, requires_grad) that allocates nothing."""
    stand_in = torch.ones((), dtype=t.dtype, device=t.device)
    return (stand_in.requires_grad_(t.requires_grad) if t.is_floating_point() else stand_in).expand(shape)


def _needs_nan_guard(q: Tensor, kind: int) -> bool:
    """Whether SDPA's output must be set to NaN where a query holds NaN/inf. Torch's CPU kernels
    propagate it themselves in float32/float64 without a causal mask (checked by the tests);
    elsewhere they may return a silent zero row, and the guard, as in the SDPA backend, applies."""
    return not (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and kind != _CAUSAL_SQUARE)
