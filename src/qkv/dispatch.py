"""Choosing a backend, and saying why.

Every registered backend lists what it cannot do for a problem (from its declared
:class:`~qkv.backends.capabilities.Capabilities`); among those that can, the one with the lowest
estimated run time wins. ``backend="name"`` forces a choice: only that backend is checked (and
estimated), and it fails with that backend's reasons. :func:`explain_dispatch` shows the decision.

A call that runs (``learn=True``, from :func:`qkv.attention`) with a mask object remembers the
automatic choice on that object, as the block layouts are (:func:`qkv.layout.cached_layout`):
keyed by the shapes, dtype, device, grad mode, log-sum-exp, scale, positions, thread count and the
state of the mask's tensors, and only once no backend has a compile pending for it (flex's ski
rental still learns until then). Estimating every backend costs ~0.3 ms of Python on a CPU; a
model's layers and steps ask the same question again and again. :func:`explain_dispatch` always
estimates afresh, so it shows what the remembered choice was made of.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backends import REGISTRY, Backend
from .layout import keep, owner_cache
from .problem import Problem, make_problem

#: Bumped by :func:`forget_choices`: choices remembered before are not used again.
_EPOCH = [0]


@dataclass(frozen=True)
class Dispatch:
    """The outcome of dispatching one problem: the chosen backend (``backend``, the object;
    ``chosen``, its name) and for every registered backend its estimated seconds (None where it
    cannot run) and the reasons it cannot. A forced backend is only checked for support: every
    estimate is None and ``reasons`` holds it alone.
    ``str()`` renders the decision as a table."""

    chosen: str
    forced: bool
    estimates: dict[str, float | None]
    reasons: dict[str, list[str]]
    problem: Problem
    backend: Backend = field(default=None, repr=False, compare=False)

    def __str__(self) -> str:
        how = "forced by backend=" if self.forced else "auto: lowest estimate among supporting backends"
        lines = [f"problem: {summarize(self.problem)}", f"chosen:  {self.chosen} ({how})"]
        for name, est in sorted(self.estimates.items(), key=lambda kv: (kv[1] is None, kv[1] or 0)):
            mark = "*" if name == self.chosen else " "
            if est is None and not self.reasons.get(name):
                lines.append(f" {mark} {name:<10} not estimated (backend forced)" if name == self.chosen else
                             f" {mark} {name:<10} not considered (backend forced)")
            elif est is None:
                lines.append(f" {mark} {name:<10} cannot run: " + "; ".join(self.reasons[name]))
            else:
                note = getattr(REGISTRY.get(name), "note", None)
                lines.append(f" {mark} {name:<10} ~{_seconds(est)}" + (f" ({note(self.problem)})" if note else ""))
        return "\n".join(lines)


def _seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"


def summarize(p: Problem) -> str:
    heads = f"Hq={p.q_heads}" + (f"/Hkv={p.kv_heads}" if p.kv_heads != p.q_heads else "")
    parts = [f"B={p.batch} {heads} Nq={p.nq} Nk={p.nk} D={p.head_dim}"
             + (f" Dv={p.v_dim}" if p.v_dim != p.head_dim else ""), str(p.dtype).replace("torch.", ""),
             p.device.type]
    if not p.positions.is_default:
        show = (lambda o: o.tolist() if hasattr(o, "tolist") else o)
        parts.append(f"q_offset={show(p.q_offset)} k_offset={show(p.k_offset)}")
    if p.mask is not None:
        parts.append(f"mask={p.mask!r}")
    if p.bias is not None:
        parts.append(f"bias{tuple(p.bias.shape)}")
    if p.score_mod is not None:
        parts.append(f"score_mod={p.score_mod!r}")
    if p.dropout_p:
        parts.append(f"dropout_p={p.dropout_p}")
    if p.requires_grad:
        parts.append("with grad")
    return ", ".join(parts)


def choose(problem: Problem, backend: str | None = None, learn: bool = False) -> Dispatch:
    """Pick the backend for ``problem`` (or check the forced one). Raises ``ValueError`` if the
    named backend does not exist or cannot run the problem, quoting its reasons. ``learn=True``
    (a call that will run) lets backends that learn from automatic choices see this one."""
    if backend is not None and backend not in REGISTRY:
        raise ValueError(f"backend must be None or one of {sorted(REGISTRY)}, got {backend!r}")
    if backend is not None:  # only the forced backend's own support check: no estimate, no block view
        own = REGISTRY[backend].unsupported(problem)
        if own:
            able = [n for n, b in REGISTRY.items() if n != backend and not b.unsupported(problem)]
            raise ValueError(f"backend={backend!r} cannot run this problem: " + "; ".join(own)
                             + f". Backends that can: {', '.join(able)}")
        return Dispatch(backend, True, {name: None for name in REGISTRY}, {backend: []}, problem, REGISTRY[backend])
    memo, key = _choices(problem) if learn else (None, None)
    if memo is not None and key in memo:
        chosen, estimates, reasons = memo[key]
        return Dispatch(chosen, False, estimates, reasons, problem, REGISTRY[chosen])
    reasons = {name: b.unsupported(problem) for name, b in REGISTRY.items()}
    estimates = {name: (None if reasons[name] else REGISTRY[name].estimate(problem)) for name in REGISTRY}
    chosen = min((n for n in REGISTRY if estimates[n] is not None), key=lambda n: estimates[n])
    for b in REGISTRY.values() if learn else ():  # backends that learn from choices (flex's ski rental)
        if hasattr(b, "observe"):
            b.observe(problem, estimates, chosen)
    if memo is not None and not any(estimates[name] is not None and b.compile_pending(problem)
                                     for name, b in REGISTRY.items() if hasattr(b, "compile_pending")):
        keep(memo, key, (chosen, estimates, reasons))
    return Dispatch(chosen, False, estimates, reasons, problem, REGISTRY[chosen])


def forget_choices() -> None:
    """Do not use the automatic choices remembered so far (after registering a backend or changing
    the cost model; :func:`qkv.fastpath.clear` calls this)."""
    _EPOCH[0] += 1


def _choices(p: Problem) -> tuple[dict | None, tuple | None]:
    """The choices remembered on ``p``'s mask object and ``p``'s key there, or ``(None, None)``
    where a choice is not remembered: no mask object, a score modifier, bias or dropout (their
    tensors and functions would all need keys), or positions held on a device."""
    owner = p.mask_source
    if owner is None or p.score_mod is not None or p.bias is not None or p.dropout_p:
        return None, None
    where = p.positions.cache_key()
    if where is None:
        return None, None
    memo = owner_cache(owner, "_qkv_choices")
    if memo is None:
        return None, None
    key = (p.q.shape, p.k.shape, p.v.shape, p.dtype, p.device, p.requires_grad, p.return_lse, p.scale, where,
           torch.get_num_threads(), _EPOCH[0], p.mask_state)
    return memo, key


def explain_dispatch(q, k, v, mask=None, *, scale=None, score_mod=None, dropout_p=0.0, generator=None,
                     return_lse=False, backend=None, q_offset=None, k_offset=0) -> Dispatch:
    """Which backend :func:`qkv.attention` would run for these arguments, and why.

    Takes the same arguments as :func:`qkv.attention` (``meta`` tensors work: nothing is computed).
    ``print()`` the result for a table of estimates and reasons.
    """
    problem = make_problem(q, k, v, mask, scale=scale, score_mod=score_mod, dropout_p=dropout_p,
                           generator=generator, return_lse=return_lse, q_offset=q_offset, k_offset=k_offset)
    return choose(problem, backend)
