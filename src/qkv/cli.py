"""The ``qkv`` command line: one sub-command per module in :mod:`qkv.commands`.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int`` and is imported
only when its command runs, so ``qkv bench`` does not pay for plotting or tokenizer imports.

A user's mistake (a bad option, a missing file, a checkpoint that does not fit) is one line on
stderr, ``qkv CMD: error: ...``, and exit status 2; ``--debug`` (anywhere on the command line)
shows the traceback instead. Anything else that goes wrong is one line and exit status 1.
"""

from __future__ import annotations

import importlib
import sys

from qkv.commands.usage import Parser, UsageError

#: command name -> (module under qkv.commands, one-line help)
COMMANDS = {
    "bench": ("bench", "compare attention backends side by side on this machine"),
    "explain": ("explain", "run the bundled pretrained encoder on a text and show its attention"),
    "train": ("train", "train the small causal LM with teacher forcing"),
    "generate": ("generate", "generate text from a trained causal LM, decoding from the KV cache"),
}

#: Exceptions that mean "the input was wrong" when they escape a command: said in one line, exit 2.
USER_ERRORS = (UsageError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError,
               ValueError, UnicodeDecodeError)


def _version() -> str:
    from qkv import __version__

    return __version__


def _top_parser() -> Parser:
    parser = Parser(prog="qkv", description="Self-attention for PyTorch.",
                    epilog="Run 'qkv COMMAND --help' for a command's options.")
    parser.add_argument("--version", action="version", version=f"qkv {_version()}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def command_parser(name: str) -> Parser:
    """The argument parser of ``qkv NAME`` (the command module is imported)."""
    module = importlib.import_module(f"qkv.commands.{COMMANDS[name][0]}")
    parser = Parser(prog=f"qkv {name}", description=COMMANDS[name][1])
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    name = argv[0] if argv else None
    prog = f"qkv {name}" if name in COMMANDS else "qkv"
    try:
        if name not in COMMANDS:
            _top_parser().parse_args(argv)  # prints help or the version, or raises for an unknown command
            return 2
        args = command_parser(name).parse_args(argv[1:])
        module = importlib.import_module(f"qkv.commands.{COMMANDS[name][0]}")
        return int(module.run(args) or 0)
    except USER_ERRORS as err:
        if debug:
            raise
        print(f"{prog}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug, not a mistake: still one line, with the way to see more
        if debug:
            raise
        print(f"{prog}: internal error: {type(err).__name__}: {_one_line(err)} (run again with --debug for the "
              "traceback)", file=sys.stderr)
        return 1


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 400 else text[:397] + "..."


if __name__ == "__main__":
    sys.exit(main())
