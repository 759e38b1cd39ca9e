"""What a backend can do, declared as data, and the one function that turns it into reasons.

Each backend declares a :class:`Capabilities` (dtypes, devices, head dims, forward and backward,
lse, dropout, score modifiers, float-mask bias, bool masks, per-batch offsets) with, where it
helps, the reason in its own words. :func:`reasons` compares a problem against it and returns what
a user reads in ``qkv.explain_dispatch`` or in the error of a forced backend. Checks that depend
on more than the declaration (SDPA's materialised mask size) stay in the backend's own
``unsupported``, after these.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..problem import FLOAT_DTYPES, Problem


@dataclass(frozen=True)
class Capabilities:
    """Declared support of one backend. ``None`` in ``devices``/``head_dims`` means any.

    ``why`` maps a feature name (``"dtype"``, ``"device"``, ``"head_dim"``, ``"forward"``,
    ``"backward"``, ``"lse"``, ``"dropout"``, ``"score_mod"``, ``"bias"``, ``"mask"``,
    ``"per_batch_offsets"``) to the backend's explanation, used in place of the generic one.
    """

    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES
    devices: tuple[str, ...] | None = None
    head_dims: tuple[int, int] | None = None  # inclusive range of D (and Dv)
    head_dim_multiple: int = 1
    forward: bool = True
    backward: bool = True
    lse: bool = True
    dropout: bool = True
    score_mod: bool = True
    bias: bool = True
    mask: bool = True
    per_batch_offsets: bool = True
    why: dict[str, str] = field(default_factory=dict)

    def supports_all(self) -> bool:
        """True when nothing is excluded (every problem passes :func:`reasons`)."""
        return reasons(self, None) == []


#: Feature -> (label shown to the user, generic explanation).
_LABELS = {
    "dtype": ("dtype", "not supported"),
    "device": ("device", "not supported"),
    "head_dim": ("head_dim", "not supported"),
    "forward": ("forward", "not implemented"),
    "backward": ("backward", "gradients are not implemented"),
    "lse": ("return_lse", "the log-sum-exp is not returned"),
    "dropout": ("dropout_p > 0", "dropout is not implemented"),
    "score_mod": ("score_mod", "score modifiers are not supported"),
    "bias": ("float mask", "an additive float mask is not supported"),
    "mask": ("mask", "bool masks are not supported"),
    "per_batch_offsets": ("q_offset/k_offset", "offsets that differ per batch element are not supported"),
}


def _problem_needs(p: Problem) -> dict[str, bool]:
    return {
        "score_mod": p.score_mod is not None,
        "lse": p.return_lse,
        "dropout": p.dropout_p > 0,
        "bias": p.bias is not None,
        "mask": p.mask is not None,
        "per_batch_offsets": not p.positions.scalar,
        "forward": True,
        "backward": p.requires_grad,
    }


def reasons(caps: Capabilities, problem: Problem | None) -> list[str]:
    """Every reason the declared ``caps`` exclude ``problem``, in the user's words (empty: it is
    supported). ``problem=None`` lists the features the backend lacks at all."""
    out = []

    def say(feature: str, detail: str | None = None) -> None:
        label, generic = _LABELS[feature]
        text = caps.why.get(feature, generic)
        out.append(f"{label}: {text}" + (f" ({detail})" if detail else ""))

    if problem is None:
        for feature in ("score_mod", "lse", "dropout", "bias", "mask", "per_batch_offsets", "forward", "backward"):
            if not getattr(caps, feature):
                say(feature)
        return out
    p = problem
    for feature, needed in _problem_needs(p).items():
        if needed and not getattr(caps, feature):
            say(feature)
    if p.dtype not in caps.dtypes:
        say("dtype", f"got {p.dtype}; supported: {', '.join(str(d).replace('torch.', '') for d in caps.dtypes)}")
    if caps.devices is not None and p.device.type not in caps.devices:
        if p.device.type == "meta" and "device" in caps.why:
            out.append(f"meta tensors: {caps.why['device']}")
        else:
            say("device", f"got {p.device.type}; supported: {', '.join(caps.devices)}")
    for dim in {p.head_dim, p.v_dim}:
        lo, hi = caps.head_dims if caps.head_dims is not None else (0, None)
        if dim < lo or (hi is not None and dim > hi) or dim % caps.head_dim_multiple:
            say("head_dim", f"got {dim}; supported: {lo}..{hi if hi is not None else ''}"
                + (f", a multiple of {caps.head_dim_multiple}" if caps.head_dim_multiple > 1 else ""))
    return out


__all__ = ["Capabilities", "reasons"]
