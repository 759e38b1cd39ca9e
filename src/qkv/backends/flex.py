"""FlexAttention (``torch.nn.attention.flex_attention``), compiled, fed by qkv's own block view.

Flex fuses any mask and score modifier into one kernel (Triton on CUDA, C++ on CPU) and skips the
``128 x 128`` tiles its ``BlockMask`` marks empty. This adapter hands it what qkv already knows:

- the **mask** becomes a ``mask_mod(b, h, q_idx, kv_idx)``: Flex's row/column indices turned into
  qkv positions (:func:`positions`), then the mask's own ``allowed`` (the same broadcasting code
  the other backends run);
- the **BlockMask** comes from the mask's analytic block view, ``O(tiles)``, via
  ``BlockMask.from_kv_blocks`` (per batch and head where the mask differs), never from
  ``create_block_mask``'s evaluation of the mask on every score;
- **score modifiers** and an additive **bias** become a ``score_mod``; their tensors are captured
  by the closure, so Flex returns their gradients (CUDA; Flex has no backward on CPU).

No recompilation storms: one compiled function serves every problem of a kind. The numbers a mask
holds (window sizes, lengths, document ids, offsets) are tensors the compiled code reads, and
shapes are dynamic, so new values or a new sequence length reuse the compiled kernel.
:func:`compile_count` counts the compilations; :meth:`FlexBackend.compile_pending` says whether a
problem would trigger one, and the estimate charges it (amortised over :data:`AMORTIZE_CALLS`), so
small one-off calls never wait for a compile.
"""

from __future__ import annotations

import contextlib
import copy
import math
import types
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..layout import KvBlocks
from ..masks import EMPTY, PARTIAL, GlobalTokens, Mask
from ..positions import Positions
from ..problem import Problem
from ..scores import ScoreMod
from . import costs
from .flex_cpu_fix import fixed_cpu_template

#: Flex's tile: the BlockMask's ``BLOCK_SIZE`` (its default), and the tiles of qkv's block view.
BLOCK = 128

#: A compile is charged to the estimate divided by this many calls: the number of times a compiled
#: kernel is assumed to be reused (a model's layers times its steps). A small problem whose
#: saving per call is below ``compile_seconds / AMORTIZE_CALLS`` never triggers a compile.
AMORTIZE_CALLS = 100

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention import flex_attention as _flex_module
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
except ImportError:  # pragma: no cover - old torch
    _flex_module = BlockMask = flex_attention = None

_AuxRequest = getattr(_flex_module, "AuxRequest", None)  # torch >= 2.9: return_lse is deprecated


# --------------------------------------------------------------------------------------------
# Positions, masks and score modifiers as Flex's functions
# --------------------------------------------------------------------------------------------


def positions(problem: Problem) -> tuple[Tensor, Tensor]:
    """``(q_offset, k_offset)``, each ``(B,)`` int64 on the index device: query row ``i`` of batch
    ``b`` sits at position ``q_offset[b] + i``, key column ``j`` at ``k_offset[b] + j``."""
    pos = _tensor_positions(problem.positions, problem.batch, problem.index_device)
    return pos.q_offset, pos.k_offset


def _dynamic(t: Tensor) -> Tensor:
    """Ask torch.compile not to specialise on ``t``'s sizes (it still may, on sizes 0 and 1)."""
    for dim in range(t.dim()):
        torch._dynamo.maybe_mark_dynamic(t, dim)
    return t


class _GlobalFlags(Mask):
    """:class:`~qkv.masks.GlobalTokens` as Flex can compile it: a flag per position (a table
    lookup; ``searchsorted`` cannot be lowered into Flex's mask subgraph)."""

    def __init__(self, indices: Tensor, device):
        size = int(indices.max()) + 2 if indices.numel() else 1  # the last slot: "not global"
        self.flags = torch.zeros(size, dtype=torch.bool, device=device)
        self.flags[indices.to(device)] = True
        self.last = torch.tensor(size - 1, dtype=torch.int64, device=device)

    def _flag(self, pos: Tensor) -> Tensor:
        return self.flags[torch.where((pos < 0) | (pos > self.last), self.last, pos)]

    def allowed(self, b, h, q, k):
        return self._flag(q) | self._flag(k)


def _tensor_positions(positions: Positions, batch: int, device) -> Positions:
    offsets = [_dynamic(torch.as_tensor(o, dtype=torch.int64, device=device).reshape(-1).expand(batch).contiguous())
               for o in (positions.q_offset, positions.k_offset)]
    return Positions(positions.nq, positions.nk, offsets[0], offsets[1], positions.explicit)


def tensorized(mask: Mask, device, batch: int = 1) -> Mask:
    """A copy of a bound built-in mask whose int parameters (window sizes, offsets, table sizes,
    its positions) are tensors: the compiled function reads them instead of baking them in as
    constants, so changing them does not recompile. User-defined masks are left as they are."""
    parts = getattr(mask, "parts", None)
    if parts is not None:
        combined = copy.copy(mask)
        combined.parts = tuple(tensorized(m, device, batch) for m in parts)
        return combined
    if isinstance(mask, GlobalTokens):
        return _GlobalFlags(mask.indices, device)
    if type(mask).__module__ not in ("qkv.masks", "qkv.sparse_patterns"):
        return mask
    fields = {}
    for name, value in vars(mask).items():
        if isinstance(value, Tensor):
            _dynamic(value)
        elif isinstance(value, Positions):
            fields[name] = _tensor_positions(value, batch, device)
        elif isinstance(value, int) and not isinstance(value, bool):
            fields[name] = torch.tensor(value, dtype=torch.int64, device=device)
    if not fields:
        return mask
    copied = copy.copy(mask)
    copied.__dict__.update(fields)
    return copied


def mask_mod(problem: Problem, offsets: tuple[Tensor, Tensor] | None = None):
    """Flex ``mask_mod(b, h, q_idx, kv_idx) -> bool`` for the problem's mask (None without one);
    ``offsets``: :func:`positions`' tensors, if already made."""
    if problem.mask is None:
        return None
    mask = tensorized(problem.mask, problem.index_device, problem.batch)
    q_off, k_off = offsets if offsets is not None else positions(problem)

    def qkv_mask(b, h, q_idx, kv_idx):
        return mask.allowed(b, h, q_idx + q_off[b], kv_idx + k_off[b])

    return qkv_mask


def score_mod(problem: Problem, offsets: tuple[Tensor, Tensor] | None = None):
    """Flex ``score_mod(score, b, h, q_idx, kv_idx) -> score`` for the problem's score modifier
    and additive bias (None if it has neither). Their tensors are captured, so they get gradients."""
    p = problem
    mod, bias = p.score_mod, p.bias
    if mod is None and bias is None:
        return None
    q_off, k_off = offsets if offsets is not None else positions(p)
    tensors = mod.tensors if mod is not None else ()
    if bias is not None:  # a stride-0 view, indexed per score like the other tensors
        bias = bias.expand(p.batch, p.q_heads, p.nq, p.nk)

    def qkv_score(score, b, h, q_idx, kv_idx):
        if mod is not None:
            score = mod.apply(tensors, score, b, h, q_idx + q_off[b], kv_idx + k_off[b])
        if bias is not None:
            score = score + bias[b, h, q_idx, kv_idx].to(score.dtype)
        return score

    return qkv_score


# --------------------------------------------------------------------------------------------
# The BlockMask, from qkv's block view
# --------------------------------------------------------------------------------------------


def tile_kinds(problem: Problem) -> Tensor:
    """``(B|1, H|1, nQB, nKB)`` int8 tile kinds at Flex's tile size (core's cached layout)."""
    return problem.layout(BLOCK, BLOCK).kinds


def kv_blocks(problem: Problem) -> KvBlocks:
    """qkv's block view of the problem's mask as Flex's block lists (``from_kv_blocks``'s
    arguments), per batch and head where it differs."""
    return problem.layout(BLOCK, BLOCK).kv_blocks()


@dataclass(frozen=True)
class FlexInputs:
    """What a Flex call needs besides ``q, k, v`` and the ``score_mod``, built once per block
    layout: the ``BlockMask`` (its ``mask_mod`` included) and the position offsets ``(B,)`` int64
    that ``score_mod`` reads (tensors of their own: inductor's CPU template fails to compile when
    the mask and score graphs capture the same tensor)."""

    block_mask: BlockMask
    score_offsets: tuple[Tensor, Tensor]


def flex_inputs(problem: Problem) -> FlexInputs:
    """The problem's :class:`FlexInputs`, kept on its block layout (:meth:`BlockLayout.kept`): the
    layout is cached on the user's mask object, so a model's layers and steps, which pass the same
    mask with the same shapes and positions, build the BlockMask once instead of per call."""
    layout = problem.layout(BLOCK, BLOCK)
    return layout.kept(("flex", problem.requires_grad), lambda: _build_inputs(problem, layout))


def _build_inputs(problem: Problem, layout) -> FlexInputs:
    blocks = layout.kv_blocks()
    # Contiguous (the layout may hand out views) and of dynamic size: no guard on strides or sizes.
    tables = [_dynamic(t.contiguous()) for t in (blocks.kv_num_blocks, blocks.kv_indices,
                                                  blocks.full_kv_num_blocks, blocks.full_kv_indices)]
    block_mask = BlockMask.from_kv_blocks(
        *tables,
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod(problem), seq_lengths=(problem.nq, problem.nk),
        compute_q_blocks=problem.requires_grad)
    return FlexInputs(block_mask, positions(problem))


def block_mask(problem: Problem) -> BlockMask:
    """The problem's ``BlockMask``, built from its block view in ``O(tiles)`` (and kept, see
    :func:`flex_inputs`)."""
    return flex_inputs(problem).block_mask


def all_finite(t: Tensor) -> bool:
    """Are all of ``t``'s values finite? One reduction (a sum in float32, float64 for float64,
    without a temporary the size of ``t``); only when the sum is not finite (a NaN/inf, or an
    overflow) is every value checked."""
    total = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32).item()
    return math.isfinite(total) or bool(torch.isfinite(t).all())


# --------------------------------------------------------------------------------------------
# The compiled call, and counting its compilations
# --------------------------------------------------------------------------------------------

_GRAPHS = [0]


def compile_count() -> int:
    """How many compiled versions of qkv's Flex functions exist in this process: one per problem
    kind, plus one per recompilation (dynamo's cache entries; graphs handed to inductor where
    that is not available)."""
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    except ImportError:  # pragma: no cover
        return _GRAPHS[0]
    return sum(len(_debug_get_cache_entry_list(code)) for code in _CODES)


def _counting_inductor(graph, example_inputs):
    from torch._inductor.compile_fx import compile_fx

    _GRAPHS[0] += 1
    return compile_fx(graph, example_inputs)


def kernel_options(device_type: str, nq: int, nk: int) -> dict | None:
    """Flex's ``kernel_options`` for a call. On CUDA, with both lengths multiples of
    :data:`BLOCK`: ``IS_DIVISIBLE``, the kernel without bounds checks on its loads and masks.
    Inductor decides that flag from the lengths only where they are static; qkv compiles with
    dynamic lengths, so it would always take the checked kernel, which Flex called directly at a
    length such as 8192 does not. The flag is part of a problem's kind (:func:`signature`): at
    most one more compile per kind, never a kernel without checks on a length that needs them."""
    if device_type == "cuda" and nq % BLOCK == 0 and nk % BLOCK == 0:
        return {"IS_DIVISIBLE": True}
    return None


def _call_flex(q, k, v, score_mod, block_mask, scale, enable_gqa, return_lse, options=None):
    if not return_lse:
        return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa, kernel_options=options), None
    if _AuxRequest is not None:
        out, aux = flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                  enable_gqa=enable_gqa, kernel_options=options, return_aux=_AuxRequest(lse=True))
        return out, aux.lse
    return flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                          enable_gqa=enable_gqa, kernel_options=options, return_lse=True)


#: One compiled function per problem kind (:func:`signature`), each with its own code object, so
#: that dynamo's recompile limit (per code object) counts the recompilations of one kind only.
_COMPILED: dict[tuple, object] = {}
_CODES: list = []
#: Kinds that have run compiled in this process (their kernels are ready).
_READY: set[tuple] = set()
#: Ski rental: per kind, the seconds other backends spent beyond flex's estimate on auto calls.
_CREDIT: dict[tuple, float] = {}
#: Kinds whose first compiled call failed (a mask or score modifier Flex cannot lower), and why.
_FAILED: dict[tuple, str] = {}


def _specialise(problem: Problem):
    """Settings for a compiled Flex call, as a context to run it in. On the CPU, torch's C++
    template gets :mod:`~qkv.backends.flex_cpu_fix`'s naming fix (for every kind: any captured
    tensor of dynamic size can trip it). With a score modifier there, too, the modifier's tables
    are marked static and the floats it reads become constants of the kernel: torch 2.13's CPU
    Flex template cannot lower a float it is handed as a symbol (every softcap failed with
    "unbacked_bindings"), nor some table sizes. Floats are part of a problem's kind already
    (:func:`signature` keys them by value), so this costs no recompiles; it is set for every call
    of such a kind, not just the first, so that a recompile is made the same way. The float
    setting costs ~25-45 µs a call on the 2-core CPU (>= 1.3 ms a call), so calls without a
    modifier go without it; CUDA (Triton) needs none of this (docs/attention.md)."""
    if problem.device.type != "cpu":
        return contextlib.nullcontext()
    if problem.score_mod is None:
        return fixed_cpu_template()
    return _specialised_modifier(problem.score_mod)


@contextlib.contextmanager
def _specialised_modifier(mod: ScoreMod):
    for t in mod.tensors:
        torch._dynamo.mark_static(t)
    with fixed_cpu_template(), torch._dynamo.config.patch(specialize_float=True):
        yield


def _compiled_for(sig: tuple):
    fn = _COMPILED.get(sig)
    if fn is None:
        code = _call_flex.__code__.replace(co_name=f"_call_flex_{len(_COMPILED)}")
        fresh = types.FunctionType(code, _call_flex.__globals__, code.co_name)
        _CODES.append(code)
        fn = _COMPILED[sig] = torch.compile(fresh, dynamic=True, backend=_counting_inductor)
    return fn


def _value_key(value):
    """What dynamo specialises on in a value a user function reads: tensors by dtype, rank and
    autograd; functions by code; Python constants by value."""
    if isinstance(value, Tensor):
        return ("tensor", value.dtype, value.dim(), value.requires_grad)
    if isinstance(value, ScoreMod):
        return _code_key(value.fn)
    if isinstance(value, (list, tuple)):
        return tuple(_value_key(x) for x in value)
    if callable(value):
        return _code_key(value)
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    return type(value)


def _code_key(fn) -> tuple:
    """A user function's code and the values its closure holds."""
    cells = tuple(_value_key(c.cell_contents) for c in getattr(fn, "__closure__", None) or ())
    return (getattr(fn, "__code__", fn), cells)


def _mask_key(mask) -> tuple:
    if mask is None:
        return ()
    parts = getattr(mask, "parts", None)
    if parts is not None:
        return (type(mask), tuple(_mask_key(m) for m in parts))
    fields = []
    for name, value in sorted(vars(mask).items()):
        if isinstance(value, Tensor):
            fields.append((name, value.dtype, value.dim(), tuple(s == 1 for s in value.shape)))
        elif isinstance(value, bool) or value is None:
            fields.append((name, value))
        elif callable(value):
            fields.append((name, _code_key(value)))
    return (type(mask), tuple(fields))


def signature(problem: Problem) -> tuple:
    """What the compiled function is specialised on (dtypes, head dims, grouping, autograd, lse,
    scale, the mask's and score modifier's structure, on CUDA whether the lengths are multiples of
    :data:`BLOCK`), but not on sizes or mask values. Computed
    once per problem (the dispatcher asks several times)."""
    p = problem
    sig = p.memo.get("flex_signature")
    if sig is None:
        sig = p.memo["flex_signature"] = _signature(p)
    return sig


def _signature(p: Problem) -> tuple:
    mod = p.score_mod
    return (p.device.type, p.dtype, p.head_dim, p.v_dim, p.group > 1, p.requires_grad, p.return_lse, p.scale,
            _mask_key(p.mask), None if mod is None else (_code_key(mod.fn), tuple(t.requires_grad for t in mod.tensors)),
            None if p.bias is None else (p.bias.dtype, p.bias.requires_grad),
            kernel_options(p.device.type, p.nq, p.nk) is not None)


# --------------------------------------------------------------------------------------------
# Cost model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rates:
    """Seconds per visited score (fixed part, and per unit of ``D + Dv``), extra per score of a
    partial tile (the mask evaluated: a fixed part and one per unit of the mask's
    :attr:`~qkv.masks.Mask.work`), extra per visited score per unit of the score modifier's
    :attr:`~qkv.scores.ScoreMod.work`, per call (Python, the kernel's set-up), the backward/forward
    ratio, the unfused path's seconds per score, and one compilation (forward; with backward).
    CPU rates are one thread's (see :mod:`qkv.backends.costs`)."""

    score: float
    score_per_dim: float
    partial_score: float
    call: float
    backward: float
    unfused_score: float
    compile_forward: float
    compile_backward: float
    partial_per_work: float = 0.0
    mod_per_work: float = 0.0


#: CPU, AVX2 (``"cpu"``): fitted on 2026-12-01 on 2 vCPUs of an AMD EPYC with AVX2, torch 2.13,
#: B=1 H=4 D=64 float32, to one-thread CPU times of compiled Flex's forward (through qkv; Flex
#: called directly took the same) in ``benchmarks/results/attention_speed_cpu.json``: 26 ns per
#: visited score at every mask and N = 1k-16k (twice tiled's, three times SDPA's: inductor's CPU
#: template is far slower without AVX-512), ~1.3 ms per call, little more on partial tiles except
#: for masks that do much work per score (window | global tokens: +5 ns). A score modifier, fused
#: into the kernel (``benchmarks/score_mod_cost.py``, one thread, N = 1k-2k, full and causal): ALiBi
#: +1.5-1.8 ns per visited score, a user ``q - k`` function +1.7-2.2, relative bias +3.9-4.4, soft
#: cap +7-7.4 (``tanh``, counted as 3 of its 5 units of work): ~0.8 ns per unit of work, against
#: tiled's ~1.4.
#: AVX-512's modifier rate is not measured (the AVX2 one scaled by the ``score`` rates); on CUDA a
#: few operations per score are taken to be free beside the two matrix products.
#: CPU, AVX-512 (``"cpu-avx512"``): fitted on 2026-11-23 on 2 cores with AVX-512 to
#: ``attention_speed_cpu.json`` of then (causal, windows and documents at N = 1k..16k: 1.6-1.7 ns per
#: visited score on two threads, here doubled to one thread's).
#: Compiling one kind took 6-20 s on these machines (less with inductor's on-disk cache warm).
#: CUDA: from the H200 measurements in ``shared/gpu`` (bf16, B=2, H=16, N=8192, D=128: 387 / 304 /
#: 346 TFLOP/s forward on causal / window 1024 / documents, i.e. ~1.4e-12 s per visited score;
#: forward+backward 3.6x the forward); the compile times there are estimates, not measurements.
RATES = {
    "cpu": Rates(score=5.0e-9, score_per_dim=0.166e-9, partial_score=0.0, call=1.25e-3, backward=2.5,
                 unfused_score=50e-9, compile_forward=10.0, compile_backward=30.0, partial_per_work=1.0e-9,
                 mod_per_work=0.8e-9),
    "cpu-avx512": Rates(score=0.6e-9, score_per_dim=0.02e-9, partial_score=1.0e-9, call=0.8e-3, backward=2.5,
                        unfused_score=16e-9, compile_forward=10.0, compile_backward=30.0, mod_per_work=0.1e-9),
    "cuda": Rates(score=0.2e-12, score_per_dim=4.7e-15, partial_score=0.3e-12, call=1.5e-4, backward=2.6,
                  unfused_score=5e-12, compile_forward=10.0, compile_backward=30.0),
}


def _rates(problem: Problem) -> Rates:
    return RATES.get(costs.device_key(problem.device), RATES["cpu"])


def visited_scores(problem: Problem) -> tuple[int, int]:
    """Scores Flex computes (in non-empty tiles) and those of them in partial tiles, over all
    batch elements and heads (counted once per block layout, see :meth:`BlockLayout.kept`)."""
    p = problem
    if p.mask is None or p.nq * p.nk <= costs.SMALL_PROBLEM_SCORES:  # small: no block view needed
        return p.batch * p.q_heads * p.nq * p.nk, 0
    layout = p.layout(BLOCK, BLOCK)
    return layout.kept(("flex visited", p.batch, p.q_heads), lambda: _count_visited(p, layout.kinds))


def _count_visited(p: Problem, kinds: Tensor) -> tuple[int, int]:
    rows = torch.clamp(p.nq - torch.arange(kinds.shape[2]) * BLOCK, max=BLOCK)
    cols = torch.clamp(p.nk - torch.arange(kinds.shape[3]) * BLOCK, max=BLOCK)
    area = (rows[:, None] * cols[None, :]).to(kinds.device)
    repeat = (p.batch // kinds.shape[0]) * (p.q_heads // kinds.shape[1])
    visited = int(area.mul(kinds != EMPTY).sum()) * repeat
    partial = int(area.mul(kinds == PARTIAL).sum()) * repeat
    return visited, partial


def compile_seconds(problem: Problem) -> float:
    r = _rates(problem)
    return r.compile_backward if problem.requires_grad else r.compile_forward


def estimate_seconds(problem: Problem, compiled: bool = True) -> float:
    """Rough run time of one call (compilation excluded)."""
    p, r = problem, _rates(problem)
    if not compiled:
        t = p.batch * p.q_heads * p.nq * p.nk * r.unfused_score * (p.head_dim + p.v_dim) / 128
    else:
        visited, partial = visited_scores(p)
        work = p.mask.work if p.mask is not None else 0.0
        t = (visited * (r.score + r.score_per_dim * (p.head_dim + p.v_dim) + r.mod_per_work * costs.score_mod_work(p))
             + partial * (r.partial_score + r.partial_per_work * work))
    t = t * (1 + r.backward) if p.requires_grad else t
    return r.call + t / costs.parallel(p)


# --------------------------------------------------------------------------------------------
# The backend
# --------------------------------------------------------------------------------------------


class FlexBackend:
    """qkv problems through FlexAttention. ``compiled=False`` runs Flex's own unfused math (the
    same semantics, scores materialised; what most tests use, since compiling is slow on CPU)."""

    def __init__(self, compiled: bool = True, name: str = "flex"):
        self.compiled, self.name = compiled, name

    def unsupported(self, problem: Problem) -> list[str]:
        p = problem
        reasons = []
        if flex_attention is None:
            return ["torch has no torch.nn.attention.flex_attention (torch >= 2.5 needed)"]
        if p.dropout_p > 0:
            reasons.append("dropout_p > 0: FlexAttention has no dropout")
        if p.device.type == "meta":
            reasons.append("meta tensors: nothing to run")
        elif p.device.type not in ("cpu", "cuda"):
            reasons.append(f"device {p.device.type}: qkv runs FlexAttention on CPU and CUDA only")
        if p.device.type == "cpu" and p.requires_grad:
            reasons.append("backward on CPU: FlexAttention has no CPU backward")
        if p.device.type == "cuda" and p.dtype == torch.float64:
            reasons.append("float64 on CUDA: FlexAttention's Triton kernels take float32/bfloat16/float16")
        if self.compiled and _FAILED:
            why = _FAILED.get(signature(p))
            if why:
                reasons.append(why)
        if self.compiled and p.device.type == "cpu":
            if p.dtype == torch.float64:
                reasons.append("float64 on CPU: compiled FlexAttention takes float32/bfloat16/float16")
            if p.return_lse:
                reasons.append("return_lse on CPU: compiled FlexAttention does not return the log-sum-exp there")
        if p.device.type == "cuda" and min(p.head_dim, p.v_dim) < 16:
            reasons.append(f"head dims D={p.head_dim}, Dv={p.v_dim}: FlexAttention's Triton kernels need >= 16")
        if p.device.type == "cuda" and max(p.head_dim, p.v_dim) > 256:
            reasons.append(f"head dims D={p.head_dim}, Dv={p.v_dim}: FlexAttention's Triton kernels take <= 256")
        return reasons

    def compile_pending(self, problem: Problem) -> bool:
        """Would running ``problem`` compile first (its kind not yet run compiled in this process)?"""
        return self.compiled and signature(problem) not in _READY

    def rent(self, problem: Problem) -> float:
        """The part of a pending compile not yet earned back (ski rental, see :meth:`observe`)."""
        if not self.compile_pending(problem):
            return 0.0
        return max(0.0, compile_seconds(problem) - _CREDIT.get(signature(problem), 0.0))

    def estimate(self, problem: Problem) -> float:
        return estimate_seconds(problem, self.compiled) + self.rent(problem)

    def observe(self, problem: Problem, estimates: dict[str, float | None], chosen: str) -> None:
        """Called by the dispatcher after an automatic choice. Ski rental: when another backend
        ran although compiled Flex would have been faster, the difference is credited to this
        problem's kind; once the credit covers the compile, the next such call compiles. Repeated
        calls thus reach Flex's speed after paying at most about twice the compile time, while a
        one-off call compiles only if it alone saves more than the compile costs."""
        if chosen == self.name or not self.compile_pending(problem) or estimates.get(self.name) is None:
            return
        others = [e for n, e in estimates.items() if e is not None and n != self.name]
        saved = min(others) - estimate_seconds(problem, self.compiled) if others else 0.0
        if saved > 0:
            sig = signature(problem)
            _CREDIT[sig] = _CREDIT.get(sig, 0.0) + saved

    def note(self, problem: Problem) -> str:
        """A remark for ``explain_dispatch``: the run estimate and whether a compile is pending."""
        run = estimate_seconds(problem, self.compiled)
        if not self.compiled:
            return f"unfused (run ~{run * 1e3:.3g} ms)"
        if self.compile_pending(problem):
            return (f"run ~{run * 1e3:.3g} ms + compile pending ~{compile_seconds(problem):.0f} s, "
                    f"{self.rent(problem):.3g} s of it not yet earned back; {compile_count()} compiles so far")
        return f"run ~{run * 1e3:.3g} ms, compiled ({compile_count()} compiles so far)"

    def run(self, problem: Problem) -> tuple[Tensor, Tensor | None]:
        p = problem
        inputs = flex_inputs(p)
        if p.mask is not None and not all_finite(p.v):
            # Flex multiplies every weight of a partial tile by its value, so a NaN/inf value at a
            # hidden key (garbage in a padded batch or an unused cache slot) would reach the output
            # as 0 * NaN. The tiled backend keeps such values out (docs/attention.md, Guarantees).
            from .tiled import TiledBackend

            return TiledBackend().run(p)
        sig = signature(p) if self.compiled else None
        call = _compiled_for(sig) if self.compiled else _call_flex
        settings = _specialise(p) if self.compiled else contextlib.nullcontext()
        if self.compiled:  # sizes vary between calls: no specialisation (0/1 are special anyway)
            for t in (p.q, p.k, p.v):
                torch._dynamo.maybe_mark_dynamic(t, 0)
                torch._dynamo.maybe_mark_dynamic(t, 2)
            if p.bias is not None:
                _dynamic(p.bias)
        args = (p.q, p.k, p.v, score_mod(p, inputs.score_offsets), inputs.block_mask, p.scale, p.group > 1,
                p.return_lse, kernel_options(p.device.type, p.nq, p.nk))
        if sig in _READY:  # compiled before: Flex's warnings were given (and silenced) at tracing
            with settings:
                out, lse = call(*args)
            return out, (None if lse is None else lse.to(p.compute_dtype))
        try:
            with warnings.catch_warnings(), settings:
                warnings.filterwarnings("ignore", message=".*flex_attention.*")
                warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
                out, lse = call(*args)
        except Exception as err:  # noqa: BLE001 - the first compiled call of a kind may fail to lower
            if not self.compiled or sig in _READY:
                raise
            lines = [line for line in str(err).splitlines() if line.strip()]
            _FAILED[sig] = ("FlexAttention could not compile this kind of problem "
                            f"({type(err).__name__}: {lines[0][:160] if lines else ''})")
            warnings.warn(f"qkv flex backend: {_FAILED[sig]}; this call runs on 'tiled', and auto will not "
                          "pick flex for it again", RuntimeWarning, stacklevel=2)
            from .tiled import TiledBackend

            return TiledBackend().run(p)
        if self.compiled:
            _READY.add(sig)
        if lse is not None:
            lse = lse.to(p.compute_dtype)
        return out, lse


__all__ = ["FlexBackend", "FlexInputs", "BLOCK", "AMORTIZE_CALLS", "compile_count", "flex_inputs", "block_mask",
           "kernel_options",
           "mask_mod", "score_mod", "kv_blocks", "positions", "tensorized", "signature", "all_finite"]
