"""Sampling the next token, and the decoding loop: prefill once, then one token at a time from a KV cache."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..cache import KVCache
from ..cache.base import token_counts


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """``logits (B, V)`` with every token outside the top-``k`` and outside the nucleus set to ``-inf``.

    The nucleus (Holtzman et al., 2020) is the smallest set of most probable tokens whose
    probabilities sum to at least ``top_p``; the most probable token is always kept.
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next_token(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits (B, V)``: the argmax for ``temperature == 0``, else a draw
    from ``softmax(logits / temperature)`` restricted by ``top_k`` / ``top_p``. Returns ``(B,)`` int64."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = filter_logits(logits.float() / temperature, top_k=top_k, top_p=top_p)
    return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator).squeeze(-1)


def check_sampling(temperature, top_k, top_p) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def _eos_tensor(eos, vocab_size: int, device) -> Tensor | None:
    if eos is None:
        return None
    ids = [eos] if isinstance(eos, int) else list(eos)
    if not ids or any(not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < vocab_size for i in ids):
        raise ValueError(f"eos must be None, a token id or a list of token ids in [0, {vocab_size}), got {eos!r}")
    return torch.tensor(ids, dtype=torch.int64, device=device)


@torch.no_grad()
def generate(model, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos=None, *, lengths=None, cache=None,
             generator: torch.Generator | None = None, memory: Tensor | None = None, memory_mask=None,
             backend: str | None = None) -> Tensor:
    """Continue each prompt of ``input_ids`` by up to ``max_new_tokens`` tokens; see :meth:`qkv.nn.Decoder.generate`."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p)
    model.check_input_ids(input_ids)
    batch, n = input_ids.shape
    device = input_ids.device
    eos_ids = _eos_tensor(eos, model.config.vocab_size, device)
    if lengths is None:
        prompt_lengths = torch.full((batch,), n, dtype=torch.int64)
    else:  # every prompt needs a token whose logits start the generation
        prompt_lengths = token_counts(lengths, name="lengths", batch_size=batch, num_tokens=n, minimum=1)
    new_tokens = torch.empty(batch, 0, dtype=torch.int64, device=device)
    if max_new_tokens == 0:
        return new_tokens
    if cache is None:
        # the last token is returned, not fed back: the longest row holds its prompt and max_new_tokens - 1 more
        cache = KVCache(batch_size=batch, capacity=int(prompt_lengths.max()) + max_new_tokens - 1,
                        **model.cache_spec())
    extra = {"memory": memory, "memory_mask": memory_mask, "backend": backend}
    logits = model(input_ids, cache, lengths=prompt_lengths, **extra)
    last = logits[torch.arange(batch, device=device), prompt_lengths.to(device) - 1]
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    produced = []
    for step in range(max_new_tokens):
        token = sample_next_token(last, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
        if eos_ids is not None:
            token = torch.where(finished, eos_ids[0], token)
            finished = finished | torch.isin(token, eos_ids)
        produced.append(token)
        if step == max_new_tokens - 1 or (eos_ids is not None and bool(finished.all())):
            break
        last = model(token[:, None], cache, check_ids=False, **extra)[:, -1]  # sampled ids are valid
    return torch.stack(produced, dim=1)
