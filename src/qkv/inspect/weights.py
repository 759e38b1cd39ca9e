"""Attention weights and tokens as the pictures take them: checked, selected and labelled.

Both :func:`~qkv.inspect.plot_attention_grid` and :func:`~qkv.inspect.write_head_view` accept
weights as

* ``(layers, heads, Nq, Nk)``: a model's maps for one input (e.g. ``torch.stack(attentions)[:, 0]``
  from a model returning per-layer ``(B, H, N, N)``), or a sequence of per-layer ``(heads, Nq, Nk)``;
* ``(heads, Nq, Nk)``: one layer;
* ``(Nq, Nk)``: one map;

and ``layers=`` / ``heads=`` pick a subset (indices into the given tensor, which also label it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LabelledMaps:
    """Attention maps ready to draw.

    ``weights (L, H, Nq, Nk)`` float on the CPU; ``layers`` (length ``L``) and ``heads`` (length
    ``H``) the indices that label them, or None where the input had no such axis; ``query_tokens``
    (``Nq``) and ``key_tokens`` (``Nk``) the labels of rows and columns, or None for none.
    """

    weights: Tensor
    layers: list[int] | None
    heads: list[int] | None
    query_tokens: list[str] | None
    key_tokens: list[str] | None


def labelled_maps(weights, tokens, *, key_tokens=None, layers=None, heads=None,
                  require_tokens: bool = False) -> LabelledMaps:
    """Check ``weights`` and ``tokens`` and select ``layers`` / ``heads`` (see the module docstring).

    ``tokens`` label the query rows, ``key_tokens`` the key columns (default: ``tokens``, as in
    self-attention). Raises ``TypeError`` / ``ValueError`` naming the argument at fault.
    """
    w = _as_tensor(weights)
    has_layers, has_heads = w.dim() == 4, w.dim() >= 3
    while w.dim() < 4:
        w = w.unsqueeze(0)
    layer_ids = _select("layers", layers, w.shape[0], has_layers)
    head_ids = _select("heads", heads, w.shape[1], has_heads)
    w = w[layer_ids][:, head_ids]
    nq, nk = w.shape[2], w.shape[3]
    if nq == 0 or nk == 0:
        raise ValueError(f"weights: need at least one query and one key, got shape {tuple(w.shape)}")
    if tokens is None and require_tokens:
        raise ValueError("tokens: a list of token strings is required")
    query_tokens = _tokens("tokens", tokens, nq, "Nq (weights.shape[-2])")
    if key_tokens is None and query_tokens is not None and nk == nq:
        key_tokens = query_tokens
    elif key_tokens is None and query_tokens is not None:
        raise ValueError(f"key_tokens: weights have Nq={nq} != Nk={nk}, so the keys need their own labels")
    key_labels = _tokens("key_tokens", key_tokens, nk, "Nk (weights.shape[-1])")
    return LabelledMaps(w, layer_ids if has_layers else None, head_ids if has_heads else None,
                        query_tokens, key_labels)


def _as_tensor(weights) -> Tensor:
    if isinstance(weights, (list, tuple)):
        if not weights or not all(isinstance(w, Tensor) for w in weights):
            raise TypeError("weights: a sequence must hold one (heads, Nq, Nk) tensor per layer")
        if any(w.shape != weights[0].shape or w.dim() != 3 for w in weights):
            raise ValueError("weights: per-layer tensors must all be (heads, Nq, Nk) of one shape, got "
                             f"{[tuple(w.shape) for w in weights]}")
        weights = torch.stack([w.detach() for w in weights])
    if not isinstance(weights, Tensor):
        raise TypeError("weights must be a torch.Tensor or a sequence of per-layer tensors, "
                        f"got {type(weights).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"weights must be floating point, got {weights.dtype}")
    if weights.dim() not in (2, 3, 4):
        raise ValueError(f"weights must be (layers, heads, Nq, Nk), (heads, Nq, Nk) or (Nq, Nk); got shape "
                         f"{tuple(weights.shape)} (pick one batch element first, e.g. weights[:, 0])")
    weights = weights.detach().cpu()
    if not torch.isfinite(weights).all():
        raise ValueError("weights must be finite (no NaN or inf)")
    return weights


def _select(name: str, value, size: int, axis_exists: bool) -> list[int]:
    if value is None:
        return list(range(size))
    if not axis_exists:
        raise ValueError(f"{name}: the weights have no {name} axis to select from")
    picked = [value] if isinstance(value, int) else value
    if (isinstance(value, bool) or not isinstance(picked, Sequence)
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in picked)):
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}")
    if not picked:
        raise ValueError(f"{name} must name at least one index")
    bad = [i for i in picked if not 0 <= i < size]
    if bad:
        raise ValueError(f"{name}: indices {bad} out of range; the weights have {size} {name}")
    return list(picked)


def _tokens(name: str, tokens, n: int, what: str) -> list[str] | None:
    if tokens is None:
        return None
    if isinstance(tokens, str) or not isinstance(tokens, Sequence) or not all(isinstance(t, str) for t in tokens):
        raise TypeError(f"{name} must be a sequence of strings, got {type(tokens).__name__}")
    if len(tokens) != n:
        raise ValueError(f"{name}: got {len(tokens)} tokens, but the weights have {what} = {n}")
    return list(tokens)
