"""Render docs/inspect.md's pictures of ``qkv explain`` on a 512-token text.

The text is prose from Python's own documentation (``pydoc_data.topics``, in the standard library,
so the run is reproducible anywhere): the "assignment" topic with the grammar lines left out,
cut to MiniLM's 512 tokens with ``--truncate``. Writes

* ``explain_512_grid.png``: the PNG ``qkv explain`` writes (every layer and head, mean-pooled
  over 8 x 8 token blocks, under the default pixel cap);
* ``explain_512_head_view.png``: a headless-Chromium screenshot of its head view with one token
  selected (through the page's URL fragment), and the page's size in the log.

Usage::

    python scripts/make_explain_images.py [--out docs/images] [--token 254] [--layer 2] [--head all]
"""

from __future__ import annotations

import argparse
import re
import shutil
import tempfile
from pathlib import Path

from qkv.cli import main as qkv_cli
from qkv.inspect import screenshot_html


def prose(topic: str = "assignment") -> str:
    """The topic's text without its grammar and code lines (those indented), whitespace collapsed."""
    from pydoc_data.topics import topics

    lines = [line for line in topics[topic].splitlines() if line and not line.startswith(" ")
             and not set(line) <= set("*=-")]
    return re.sub(r"\s+", " ", " ".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--token", type=int, default=254, help="token pre-selected in the screenshot")
    parser.add_argument("--layer", type=int, default=2)
    parser.add_argument("--head", default="all", help="heads shown in the screenshot: an index, a list or 'all'")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        assert qkv_cli(["explain", prose(), "--truncate", "--out", work, "--table", "none", "--no-progress"]) == 0
        page = Path(work) / "head_view.html"
        print(f"head view: {page.stat().st_size / 1e6:.2f} MB")
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(work) / "attention.png", args.out / "explain_512_grid.png")
        shot = screenshot_html(page, args.out / "explain_512_head_view.png", size=(1200, 900),
                               fragment=f"token={args.token}&layer={args.layer}&head={args.head}")
    print(f"wrote {args.out / 'explain_512_grid.png'} and {shot}")


if __name__ == "__main__":
    main()
