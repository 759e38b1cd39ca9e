"""How the ``qkv`` CLI talks to a user who made a mistake: one line on stderr, exit status 2.

* :class:`UsageError`: raised by a command for a bad option or input (a missing file, a value out
  of range, a checkpoint that does not fit); :func:`qkv.cli.main` prints ``qkv CMD: error: ...``
  and returns 2. ``--debug`` shows the traceback instead.
* :class:`Parser`: an ``argparse.ArgumentParser`` whose errors are that same one line (argparse's
  own print the usage block first), and whose help shows every option's default.
* Checks shared by the commands, each naming the option: :func:`existing_file`,
  :func:`existing_dir`, :func:`output_file`, :func:`positive`, :func:`non_negative`, :func:`backend_name`.

Commands check their options before loading a model, so a typo costs no waiting.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


class UsageError(Exception):
    """A user's mistake, said in one line that names the option and what it expects."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ``(default: X)`` appended to every option whose help does not
    already say its default (``(default: off)`` for flags; an option whose default is None must
    say in its help what leaving it out does)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            return text
        value = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{text} (default: {value})"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` that reports a bad command line as :class:`UsageError` (one line, exit 2)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse calls this for unknown options, bad types and choices
        raise UsageError(f"{message} (see {self.prog} --help)")


def existing_file(option: str, path: str | Path | None) -> Path | None:
    """``path`` as a Path if it names a file (None passes through), else :class:`UsageError`."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a directory, expected a file")
    if not path.is_file():
        raise UsageError(f"{option}: no such file: {path}")
    return path


def output_file(option: str, path: str | Path | None) -> Path | None:
    """``path`` as a Path if a file can be written there (its directory is made if missing; None
    passes through), else :class:`UsageError`: checked before a long run, not after it."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option}: {path} is a directory, expected a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{option}: cannot make the directory {path.parent}: {e.strerror or e}") from None
    if not path.parent.is_dir():
        raise UsageError(f"{option}: {path.parent} is not a directory")
    return path


def existing_dir(option: str, path: str | Path | None, *, needs: str | None = None, hint: str = "") -> Path | None:
    """``path`` as a Path if it names a directory (holding the file ``needs``, if given)."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{option}: no such directory: {path}{hint}")
    if needs is not None and not (path / needs).is_file():
        raise UsageError(f"{option}: {path} holds no {needs}{hint}")
    return path


def trained_checkpoint(option: str, path: str | Path, hint: str) -> Path:
    """``path`` as a Path if it holds a checkpoint written by ``qkv train`` (its ``LATEST`` step
    directory, or an older flat checkpoint, with ``config.json``)."""
    from qkv.models import gpt

    path = existing_dir(option, path, hint=hint)
    if not (gpt.checkpoint_dir(path) / gpt.CONFIG).is_file():
        raise UsageError(f"{option}: {path} holds no checkpoint{hint}")
    return path


def positive(option: str, value, *, allow_none: bool = True):
    """``value`` if it is > 0 and finite (or None when ``allow_none``), else :class:`UsageError`
    (``inf`` is no number to train or time with: ``--lr inf`` trained every weight into NaN)."""
    if value is None and allow_none:
        return value
    if value is None or not value > 0:
        raise UsageError(f"{option} must be a positive number, got {value}")
    if not math.isfinite(value):
        raise UsageError(f"{option} must be a finite number > 0, got {value}")
    return value


def non_negative(option: str, value):
    """``value`` if it is >= 0 (or None), else :class:`UsageError`."""
    if value is not None and value < 0:
        raise UsageError(f"{option} must be >= 0, got {value}")
    return value


def backend_name(option: str, name: str | None) -> str | None:
    """``name`` if it is a registered :func:`qkv.attention` backend (or None: automatic)."""
    if name is None:
        return None
    from qkv.backends import REGISTRY

    if name not in REGISTRY:
        raise UsageError(f"{option} must be one of {', '.join(REGISTRY)} (or left out: automatic), got {name!r}")
    return name


def index_list(text: str) -> list[int]:
    """An argparse ``type``: ``"2"`` or ``"0,2,5"`` -> ``[2]`` or ``[0, 2, 5]``."""
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        message = f"expected an index or a comma-separated list such as 0,5, got {text!r}"
    raise argparse.ArgumentTypeError(message)


def indices(option: str, values: list[int] | None, size: int, what: str) -> list[int]:
    """``values`` (None: all of ``range(size)``) if each lies in ``[0, size)``, duplicates dropped."""
    if values is None:
        return list(range(size))
    bad = [v for v in values if not 0 <= v < size]
    if bad:
        raise UsageError(f"{option} must be in [0, {size - 1}] (this model has {size} {what}), got {bad[0]}")
    return list(dict.fromkeys(values))
