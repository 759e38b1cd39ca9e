"""Tile configurations and the autotuning cache (no triton import at module level).

Each kernel direction (``fwd``, ``bwd``, ``decode``) has a few candidate configurations per head
dim. On CUDA the first call for a key (device, direction, D, Dv, dtype, mask class, score class,
and dropout for training, paged layout and stacked rows for decode) times each candidate on that
call's problem (``triton.testing.do_bench``) and caches the fastest for the process; later calls
with the same key reuse it (masks of one class share it whatever their sizes).
``QKV_TRITON_AUTOTUNE=0`` takes each list's first entry. Under ``TRITON_INTERPRET=1`` timing is
meaningless: one small configuration is used.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Config:
    """Tile sizes and launch options. ``block_m`` is unused by the decode kernel (its tile holds the
    stacked query rows, ``G * Nq``)."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2


#: The interpreter's only configuration: small tiles, so tests at tiny sizes cross many tiles.
INTERPRETER = Config(16, 16, 1, 1)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def candidates(direction: str, head_dim: int, float32: bool = False) -> list[Config]:
    """Candidate configurations (the largest head dim of q/k and v decides). float32 inputs take
    IEEE-precision dots, which need far more registers per tile: smaller tiles."""
    if interpreting():
        return [INTERPRETER]
    if direction == "decode":  # memory-bound: keys per tile, warps and pipelining stages
        if float32:
            return [Config(0, 32, 4, 2), Config(0, 16, 4, 2), Config(0, 32, 8, 3)]
        if head_dim <= 128:
            return [Config(0, 64, 4, 2), Config(0, 128, 8, 2), Config(0, 64, 4, 3), Config(0, 32, 4, 3)]
        return [Config(0, 32, 4, 2), Config(0, 64, 8, 2), Config(0, 16, 4, 3)]
    if float32:
        if direction == "fwd" and head_dim <= 64:
            return [Config(64, 32, 4, 2), Config(32, 32, 4, 2), Config(64, 64, 8, 2)]
        return [Config(32, 32, 4, 1), Config(64, 32, 8, 1), Config(32, 16, 4, 1)]
    if direction == "fwd":
        if head_dim <= 64:
            return [Config(128, 64, 4, 3), Config(128, 128, 8, 3), Config(64, 64, 4, 3)]
        if head_dim <= 128:
            return [Config(128, 64, 8, 3), Config(128, 32, 4, 3), Config(64, 64, 4, 3), Config(128, 128, 8, 2)]
        if head_dim <= 256:
            return [Config(64, 64, 4, 2), Config(64, 32, 4, 2), Config(128, 32, 8, 2)]
        return [Config(32, 32, 4, 1), Config(64, 32, 8, 1), Config(32, 16, 4, 1)]
    if head_dim <= 64:
        return [Config(64, 64, 4, 2), Config(128, 64, 8, 2), Config(64, 128, 8, 2)]
    if head_dim <= 128:
        return [Config(64, 64, 8, 2), Config(64, 64, 4, 2), Config(32, 64, 4, 2), Config(128, 64, 8, 2)]
    return [Config(32, 32, 4, 1), Config(64, 32, 8, 1), Config(32, 64, 8, 1)]


_CACHE: dict[tuple, Config] = {}

_DETERMINISTIC = os.environ.get("QKV_TRITON_DETERMINISTIC", "1") != "0"


def set_deterministic(enabled: bool) -> None:
    """The backward's mode. True (the default; ``QKV_TRITON_DETERMINISTIC=0`` starts with False):
    a ``dq`` kernel and a ``dk``/``dv`` kernel, each output tile written once by one program, so
    gradients are bit-identical run to run. False: one kernel, ``dq`` accumulated with float32
    atomic adds from every key tile (no second pass over the scores; the order of the additions,
    and so the last bits, vary run to run). ``torch.use_deterministic_algorithms(True)`` keeps the
    deterministic mode whatever this says; so do score modifiers whose tensors need gradients."""
    global _DETERMINISTIC
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    _DETERMINISTIC = enabled


def deterministic() -> bool:
    """Whether the backward runs in its deterministic mode (see :func:`set_deterministic`)."""
    import torch

    return _DETERMINISTIC or torch.are_deterministic_algorithms_enabled()


def pick(key: tuple, options: list[Config], run: Callable[[Config], None]) -> Config:
    """The cached best of ``options`` for ``key``; times them with ``run(config)`` on a miss."""
    if len(options) == 1 or os.environ.get("QKV_TRITON_AUTOTUNE", "1") == "0":
        return options[0]
    if key in _CACHE:
        return _CACHE[key]
    from triton.testing import do_bench

    times, error = {}, None
    for cfg in options:
        try:
            times[cfg] = do_bench(lambda: run(cfg), warmup=3, rep=10)
        except Exception as err:  # e.g. out of shared memory for this tile size on this device
            error = err
    if not times:
        raise RuntimeError(f"triton backend: no tile configuration ran for {key}") from error
    _CACHE[key] = best = min(times, key=times.get)
    return best


def cached() -> dict[tuple, Config]:
    """The configurations chosen so far (for benchmark result files)."""
    return dict(_CACHE)


def patch_interpreter() -> None:
    """Make Triton 3.6's interpreter usable with NumPy >= 2.3 (interpreter only, tests only).

    The interpreter holds scalars as 1-element arrays and turns them into loop bounds with
    ``int(array)``, which NumPy 2.3 made an error: ``range(0, n)`` over a loaded count fails.
    This re-points that one conversion at ``array.item()``. Compiled kernels are not affected."""
    if not interpreting():
        return
    from triton.runtime import interpreter

    if getattr(interpreter, "_qkv_patched", False):
        return
    original = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patch_lang_tensor
    interpreter._qkv_patched = True
