"""The ``qkv`` command line: one sub-command per module in :mod:`qkv.commands`.

Each command module provides ``add_arguments(parser)`` and ``run(args) -> int`` and is imported
only when its command runs, so ``qkv bench`` does not pay for plotting or tokenizer imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command name -> (module under qkv.commands, one-line help)
COMMANDS = {
    "bench": ("bench", "compare attention backends side by side on this machine"),
    "explain": ("explain", "run the bundled pretrained encoder on a text and show its attention"),
    "train": ("train", "train the small causal LM with teacher forcing"),
    "generate": ("generate", "generate text from a trained causal LM, decoding from the KV cache"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="qkv", description="Self-attention for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help or the error for an unknown command
        return 2
    name = argv[0]
    module = importlib.import_module(f"qkv.commands.{COMMANDS[name][0]}")
    command_parser = argparse.ArgumentParser(prog=f"qkv {name}", description=COMMANDS[name][1])
    module.add_arguments(command_parser)
    return int(module.run(command_parser.parse_args(argv[1:])) or 0)


if __name__ == "__main__":
    sys.exit(main())
