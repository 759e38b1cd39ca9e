"""Recurrent decoding with kernelised attention: an ``O(1)``-per-token state.

Causal linear attention is an RNN (Katharopoulos et al. 2020): after keys ``k_1..k_t`` it needs
only ``S_t = sum phi(k_j) v_j^T`` (``F x Dv``) and ``z_t = sum phi(k_j)`` (``F``) per key/value head,
so a new token costs the same however long the past — no KV cache that grows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import _check, _compute_dtype, _ratio, feature_pair, kernel_attention


class LinearAttentionState:
    """Running sums of causal kernelised attention for a batch of sequences.

    ``state.update(q, k, v)`` attends the ``n`` new queries causally over every key so far plus
    the ``n`` new ones and returns ``(B, Hq, n, Dv)``; one token at a time it is the recurrence
    ``S += phi(k) v^T; z += phi(k); out = phi(q) S / phi(q) z``, several at once (a prompt) run the
    chunked form. Equal to :func:`qkv.linear.linear_attention` with ``qkv.causal()`` over the whole
    sequence (same ``feature_map``, ``scale``).
    """

    def __init__(self, feature_map="elu", *, scale: float | None = None):
        self.feature_map, self.scale = feature_map, scale
        self.s: Tensor | None = None  # (B, Hkv, F, Dv)
        self.z: Tensor | None = None  # (B, Hkv, F)
        self.length = 0

    def update(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        _check(q, k, v)
        if q.shape[2] != k.shape[2]:
            raise ValueError(f"update: q and k must hold the same new tokens, got {q.shape[2]} and {k.shape[2]}")
        phi_q, phi_k = feature_pair(q, k, self.feature_map, self.scale)
        v = v.to(_compute_dtype(q.dtype))
        if self.s is None:
            batch, hkv, nf, dv = k.shape[0], k.shape[1], phi_k.shape[-1], v.shape[-1]
            self.s = phi_k.new_zeros(batch, hkv, nf, dv)
            self.z = phi_k.new_zeros(batch, hkv, nf)
        elif self.s.shape[:2] != k.shape[:2] or self.s.shape[-1] != v.shape[-1]:
            raise ValueError(f"update: state holds (B, Hkv) = {tuple(self.s.shape[:2])}, Dv = {self.s.shape[-1]}; "
                             f"got k {tuple(k.shape)}, v {tuple(v.shape)}")
        if q.shape[2] == 1:  # the recurrence
            self.s = self.s + phi_k[:, :, 0, :, None] * v[:, :, 0, None, :]
            self.z = self.z + phi_k[:, :, 0]
            batch, hq, hkv = q.shape[0], q.shape[1], k.shape[1]
            pq = phi_q.view(batch, hkv, hq // hkv, phi_q.shape[-1])
            out = _ratio(torch.einsum("bhgf,bhfd->bhgd", pq, self.s), torch.einsum("bhgf,bhf->bhg", pq, self.z))
            out = out.reshape(batch, hq, 1, -1)
        else:
            out = kernel_attention(phi_q, phi_k, v, causal=True, state=(self.s, self.z))
            self.s = self.s + torch.einsum("bhnf,bhnd->bhfd", phi_k, v)
            self.z = self.z + phi_k.sum(2)
        self.length += q.shape[2]
        return out.to(q.dtype)
