"""Attention backends and their registry.

Each backend implements :class:`~qkv.backends.base.Backend`: it says what it cannot serve and why,
estimates its run time, and runs. :mod:`qkv.dispatch` picks among the registered ones.
"""

from __future__ import annotations

from .base import Backend
from .capabilities import Capabilities, reasons
from .flex import FlexBackend
from .reference import ReferenceBackend
from .sdpa import SdpaBackend
from .tiled import TiledBackend, TileSizes
from .triton import TritonBackend

REGISTRY: dict[str, Backend] = {}
#: Called after every :func:`register`: whatever remembers dispatch decisions forgets them
#: (:func:`qkv.fastpath.clear` is added here when qkv is imported).
ON_REGISTER: list = []


def register(backend: Backend) -> None:
    """Make ``backend`` available to the dispatcher under ``backend.name`` (decisions remembered
    before are forgotten, so it is considered from the next call on)."""
    REGISTRY[backend.name] = backend
    for forget in ON_REGISTER:
        forget()


for _backend in (ReferenceBackend(), TiledBackend(), SdpaBackend(), TritonBackend(), FlexBackend()):
    register(_backend)

__all__ = ["Backend", "Capabilities", "reasons", "REGISTRY", "ON_REGISTER", "register", "ReferenceBackend", "TiledBackend", "TileSizes",
           "SdpaBackend", "TritonBackend", "FlexBackend"]
