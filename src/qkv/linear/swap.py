"""One option that swaps a module's attention: ``attention="exact" | "linear" | "performer" | Mask``.

:class:`qkv.nn.MultiHeadAttention` calls :func:`attend` in place of :func:`qkv.attention`:
``"exact"`` is softmax attention (unchanged), ``"linear"`` kernelised attention with ``elu + 1``,
``"performer"`` FAVOR+ with the module's :class:`PerformerFeatures`, and a :class:`qkv.Mask` (a
sparse pattern such as ``qkv.bigbird()``) is exact attention restricted to it (``&`` with the call's
mask). So a trained model can be run with approximate attention without touching its code.
"""

from __future__ import annotations

from torch import Tensor

from ..attention import attention as exact_attention
from ..masks import Mask
from .attention import linear_attention

KINDS = ("exact", "linear", "performer")


def check_option(attention) -> str | Mask:
    """``attention`` if valid, else ``ValueError`` naming the choices."""
    if isinstance(attention, Mask) or attention in KINDS:
        return attention
    raise ValueError(f"attention must be one of {', '.join(map(repr, KINDS))} or a qkv.Mask (a sparse pattern), "
                     f"got {attention!r}")


def weights_mask(kind, mask):
    """The mask exact attention weights are computed under for ``need_weights``; ``ValueError``
    for the kernelised kinds, which have no such weights."""
    if kind in ("linear", "performer"):
        raise ValueError(f"need_weights: attention={kind!r} forms no attention weights; use attention='exact'")
    return mask if kind == "exact" else _combine(kind, mask)


def _combine(pattern: Mask, mask):
    if isinstance(mask, Tensor) and mask.is_floating_point():
        raise ValueError("mask: a sparse attention pattern combines with bool masks and qkv masks, "
                         "not with an additive float mask")
    return pattern if mask is None else pattern & mask


def attend(kind, q: Tensor, k: Tensor, v: Tensor, mask=None, *, features=None, score_mod=None, dropout_p=0.0,
           return_lse=False, backend=None, **positions):
    """:func:`qkv.attention`'s call, answered by the attention ``kind`` (see the module docstring).
    ``positions`` (``q_offset``, ``k_offset``) are passed on to exact attention."""
    if kind == "exact":
        return exact_attention(q, k, v, mask, score_mod=score_mod, dropout_p=dropout_p, return_lse=return_lse,
                               backend=backend, **positions)
    if isinstance(kind, Mask):
        return exact_attention(q, k, v, _combine(kind, mask), score_mod=score_mod, dropout_p=dropout_p,
                               return_lse=return_lse, backend=backend, **positions)
    unsupported = [name for name, used in (("score_mod", score_mod is not None), ("dropout", dropout_p > 0),
                                           ("sink (log-sum-exp)", return_lse), ("backend", backend is not None),
                                           ("positions from a KV cache (q_offset/k_offset)", bool(positions)))
                   if used]
    if unsupported:
        raise ValueError(f"attention={kind!r} computes no softmax scores, so it cannot take: {', '.join(unsupported)}")
    if kind == "performer":
        return linear_attention(q, k, v, mask, feature_map=features)
    return linear_attention(q, k, v, mask)
