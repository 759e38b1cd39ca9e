"""Kernelised ("linear") attention: ``out_i = sum_j phi(q_i).phi(k_j) v_j / sum_j phi(q_i).phi(k_j)``.

Same layout as :func:`qkv.attention`: ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``,
``v (B, Hkv, Nk, Dv)``, ``Hq`` a multiple of ``Hkv`` (GQA), out ``(B, Hq, Nq, Dv)``. Instead of the
``Nq x Nk`` weights it keeps, per key/value head, ``S = phi(K)^T V`` (``F x Dv``) and
``z = phi(K)^T 1`` (``F``): time and memory ``O(N F Dv)``, linear in the length.

Masks: None, ``qkv.causal()`` (bottom-right aligned, as in qkv.attention), ``qkv.key_padding(...)``,
a bool key mask ``(B, 1, 1, Nk)`` (as a padded batch gives), or ``&`` of these. Causal runs in
chunks of ``chunk_size`` positions: exact products inside a chunk, the prefix sums ``S``, ``z`` of
earlier chunks for the rest; :class:`~qkv.linear.state.LinearAttentionState` carries them from
token to token when decoding.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import masks as _masks
from ..problem import _check_shapes, _check_tensor
from ..validate import positive_int
from .features import PerformerFeatures, elu_plus_one

FEATURE_MAPS = ("elu", "performer")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_mask(mask, batch: int, nk: int, device) -> tuple[bool, Tensor | None]:
    """``mask`` -> ``(causal, keep)`` with ``keep (B|1, Nk)`` bool (True = a real key) or None.

    Raises ``ValueError`` for masks a kernelised attention cannot apply (it never forms the
    individual weights, so only "which keys exist" and "no key from the future" are expressible)."""
    if mask is None:
        return False, None
    if isinstance(mask, Tensor):
        if mask.dtype != torch.bool:
            raise ValueError("mask: linear attention takes no additive float mask (it never forms the scores)")
        mask = _masks.from_tensor(mask)
    if isinstance(mask, _masks.And):
        c1, k1 = split_mask(mask.parts[0], batch, nk, device)
        c2, k2 = split_mask(mask.parts[1], batch, nk, device)
        keep = k1 if k2 is None else k2 if k1 is None else k1 & k2
        return c1 or c2, keep
    if isinstance(mask, _masks.Causal):
        return True, None
    if isinstance(mask, _masks.KeyPadding):
        lengths = mask.bind(batch, 1, 1, nk, device).lengths
        return False, torch.arange(nk, device=device)[None, :] < lengths[:, None]
    if isinstance(mask, _masks.TensorMask):
        t = mask.tensor
        if t.shape[1] == 1 and t.shape[2] == 1 and t.shape[0] in (1, batch) and t.shape[3] == nk:
            return False, t[:, 0, 0].to(device)
        raise ValueError(f"mask: linear attention takes a bool key mask of shape (B, 1, 1, Nk), got {tuple(t.shape)}")
    raise ValueError(f"mask: linear attention supports None, qkv.causal(), qkv.key_padding(...), a (B, 1, 1, Nk) "
                     f"bool key mask, and & of these; got {mask!r}")


def feature_pair(q: Tensor, k: Tensor, feature_map, scale: float | None) -> tuple[Tensor, Tensor]:
    """``phi(q) (B, Hq, Nq, F)``, ``phi(k) (B, Hkv, Nk, F)`` in the compute dtype."""
    dtype = _compute_dtype(q.dtype)
    q, k = q.to(dtype), k.to(dtype)
    if isinstance(feature_map, PerformerFeatures):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return feature_map(q, scale, stabilize=True), feature_map(k, scale)
    if feature_map == "elu":
        return elu_plus_one(q), elu_plus_one(k)
    if callable(feature_map):
        return feature_map(q), feature_map(k)
    raise ValueError(f"feature_map must be 'elu', a PerformerFeatures or a callable, got {feature_map!r}")


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den[..., None]``; rows that see no key (``den == 0``, so ``num == 0``) give zeros."""
    return num / torch.where(den > 0, den, torch.ones_like(den))[..., None]


def default_chunk_size(num_features: int, v_dim: int) -> int:
    """A chunk length balancing the two memory terms of causal attention, ``N * C`` (products
    inside chunks) and ``N / C * F * Dv`` (a state per chunk): ``C ~ sqrt(F * Dv)``, a power of 2."""
    return int(min(256, max(16, 2 ** round(math.log2(math.sqrt(num_features * v_dim))))))


def kernel_attention(phi_q: Tensor, phi_k: Tensor, v: Tensor, *, causal: bool, keep: Tensor | None = None,
                     chunk_size: int | None = None, state: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Normalised kernel attention on features: ``phi_q (B, Hq, Nq, F)``, ``phi_k (B, Hkv, Nk, F)``,
    ``v (B, Hkv, Nk, Dv)`` -> ``(B, Hq, Nq, Dv)`` in ``phi_q``'s dtype.

    ``state``: ``(S (B, Hkv, F, Dv), z (B, Hkv, F))`` of keys before all of these, seen by every query."""
    batch, hq, nq, nf = phi_q.shape
    hkv, nk, dv = phi_k.shape[1], phi_k.shape[2], v.shape[-1]
    group = hq // hkv
    v = v.to(phi_q.dtype)
    if keep is not None:  # selected, not multiplied: a hidden key's NaN/inf must not reach a sum (0 * NaN)
        hidden = ~keep[:, None, :, None]
        phi_k = phi_k.masked_fill(hidden, 0.0)
        v = v.masked_fill(hidden, 0.0)
    pq = phi_q.view(batch, hkv, group, nq, nf)
    s0 = z0 = None
    if state is not None:
        s0, z0 = state
    if not causal:
        s = torch.einsum("bhnf,bhnd->bhfd", phi_k, v)
        z = phi_k.sum(2)
        if s0 is not None:
            s, z = s + s0, z + z0
        out = _ratio(torch.einsum("bhgnf,bhfd->bhgnd", pq, s), torch.einsum("bhgnf,bhf->bhgn", pq, z))
        return out.reshape(batch, hq, nq, dv)
    # Causal, bottom-right aligned: the first Nk - Nq keys are seen by every query (a prefix state);
    # with Nq > Nk the first Nq - Nk queries see nothing.
    out = phi_q.new_zeros(batch, hkv, group, nq, dv)
    lead = max(0, nq - nk)
    n = nq - lead
    if n == 0:
        return out.reshape(batch, hq, nq, dv)
    prefix = nk - n
    if prefix:
        sp = torch.einsum("bhnf,bhnd->bhfd", phi_k[:, :, :prefix], v[:, :, :prefix])
        zp = phi_k[:, :, :prefix].sum(2)
        s0, z0 = (sp, zp) if s0 is None else (s0 + sp, z0 + zp)
    if s0 is None:
        s0 = phi_q.new_zeros(batch, hkv, nf, dv)
        z0 = phi_q.new_zeros(batch, hkv, nf)
    chunk_size = default_chunk_size(nf, dv) if chunk_size is None else positive_int("chunk_size", chunk_size)
    c = min(chunk_size, n)
    chunks = math.ceil(n / c)
    pad = chunks * c - n
    pad_rows = lambda t: torch.nn.functional.pad(t, (0, 0, 0, pad))  # noqa: E731  (zeros: no weight)
    qc = pad_rows(pq[:, :, :, lead:]).view(batch, hkv, group, chunks, c, nf)
    kc = pad_rows(phi_k[:, :, prefix:]).view(batch, hkv, chunks, c, nf)
    vc = pad_rows(v[:, :, prefix:]).view(batch, hkv, chunks, c, dv)
    # State entering each chunk: s0 plus the sums of every earlier chunk (exclusive prefix sum).
    s_chunk = torch.einsum("bhcnf,bhcnd->bhcfd", kc, vc)
    z_chunk = kc.sum(3)
    s_before = torch.cat([s0[:, :, None], s_chunk[:, :, :-1]], dim=2).cumsum(2)
    z_before = torch.cat([z0[:, :, None], z_chunk[:, :, :-1]], dim=2).cumsum(2)
    num = torch.einsum("bhgcnf,bhcfd->bhgcnd", qc, s_before)
    den = torch.einsum("bhgcnf,bhcf->bhgcn", qc, z_before)
    # Inside a chunk: the exact lower-triangular products.
    weights = torch.einsum("bhgcnf,bhcmf->bhgcnm", qc, kc)
    weights = weights * torch.ones(c, c, dtype=torch.bool, device=weights.device).tril()
    num = num + torch.einsum("bhgcnm,bhcmd->bhgcnd", weights, vc)
    den = den + weights.sum(-1)
    out[:, :, :, lead:] = _ratio(num, den).reshape(batch, hkv, group, chunks * c, dv)[:, :, :, :n]
    return out.reshape(batch, hq, nq, dv)


def _check(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    _check_shapes(q, k, v)


def linear_attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, feature_map="elu", scale: float | None = None,
                     chunk_size: int | None = None) -> Tensor:
    """Kernelised attention with ``feature_map`` (``"elu"``: ``elu(x) + 1``; a
    :class:`PerformerFeatures`; or a callable ``(..., D) -> (..., F)`` with positive outputs).

    ``scale`` is used by Performer features only (default ``1/sqrt(D)``, as in qkv.attention).
    ``chunk_size``: positions per chunk of the causal computation (default from the feature count).
    Returns ``(B, Hq, Nq, Dv)`` in ``q``'s dtype (computed in float32, or float64 for float64).
    """
    _check(q, k, v)
    causal, keep = split_mask(mask, q.shape[0], k.shape[2], q.device)
    phi_q, phi_k = feature_pair(q, k, feature_map, scale)
    out = kernel_attention(phi_q, phi_k, v, causal=causal, keep=keep, chunk_size=chunk_size)
    return out.to(q.dtype)


def performer_attention(q: Tensor, k: Tensor, v: Tensor, mask=None, *, features: PerformerFeatures | None = None,
                        num_features: int = 256, seed: int = 0, scale: float | None = None,
                        chunk_size: int | None = None) -> Tensor:
    """FAVOR+ estimate of ``softmax(q k^T * scale) v`` with ``features`` (or fresh ones:
    ``num_features`` orthogonal random features drawn from ``seed``). Masks as :func:`linear_attention`."""
    if features is None:
        features = PerformerFeatures(q.shape[-1], num_features, seed=seed, device=q.device)
    return linear_attention(q, k, v, mask, feature_map=features, scale=scale, chunk_size=chunk_size)
