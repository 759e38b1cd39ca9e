"""The error a bad checkpoint raises: it names the file, and the tensor where there is one."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used. ``file`` and ``tensor`` (or None) name the culprit."""

    def __init__(self, problem: str, *, file: Path | str, tensor: str | None = None):
        self.file = str(file)
        self.tensor = tensor
        where = f"{self.file}: tensor {tensor!r}" if tensor is not None else self.file
        super().__init__(f"{where}: {problem}")
