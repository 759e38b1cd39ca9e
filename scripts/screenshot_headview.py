"""Screenshot a head-view page (from ``qkv explain`` or :func:`qkv.inspect.write_head_view`) with
headless Chromium, so that it can be looked at without a desktop browser.

A screenshot cannot hover, so the token to show is chosen through the page's URL fragment
(``#token=3&layer=0&head=0``). Needs a Chromium-family browser on PATH (Debian/Ubuntu:
``apt-get install chromium``; or set ``QKV_BROWSER`` to its path).

Usage::

    python scripts/screenshot_headview.py explain_out/head_view.html shot.png --token 2 --layer 0 --head 2
    python scripts/screenshot_headview.py page.html shot.png --head all --size 1200x700
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qkv.inspect import screenshot_html


def fragment(token: int | None, layer: int | None, head: str | None, side: str) -> str:
    """The page's URL fragment for the chosen token, layer and heads (``head``: ``"0,5"`` or ``"all"``)."""
    parts = []
    if token is not None:
        parts.append(f"token={token}")
    if layer is not None:
        parts.append(f"layer={layer}")
    if head is not None:
        parts.append(f"head={head}")
    if side != "query":
        parts.append(f"side={side}")
    return "&".join(parts)


def window_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 1000x600, got {text!r}") from None
    return width, height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", type=Path, help="the head-view .html file")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--token", type=int, help="index of the token to select (default: none, all lines)")
    parser.add_argument("--side", choices=["query", "key"], default="query",
                        help="select the token in the query (left) or key (right) column")
    parser.add_argument("--layer", type=int, help="layer to show (its index as labelled on the page)")
    parser.add_argument("--head", help="heads to show: an index, a comma list or 'all' (default: all)")
    parser.add_argument("--size", type=window_size, default=(1000, 600), help="window size WIDTHxHEIGHT")
    parser.add_argument("--browser", help="browser executable (default: chromium etc. on PATH)")
    args = parser.parse_args()
    shot = screenshot_html(args.page, args.png, fragment=fragment(args.token, args.layer, args.head, args.side),
                           size=args.size, browser=args.browser)
    print(f"wrote {shot}")


if __name__ == "__main__":
    main()
