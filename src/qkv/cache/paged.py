"""A paged KV cache: fixed-size pages from one shared pool, a block table per sequence.

As in vLLM (Kwon et al., 2023, "Efficient Memory Management for Large Language Model Serving with
PagedAttention"): memory is a pool of ``num_pages`` pages of ``page_size`` tokens; sequence ``s``
owns the list of pages ``block_table(s)``, and its token at position ``p`` lives in page
``block_table(s)[p // page_size]`` at offset ``p % page_size``. Sequences grow a page at a time,
so a pool serves many sequences of unknown length without reserving each one's maximum.

``fork(s)`` makes a sequence that shares all of ``s``'s pages (a common prompt, beam search,
parallel sampling); pages count their owners, and a shared page is copied the first time one of
its owners writes into it (copy-on-write). ``free(s)`` returns the pages nobody else holds.

A model runs on a batch of sequences through :meth:`PagedKVCache.batch`, which gives the same step
protocol as :class:`~qkv.cache.KVCache`, optionally with a sliding window and sink tokens. Each
layer reads its keys and values in one of two ways:

- *in place*: a decode step (every row's new tokens real, no gradients) offers a
  :class:`PagedView` (block table, lengths, mask), and :mod:`qkv.nn.paged` hands the pages to the
  triton backend's paged kernel, which reads them through the block table (on CUDA with Triton);
- *gathered*: otherwise the pages are gathered into a ``(B, Hkv, Nk, D)`` tensor for
  :func:`qkv.attention` (``O(context)`` copying per layer and step).

:attr:`PagedBatch.last_read` says which one the last step took, and why.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..masks import Mask, causal, key_padding, sliding_window
from ..validate import positive_int
from .base import _CAUSAL, CacheFullError, KVCacheBase, Step, appending_step, check_layout, real_tokens, uniform_step


class PagedKVCache:
    """A pool of pages and the sequences that own them.

    Args:
        num_layers: attention layers served.
        num_pages: pages in the pool.
        page_size: tokens per page.
        num_kv_heads, head_dim: the key/value shape per token ``(Hkv, D)``.
        dtype, device: of the stored keys and values.

    Attributes:
        k_pages, v_pages: ``(num_layers, num_pages, Hkv, page_size, D)``, detached values:
            gradients do not flow into cached keys and values (see :mod:`qkv.cache.base`).

    A model runs on its sequences through :meth:`batch` (``cache=pool.batch(seq_ids)``), not on
    the pool itself.
    """

    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype = torch.float32, device=None):
        self.device = check_layout(num_layers, num_kv_heads, head_dim, dtype, device)
        self.num_pages, self.page_size = positive_int("num_pages", num_pages), positive_int("page_size", page_size)
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        self.k_pages = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_pages = torch.zeros(shape, dtype=dtype, device=self.device)
        self._owners = [0] * num_pages               # sequences holding each page
        self._free = list(range(num_pages - 1, -1, -1))  # a stack; pop() gives the lowest page first
        self._tables: dict[int, list[int]] = {}
        self._lengths: dict[int, int] = {}
        self._next_id = 0
        self._version = 0  # bumped whenever a block table changes (batches reuse their page index until then)
        self._open_steps: dict[int, weakref.ref] = {}  # sequence -> the PagedBatch with a step open on it

    # -- sequences ----------------------------------------------------------------------------

    def add_sequence(self) -> int:
        """A new empty sequence (no pages yet); returns its id."""
        seq = self._next_id
        self._next_id += 1
        self._tables[seq], self._lengths[seq] = [], 0
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence with the same tokens as ``seq``, sharing its pages (no copy). Either may
        then grow independently; a shared page is copied when one of them first writes into it."""
        self._check_sequence(seq)
        child = self.add_sequence()
        self._tables[child] = list(self._tables[seq])
        self._lengths[child] = self._lengths[seq]
        for page in self._tables[child]:
            self._owners[page] += 1
        return child

    def free(self, seq: int) -> None:
        """Drop ``seq``; its pages that no other sequence holds return to the pool."""
        self._check_sequence(seq)
        self._version += 1
        for page in self._tables.pop(seq):
            self._owners[page] -= 1
            if self._owners[page] == 0:
                self._free.append(page)
        del self._lengths[seq]

    def length(self, seq: int) -> int:
        self._check_sequence(seq)
        return self._lengths[seq]

    def block_table(self, seq: int) -> list[int]:
        """The pages of ``seq`` in order (a copy)."""
        self._check_sequence(seq)
        return list(self._tables[seq])

    def owners(self, page: int) -> int:
        """How many sequences hold ``page`` (an int in ``[0, num_pages)``)."""
        if not isinstance(page, int) or isinstance(page, bool) or not 0 <= page < self.num_pages:
            raise ValueError(f"page must be an int in [0, num_pages={self.num_pages}), got {page!r}")
        return self._owners[page]

    @property
    def sequences(self) -> list[int]:
        return list(self._tables)

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def sequence_kv(self, seq: int, layer: int) -> tuple[Tensor, Tensor]:
        """The cached keys and values of ``seq`` in ``layer``, each ``(Hkv, length, D)`` (a copy)."""
        self._check_sequence(seq)
        n = self._lengths[seq]
        table = torch.tensor(self._tables[seq], dtype=torch.int64, device=self.device)
        return tuple(pages[layer][table].transpose(0, 1).reshape(self.num_kv_heads, -1, self.head_dim)[:, :n]
                     for pages in (self.k_pages, self.v_pages))

    def batch(self, seqs: list[int], *, window: int | None = None, sinks: int = 0,
              read_in_place: bool = True) -> PagedBatch:
        """A batch of sequences to run a model on (``model(ids, cache=paged.batch([a, b]))``); see
        :class:`PagedBatch` for ``window``, ``sinks`` and ``read_in_place``."""
        return PagedBatch(self, seqs, window=window, sinks=sinks, read_in_place=read_in_place)

    def _check_sequence(self, seq) -> None:
        if seq not in self._tables:
            raise ValueError(f"sequence {seq!r} is not in this cache (live sequences: {sorted(self._tables)})")

    # -- growth -------------------------------------------------------------------------------

    def reserve(self, seqs: list[int], counts: list[int]) -> None:
        """Make room for ``counts[i]`` more tokens in each of ``seqs``: new pages at the end, and
        private copies of shared pages that will be written. All or nothing: if the pool has too
        few free pages, raises :class:`CacheFullError` and changes nothing."""
        copies, growth = [], []
        owners = {}  # owner counts as they will be after the copies planned so far
        for seq, count in zip(seqs, counts):
            table, start = self._tables[seq], self._lengths[seq]
            end = start + count
            first_page, last_page = start // self.page_size, (end - 1) // self.page_size
            for j in range(first_page, min(last_page + 1, len(table))) if count else ():
                page = table[j]
                owners.setdefault(page, self._owners[page])
                if owners[page] > 1:
                    copies.append((seq, j))
                    owners[page] -= 1
            growth.append(max(0, -(-end // self.page_size) - len(table)))
        needed = len(copies) + sum(growth)
        if needed > len(self._free):
            raise CacheFullError(
                f"PagedKVCache: pool exhausted: this step needs {needed} page(s) ({sum(growth)} to grow, "
                f"{len(copies)} to copy shared pages) but {len(self._free)} of {self.num_pages} are free; "
                "free finished sequences or use a larger pool. Nothing was changed")
        for seq, j in copies:
            old, new = self._tables[seq][j], self._free.pop()
            self.k_pages[:, new] = self.k_pages[:, old]
            self.v_pages[:, new] = self.v_pages[:, old]
            self._owners[old] -= 1
            self._owners[new] = 1
            self._tables[seq][j] = new
        if needed:
            self._version += 1
        for seq, pages in zip(seqs, growth):
            for _ in range(pages):
                page = self._free.pop()
                self._owners[page] = 1
                self._tables[seq].append(page)

    def __repr__(self):
        return (f"PagedKVCache(layers={self.num_layers}, pages={self.num_pages}x{self.page_size}, "
                f"free={self.num_free_pages}, sequences={ {s: self._lengths[s] for s in self._tables} })")


@dataclass
class PagedView:
    """One step of a :class:`PagedBatch` as a paged kernel reads it (every layer shares it).

    ``block_table (B, W)`` int32 and ``lengths (B,)`` int32 (keys per sequence *with* this
    step's tokens) on the cache's device; ``max_length`` bounds the lengths (a host int); the
    step's ``num_queries`` new tokens are each sequence's newest, attending under ``mask``
    (None, :func:`qkv.causal`, or the batch's window with sinks; over positions). ``scratch``
    is the reader's: what it prepares once per step (e.g. the kernel's launch), and ``why``, a
    reason it gave for gathering instead."""

    block_table: Tensor
    lengths: Tensor
    max_length: int
    num_queries: int
    page_size: int
    num_kv_heads: int
    mask: Mask | None
    scratch: dict = field(default_factory=dict)
    why: str | None = None


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small host tensor on ``device`` without waiting for the device (pinned, asynchronous)."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class PagedBatch(KVCacheBase):
    """Sequences of a :class:`PagedKVCache` run together as one batch (row ``i`` = ``seqs[i]``).

    Args:
        window: if given, each token attends to the ``window`` tokens before it and itself ...
        sinks: ... and to the first ``sinks`` tokens of its sequence (StreamingLLM's attention
            sinks), like :class:`~qkv.cache.StreamingKVCache` but keeping every token: the mask
            ``sliding_window(window) | (key_padding(sinks) & causal())`` over true positions.
        read_in_place: let decode steps offer their pages to be read in place (a
            :class:`PagedView`; on CUDA with Triton, :mod:`qkv.nn.paged` reads them through the
            block table, without gathering). False: always gather.

    ``begin`` reserves the step's pages in the pool (new pages, private copies of shared ones);
    if the step then fails they stay with their sequences, holding the same tokens, and serve the
    next step (or return to the pool on ``free``)."""

    def __init__(self, pool: PagedKVCache, seqs: list[int], *, window: int | None = None, sinks: int = 0,
                 read_in_place: bool = True):
        super().__init__(pool.num_layers, pool.num_kv_heads, pool.head_dim, pool.dtype, pool.device)
        seqs = list(seqs)
        if not seqs:
            raise ValueError("seqs must name at least one sequence")
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs must not repeat a sequence, got {seqs}")
        for seq in seqs:
            pool._check_sequence(seq)
        if window is not None:
            positive_int("window", window)
        if isinstance(sinks, bool) or not isinstance(sinks, int) or sinks < 0:
            raise ValueError(f"sinks must be an int >= 0, got {sinks!r}")
        if sinks and window is None:
            raise ValueError(f"sinks={sinks}: sink tokens go with a window (window=None sees every token)")
        if not isinstance(read_in_place, bool):
            raise TypeError(f"read_in_place must be a bool, got {type(read_in_place).__name__}")
        self.pool, self.seqs = pool, seqs
        self.window, self.sinks, self.reads_pages = window, sinks, read_in_place
        self._window_mask = None if window is None else (
            sliding_window(window) | (key_padding(sinks) & causal()) if sinks else sliding_window(window))
        self._view: tuple[Step, PagedView | None] | None = None
        #: How the last step read the pages: "in place" or "gathered" (with the reason, if any).
        self.last_read = "none yet"

    @property
    def batch_size(self) -> int:
        return len(self.seqs)

    @property
    def lengths(self) -> Tensor:
        """``(B,)`` tokens held per sequence (int64, CPU)."""
        return torch.tensor([self.pool.length(s) for s in self.seqs], dtype=torch.int64)

    def begin_step(self, num_tokens: int, counts=None, *, checked: bool = False) -> Step:
        """:meth:`KVCacheBase.begin_step`, refused (``RuntimeError``, nothing changed) while another
        batch has a step open on one of these sequences: both would write the same slots."""
        self._claim()
        try:
            return super().begin_step(num_tokens, counts, checked=checked)
        except BaseException:
            self._release()
            raise

    def abort(self) -> None:
        super().abort()
        self._release()

    def _claim(self) -> None:
        open_steps = self.pool._open_steps
        for seq in self.seqs:
            ref = open_steps.get(seq)
            other = None if ref is None else ref()
            if other is not None and other is not self and other._step is not None:
                raise RuntimeError(f"sequence {seq} has a step open in another batch (seqs {other.seqs}): commit "
                                   "it, or call abort() on it, before starting another step on that sequence (two open "
                                   "steps would write the same slots). Nothing was changed")
        me = weakref.ref(self)
        for seq in self.seqs:
            open_steps[seq] = me

    def _release(self) -> None:
        open_steps = self.pool._open_steps
        for seq in self.seqs:
            ref = open_steps.get(seq)
            if ref is not None and ref() is self:
                del open_steps[seq]

    def uniform_length(self) -> int | None:
        lengths = self.pool._lengths
        try:
            start = lengths[self.seqs[0]]
            return start if all(lengths[s] == start for s in self.seqs) else None
        except KeyError:  # a freed sequence: the general plan says which
            return None

    def plan_uniform(self, n: int, start: int) -> Step:
        if n > 1:
            return super().plan_uniform(n, start)
        # One token per row at position `start`: reserve its page, then write it through a column of
        # the page index (rebuilt only when a block table changed), at offset start % page_size.
        self.pool.reserve(self.seqs, [1] * len(self.seqs))
        self._nk = start + 1
        self._lengths_cpu, self._counts_real = None, True
        self._index_pages(-(-self._nk // self.pool.page_size))
        self._write = None
        self._write_one = (self._gather[:, start // self.pool.page_size], start % self.pool.page_size)
        return self._windowed(uniform_step(start, 1, len(self.seqs), self.device))

    def _windowed(self, step: Step) -> Step:
        """The step under the batch's window and sinks (positions as the step places them)."""
        if self._window_mask is None or (step.q_offset is None and self._nk <= self.sinks):
            return step  # every key is a sink (or the window covers all): causal, as planned
        if step.mask is None or step.mask is _CAUSAL:
            step.mask = self._window_mask
        else:
            step.mask = self._window_mask & step.mask
        return step

    def _index_pages(self, width: int) -> None:
        """``self._gather (B, width)``: each row's first ``width`` pages on the device; past a
        sequence's end, padding (page 0) whose content is never visible."""
        key = (width, self.pool._version)
        if self.__dict__.get("_gather_key") != key:
            tables = [self.pool._tables[s][:width] for s in self.seqs]
            self._tables_cpu = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)
            self._gather = self._tables_cpu.to(self.device)
            self._gather_key = key

    def plan(self, n: int, counts: Tensor) -> Step:
        lengths = self.lengths  # also checks that every sequence is still alive
        self.pool.reserve(self.seqs, counts.tolist())
        self._nk = int(lengths.max()) + n
        step = self._windowed(appending_step(lengths, counts, n, self._nk, self.device))
        self._counts_real = bool((counts == n).all())
        self._lengths_cpu = lengths
        page_size = self.pool.page_size
        self._index_pages(-(-self._nk // page_size))
        rows, tokens = real_tokens(counts)
        columns = lengths[rows] + tokens  # = positions, all < num_keys: their pages are among the first `width`
        self._write_one = None
        self._write = tuple(t.to(self.device) for t in (self._tables_cpu[rows, columns // page_size],
                                                        columns % page_size, rows, tokens))
        return step

    def store_pages(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the step's ``k, v`` into their pages; returns ``layer``'s ``(k_pages, v_pages)``,
        ``(num_pages, Hkv, page_size, D)`` views of the pool (read in place through :meth:`paged_view`)."""
        for store, new in ((self.pool.k_pages[layer], k), (self.pool.v_pages[layer], v)):
            if self._write_one is not None:
                pages, offset = self._write_one
                store[pages, :, offset] = new[:, :, 0]
            else:
                pages, offsets, rows, tokens = self._write
                store[pages, :, offsets] = new[rows, :, tokens]
        self.last_read = "in place"
        return self.pool.k_pages[layer], self.pool.v_pages[layer]

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self.store_pages(layer, k, v)
        view = self._view[1] if self._view is not None and self._view[0] is self._step else None
        self.last_read = "gathered" if view is None or view.why is None else f"gathered: {view.why}"
        out = []
        for store in (self.pool.k_pages[layer], self.pool.v_pages[layer]):
            gathered = store[self._gather]  # (B, width, Hkv, page_size, D), a copy
            out.append(gathered.transpose(1, 2).flatten(2, 3)[:, :, :self._nk])
        return out[0], out[1]

    def paged_view(self) -> PagedView | None:
        """The step as a paged kernel reads it (built on the first layer's call, then shared), or
        None: ``read_in_place=False``, or some row's new tokens include padding (a ragged prompt)."""
        step = self.step
        if self._view is not None and self._view[0] is step:
            return self._view[1]
        view = None
        if self.reads_pages and self._counts_real:
            key = self._gather_key
            if self.__dict__.get("_table_key") != key:
                self._table32 = _to_device(self._tables_cpu.to(torch.int32), self.device)
                self._table_key = key
            batch = len(self.seqs)
            if self._lengths_cpu is None:  # uniform: every row holds `_nk` keys after this step
                lengths = torch.full((batch,), self._nk, dtype=torch.int32, device=self.device)
            else:
                lengths = _to_device((self._lengths_cpu + step.n).to(torch.int32), self.device)
            view = PagedView(self._table32, lengths, self._nk, step.n, self.pool.page_size, self.num_kv_heads,
                             step.mask)
        self._view = (step, view)
        return view

    def finish(self, step: Step) -> None:
        lengths = self.pool._lengths
        if step.offset is not None:
            for seq in self.seqs:
                lengths[seq] += step.n
        else:
            for seq, count in zip(self.seqs, step.counts.tolist()):
                lengths[seq] += count
        self._release()

    def __repr__(self):
        return f"PagedBatch(seqs={self.seqs}, lengths={self.lengths.tolist()})"
