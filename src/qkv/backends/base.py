"""What every backend provides: what it cannot do (and why), a cost estimate, and a run."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from ..problem import Problem
from .capabilities import Capabilities


class Backend(Protocol):
    """An implementation of :func:`qkv.attention`.

    ``capabilities`` declares what it supports (:class:`~qkv.backends.capabilities.Capabilities`).
    ``unsupported`` lists, in words a user understands, every reason this backend cannot serve a
    problem (empty: it can): ``capabilities.reasons(self.capabilities, problem)`` plus any check
    the declaration cannot express. ``estimate`` is the backend's own rough run time in seconds on
    the problem's device, used only to rank backends (it should not build anything the run would
    not need). ``run`` returns ``(out, lse)``; ``lse`` may be None unless the problem asks for it.
    """

    name: str
    capabilities: Capabilities

    def unsupported(self, problem: Problem) -> list[str]: ...

    def estimate(self, problem: Problem) -> float: ...

    def run(self, problem: Problem) -> tuple[Tensor, Tensor | None]: ...
