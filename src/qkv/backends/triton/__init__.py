"""The ``triton`` backend: qkv's own GPU kernels (forward, deterministic backward, split-KV decode).

Importing this package does not import Triton: :class:`TritonBackend` says why it cannot run
(no Triton, no CUDA device, ...) without it, and the kernels (:mod:`.kernels`, :mod:`.launch`,
:mod:`.decode`) are imported on first use. On CPU the kernels run only under ``TRITON_INTERPRET=1``
(set before Python starts), for tests; the dispatcher then never picks them on its own.

See ``docs/triton.md`` for the design: tile lists from the block view per batch and head, masks as
small in-kernel programs with runtime parameters, score modifiers and dropout in-kernel.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import Tensor

from ...problem import Problem
from ..capabilities import Capabilities, reasons
from .configs import deterministic, interpreting, set_deterministic
from .programs import mask_program, score_program

#: Largest head dim (of q/k and of v) the kernels serve with gradients, and forward only.
MAX_HEAD_DIM_BACKWARD = 256
MAX_HEAD_DIM_FORWARD = 512

#: Guessed CUDA rates (seconds per visited score, fixed + per unit of D + Dv; per partial score;
#: per launch), set a little above SDPA's so that dense problems and decode stay on SDPA until measured.
_SCORE, _SCORE_PER_DIM, _PARTIAL_SCORE, _LAUNCH, _BACKWARD = 2.4e-13, 2.4e-15, 1.0e-13, 8e-6, 2.5
_BYTES_PER_SECOND = 2.5e12  # reading K and V once (decode is bandwidth-bound)


@functools.cache
def triton_available() -> bool:
    """Is Triton installed? Looked up once (a search of the import path costs ~0.1 ms, and the
    dispatcher asks on every call)."""
    return importlib.util.find_spec("triton") is not None


class PagedUnsupported(ValueError):
    """:func:`paged_attention` / :class:`~.decode.PagedDecode` do not serve these arguments (the
    message says why: dtype, device, mask, score modifier, too many stacked query rows); a caller
    with another path (a ``PagedBatch`` step gathering its pages) takes that one."""


class TritonBackend:
    """qkv's Triton kernels (see module docstring)."""

    name = "triton"

    @property
    def capabilities(self) -> Capabilities:
        """CUDA devices (and the CPU under ``TRITON_INTERPRET=1``), float32/bf16/fp16, head dims up
        to 512 (256 with gradients: checked in :meth:`unsupported`), no bias tensors."""
        return Capabilities(
            dtypes=(torch.float32, torch.bfloat16, torch.float16),
            devices=("cuda", "cpu") if interpreting() else ("cuda",),
            head_dims=(1, MAX_HEAD_DIM_FORWARD), bias=False,
            why={"device": "Triton kernels run on CUDA devices (on CPU only under TRITON_INTERPRET=1)",
                 "bias": "an additive bias tensor is not applied in-kernel; use a bool mask or a score_mod"})

    def unsupported(self, problem: Problem) -> list[str]:
        p = problem
        if not triton_available():
            return ["Triton is not installed (pip install 'qkv[triton]')"]
        out = reasons(self.capabilities, p)
        dims = max(p.head_dim, p.v_dim)
        if MAX_HEAD_DIM_BACKWARD < dims <= MAX_HEAD_DIM_FORWARD and p.requires_grad:
            out.append(f"backward: gradients for head dims up to {MAX_HEAD_DIM_BACKWARD}, got {dims} (forward "
                       f"serves up to {MAX_HEAD_DIM_FORWARD})")
        prog = score_program(p.score_mod)
        if isinstance(prog, str):
            out.append(prog)
        return out

    def estimate(self, problem: Problem) -> float:
        if problem.device.type != "cuda":
            return 1e9  # the interpreter: forcible for tests, never chosen
        return cuda_estimate(problem)

    def run(self, problem: Problem) -> tuple[Tensor, Tensor]:
        from .launch import Launch, TritonAttention

        p = problem
        mask = mask_program(p.mask, p.batch, p.nq, p.nk, p.device)
        score = score_program(p.score_mod)
        from . import decode

        if decode.serves(p, mask):
            return decode.decode_problem(p, mask, score)
        launch = Launch(p, mask, score)
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (p.q, p.k, p.v))
        mods = p.score_mod.tensors if p.score_mod is not None else ()
        return TritonAttention.apply(launch, q, k, v, *mods)


def cuda_estimate(problem: Problem) -> float:
    """Guessed seconds on a Hopper GPU (see the rates above): the tiles the kernels visit per batch
    element and head, extra for partial tiles, plus reading K and V once."""
    p = problem
    block_q, block_k = 128, 64
    kinds = p.layout(block_q, block_k).kinds  # per batch element and head: what the kernels walk
    spread = (p.batch // kinds.shape[0]) * (p.q_heads // kinds.shape[1])
    tile = min(block_q, p.nq) * min(block_k, p.nk) * spread
    visited = int((kinds > 0).sum()) * tile
    partial = int((kinds == 1).sum()) * tile
    kv_bytes = p.batch * p.kv_heads * p.nk * (p.head_dim + p.v_dim) * p.k.element_size()
    t = (visited * (_SCORE + _SCORE_PER_DIM * (p.head_dim + p.v_dim)) + partial * _PARTIAL_SCORE + _LAUNCH
         + kv_bytes / _BYTES_PER_SECOND)
    return t * (1 + _BACKWARD) if p.requires_grad else t


def paged_attention(*args, **kwargs):
    """Attention over a paged KV cache read in place (see :func:`.decode.paged_attention`)."""
    from .decode import paged_attention as run

    return run(*args, **kwargs)


def paged_decode(*args, **kwargs):
    """A paged decode step prepared once and run per layer (see :class:`.decode.PagedDecode`)."""
    if not triton_available():
        raise PagedUnsupported("Triton is not installed (pip install 'qkv[triton]')")
    from .decode import PagedDecode

    return PagedDecode(*args, **kwargs)


__all__ = ["TritonBackend", "triton_available", "paged_attention", "paged_decode", "PagedUnsupported",
           "set_deterministic", "deterministic"]
