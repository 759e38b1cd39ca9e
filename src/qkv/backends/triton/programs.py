"""Masks and score modifiers as small programs the Triton kernels interpret (no triton import).

A built-in mask tree (``causal``, ``sliding_window``, ``key_padding``, ``document``, ``prefix_lm``,
``global_tokens``, ``block_sparse`` and ``&``/``|``/``~`` of them) becomes a :class:`MaskProgram`:
up to :data:`MAX_LEAVES` *leaves*, each a predicate of one kind (a compile-time code) with its
sizes, lengths and id tables as runtime data, and a *truth table* (a runtime integer) that combines
the leaves. The kernel evaluates every leaf on a partial tile, packs the results into a small
integer per element (bit ``i`` = leaf ``i``), and looks the combination up in the truth table. So
one compiled kernel serves every window size, every length, every document layout and every
combination of the same leaf kinds; only the tuple of leaf codes is a compile-time constant.

Any other mask (``from_tensor``, ``from_function``, a cache's ``PositionMask``, or a tree with
too many leaves) is served by a bit-packed copy of its partial tiles (:mod:`.blocks`).

Score modifiers made by :func:`qkv.scores.alibi`, :func:`~qkv.scores.softcap`,
:func:`~qkv.scores.relative_bias` and :func:`~qkv.scores.chain` of them (at most one of each)
become a :class:`ScoreProgram`; anything else is reported by :func:`score_program_reason`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ... import masks as M
from ...scores import ScoreMod

#: Leaves a kernel evaluates at most (the truth table has ``2 ** MAX_LEAVES`` bits).
MAX_LEAVES = 5
#: Integer parameters per leaf (rows of :attr:`MaskProgram.ints`).
LEAF_INTS = 8

# Leaf codes (compile-time constants of the kernel).
CAUSAL, WINDOW, KEY_PREFIX, DOCUMENT, GLOBAL, BLOCK_SPARSE = 1, 2, 3, 4, 5, 6
# Mask modes.
NO_MASK, PROGRAM, BITS = 0, 1, 2


@dataclass
class MaskProgram:
    """``mode``: :data:`NO_MASK`, :data:`PROGRAM` or :data:`BITS`. For programs: ``codes``
    (``MAX_LEAVES`` leaf codes, 0 = unused), ``ints`` ``(MAX_LEAVES, LEAF_INTS)`` int32 parameters,
    ``data`` int32 tables the parameters point into (offsets), ``truth`` the truth table (bit
    ``i`` says whether leaf values ``i`` (bit ``j`` = leaf ``j``) allow; as a signed 32-bit int)."""

    mode: int
    codes: tuple[int, ...] = (0,) * MAX_LEAVES
    ints: Tensor | None = None
    data: Tensor | None = None
    truth: int = 0

    @property
    def mask_class(self) -> tuple:
        """What the kernel is compiled for (the autotuning key's mask part)."""
        return (self.mode, *self.codes)


class _Builder:
    def __init__(self, device):
        self.device = device
        self.leaves: list[tuple[int, list[int]]] = []
        self.chunks: list[Tensor] = []
        self.size = 0
        self.keys: dict = {}

    def table(self, t: Tensor) -> int:
        """Append an integer table to the data buffer; returns its offset."""
        flat = t.reshape(-1).to(torch.int32)
        offset = self.size
        self.chunks.append(flat)
        self.size += flat.numel()
        return offset

    def leaf(self, code: int, ints: list[int], key=None) -> int:
        """Index of a leaf (reused when ``key`` repeats, e.g. two causal parts)."""
        if key is not None and key in self.keys:
            return self.keys[key]
        if len(self.leaves) >= MAX_LEAVES:
            raise _TooComplex
        self.leaves.append((code, ints + [0] * (LEAF_INTS - len(ints))))
        index = len(self.leaves) - 1
        if key is not None:
            self.keys[key] = index
        return index


class _TooComplex(Exception):
    pass


def _compile(mask: M.Mask, bld: _Builder, batch: int, nq: int, nk: int):
    """A function of the leaf values (a tuple of bools) that evaluates ``mask``; adds leaves."""
    kind = type(mask)
    if kind is M.And:
        a, c = (_compile(p, bld, batch, nq, nk) for p in mask.parts)
        return lambda x: a(x) and c(x)
    if kind is M.Or:
        a, c = (_compile(p, bld, batch, nq, nk) for p in mask.parts)
        return lambda x: a(x) or c(x)
    if kind is M.Not:
        a = _compile(mask.parts[0], bld, batch, nq, nk)
        return lambda x: not a(x)
    if kind is M.Causal:
        i = bld.leaf(CAUSAL, [], key="causal")
        return lambda x: x[i]
    if kind is M.SlidingWindow:
        i = bld.leaf(WINDOW, [mask.left, mask.right], key=("window", mask.left, mask.right))
        return lambda x: x[i]
    if kind is M.KeyPadding:
        return _key_prefix(mask.lengths, bld)
    if kind is M.PrefixLM:
        prefix = _key_prefix(mask.prefix_len, bld)
        i = bld.leaf(CAUSAL, [], key="causal")
        return lambda x: prefix(x) or x[i]
    if kind is M.Document:
        k_ids = mask.segment_ids  # (B|1, L), indexed by position
        length = k_ids.shape[1]
        k_off = bld.table(k_ids)
        k_stride = length if k_ids.shape[0] > 1 else 0
        if mask.q_segment_ids is None:
            q_off, q_stride, by_row, q_len = k_off, k_stride, 0, length
        else:  # indexed by query row
            q_ids = mask.q_segment_ids
            q_off, q_stride, by_row, q_len = bld.table(q_ids), (nq if q_ids.shape[0] > 1 else 0), 1, nq
        i = bld.leaf(DOCUMENT, [k_off, k_stride, q_off, q_stride, by_row, q_len, length])
        if mask.causal:
            j = bld.leaf(CAUSAL, [], key="causal")
            return lambda x: x[i] and x[j]
        return lambda x: x[i]
    if kind is M.GlobalTokens:
        indices = mask.indices
        span = int(indices.max()) + 1 if indices.numel() else 0
        flags = torch.zeros(span + 1, dtype=torch.int32, device=indices.device)  # last: "no position"
        flags[indices] = 1
        i = bld.leaf(GLOBAL, [bld.table(flags), span])
        return lambda x: x[i]
    if kind is M.BlockSparse:
        layout = mask.layout
        lb, lh, lq, lk = layout.shape
        off = bld.table(layout)
        i = bld.leaf(BLOCK_SPARSE, [off, lh * lq * lk if lb > 1 else 0, lq * lk if lh > 1 else 0, lk,
                                    mask.block_size, lq])
        return lambda x: x[i]
    raise _TooComplex


def _key_prefix(lengths: Tensor, bld: _Builder):
    i = bld.leaf(KEY_PREFIX, [bld.table(lengths), 1 if lengths.numel() > 1 else 0])
    return lambda x: x[i]


def mask_program(mask: M.Mask | None, batch: int, nq: int, nk: int, device) -> MaskProgram:
    """Compile a bound mask (or None) for the kernels; falls back to :data:`BITS`."""
    if mask is None:
        return MaskProgram(NO_MASK)
    bld = _Builder(device)
    try:
        evaluate = _compile(mask, bld, batch, nq, nk)
    except _TooComplex:
        return MaskProgram(BITS)
    n = len(bld.leaves)
    truth = 0
    for bits in itertools.product((False, True), repeat=n):  # bits[i] = leaf i
        index = sum(1 << i for i, bit in enumerate(bits) if bit)
        if evaluate(bits):
            truth |= 1 << index
    if truth >= 1 << 31:  # the kernels read the table as a signed 32-bit integer
        truth -= 1 << 32
    codes = tuple(code for code, _ in bld.leaves) + (0,) * (MAX_LEAVES - n)
    ints = torch.zeros(MAX_LEAVES, LEAF_INTS, dtype=torch.int32)
    for i, (_, values) in enumerate(bld.leaves):
        ints[i] = torch.tensor(values, dtype=torch.int32)
    data = torch.cat(bld.chunks) if bld.chunks else torch.zeros(1, dtype=torch.int32, device=device)
    return MaskProgram(PROGRAM, codes, _on(ints, device), _on(data.to(torch.int32), device).contiguous(), truth)


def _on(t: Tensor, device) -> Tensor:
    """``t`` on ``device``; from the CPU to CUDA through pinned memory, asynchronously (a pageable
    copy would wait for the device to finish its queue)."""
    device = torch.device(device)
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# --------------------------------------------------------------------------------------------
# Score modifiers
# --------------------------------------------------------------------------------------------

# Score op codes.
ALIBI, ALIBI_SYMMETRIC, SOFTCAP, REL_SHARED, REL_PER_HEAD = 1, 2, 3, 4, 5


@dataclass
class ScoreProgram:
    """At most one ALiBi, one soft-cap and one relative-bias step, in the order given.

    ``alibi`` (0, ALIBI or ALIBI_SYMMETRIC), ``rel`` (0, REL_SHARED, REL_PER_HEAD), ``cap``
    (0/1), and ``pos_*`` the step index of each (for the kernel's fixed 3-step loop).
    ``slopes``/``table`` index into the modifier's tensors (for gradients)."""

    alibi: int = 0
    rel: int = 0
    cap: int = 0
    pos_alibi: int = 3
    pos_rel: int = 3
    pos_cap: int = 3
    cap_value: float = 1.0
    max_distance: int = 0
    slopes_index: int | None = None
    table_index: int | None = None
    tensors: tuple = field(default_factory=tuple)

    @property
    def score_class(self) -> tuple:
        return (self.alibi, self.rel, self.cap, self.pos_alibi, self.pos_rel, self.pos_cap)


def _closure(fn) -> dict:
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


def _parts(mod: ScoreMod) -> list[ScoreMod] | None:
    """The steps of a (possibly chained) modifier made by :mod:`qkv.scores`' constructors."""
    name, module = getattr(mod.fn, "__name__", ""), getattr(mod.fn, "__module__", "")
    if module == "qkv.scores" and name == "chained":
        parts = []
        for part in _closure(mod.fn)["parts"]:
            sub = _parts(part)
            if sub is None:
                return None
            parts.extend(sub)
        return parts
    if module == "qkv.scores" and name in ("alibi_bias", "soft_cap", "rel_bias"):
        return [mod]
    return None


def score_program(mod: ScoreMod | None) -> ScoreProgram | str:
    """The program for ``mod``, or a reason (str) why the kernels cannot apply it."""
    prog = ScoreProgram()
    if mod is None:
        return prog
    parts = _parts(mod)
    if parts is None:
        return (f"score_mod {mod.name} is a custom function (in-kernel: alibi, softcap, relative_bias "
                "and chain() of them)")
    tensor_index = 0
    for step, part in enumerate(parts):
        env = _closure(part.fn)
        name = part.fn.__name__
        if name == "alibi_bias":
            if prog.alibi:
                return "score_mod chains two ALiBi steps (at most one in-kernel)"
            prog.alibi = ALIBI_SYMMETRIC if env["symmetric"] else ALIBI
            prog.pos_alibi, prog.slopes_index = step, tensor_index
        elif name == "soft_cap":
            if prog.cap:
                return "score_mod chains two soft-caps (at most one in-kernel)"
            prog.cap, prog.pos_cap, prog.cap_value = 1, step, float(env["cap"])
        else:
            if prog.rel:
                return "score_mod chains two relative biases (at most one in-kernel)"
            prog.rel = REL_PER_HEAD if env["per_head"] else REL_SHARED
            max_distance = part.tensors[0].shape[-1] // 2  # the table is (H|, 2M + 1)
            prog.pos_rel, prog.table_index, prog.max_distance = step, tensor_index, max_distance
        tensor_index += len(part.tensors)
    return prog


def score_program_reason(mod: ScoreMod | None) -> str | None:
    prog = score_program(mod)
    return prog if isinstance(prog, str) else None
