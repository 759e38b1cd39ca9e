"""A decode step over a paged KV cache, read in place.

:class:`~qkv.nn.MultiHeadAttention` calls :func:`attend_in_place` when its cache layer belongs to a
:class:`~qkv.cache.PagedBatch` and the call can take that path (:func:`eligible`: CUDA, or the CPU
under ``TRITON_INTERPRET=1``; no gradients, no dropout, exact attention, no weights asked for, no
backend forced other than ``"triton"``). The step's :class:`~qkv.cache.paged.PagedView` (block
table, lengths with this step's tokens, the window/sinks mask) is prepared once for the triton
backend's paged kernel (:class:`qkv.backends.triton.decode.PagedDecode`) by the first layer and
reused by the others; each layer then writes its new keys and values into their pages and the
kernel reads the pages through the block table: no gather into a contiguous copy. Where the
kernel does not serve the step (Triton missing, a custom score modifier, a padded prompt, too many
stacked query rows...), the reason is kept on the view and every layer gathers as before
(``PagedBatch.last_read`` says which path the last step took, and why).

On a CPU without the interpreter :func:`eligible` is false at the first test, so that path costs
nothing.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

#: The kernels run on the CPU only under Triton's interpreter (set before Python starts).
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def eligible(cache, q: Tensor, k: Tensor, v: Tensor, *, backend, exact: bool, need_weights: bool,
             dropout_p: float) -> bool:
    """Whether this call may read the cache's pages in place (cheapest tests first)."""
    return ((q.is_cuda or INTERPRETING) and cache.reads_pages and exact and not need_weights and dropout_p == 0
            and backend in (None, "triton")
            and not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)))


def attend_in_place(cache, q: Tensor, k: Tensor, v: Tensor, score_mod, return_lse: bool):
    """Store ``k, v`` and attend ``q`` over the layer's pages in place: ``out`` (or ``(out, lse)``),
    or None, having stored nothing, where the kernel does not serve this step (the caller then
    takes its usual path, ``cache.update``)."""
    view = cache.paged_view()
    if view is None:
        return None
    key = (tuple(q.shape), q.dtype, v.shape[-1], id(score_mod))
    entry = view.scratch.get(key)
    if entry is None:
        entry = view.scratch[key] = (_prepare(view, q, v, score_mod), score_mod)  # keeps score_mod (and its id)
    plan = entry[0]
    if isinstance(plan, str):
        view.why = plan
        return None
    k_pages, v_pages = cache.store_pages(k, v)
    out, lse = plan(q, k_pages, v_pages)
    return (out, lse) if return_lse else out


def _prepare(view, q: Tensor, v: Tensor, score_mod):
    """The kernel's launch for this step, or the reason it cannot serve it."""
    from ..backends.triton import PagedUnsupported, paged_decode

    try:
        return paged_decode(q, view.block_table, view.lengths, view.mask, page_size=view.page_size,
                            kv_heads=view.num_kv_heads, v_dim=v.shape[-1], score_mod=score_mod,
                            max_length=view.max_length)
    except PagedUnsupported as why:
        return str(why)
