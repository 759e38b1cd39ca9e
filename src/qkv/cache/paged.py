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
protocol as :class:`~qkv.cache.KVCache`. Each layer's keys are gathered from the pages into a
``(B, Hkv, Nk, D)`` tensor for :func:`qkv.attention` (``O(context)`` copying per step).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from ..validate import positive_int
from .base import CacheFullError, KVCacheBase, Step, appending_step, check_layout, real_tokens, uniform_step


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

    def batch(self, seqs: list[int]) -> PagedBatch:
        """A batch of sequences to run a model on (``model(ids, cache=paged.batch([a, b]))``)."""
        return PagedBatch(self, seqs)

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


class PagedBatch(KVCacheBase):
    """Sequences of a :class:`PagedKVCache` run together as one batch (row ``i`` = ``seqs[i]``).

    ``begin`` reserves the step's pages in the pool (new pages, private copies of shared ones);
    if the step then fails they stay with their sequences, holding the same tokens, and serve the
    next step (or return to the pool on ``free``)."""

    def __init__(self, pool: PagedKVCache, seqs: list[int]):
        super().__init__(pool.num_layers, pool.num_kv_heads, pool.head_dim, pool.dtype, pool.device)
        seqs = list(seqs)
        if not seqs:
            raise ValueError("seqs must name at least one sequence")
        if len(set(seqs)) != len(seqs):
            raise ValueError(f"seqs must not repeat a sequence, got {seqs}")
        for seq in seqs:
            pool._check_sequence(seq)
        self.pool, self.seqs = pool, seqs

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
        self._index_pages(-(-self._nk // self.pool.page_size))
        self._write = None
        self._write_one = (self._gather[:, start // self.pool.page_size], start % self.pool.page_size)
        return uniform_step(start, 1, len(self.seqs), self.device)

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
        step = appending_step(lengths, counts, n, self._nk, self.device)
        page_size = self.pool.page_size
        self._index_pages(-(-self._nk // page_size))
        rows, tokens = real_tokens(counts)
        columns = lengths[rows] + tokens  # = positions, all < num_keys: their pages are among the first `width`
        self._write_one = None
        self._write = tuple(t.to(self.device) for t in (self._tables_cpu[rows, columns // page_size],
                                                        columns % page_size, rows, tokens))
        return step

    def store_and_read(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        out = []
        for store, new in ((self.pool.k_pages[layer], k), (self.pool.v_pages[layer], v)):
            if self._write_one is not None:
                pages, offset = self._write_one
                store[pages, :, offset] = new[:, :, 0]
            else:
                pages, offsets, rows, tokens = self._write
                store[pages, :, offsets] = new[rows, :, tokens]
            gathered = store[self._gather]  # (B, width, Hkv, page_size, D), a copy
            out.append(gathered.transpose(1, 2).flatten(2, 3)[:, :, :self._nk])
        return out[0], out[1]

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
