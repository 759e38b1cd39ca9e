"""Normalisation layers chosen by name, so that blocks and stacks take ``norm="rmsnorm"``."""

from __future__ import annotations

from torch import nn

NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, *, eps: float = 1e-5, bias: bool = True) -> nn.Module:
    """``"layernorm"`` (:class:`torch.nn.LayerNorm`, with a bias unless ``bias=False``) or
    ``"rmsnorm"`` (:class:`torch.nn.RMSNorm`, never a bias) over the last dimension ``dim``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")
