"""``torch.nn.functional.scaled_dot_product_attention`` for the problems it maps onto.

Torch's fused kernels are the fastest dense attention there is on most devices, but they know only
``is_causal`` (aligned top-left) and a materialised ``attn_mask``: any other mask is built here as a
dense ``(B|1, H|1, Nq, Nk)`` tensor, which costs ``Nq * Nk`` memory and no tile is ever skipped.

Torch's kernels do not all keep qkv's promises (docs/attention.md, "Guarantees"), so the run
enforces them around the call, in ``O(N * D)`` extra memory: keys and values that the mask hides
from every query are zeroed first (NaN there would otherwise poison every row), rows with
nothing to attend to are zeroed after (cuDNN returns non-zero rows in float16/bfloat16), and a
row whose query or float-mask entries are NaN/inf is NaN (some CPU kernels return a silent zero).
"""

from __future__ import annotations

import contextlib
import inspect
import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..masks import Causal
from ..problem import Problem
from . import costs
from .capabilities import Capabilities, reasons

#: Largest mask this backend will materialise for SDPA, in bytes.
MAX_DENSE_MASK_BYTES = 2 << 30


def uses_is_causal(problem: Problem) -> bool:
    """A plain causal mask whose query row ``i`` sits at key column ``i`` (SDPA's top-left
    ``is_causal``; a square problem at the default positions) maps onto ``is_causal``."""
    return isinstance(problem.mask, Causal) and problem.positions.diagonal == 0 and problem.bias is None


def needs_no_mask(problem: Problem) -> bool:
    """A causal mask over a single query at or after every key (a decoding step) hides nothing."""
    diagonal = problem.positions.diagonal
    return (isinstance(problem.mask, Causal) and problem.nq == 1 and diagonal is not None
            and diagonal >= problem.nk - 1)


def dense_mask_bytes(problem: Problem) -> int:
    """Bytes of the mask SDPA would need (0 if none)."""
    if problem.bias is None and (problem.mask is None or uses_is_causal(problem) or needs_no_mask(problem)):
        return 0
    per_element = 1 if problem.bias is None else torch.finfo(problem.dtype).bits // 8
    return problem.batch * problem.q_heads * problem.nq * problem.nk * per_element


class SdpaBackend:
    name = "sdpa"
    capabilities = Capabilities(
        devices=("cpu", "cuda", "xpu", "mps", "hpu"), score_mod=False, lse=False, dropout=False,
        why={"score_mod": "SDPA has no score modifier hook",
             "lse": "SDPA's public API does not return the log-sum-exp",
             "dropout": "SDPA draws its own dropout mask, which `generator` cannot reproduce and which "
                        "differs from the other backends'",
             "device": "nothing to run"})

    def unsupported(self, problem: Problem) -> list[str]:
        out = reasons(self.capabilities, problem)
        mask_bytes = dense_mask_bytes(problem)
        if mask_bytes > MAX_DENSE_MASK_BYTES:
            out.append(f"mask: SDPA needs it materialised, {mask_bytes / 2**30:.1f} GiB for "
                       f"(B, H, Nq, Nk); the limit is {MAX_DENSE_MASK_BYTES / 2**30:.0f} GiB")
        return out

    def estimate(self, problem: Problem) -> float:
        """Fused kernel time per score (``D + Dv`` dependent), cheaper with ``is_causal``, dearer
        with a materialised mask (plus building it)."""
        p = problem
        r = costs.rates(p)
        t = p.nq * p.nk * p.batch * p.q_heads * (r.sdpa_score + r.sdpa_score_per_dim * (p.head_dim + p.v_dim))
        if uses_is_causal(p):
            t *= r.sdpa_causal_fraction
        call = 0.0
        if dense_mask_bytes(p):
            t = t * r.sdpa_mask_slowdown + p.batch * p.nq * p.nk * r.mask_element
            call = r.sdpa_mask_call
        return costs.with_backward(p, t / costs.parallel(p) + call, r.sdpa_backward)

    def run(self, problem: Problem) -> tuple[Tensor, None]:
        p = problem
        attn_mask = None
        if p.mask is not None and not uses_is_causal(p) and not needs_no_mask(p):
            attn_mask = p.mask.dense(p.batch, p.q_heads, p.nq, p.nk, p.device, p.positions)
        if p.bias is not None:
            bias = p.bias.to(p.dtype)
            attn_mask = bias if attn_mask is None else torch.where(attn_mask, bias, float("-inf"))
        return guarded_sdpa(p.q, p.k, p.v, attn_mask, is_causal=uses_is_causal(p), scale=p.scale), None


def guarded_sdpa(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, *, is_causal: bool, scale: float,
                 nan_guard: bool = True) -> Tensor:
    """``F.scaled_dot_product_attention`` with qkv's guarantees (docs/attention.md, Guarantees):
    keys the mask hides from every query are zeroed first (garbage there never reaches the
    output), rows that see nothing are zero whatever the kernel returns, and a row whose query (or
    a visible float-mask entry) is NaN/inf is NaN. ``nan_guard=False`` skips the query check, for
    callers that know the kernel propagates NaN itself. Shapes as for SDPA: ``q (B, Hq, Nq, D)``,
    ``k, v (B, Hkv, Nk, D|Dv)``, ``attn_mask`` broadcastable to ``(B, Hq, Nq, Nk)`` or None."""
    rows_seen = poisoned = None
    if attn_mask is not None:
        rows_seen, keys_seen, poisoned = mask_visibility(attn_mask, k.shape[1])
        k, v = torch.where(keys_seen, k, 0), torch.where(keys_seen, v, 0)
    gqa = k.shape[1] != q.shape[1]
    if q.is_cuda:
        with kernel_priority(q, v, attn_mask, is_causal):
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                                 enable_gqa=gqa)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                             enable_gqa=gqa)
    bad = non_finite_rows(q) if nan_guard else None
    if poisoned is not None:
        bad = poisoned if bad is None else bad | poisoned
    if bad is not None and (out.device.type != "cpu" or torch.compiler.is_compiling() or bool(bad.any())):
        out = out.masked_fill(bad, float("nan"))  # (on the CPU only when some row needs it: a copy of out)
    if rows_seen is not None:
        out = torch.where(rows_seen, out, 0)
    return out


def non_finite_rows(x: Tensor) -> Tensor:
    """``(..., 1)`` bool: whether the row (last dim) of ``x`` holds a NaN or an infinity. Computed
    as ``(x * 0).sum(-1)`` is NaN (``x * 0`` is 0 for a finite value, NaN otherwise, and a sum of
    zeros cannot overflow): three kernels, where ``~isfinite(x).all(-1)`` takes six."""
    return (x * 0).sum(dim=-1, keepdim=True).isnan()


#: torch >= 2.6 lets sdpa_kernel set an order of preference rather than only a set of kernels.
_HAS_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters

#: Torch's own kernel order (a reusable no-op context: no allocation on a decode step's hot path).
_TORCH_ORDER = contextlib.nullcontext()


def prefers_cudnn(q: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool) -> bool:
    """Where torch's default kernel order is not the fastest: on Hopper (H100/H200, sm90), cuDNN's
    fused attention beats the default pick for causal attention in bfloat16/float16 (H200, B=2
    H=16 N=8192 D=128: 597 vs 444 TFLOP/s forward, 512 vs 496 with backward; shared/gpu)."""
    d = q.shape[-1]
    return (q.device.type == "cuda" and attn_mask is None and is_causal
            and q.dtype in (torch.float16, torch.bfloat16) and d == v.shape[-1] and d % 8 == 0
            and d <= 128 and torch.cuda.get_device_capability(q.device) == (9, 0))


def kernel_priority(q: Tensor, v: Tensor, attn_mask: Tensor | None, is_causal: bool):
    """A context that puts cuDNN first where :func:`prefers_cudnn` (the others stay as fallbacks,
    so a shape cuDNN rejects still runs); elsewhere torch's own choice."""
    if not _HAS_PRIORITY or not prefers_cudnn(q, v, attn_mask, is_causal):
        return _TORCH_ORDER
    order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(order, set_priority=True)


def mask_visibility(attn_mask: Tensor, kv_heads: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """What a materialised SDPA mask ``(B|1, H|1, Nq, Nk)`` (bool, True = visible; or float,
    ``-inf`` = hidden) lets through: ``rows_seen (B|1, H|1, Nq, 1)`` (the row sees some key),
    ``keys_seen (B|1, Hkv|1, Nk, 1)`` (some query of the key's head group sees the key) and, for a
    float mask, ``poisoned (B|1, H|1, Nq, 1)`` (a visible entry is NaN or ``+inf``; else None).
    Read in bands of rows: the temporaries are ``O(Nk)`` per row, never a second ``Nq x Nk`` copy."""
    if attn_mask.dtype == torch.bool:
        rows_seen, keys_seen = attn_mask.any(dim=-1, keepdim=True), attn_mask.any(dim=-2)
        poisoned = None
    else:
        rows_seen, keys_seen, poisoned = _float_mask_visibility(attn_mask)
    if keys_seen.shape[1] > 1:
        keys_seen = keys_seen.reshape(keys_seen.shape[0], kv_heads, -1, keys_seen.shape[-1]).any(dim=2)
    return rows_seen, keys_seen.unsqueeze(-1), poisoned


#: Mask elements read at once by :func:`_float_mask_visibility`.
_BAND_ELEMENTS = 1 << 24


def _float_mask_visibility(attn_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    *lead, nq, nk = attn_mask.shape
    per_row = max(1, nk * math.prod(lead))
    band = max(1, _BAND_ELEMENTS // per_row)
    rows, poisoned, keys = [], [], None
    for r0 in range(0, nq, band):
        part = attn_mask[..., r0:r0 + band, :]
        seen = part != float("-inf")  # NaN counts as seen
        rows.append(seen.any(dim=-1, keepdim=True))
        poisoned.append((seen & ~torch.isfinite(part)).any(dim=-1, keepdim=True))
        part_keys = seen.any(dim=-2)
        keys = part_keys if keys is None else keys | part_keys
    return torch.cat(rows, dim=-2), keys, torch.cat(poisoned, dim=-2)
