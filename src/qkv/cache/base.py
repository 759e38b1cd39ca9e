"""What every KV cache shares: the step protocol a model drives, and the per-layer view.

A forward pass over ``n`` new tokens per sequence is one *step*::

    positions = cache.begin(n, counts)      # (B, n) positions of the new tokens; checks room first
    for i, layer in enumerate(layers):      # each attention layer, with cache.layer(i):
        k_all, v_all, mask = cache.layer(i).update(k_new, v_new)
        ...attend q_new to k_all, v_all under mask...
    cache.commit()                          # the sequences now include the new tokens

``counts[b] <= n`` is how many of row ``b``'s ``n`` tokens are real (prompts of different lengths,
right-padded); the rest are padding that no real token sees and that is never kept. ``begin``
validates everything and reserves room before any tensor is written, so a step that cannot fit
raises :class:`CacheFullError` and leaves every cached token as it was. A step that fails between
``begin`` and ``commit`` leaves the lengths and every cached token unchanged; the next ``begin``
starts over. What ``begin`` reserved may stay reserved: a :class:`~qkv.cache.PagedBatch` takes its
new pages, and private copies of shared pages, in ``begin``, and they stay with their sequences
(holding the same tokens) until used by a later step or freed.

Caches are for inference. They store keys and values *detached*: gradients never flow into
cached keys and values, and no autograd graph outlives its step. With grad mode on, the keys and
values ``update`` returns are fresh tensors in which the step's own new keys and values are
differentiable (so a step over a whole sequence has the gradients of a full pass), and the cached
ones are constants.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from ..masks import Mask, causal, from_tensor
from ..validate import positive_int
from .positions import PositionMask


class CacheFullError(RuntimeError):
    """A step needs more room than the cache has (capacity, or free pages of a paged pool).
    Raised before anything is written: the cache is unchanged."""


# -- argument checks shared by the caches and the modules that drive them ----------------------

def token_counts(value, *, name: str, batch_size: int, num_tokens: int, minimum: int = 0) -> Tensor:
    """``value`` as ``(batch_size,)`` int64 on CPU, each in ``[minimum, num_tokens]``: how many of
    each row's ``num_tokens`` tokens are real. ``TypeError``/``ValueError`` naming ``name``."""
    counts = torch.as_tensor(value)
    if counts.is_floating_point() or counts.is_complex() or counts.dtype == torch.bool:
        raise TypeError(f"{name} must hold integers, got {counts.dtype}")
    counts = counts.to("cpu", torch.int64).reshape(-1) if counts.dim() == 0 else counts.to("cpu", torch.int64)
    if counts.shape != (batch_size,):
        raise ValueError(f"{name} must have shape (batch_size,) = ({batch_size},), got {tuple(counts.shape)}")
    if int(counts.min()) < minimum or int(counts.max()) > num_tokens:
        raise ValueError(f"{name} must lie in [{minimum}, {num_tokens}] (how many of each row's {num_tokens} "
                         f"tokens are real), got {counts.tolist()}")
    return counts


def check_layout(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device) -> torch.device:
    """Validate what a cache stores per layer and token; return ``device`` as tensors report it
    (``"cuda"`` becomes ``cuda:0``, ``"cpu:0"`` becomes ``cpu``; None is the CPU), so that it
    compares equal to the device of the keys and values a model passes."""
    for name, value in (("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim)):
        positive_int(name, value)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return torch.empty(0, device="cpu" if device is None else device).device


# -- the step ------------------------------------------------------------------------------------

#: Extra checks on every step (each layer's keys and values against the cache's layout, the
#: fast path's bookkeeping against the general one's). Off by default: the checks are made once
#: per step at the API boundary (``begin``, and a model's check of the cache it is given). Turn on
#: with :func:`set_debug` or the environment variable ``QKV_CACHE_DEBUG=1``.
DEBUG = os.environ.get("QKV_CACHE_DEBUG", "") not in ("", "0")


def set_debug(enabled: bool) -> None:
    """Check every layer's update of every step (see :data:`DEBUG`)."""
    global DEBUG
    DEBUG = bool(enabled)


_CAUSAL = causal()


class Step:
    """What :meth:`KVCacheBase.begin` prepared for one step of ``n`` new tokens per row.

    ``offset`` is set (an int) on the *uniform* hot path: every row holds ``offset`` tokens and all
    ``n`` new ones are real, so the new tokens sit at positions ``offset .. offset+n-1`` in every
    row. ``positions`` ``(B, n)`` int64 on the cache's device and ``counts`` ``(B,)`` int64 on CPU
    (real tokens per row) are then built only if asked for. ``end`` bounds every position
    (``< end``), so that position tables need not read the positions back.

    ``q_offset``, ``k_offset`` are the positions of the first query row and key column, as
    :func:`qkv.attention` takes them (an int or a ``(B,)`` tensor; None and 0 mean bottom-right):
    masks and score modifiers then see every token's true position.

    ``new_columns`` says where the step's tokens sit along the key axis of what ``update``
    returns: a slice (every row's ``n`` tokens at the same columns), or ``(rows, columns,
    tokens)`` index tensors on the cache's device, one entry per real token (token ``tokens[i]``
    of row ``rows[i]`` is at column ``columns[i]``). ``position_mask`` (a callable, or None when
    ``mask`` is one already) builds a :class:`PositionMask` over the true positions on demand, for
    score modifiers that must see them. ``checked``: the caller verified that the keys and values
    it will pass match the cache's layout (``update`` then skips the per-layer check).
    """

    def __init__(self, *, n: int, batch: int, device, end: int, mask: Mask | None, true_positions: bool,
                 new_columns, offset: int | None = None, positions: Tensor | None = None,
                 counts: Tensor | None = None, position_mask=None, q_offset=None, k_offset=0):
        self.n, self.batch, self.device, self.end, self.offset = n, batch, device, end, offset
        self.q_offset, self.k_offset = q_offset, k_offset  # for qkv.attention (None, 0: bottom-right)
        self.mask, self.true_positions, self.new_columns = mask, true_positions, new_columns
        self._positions, self._counts, self._position_mask = positions, counts, position_mask
        self.checked = False
        self.updated: set[int] = set()  # layers that stored their keys and values

    @property
    def positions(self) -> Tensor:
        """``(B, n)`` int64 positions of the new tokens, on the cache's device."""
        if self._positions is None:
            self._positions = torch.arange(self.offset, self.offset + self.n, device=self.device).expand(self.batch, -1)
        return self._positions

    @property
    def counts(self) -> Tensor:
        """``(B,)`` int64 on CPU: real tokens per row."""
        if self._counts is None:
            self._counts = torch.full((self.batch,), self.n, dtype=torch.int64)
        return self._counts

    @property
    def rope_positions(self) -> int | Tensor:
        """The int offset on the uniform path (a table slice for RoPE), else :attr:`positions`."""
        return self.positions if self.offset is None else self.offset

    def true_position_mask(self) -> PositionMask:
        """A :class:`PositionMask` over the true positions of the keys this step attends to."""
        if isinstance(self.mask, PositionMask):
            return self.mask
        if callable(self._position_mask):
            self._position_mask = self._position_mask()
        return self._position_mask


def put_tokens(target: Tensor, new: Tensor, where: slice | tuple[Tensor, Tensor, Tensor]) -> None:
    """Write a step's tokens ``new (B, Hkv, n, D)`` into ``target (B, Hkv, S, D)`` at ``where``."""
    if isinstance(where, slice):
        target[:, :, where] = new
    else:
        rows, columns, tokens = where
        target[rows, :, columns] = new[rows, :, tokens]


def real_tokens(counts: Tensor) -> tuple[Tensor, Tensor]:
    """``(rows, tokens)``, int64 on CPU, one entry per real token of a step with ``counts (B,)``
    real tokens per row: row ``b`` contributes tokens ``0 .. counts[b]-1``."""
    rows = torch.repeat_interleave(torch.arange(counts.shape[0]), counts)
    first = torch.repeat_interleave(counts.cumsum(0) - counts, counts)  # index of each row's first entry
    return rows, torch.arange(rows.shape[0]) - first


def uniform_step(start: int, n: int, batch: int, device) -> Step:
    """The hot path of a cache that holds every row's tokens at key columns ``0 .. start-1``
    (column = position) and appends ``n`` real tokens to each: the mask is :func:`qkv.causal`
    (none for one token), which bottom-right alignment makes exact, and no tensor is built."""
    return Step(n=n, batch=batch, device=device, end=start + n, mask=None if n == 1 else _CAUSAL,
                true_positions=False, new_columns=slice(start, start + n), offset=start)


def appending_step(lengths: Tensor, counts: Tensor, n: int, num_keys: int, device) -> Step:
    """The step of a cache that holds sequence ``b``'s tokens at key columns ``0 .. lengths[b]-1``
    (column = position) and appends the new ones after them, reading ``num_keys`` columns (at
    least ``max(lengths + counts)``; exactly ``lengths[0] + n`` when the batch is uniform).

    Uniform (equal lengths, every token real): :func:`uniform_step`. Otherwise explicit positions:
    row ``b``'s queries start at ``q_offset[b] = lengths[b]`` (keys at their columns, ``k_offset =
    0``) under :func:`qkv.causal`, which then hides every column beyond a query's own position; and
    ``new_columns`` lists the real tokens."""
    batch = lengths.shape[0]
    if bool((lengths == lengths[0]).all() and (counts == n).all()):
        return uniform_step(int(lengths[0]), n, batch, device)
    q_offset = lengths.to(device)
    positions = q_offset[:, None] + torch.arange(n, device=device)
    rows, tokens = real_tokens(counts)
    new_columns = tuple(t.to(device) for t in (rows, lengths[rows] + tokens, tokens))
    mask = _CAUSAL
    if bool((counts < n).any()):
        # Padding queries see nothing: the never-written slots of padding tokens are then hidden
        # from every query, so whatever they hold (a reused page's NaN) cannot reach an output.
        real_queries = (torch.arange(n) < counts[:, None]).to(device)
        mask = _CAUSAL & from_tensor(real_queries[:, None, :, None])  # (B, 1, n, 1), by query row
    return Step(n=n, batch=batch, device=device, end=int(lengths.max()) + n, mask=mask, true_positions=False,
                new_columns=new_columns, positions=positions, counts=counts, q_offset=q_offset)


class CacheLayer:
    """One layer's view of a cache during a step, as :class:`qkv.nn.MultiHeadAttention` uses it."""

    #: A layer may run the attention over what ``update`` returned itself (``attend(q, k, v, mask)``,
    #: as a fixed-shape compiled step's layer does); None: :func:`qkv.attention` runs it.
    attend = None

    def __init__(self, cache: KVCacheBase, index: int):
        self.cache, self.index = cache, index

    @property
    def positions(self) -> Tensor:
        """``(B, n)`` positions of this step's tokens."""
        return self.cache.step.positions

    @property
    def rope_positions(self) -> int | Tensor:
        """This step's positions for RoPE: an int offset on the uniform path, else ``(B, n)``."""
        return self.cache.step.rope_positions

    @property
    def position_end(self) -> int:
        """A bound on this step's positions (all ``<`` it)."""
        return self.cache.step.end

    @property
    def offsets(self) -> tuple:
        """``(q_offset, k_offset)`` to pass to :func:`qkv.attention` with what ``update`` returns."""
        step = self.cache.step
        return step.q_offset, step.k_offset

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Mask | None]:
        """Store this step's ``k, v (B, Hkv, n, D)`` (detached); return the keys and values to
        attend to (``(B, Hkv, Nk, D)``, cached and new) and the mask that goes with them.

        With grad mode on the returned tensors are copies in which this step's ``k, v`` are
        differentiable; without it they may be views of the cache's buffers."""
        cache = self.cache
        step = cache._step
        if step is None:
            step = cache.step  # raises: no step in progress
        if DEBUG or not step.checked:
            cache.check_kv(k, v, step.n)
        if not torch.is_grad_enabled():
            keys, values = cache.store_and_read(self.index, k, v)
        else:  # never a view of a buffer that a later step overwrites
            keys, values = cache.store_and_read(self.index, k.detach(), v.detach())
            keys, values = keys.clone(), values.clone()
            put_tokens(keys, k, step.new_columns)
            put_tokens(values, v, step.new_columns)
        step.updated.add(self.index)
        return keys, values, step.mask

    # -- reading a paged cache in place (see qkv.cache.paged and qkv.nn.paged) -------------------

    @property
    def reads_pages(self) -> bool:
        """Whether this cache offers its pages to be read in place (:meth:`paged_view`)."""
        return self.cache.reads_pages

    def paged_view(self):
        """This step's :class:`~qkv.cache.paged.PagedView` (block table, lengths, mask; shared by
        every layer of the step), or None where the step cannot be read in place."""
        return self.cache.paged_view()

    def store_pages(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this step's ``k, v (B, Hkv, n, D)`` (detached) like :meth:`update`, without
        reading anything back; returns this layer's ``(k_pages, v_pages)``, to be read in place
        through the :meth:`paged_view`."""
        step = self.cache.step
        if DEBUG or not step.checked:
            self.cache.check_kv(k, v, step.n)
        pages = self.cache.store_pages(self.index, k.detach(), v.detach())
        step.updated.add(self.index)
        return pages

    def remap_score_mod(self, score_mod):
        """``score_mod`` evaluated at the tokens' true positions (ALiBi over a ragged batch)."""
        step = self.cache.step
        if score_mod is None or not step.true_positions:
            return score_mod
        return step.true_position_mask().remap_score_mod(score_mod)


class KVCacheBase:
    """Common state and checks; subclasses implement ``plan``, ``store_and_read`` and ``finish``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.device = check_layout(num_layers, num_kv_heads, head_dim, dtype, device)
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        self._step: Step | None = None

    # -- the step protocol --------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    def begin(self, num_tokens: int, counts=None) -> Tensor:
        """Start a step of ``num_tokens`` new tokens per row, ``counts (B,)`` of them real (default
        all). Returns their positions ``(B, num_tokens)``. Raises :class:`CacheFullError` (nothing
        changed) if they do not fit; otherwise reserves their room (see the module docstring)."""
        return self.begin_step(num_tokens, counts).positions

    def begin_step(self, num_tokens: int, counts=None, *, checked: bool = False) -> Step:
        """:meth:`begin`, returning the whole :class:`Step`. ``checked=True``: the caller has
        verified that what it will pass to ``update`` matches :meth:`layout` (a model that checked
        the cache), so layers skip that check unless :data:`DEBUG` is on."""
        positive_int("num_tokens", num_tokens)
        self._step = None
        start = self.uniform_length() if counts is None else None
        if start is not None:
            step = self.plan_uniform(num_tokens, start)
        else:
            if counts is None:
                counts = torch.full((self.batch_size,), num_tokens, dtype=torch.int64)
            else:
                counts = token_counts(counts, name="counts", batch_size=self.batch_size, num_tokens=num_tokens)
            step = self.plan(num_tokens, counts)
        step.checked = checked
        self._step = step
        return step

    def layout(self) -> tuple:
        """``(num_layers, num_kv_heads, head_dim, dtype, device)``: what every layer's keys and values
        must match (compare with a model's ``cache_spec()``)."""
        return self.num_layers, self.num_kv_heads, self.head_dim, self.dtype, self.device

    def layer(self, index: int) -> CacheLayer:
        """The view of layer ``index`` that attention layers call ``update`` on."""
        layers = self.__dict__.get("_layers")
        if layers is None:
            layers = self._layers = [CacheLayer(self, i) for i in range(self.num_layers)]
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < self.num_layers:
            raise ValueError(f"layer index must be an int in [0, {self.num_layers}), got {index!r}")
        return layers[index]

    def commit(self) -> None:
        """End the step: the sequences now include its real tokens. Every layer must have been
        updated (a cache serves a model with exactly ``num_layers`` attention layers)."""
        step = self.step
        missing = sorted(set(range(self.num_layers)) - step.updated)
        if missing:
            raise RuntimeError(f"commit: layer(s) {missing} were not updated in this step; the cache has "
                               f"{self.num_layers} layers, as many as the model must have. Nothing was committed")
        self.finish(step)
        self._step = None

    def abort(self) -> None:
        """Give up the step in progress (after a failure): nothing is committed, lengths and cached
        tokens stay as they were. A :class:`qkv.nn.Decoder` calls this when its forward pass fails."""
        self._step = None

    @property
    def step(self) -> Step:
        if self._step is None:
            raise RuntimeError("no step in progress: call cache.begin(num_tokens) before the forward pass "
                               "(a qkv.nn.Decoder does this when given cache=...)")
        return self._step

    #: Whether :meth:`paged_view` may offer the pages to be read in place (a ``PagedBatch``).
    reads_pages = False

    def paged_view(self):
        """See :meth:`CacheLayer.paged_view`; caches without pages have none."""
        return None

    # -- for subclasses -----------------------------------------------------------------------

    def plan(self, n: int, counts: Tensor) -> Step:
        """Check that the step fits, reserve room, and say where the new tokens go."""
        raise NotImplementedError

    def uniform_length(self) -> int | None:
        """The length every row has, if they all have the same (known on the host without
        reading a tensor); None otherwise, or if the cache has no uniform hot path."""
        return None

    def plan_uniform(self, n: int, start: int) -> Step:
        """:meth:`plan` for ``n`` real tokens per row, every row holding ``start`` tokens. By
        default the general plan; caches override it with a path that builds no index tensors."""
        return self.plan(n, torch.full((self.batch_size,), n, dtype=torch.int64))

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Keep the step's (detached) ``k, v`` and return all keys and values to attend to, with
        the new tokens at ``step.new_columns``."""
        raise NotImplementedError

    def finish(self, step: Step) -> None:
        raise NotImplementedError

    def check_kv(self, k: Tensor, v: Tensor, n: int) -> None:
        expected = (self.batch_size, self.num_kv_heads, n, self.head_dim)
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, Tensor) or tuple(t.shape) != expected:
                raise ValueError(f"cache update: {name} must have shape (B, Hkv, n, D) = {expected}, got "
                                 f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
            if t.dtype != self.dtype or t.device != self.device:
                raise ValueError(f"cache update: {name} is {t.dtype} on {t.device}, but the cache stores "
                                 f"{self.dtype} on {self.device}")
