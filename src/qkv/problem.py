"""One attention call, validated: the :class:`Problem` every backend receives.

:func:`make_problem` checks the arguments of :func:`qkv.attention` and raises ``TypeError`` /
``ValueError`` naming the argument and what was expected, so that no bad input reaches a backend
(no silent broadcasts, no IndexError from deep inside a kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import Tensor

from . import dropout as _dropout
from .layout import BlockLayout, cached_layout, tensor_state
from .masks import Mask, TileGrid, bind_mask, from_tensor
from .positions import Offset, Positions
from .scores import ScoreMod, as_score_mod

FLOAT_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


@dataclass(eq=False)
class Problem:
    """A validated attention call.

    Shapes: ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``, ``Hq % Hkv == 0``.
    ``mask`` is a bound :class:`~qkv.masks.Mask` or None; ``bias`` an additive float tensor
    broadcastable to ``(B, Hq, Nq, Nk)`` or None. ``positions`` (:class:`~qkv.positions.Positions`)
    place query rows and key columns; ``q_offset`` / ``k_offset`` are its offsets.
    """

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Mask | None = None
    bias: Tensor | None = None
    scale: float = 1.0
    score_mod: ScoreMod | None = None
    dropout_p: float = 0.0
    seed: int | None = None
    return_lse: bool = False
    positions: Positions | None = None
    mask_source: Mask | None = field(default=None, repr=False)  # the user's mask object (layout cache)
    #: values derived from this call and asked for more than once (its block layouts per tile
    #: size, flex's signature)
    memo: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.positions is None:
            self.positions = Positions.default(self.nq, self.nk)

    @property
    def q_offset(self) -> Offset:
        """Position of query row 0: an int, or ``(B,)`` int64 on :attr:`index_device`."""
        return self.positions.q_offset

    @property
    def k_offset(self) -> Offset:
        """Position of key column 0: an int, or ``(B,)`` int64 on :attr:`index_device`."""
        return self.positions.k_offset

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def q_heads(self) -> int:
        return self.q.shape[1]

    @property
    def kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group(self) -> int:
        """Query heads per key/value head (1 for MHA, ``Hq`` for MQA)."""
        return self.q_heads // self.kv_heads

    @property
    def nq(self) -> int:
        return self.q.shape[2]

    @property
    def nk(self) -> int:
        return self.k.shape[2]

    @property
    def head_dim(self) -> int:
        return self.q.shape[3]

    @property
    def v_dim(self) -> int:
        return self.v.shape[3]

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def compute_dtype(self) -> torch.dtype:
        """float64 stays float64; everything else accumulates in float32."""
        return torch.float64 if self.dtype == torch.float64 else torch.float32

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_empty(self) -> bool:
        """Nothing to compute: a zero-sized dimension (``Dv = 0`` only when no ``lse`` is asked for,
        since the log-sum-exp of the scores does not depend on ``Dv``)."""
        return 0 in (self.batch, self.q_heads, self.nq, self.nk) or (self.v_dim == 0 and not self.return_lse)

    @cached_property
    def requires_grad(self) -> bool:
        tensors = [self.q, self.k, self.v, self.bias, *(self.score_mod.tensors if self.score_mod else ())]
        return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)

    def layout(self, block_q: int, block_k: int) -> BlockLayout:
        """The mask's :class:`~qkv.layout.BlockLayout` for ``(block_q x block_k)`` tiles (all FULL
        without a mask). Kept per tile size for this call, and cached on the user's mask object
        across calls with the same shapes, positions and device (a model's layers share it)."""
        key = ("layout", block_q, block_k)
        if key not in self.memo:
            if self.mask is None:
                layout = BlockLayout.full(block_q, block_k, self.nq, self.nk, self.index_device)
            else:
                layout = self._mask_layout(block_q, block_k)
            self.memo[key] = layout
        return self.memo[key]

    def _mask_layout(self, block_q: int, block_k: int) -> BlockLayout:
        grid = TileGrid(self.nq, self.nk, block_q, block_k, self.index_device, self.positions)

        def build() -> BlockLayout:
            kinds = self.mask.block_kinds(grid, self.batch, self.q_heads)
            while kinds.dim() < 4:
                kinds = kinds.unsqueeze(0)
            return BlockLayout(kinds.to(self.index_device), block_q, block_k, self.nq, self.nk)

        where = self.positions.cache_key()
        if self.mask_source is None or where is None:
            return build()
        key = ("layout", self.batch, self.q_heads, block_q, block_k, where, str(self.index_device))
        return cached_layout(self.mask_source, key, build, self.mask_state)

    @cached_property
    def mask_state(self) -> tuple:
        """:func:`qkv.layout.tensor_state` of the mask object, read once per call (the dispatcher's
        remembered choice and the block layouts both key on it)."""
        return tensor_state(self.mask_source)

    def block_kinds(self, block_q: int, block_k: int) -> Tensor:
        """``(nQB, nKB)`` tile kinds merged over batch and heads, on the CPU:
        ``self.layout(block_q, block_k).merged()``."""
        return self.layout(block_q, block_k).merged()

    @property
    def index_device(self) -> torch.device:
        """Where masks and index tensors live (the data's device; CPU for meta tensors)."""
        return torch.device("cpu") if self.device.type == "meta" else self.device


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float64, float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must have 4 dims (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")


def _check_shapes(q: Tensor, k: Tensor, v: Tensor) -> None:
    (bq, hq, _, dq), (bk, hk, nk, dk), (bv, hv, nv, _) = q.shape, k.shape, v.shape
    if not bq == bk == bv:
        raise ValueError(f"q, k, v must share the batch size, got {bq}, {bk}, {bv}")
    if hk != hv:
        raise ValueError(f"k and v must have the same number of heads, got {hk} and {hv}")
    if nk != nv:
        raise ValueError(f"k and v must have the same sequence length, got {nk} and {nv}")
    if dq != dk:
        raise ValueError(f"q and k must have the same head_dim, got {dq} and {dk}")
    if hk == 0 or hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk}) (GQA/MQA)")
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def _split_mask(mask, q: Tensor, nk: int) -> tuple[Mask | None, Tensor | None]:
    """``mask`` -> (bool mask as a Mask, additive float bias)."""
    if mask is None or isinstance(mask, Mask):
        return mask, None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be None, a qkv Mask, a bool tensor or a float tensor, got {type(mask).__name__}")
    if mask.device != q.device:
        raise ValueError(f"mask is on {mask.device}, but q is on {q.device}")
    if mask.dtype == torch.bool:
        return from_tensor(mask), None
    if not mask.is_floating_point():
        raise TypeError(f"mask must be bool (True = may attend) or floating (added to the scores), got {mask.dtype}")
    if mask.dim() > 4:
        raise ValueError(f"mask: expected at most 4 dims (B, H, Nq, Nk), got shape {tuple(mask.shape)}")
    bias = mask
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    expected = (q.shape[0], q.shape[1], q.shape[2], nk)
    for size, want, name in zip(bias.shape, expected, ("batch", "heads", "Nq", "Nk")):
        if size not in (1, want):
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to (B, H, Nq, Nk) = "
                             f"{expected} ({name}: {size} vs {want})")
    return None, bias


def make_problem(q, k, v, mask=None, *, scale=None, score_mod=None, dropout_p=0.0, generator=None,
                 return_lse=False, q_offset=None, k_offset=0) -> Problem:
    """Validate the arguments of :func:`qkv.attention` and bundle them into a :class:`Problem`."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    _check_shapes(q, k, v)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None (1/sqrt(head_dim)), got {scale!r}")
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}")
    if not isinstance(return_lse, bool):  # a truthy 'yes' or tensor would change what is returned
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    batch, heads, nq, nk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    index_device = torch.device("cpu") if q.device.type == "meta" else q.device
    positions = Positions.make(batch, nq, nk, q_offset, k_offset, index_device)
    bool_mask, bias = _split_mask(mask, q, nk)
    mask_source = bool_mask
    if bool_mask is not None:
        bool_mask = bind_mask(bool_mask, batch, heads, nq, nk, index_device, positions)
    score_mod = as_score_mod(score_mod)
    if score_mod is not None:
        score_mod = score_mod.bind(batch, heads, nq, nk, q.device)
    seed = _dropout.draw_seed(generator, q.device) if dropout_p > 0 else None
    return Problem(q, k, v, mask=bool_mask, bias=bias, scale=float(scale), score_mod=score_mod,
                   dropout_p=float(dropout_p), seed=seed, return_lse=bool(return_lse), positions=positions,
                   mask_source=mask_source)
