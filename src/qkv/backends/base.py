"""What every backend provides: what it cannot do (and why), a cost estimate, and a run."""

from __future__ import annotations

from typing import Protocol

from torch import Tensor

from ..problem import Problem


class Backend(Protocol):
    """An implementation of :func:`qkv.attention`.

    ``unsupported`` lists, in words a user understands, every reason this backend cannot serve a
    problem (empty: it can). ``estimate`` is a rough run time in seconds on the problem's device,
    used only to rank backends. ``run`` returns ``(out, lse)``; ``lse`` may be None unless the
    problem asks for it.
    """

    name: str

    def unsupported(self, problem: Problem) -> list[str]: ...

    def estimate(self, problem: Problem) -> float: ...

    def run(self, problem: Problem) -> tuple[Tensor, Tensor | None]: ...
