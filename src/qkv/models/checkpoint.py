"""The tensors of a checkpoint directory, each knowing the file it lives in.

Reads ``model.safetensors`` (with the ``safetensors`` package), or ``pytorch_model.bin`` (with
``torch.load(weights_only=True)``, which runs no pickled code), or a sharded checkpoint through its
``*.index.json``. Damage is reported as a :class:`~qkv.models.errors.CheckpointError` naming the
file and, where the damage has one, the tensor: a truncated safetensors file names the first
tensor whose bytes are cut off.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .config import read_json
from .errors import CheckpointError

#: Weight files looked for, in order of preference.
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class Checkpoint:
    """Read-only access to the tensors of one checkpoint directory, by their stored names.

    Safetensors files are memory-mapped and a tensor is read only when asked for; a
    ``pytorch_model.bin`` is loaded whole (its format allows nothing else).
    """

    def __init__(self, directory: Path | str):
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"{self.directory}: checkpoint directory not found")
        found = [self.directory / name for name in WEIGHT_FILES if (self.directory / name).is_file()]
        if not found:
            raise FileNotFoundError(f"{self.directory}: no weights found; expected one of {', '.join(WEIGHT_FILES)}")
        self.weights_file = found[0]
        self._file_of: dict[str, Path] = {}
        self._readers: dict[Path, _SafetensorsReader | _TorchReader] = {}
        if self.weights_file.name.endswith(".index.json"):
            self._open_shards(self.weights_file)
        else:
            self._open(self.weights_file)

    def _open(self, path: Path) -> None:
        reader = _SafetensorsReader(path) if path.suffix == ".safetensors" else _TorchReader(path)
        self._readers[path] = reader
        for name in reader.names():
            self._file_of.setdefault(name, path)

    def _open_shards(self, index_path: Path) -> None:
        weight_map = read_json(index_path, "sharded checkpoint index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError("has no 'weight_map' from tensor names to shard files", file=index_path)
        for shard in sorted(set(weight_map.values())):
            path = self._shard_path(shard, index_path)
            if not path.is_file():
                first = next(name for name, file in weight_map.items() if file == shard)
                raise FileNotFoundError(f"{path}: shard not found (listed in {index_path} for tensor {first!r})")
            self._readers[path] = _SafetensorsReader(path) if path.suffix == ".safetensors" else _TorchReader(path)
        for name, shard in weight_map.items():
            path = self._shard_path(shard, index_path)
            if name not in self._readers[path].names():
                raise CheckpointError(f"is missing; {index_path.name} says it is stored here", file=path, tensor=name)
            self._file_of[name] = path

    def _shard_path(self, shard, index_path: Path) -> Path:
        """``shard`` (a file name from the index) inside the checkpoint directory; anything that
        would leave it (an absolute path, ``..``, a link pointing out) is refused."""
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"weight_map entries must be shard file names, got {shard!r}", file=index_path)
        path = self.directory / shard
        root = self.directory.resolve()
        if Path(shard).is_absolute() or ".." in Path(shard).parts or not path.resolve().is_relative_to(root):
            raise CheckpointError(f"weight_map names {shard!r}, which is outside the checkpoint directory "
                                  f"{self.directory}; shards must lie inside it", file=index_path)
        return path

    def names(self) -> list[str]:
        """All stored tensor names."""
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def file_of(self, name: str) -> Path:
        """The file that stores tensor ``name`` (the main weights file for names it lacks)."""
        return self._file_of.get(name, self.weights_file)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of the stored tensor ``name``, without reading its data."""
        return self._readers[self.file_of(name)].shape(name)

    def tensor(self, name: str) -> Tensor:
        """The stored tensor ``name`` (on the CPU, in its stored dtype)."""
        if name not in self._file_of:
            raise CheckpointError("is missing", file=self.weights_file, tensor=name)
        return self._readers[self.file_of(name)].tensor(name)


class _SafetensorsReader:
    def __init__(self, path: Path):
        self.path = path
        try:
            self._handle = safe_open(str(path), framework="pt")
        except SafetensorError as e:
            raise diagnose_safetensors(path, e) from e
        self._names = set(self._handle.keys())

    def names(self) -> set[str]:
        return self._names

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle.get_slice(name).get_shape())

    def tensor(self, name: str) -> Tensor:
        return self._handle.get_tensor(name)


class _TorchReader:
    def __init__(self, path: Path):
        self.path = path
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for damaged files; all mean "unreadable"
            raise CheckpointError(f"cannot be read by torch.load(weights_only=True); the file is truncated, "
                                  f"damaged or not a PyTorch state dict ({type(e).__name__}: {e})", file=path) from e
        if not isinstance(state, dict):
            raise CheckpointError(f"must hold a state dict (name -> tensor), got {type(state).__name__}", file=path)
        for name, value in state.items():
            if not isinstance(value, Tensor):
                raise CheckpointError(f"is a {type(value).__name__}, not a tensor", file=path, tensor=str(name))
        self._state = state

    def names(self) -> set[str]:
        return set(self._state)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._state[name].shape)

    def tensor(self, name: str) -> Tensor:
        return self._state[name]


def diagnose_safetensors(path: Path, error: Exception) -> CheckpointError:
    """Explain why ``safetensors`` refused ``path``: a cut header, a cut tensor (named), trailing
    bytes, or else the library's own message."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length_bytes = f.read(8)
        if len(length_bytes) < 8:
            return CheckpointError(f"is truncated: {size} bytes, shorter than the 8-byte header length", file=path)
        header_len = int.from_bytes(length_bytes, "little")
        if 8 + header_len > size:
            return CheckpointError(f"is truncated or not a safetensors file: its header claims {header_len} bytes "
                                   f"but only {size - 8} follow", file=path)
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return CheckpointError(f"is not a safetensors file: its header is not JSON ({error})", file=path)
    data_len = size - 8 - header_len
    try:
        spans = sorted((info["data_offsets"][0], info["data_offsets"][1], name)
                       for name, info in header.items() if name != "__metadata__")
    except (TypeError, KeyError, IndexError):
        return CheckpointError(f"has a malformed header ({error})", file=path)
    for start, end, name in spans:
        if end > data_len:
            return CheckpointError(f"is cut off: the file is truncated; this tensor needs bytes {start}..{end} of the "
                                   f"data section, which has only {data_len} bytes", file=path, tensor=name)
    end_of_data = spans[-1][1] if spans else 0
    if end_of_data < data_len:
        return CheckpointError(f"has {data_len - end_of_data} unexpected bytes after the last tensor", file=path)
    return CheckpointError(f"cannot be read by safetensors ({error})", file=path)
