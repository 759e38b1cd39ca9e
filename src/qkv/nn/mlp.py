"""The feed-forward half of a transformer block: ``(B, N, dim) -> (B, N, dim)``.

Two shapes: the classic two-layer MLP ``fc2(act(fc1(x)))`` (BERT, GPT-2) and the gated SwiGLU
``down(silu(gate(x)) * up(x))`` (Shazeer, 2020, "GLU Variants Improve Transformer"; LLaMA).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..validate import positive_int
from . import fused as fusion

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "swiglu")

_POINTWISE = {
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class MLP(nn.Module):
    """``fc2(dropout(act(fc1(x))))`` with ``act`` one of ``"gelu"``, ``"gelu_tanh"``, ``"relu"``."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu", *, bias: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        if activation not in _POINTWISE:
            raise ValueError(f"activation must be one of {ACTIVATIONS} (an MLP takes all but 'swiglu', which is "
                             f"the SwiGLU module), got {activation!r}")
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden_dim, bias=bias)
        self.fc2 = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = optional_dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        h = _POINTWISE[self.activation](self.fc1(x))
        return self.fc2(h if self.dropout is None else self.dropout(h))


class SwiGLU(nn.Module):
    """``down(dropout(silu(gate(x)) * up(x)))``.

    Inside :func:`qkv.nn.fused.fused_projections`, ``gate`` and ``up`` run as one product while
    grad mode is off (the same numbers)."""

    #: :class:`qkv.nn.fused.Stacks` (stacked ``gate, up``; a copy of ``down``) while inside
    #: :func:`qkv.nn.fused.fused_projections`.
    _fused = None

    def __init__(self, dim: int, hidden_dim: int, *, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.gate = nn.Linear(dim, hidden_dim, bias=bias)
        self.up = nn.Linear(dim, hidden_dim, bias=bias)
        self.down = nn.Linear(hidden_dim, dim, bias=bias)
        self.dropout = optional_dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        stacks = self._fused
        if stacks is None:
            gate, up = self.gate(x), self.up(x)
        elif fusion.serves(stacks.proj, x):
            gate, up = F.linear(x, stacks.proj.weight, stacks.proj.bias).chunk(2, dim=-1)  # equally wide
        else:
            gate, up = self.gate(x), self.up(x)
        h = F.silu(gate) * up
        if self.dropout is not None:
            h = self.dropout(h)
        down = None if stacks is None else stacks.out
        return F.linear(h, down.weight, down.bias) if fusion.serves(down, h) else self.down(h)


def optional_dropout(p: float) -> nn.Dropout | None:
    """``nn.Dropout(p)``, or None for ``p == 0``: modules then skip the call, which would be an
    identity costing a module call per use (13 per decoded token in a 4-layer model)."""
    return nn.Dropout(p) if p > 0 else None


def make_mlp(dim: int, hidden_dim: int, activation: str, *, bias: bool = True, dropout: float = 0.0) -> nn.Module:
    """:class:`SwiGLU` for ``activation="swiglu"``, else an :class:`MLP` with that activation."""
    positive_int("mlp_dim", hidden_dim)
    if activation == "swiglu":
        return SwiGLU(dim, hidden_dim, bias=bias, dropout=dropout)
    return MLP(dim, hidden_dim, activation, bias=bias, dropout=dropout)  # MLP checks the activation
