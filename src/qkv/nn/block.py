"""One transformer layer: self-attention, optional cross-attention, feed-forward, each residual.

Pre-norm (``norm_first=True``, GPT-2 onwards): ``x = x + sublayer(norm(x))``.
Post-norm (``norm_first=False``, the original Transformer and BERT): ``x = norm(x + sublayer(x))``.
"""

from __future__ import annotations

from torch import Tensor, nn

from . import fused as fusion
from .attention import MultiHeadAttention
from .mlp import make_mlp, optional_dropout
from .norms import make_norm


class TransformerBlock(nn.Module):
    """A transformer layer over ``(B, N, dim)``.

    Args:
        dim: model width.
        num_heads: attention heads (queries).
        mlp_dim: hidden width of the feed-forward network.
        num_kv_heads: key/value heads (GQA/MQA), default ``num_heads``.
        norm_first: pre-norm (True) or post-norm (False).
        norm: ``"layernorm"`` or ``"rmsnorm"``.
        norm_eps: eps of every norm.
        activation: ``"gelu"``, ``"gelu_tanh"``, ``"relu"`` or ``"swiglu"``.
        bias: biases on every linear layer and LayerNorm.
        dropout: attention-weight, feed-forward and residual dropout while training.
        cross_attention: add a cross-attention sublayer (``cross_attn``, ``cross_norm``) that
            attends to ``memory``, between self-attention and the feed-forward network.
        memory_dim: width of ``memory`` (default ``dim``).
        head_dim, qk_norm, fused_qkv, sink: passed to the self-attention
            :class:`~qkv.nn.MultiHeadAttention` (``head_dim`` to the cross-attention too).

    Submodules: ``attn``, ``attn_norm``, (``cross_attn``, ``cross_norm``), ``mlp`` (``mlp.fc1``,
    ``mlp.fc2``; for SwiGLU ``mlp.gate``, ``mlp.up``, ``mlp.down``), ``mlp_norm``.
    """

    #: :class:`qkv.nn.fused.Stacks` (the norms as direct calls) while inside
    #: :func:`qkv.nn.fused.fused_projections`.
    _fused = None

    def __init__(self, dim: int, num_heads: int, mlp_dim: int, *, num_kv_heads: int | None = None,
                 norm_first: bool = True, norm: str = "layernorm", norm_eps: float = 1e-5, activation: str = "gelu",
                 bias: bool = True, dropout: float = 0.0, cross_attention: bool = False, memory_dim: int | None = None,
                 head_dim: int | None = None, qk_norm: bool = False, fused_qkv: bool = False, sink: bool = False):
        super().__init__()
        self.norm_first = bool(norm_first)
        self.attn = MultiHeadAttention(dim, num_heads, num_kv_heads=num_kv_heads, bias=bias, dropout=dropout,
                                       head_dim=head_dim, qk_norm=qk_norm, fused_qkv=fused_qkv, sink=sink)
        self.attn_norm = make_norm(norm, dim, eps=norm_eps, bias=bias)
        if cross_attention:
            self.cross_attn = MultiHeadAttention(dim, num_heads, num_kv_heads=num_kv_heads, kdim=memory_dim,
                                                 vdim=memory_dim, bias=bias, dropout=dropout, head_dim=head_dim)
            self.cross_norm = make_norm(norm, dim, eps=norm_eps, bias=bias)
        else:
            self.cross_attn = None
        self.mlp = make_mlp(dim, mlp_dim, activation, bias=bias, dropout=dropout)
        self.mlp_norm = make_norm(norm, dim, eps=norm_eps, bias=bias)
        self.dropout = optional_dropout(dropout)

    def forward(self, x: Tensor, *, mask=None, score_mod=None, rope=None, positions=None, cache=None,
                memory: Tensor | None = None, memory_mask=None, backend: str | None = None) -> Tensor:
        """``x (B, N, dim) -> (B, N, dim)``.

        ``mask``, ``score_mod``, ``rope``, ``positions`` and ``cache`` go to the self-attention
        (see :meth:`qkv.nn.MultiHeadAttention.forward`); ``memory (B, M, memory_dim)`` and
        ``memory_mask`` (broadcastable to ``(B, Hq, N, M)``) to the cross-attention; ``backend``
        to both.
        """
        if self.norm_first and self.dropout is None and self.cross_attn is None and memory is None \
                and memory_mask is None:  # the common pre-norm decoder layer, in straight lines
            norms = fusion.norms_serve(self._fused)  # direct calls inside qkv.nn.fused.fused_projections
            attn_norm, mlp_norm = (self.attn_norm, self.mlp_norm) if norms is None else norms
            x = x + self.attn(attn_norm(x), mask=mask, score_mod=score_mod, rope=rope, positions=positions,
                              cache=cache, backend=backend)
            return x + self.mlp(mlp_norm(x))
        x = self._residual(x, self.attn_norm, lambda h: self.attn(
            h, mask=mask, score_mod=score_mod, rope=rope, positions=positions, cache=cache, backend=backend))
        if self.cross_attn is not None:
            if memory is None:
                raise ValueError("memory: this block has cross-attention and needs memory (B, M, memory_dim)")
            x = self._residual(x, self.cross_norm, lambda h: self.cross_attn(h, memory, mask=memory_mask,
                                                                              backend=backend))
        elif memory is not None or memory_mask is not None:
            raise ValueError("memory: this block has no cross-attention (build it with cross_attention=True)")
        return self._residual(x, self.mlp_norm, self.mlp)

    def _residual(self, x: Tensor, norm: nn.Module, sublayer) -> Tensor:
        if self.norm_first:
            h = sublayer(norm(x))
            return x + (h if self.dropout is None else self.dropout(h))
        h = sublayer(x)
        return norm(x + (h if self.dropout is None else self.dropout(h)))
