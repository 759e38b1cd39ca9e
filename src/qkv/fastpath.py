"""The fast path of :func:`qkv.attention`: a dispatch decision remembered per problem signature.

The general path validates every argument into a :class:`~qkv.problem.Problem`, asks every
backend what it cannot do and estimates each one's time: some 30 µs on a CPU, as long as the
attention of a small decoding step itself. But a model calls the same few problems again and
again (every layer, every step), and the commonest of them -- no mask, a causal mask that hides
nothing (one query) or that SDPA's ``is_causal`` expresses (a square problem), or a bool key mask
``(B|1, 1, 1, Nk)`` for one query (a decoding step over a fixed-size cache); no score modifier,
no dropout, no log-sum-exp, no offsets, no forced backend -- are ones SDPA runs whenever the
dispatcher picks it. For those, the dispatcher's choice is remembered per *signature*: batch,
heads, head dims, ``Nq``, the mask's kind, dtype, device, whether a scale was given, ``backend``
(None, or ``"sdpa"`` forced), and ``Nk`` by its power-of-two bucket (a decoding step's ``Nk``
grows by one each step).

A signature is decided once, by running the dispatcher itself on the problem at hand and at both
ends of its ``Nk`` bucket (the estimates are linear in ``Nk`` there), each with and without
gradients; only if it picks ``sdpa`` everywhere does the fast path take such calls (so a call
need not read its grad mode: ~2 µs), and then it runs exactly what
:class:`~qkv.backends.sdpa.SdpaBackend` runs for them (same kernel call, same guarantee that a
row whose query holds NaN/inf is NaN). Anything else, and any argument the fast path does not
recognise at a glance, goes the general way, which validates and raises as always; so
:func:`qkv.explain_dispatch` tells the truth about every call.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .backends import ON_REGISTER
from .backends.sdpa import guarded_sdpa
from .masks import Causal

#: signature -> ``(is_causal, needs_nan_guard)`` if SDPA serves it, else None.
_DECISIONS: dict[tuple, tuple[bool, bool] | None] = {}
#: exact call signature (shapes, q's dtype and device, mask, scale given, backend) -> a run plan
#: ``(direct, is_causal, nan_guard, default_scale, enable_gqa)``, :data:`_DEFAULTS`, or None (the general path);
#: ``direct``: call SDPA itself (no mask to guard, and a kernel that keeps the NaN promise).
_PLANS: dict[tuple, tuple | None] = {}
MAX_SIGNATURES = 4096
_UNSEEN = object()
_DEFAULTS = object()  # a plan: SDPA with its own defaults, F.scaled_dot_product_attention(q, k, v)

# Mask kinds in a signature.
_NONE, _CAUSAL_DECODE, _CAUSAL_SQUARE, _KEY_MASK = 0, 1, 2, 3
_CAUSAL = "causal"  # a qkv.causal() mask in an exact signature
_sdpa = F.scaled_dot_product_attention  # bound once: a module attribute lookup per call is measurable here


def clear() -> None:
    """Forget every remembered decision (after registering a backend or changing the cost model),
    the dispatcher's remembered choices too."""
    from .dispatch import forget_choices

    _DECISIONS.clear()
    _PLANS.clear()
    forget_choices()


ON_REGISTER.append(clear)  # a newly registered backend is considered from the next call on


def attend(q, k, v, mask, scale, backend=None) -> Tensor | None:
    """``qkv.attention(q, k, v, mask, scale=scale, backend=backend)`` if the fast path serves this
    call, else None. ``backend``: None or ``"sdpa"`` (forced: then the decision is whether SDPA
    can run the problem, as ``choose`` decides it). Called only without score modifier, dropout,
    generator, ``return_lse`` or offsets.

    The exact signature of a call (every shape, q's dtype and device, the mask's kind or shape,
    whether a scale was given, ``backend``) is looked up first: a plan says what to run
    (checked once, when the signature was first seen). A new signature is checked and decided by
    its ``Nk`` bucket (see the module docstring)."""
    if mask is None:
        mask_sig = None
    elif type(mask) is Causal:
        mask_sig = _CAUSAL
    elif type(mask) is Tensor:
        mask_sig = (mask.shape, mask.dtype, mask.device)
    else:
        return None
    # Every tensor attribute read costs ~0.2-1.5 µs (the first after a kernel more), so the key
    # holds only what a decision depends on: the shapes, q's dtype and device. A plan is made only
    # for a signature first seen with plain tensors of one dtype and device (see _plan); a later
    # call that mixes dtypes or devices makes SDPA raise, and one that passes no tensors fails on
    # ``.shape``: both caught below, so the general path says what is wrong. (A tensor subclass
    # that arrives with a known key goes to SDPA as it is: its __torch_function__ sees that call.)
    try:
        key = (q.shape, k.shape, v.shape, q.dtype, q.device, mask_sig, scale is None, backend)
        plan = _PLANS.get(key, _UNSEEN)
        if plan is _DEFAULTS:  # the commonest plan, first
            return _sdpa(q, k, v)
        if plan is _UNSEEN:
            plan = _plan(key, q, k, v, mask, scale, backend)
            if plan is _DEFAULTS:
                return _sdpa(q, k, v)
        if plan is None:
            return None
        direct, is_causal, nan_guard, default_scale, gqa = plan
        if scale is None:
            scale = default_scale
        elif type(scale) is not float or not math.isfinite(scale):
            return None  # the general path accepts ints and says what is wrong with the rest
        if direct:  # what guarded_sdpa runs here: no mask to guard, a kernel that keeps the NaN promise
            return _sdpa(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=gqa)
        if mask_sig is not None and mask_sig is not _CAUSAL:  # a materialised mask, as SdpaBackend.run passes it
            return guarded_sdpa(q, k, v, mask, is_causal=False, scale=scale)
        return guarded_sdpa(q, k, v, None, is_causal=is_causal, scale=scale, nan_guard=nan_guard)
    except (AttributeError, RuntimeError):
        return None  # not tensors, mixed dtypes or devices (or the kernel's refusal): the general path explains


def _plan(key: tuple, q: Tensor, k: Tensor, v: Tensor, mask, scale, backend) -> tuple | None:
    """Check a new exact signature and decide it (by its ``Nk`` bucket); remember the plan."""
    plan = None
    if (backend is None or backend == "sdpa") and type(q) is Tensor and type(k) is Tensor and type(v) is Tensor:
        kind = _signature_kind(q, k, v, mask)
        if kind is not None:
            qs, ks, vs = q.shape, k.shape, v.shape
            nq, nk = qs[2], ks[2]
            mask_batch = mask.shape[0] if kind == _KEY_MASK else 0
            bucket = (qs[0], qs[1], ks[1], qs[3], ks[0], ks[3], vs[0], vs[1], vs[3], nq, nk.bit_length(), kind,
                      mask_batch, q.dtype, q.device, scale is None, backend)
            try:
                decision = _DECISIONS[bucket]
            except KeyError:
                decision = _decide(bucket, q, k, v, mask, scale)
            if decision is not None:
                is_causal, nan_guard = decision
                gqa = ks[1] != qs[1]
                direct = kind != _KEY_MASK and not nan_guard and q.device.type != "cuda"
                plan = (direct, is_causal, nan_guard, 1.0 / math.sqrt(qs[3]), gqa)
                if direct and not is_causal and not gqa and scale is None:
                    plan = _DEFAULTS
    if plan is None and (type(q) is not Tensor or type(k) is not Tensor or type(v) is not Tensor
                         or k.dtype != q.dtype or v.dtype != q.dtype or k.device != q.device or v.device != q.device):
        return None  # not remembered: the key holds q's dtype and device only, and this call is unusual
    if len(_PLANS) >= MAX_SIGNATURES:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _signature_kind(q: Tensor, k: Tensor, v: Tensor, mask) -> int | None:
    """The mask kind of a call the fast path may serve, or None (the general path takes it)."""
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != 4 or len(ks) != 4 or len(vs) != 4:
        return None
    nq, nk = qs[2], ks[2]
    dtype, device = q.dtype, q.device
    if k.dtype != dtype or v.dtype != dtype or k.device != device or v.device != device or vs[:3] != ks[:3]:
        return None
    if mask is None:
        return _NONE
    if type(mask) is Causal:
        if nq == 1:
            return _CAUSAL_DECODE  # the one query is the newest position: it sees every key
        return _CAUSAL_SQUARE if nq == nk else None
    ms = mask.shape
    if mask.dtype != torch.bool or mask.dim() != 4 or nq != 1 or ms[1] != 1 or ms[2] != 1 or ms[3] != nk \
            or ms[0] not in (1, qs[0]) or mask.device != device:
        return None
    return _KEY_MASK


def _decide(key: tuple, q: Tensor, k: Tensor, v: Tensor, mask, scale) -> tuple[bool, bool] | None:
    """Whether SDPA serves the signature bucket ``key``: the dispatcher picks it for this problem
    and at both ends of its ``Nk`` bucket, with gradients and without (so grad mode need not be
    read on every call), as ``(is_causal, needs_nan_guard)``; None if not."""
    from .dispatch import choose
    from .problem import make_problem

    decision = None
    nk, kind, backend = k.shape[2], key[11], key[-1]
    try:
        if 0 not in (*q.shape, *k.shape, *v.shape) and q.device.type != "meta":  # (Nk = 0 has no bucket ends)
            ends = (nk,) if kind == _CAUSAL_SQUARE else (nk, 1 << (nk.bit_length() - 1), (1 << nk.bit_length()) - 1)
            chosen = set()
            for grad in (False, True):
                with torch.inference_mode(False), torch.set_grad_enabled(grad):
                    q_in = _stand_in(q, q.shape, grad)
                    for end in ends:  # Nq fixed, Nk anywhere in its bucket
                        k_end = _stand_in(k, (*k.shape[:2], end, k.shape[3]), grad)
                        v_end = _stand_in(v, (*v.shape[:2], end, v.shape[3]), grad)
                        mask_end = _stand_in(mask, (*mask.shape[:3], end), False) if kind == _KEY_MASK else mask
                        chosen.add(choose(make_problem(q_in, k_end, v_end, mask_end, scale=scale), backend).chosen)
            if chosen == {"sdpa"}:
                decision = (kind == _CAUSAL_SQUARE, _needs_nan_guard(q, kind))
    except (TypeError, ValueError):
        decision = None  # the general path raises the error
    if len(_DECISIONS) >= MAX_SIGNATURES:
        _DECISIONS.clear()
    _DECISIONS[key] = decision
    return decision


def _stand_in(t: Tensor, shape: tuple, requires_grad: bool) -> Tensor:
    """A tensor of ``shape`` like ``t`` (dtype, device) that allocates nothing."""
    stand_in = torch.ones((), dtype=t.dtype, device=t.device)
    return (stand_in.requires_grad_(requires_grad) if t.is_floating_point() else stand_in).expand(shape)


def _needs_nan_guard(q: Tensor, kind: int) -> bool:
    """Whether SDPA's output must be set to NaN where a query holds NaN/inf. Torch's CPU kernels
    propagate it themselves in float32/float64 without a causal mask (checked by the tests);
    elsewhere they may return a silent zero row, and the guard, as in the SDPA backend, applies."""
    return not (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float64) and kind != _CAUSAL_SQUARE)
