"""Sampling the next token, and the decoding loop: prefill once, then one token at a time from a KV cache."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..cache import CacheFullError, KVCache
from .compiled import DecodeStep, check_compilable
from .fused import fused_projections
from .positional import LearnedPositionalEmbedding
from ..cache.base import token_counts


def filter_logits(logits: Tensor, *, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """``logits (B, V)`` with every token outside the top-``k`` and outside the nucleus set to ``-inf``.

    The nucleus (Holtzman et al., 2020) is the smallest set of most probable tokens whose
    probabilities sum to at least ``top_p``; the most probable token is always kept. The
    probabilities and their running sum are float32 at least (a half-precision running sum over a
    large vocabulary drifts by hundreds of tokens).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        mass_before = torch.cumsum(probs, dim=-1) - probs
        sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_next_token(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """One token id per row of ``logits (B, V)``: the argmax for ``temperature == 0``, else a draw
    from ``softmax(logits / temperature)`` restricted by ``top_k`` / ``top_p``. Returns ``(B,)`` int64.
    The logits are shifted by their row maximum before the division (the same distribution), so a
    tiny temperature tends to greedy instead of overflowing to ``inf`` (NaN probabilities)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float()
    scaled = filter_logits((logits - logits.amax(dim=-1, keepdim=True)) / temperature, top_k=top_k, top_p=top_p)
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
             backend: str | None = None, compile: bool | dict = False) -> Tensor:
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
    if compile is not False:
        check_compilable(model, memory, backend)
        if cache is not None and type(cache) is not KVCache:
            raise ValueError(f"compile: the compiled decode step runs on a KVCache (fixed shapes), got "
                             f"{type(cache).__name__}")
    if max_new_tokens == 0:
        return new_tokens
    if cache is None:
        # the last token is returned, not fed back: the longest row holds its prompt and max_new_tokens - 1 more
        capacity = int(prompt_lengths.max()) + max_new_tokens - 1
        cache = KVCache(batch_size=batch, capacity=capacity, **model.cache_spec()) if compile is False \
            else _CompiledSteps.reusable_cache(model, batch, capacity)
    compiled = None if compile is False else _CompiledSteps(model, cache, compile)
    # one product for q, k, v and one for gate, up per layer (a compiled step's own stacks, refreshed)
    with fused_projections(model, None if compiled is None else compiled.step.fused):
        extra = {"memory": memory, "memory_mask": memory_mask, "backend": backend}
        logits = model(input_ids, cache, lengths=prompt_lengths, **extra)
        last = logits[torch.arange(batch, device=device), prompt_lengths.to(device) - 1]
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        produced = []
        decode = _eager_step(model, cache, extra) if compiled is None else compiled.begin()
        for step in range(max_new_tokens):
            token = sample_next_token(last, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            if eos_ids is not None:
                token = torch.where(finished, eos_ids[0], token)
                finished = finished | torch.isin(token, eos_ids)
            produced.append(token)
            if step == max_new_tokens - 1 or (eos_ids is not None and bool(finished.all())):
                break
            last = decode(token[:, None])[:, -1]
        if compiled is not None:
            compiled.finish()
    return torch.stack(produced, dim=1)


def _eager_step(model, cache, extra):
    def step(tokens: Tensor) -> Tensor:
        return model(tokens, cache, check_ids=False, **extra)  # sampled ids are valid by construction
    return step


#: Inductor settings for a compiled CPU decode step: the graph's wrapper in C++ rather than
#: Python (one call instead of one per kernel), without the wrapper's re-checks of sizes and
#: alignment of its inputs (dynamo's guards have checked them). Measured on 2 AMD EPYC cores: the
#: step 7-10% faster at batch 1, 1-5% at batch 8; compiling takes a few seconds longer.
CPU_INDUCTOR_OPTIONS = {"cpp_wrapper": True, "size_asserts": False, "alignment_asserts": False}


def cpu_inductor_options() -> dict:
    """:data:`CPU_INDUCTOR_OPTIONS` that this torch's inductor knows (older ones lack some)."""
    from torch._inductor import config

    return {key: value for key, value in CPU_INDUCTOR_OPTIONS.items() if hasattr(config, key)}


#: Cache sizes of compiled decoding: powers of two up to this, then multiples of it.
CACHE_GRANULE = 1024


def cache_bucket(capacity: int, limit: int | None = None) -> int:
    """The size of the cache a compiled decode step gets for ``capacity`` tokens: at least one slot
    more (on the CPU a step over the whole buffer would compile a second graph), rounded up to a
    power of two (at least 64) below :data:`CACHE_GRANULE` and to a multiple of it above, so that
    a few sizes (a few compiled graphs) serve every length. A CPU step reads only the filled
    slots, so the headroom costs memory only; a CUDA step reads every slot (one shape per CUDA
    graph), at most twice what the generation needs, or ``CACHE_GRANULE`` more. ``limit``: the
    most positions the model has (a learned position table), which the size never exceeds; where
    even the one slot of headroom does not fit, the cache holds exactly ``capacity``."""
    needed = capacity + 1
    granule = min(max(64, 1 << (needed - 1).bit_length()), CACHE_GRANULE)
    size = -(-needed // granule) * granule
    if limit is not None:
        size = max(min(size, limit), min(needed, limit), capacity)
    return size


def _position_limit(model) -> int | None:
    emb = model.position_embedding
    return emb.max_positions if isinstance(emb, LearnedPositionalEmbedding) else None


class _CompiledSteps:
    """Decoding steps through a compiled :class:`~qkv.nn.compiled.DecodeStep` (compiled once per
    model, cache shape and options; kept on the model, and refreshed from the model's weights for
    every generation)."""

    def __init__(self, model, cache, options):
        options = {} if options is True else dict(options)
        if "mode" not in options and "backend" not in options and "options" not in options:
            if cache.device.type == "cuda":
                options["mode"] = "reduce-overhead"  # CUDA graphs: one launch per step
            else:
                options["options"] = cpu_inductor_options()
        self.cache, self.steps = cache, 0
        key = (id(cache), tuple(cache.k.shape), cache.k.dtype, str(cache.device), repr(sorted(options.items())))
        compiled = model.__dict__.setdefault("_compiled_decode_steps", {})
        if key not in compiled:
            step = DecodeStep(model, cache)
            compiled.clear()  # one at a time: each holds its cache's buffers
            compiled[key] = (step, step.compiled(**options))
        self.step, self.run = compiled[key]
        self.step.refresh()  # the stacked projections, from the weights as they are now

    def begin(self) -> _CompiledSteps:
        """Start decoding from what the cache holds now (after the prefill)."""
        lengths = self.cache.lengths
        longest = int(lengths.max())
        if longest + 1 > self.cache.capacity:
            raise CacheFullError(f"KVCache: capacity {self.cache.capacity} exceeded: the rows hold "
                                 f"{lengths.tolist()} tokens")
        self.uniform = bool((lengths == longest).all())
        if self.cache.device.type != "cpu" or not self.uniform:
            self.step.clear_free_slots()  # slots that masked steps read (a uniform CPU step reads none)
        self.limit = self.cache.capacity - longest  # steps that fit
        self.length = longest + 1  # slots the next step reads (the longest row's, with its new token)
        self.positions = lengths.to(self.cache.device)  # where each row's next token goes
        return self

    @staticmethod
    def reusable_cache(model, batch: int, capacity: int) -> KVCache:
        """An empty cache for ``capacity`` tokens, the same object as last time when its size
        repeats, so that the step compiled for it serves again (kept on the model). Its size is
        :func:`cache_bucket`'s: one size serves many prompt and generation lengths, so a new length
        does not compile a new step. On the CPU, where a step reads only the filled slots, a
        larger cache than that serves as well, and is kept."""
        size = cache_bucket(capacity, _position_limit(model))
        cache = model.__dict__.get("_compiled_decode_cache")
        fits = cache is not None and (cache.capacity == size or (cache.device.type == "cpu" and cache.capacity > size))
        if not fits or cache.batch_size != batch or cache.layout() != model.cache_layout():
            cache = model.__dict__["_compiled_decode_cache"] = KVCache(batch_size=batch, capacity=size,
                                                                       **model.cache_spec())
        cache.reset()
        return cache

    def __call__(self, tokens: Tensor) -> Tensor:
        if self.steps >= self.limit:
            raise CacheFullError(f"KVCache: capacity {self.cache.capacity} exceeded after {self.steps} steps")
        logits = self.run(tokens, self.positions, self.length, self.uniform)
        self.positions = self.positions + 1
        self.length += 1
        self.steps += 1
        return logits

    def finish(self) -> None:
        if self.steps:
            self.step.sync_cache(torch.full((self.cache.batch_size,), self.steps, dtype=torch.int64))
