"""A self-contained HTML head view of attention, and reading its data back.

The page (one file, no network: inline CSS and JavaScript, no CDN) shows the tokens in two
columns, queries (attending) on the left and keys (attended to) on the right. Hovering a token
draws its attention lines, one colour per head, line opacity = weight; a click pins it. A layer
selector and per-head toggles choose what is drawn. The page is driven by its URL fragment too,
``page.html#token=3&layer=0&head=0`` (``head=0,5`` or ``head=all``; ``side=key`` selects a key
token), which pre-selects a token so that a headless-browser screenshot shows its lines.

The weights and tokens are embedded as JSON in ``<script type="application/json"
id="qkv-head-view-data">``; :func:`read_head_view_data` parses them back exactly.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .headview_page import PAGE_BODY, PAGE_SCRIPT, PAGE_STYLE
from .weights import labelled_maps

DATA_ELEMENT_ID = "qkv-head-view-data"
FORMAT = "qkv-head-view"
FORMAT_VERSION = 1

_DATA_BLOCK = re.compile(r'<script type="application/json" id="' + DATA_ELEMENT_ID + r'">(.*?)</script>', re.S)


@dataclass
class HeadViewData:
    """What a head-view page holds: ``weights (L, H, Nq, Nk)`` (float32, or float64 if written
    from float64), the query ``tokens`` and ``key_tokens``, the ``layers`` and ``heads`` indices
    that label the weights (None where the written weights had no such axis) and the ``title``."""

    weights: Tensor
    tokens: list[str]
    key_tokens: list[str]
    layers: list[int] | None
    heads: list[int] | None
    title: str


def head_view_html(weights, tokens, *, key_tokens=None, layers=None, heads=None, title: str | None = None) -> str:
    """The head-view page as a string (see :func:`write_head_view` for the arguments); e.g. for
    ``IPython.display.HTML`` in a notebook."""
    maps = labelled_maps(weights, tokens, key_tokens=key_tokens, layers=layers, heads=heads, require_tokens=True)
    title = "Attention head view" if title is None else str(title)
    data = _json_block(maps, title)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>{PAGE_BODY}"
        f"<script type=\"application/json\" id=\"{DATA_ELEMENT_ID}\">{data}</script>\n"
        f"<script>{PAGE_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_head_view(weights, tokens, path, *, key_tokens=None, layers=None, heads=None,
                    title: str | None = None) -> Path:
    """Write a self-contained, interactive HTML head view of attention weights.

    Args:
        weights: ``(layers, heads, Nq, Nk)``, ``(heads, Nq, Nk)`` or ``(Nq, Nk)`` attention weights
            of one input (or a sequence of per-layer ``(heads, Nq, Nk)``), finite floats.
        tokens: the ``Nq`` query tokens (strings).
        path: the ``.html`` file to write (parent folders are created).
        key_tokens: the ``Nk`` key tokens; default ``tokens`` (self-attention).
        layers, heads: indices to include (int or list), default all; the page labels them so.
        title: the page's heading.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. float32 weights are stored with 9 significant digits
        and float64 ones with 17, so that :func:`read_head_view_data` returns them bit for bit.
    """
    page = head_view_html(weights, tokens, key_tokens=key_tokens, layers=layers, heads=heads, title=title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def read_head_view_data(path) -> HeadViewData:
    """Parse the data embedded in a page written by :func:`write_head_view`.

    Raises ``ValueError`` naming the file if it holds no head-view data block or the block is
    malformed.
    """
    path = Path(path)
    match = _DATA_BLOCK.search(path.read_text(encoding="utf-8"))
    if match is None:
        raise ValueError(f"{path}: no <script type=\"application/json\" id=\"{DATA_ELEMENT_ID}\"> block")
    try:
        data = json.loads(match.group(1))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the head-view data block is not valid JSON ({e})") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: the data block is not in the {FORMAT!r} format")
    dtype = {"float32": torch.float32, "float64": torch.float64}.get(data.get("dtype"))
    if dtype is None:
        raise ValueError(f"{path}: unknown weights dtype {data.get('dtype')!r}")
    weights = torch.tensor(data["weights"], dtype=dtype)
    if list(weights.shape) != data["shape"]:
        raise ValueError(f"{path}: weights have shape {list(weights.shape)}, the block says {data['shape']}")
    return HeadViewData(weights, data["tokens"], data["key_tokens"], data["layers"], data["heads"], data["title"])


def _json_block(maps, title: str) -> str:
    """The JSON data block, safe inside ``<script>`` (no ``</`` or ``<!--`` sequences)."""
    w = maps.weights
    if w.dtype != torch.float64:
        w = w.to(torch.float32)
    digits = "{:.17g}" if w.dtype == torch.float64 else "{:.9g}"  # enough digits to round-trip exactly
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "title": title,
        "dtype": "float64" if w.dtype == torch.float64 else "float32", "shape": list(w.shape),
        "tokens": maps.query_tokens, "key_tokens": maps.key_tokens, "layers": maps.layers, "heads": maps.heads,
    }
    weights = "[" + ",".join(
        "[" + ",".join("[" + ",".join("[" + ",".join(digits.format(x) for x in row) + "]" for row in head) + "]"
                       for head in layer) + "]"
        for layer in w.tolist()) + "]"
    text = json.dumps(meta)[:-1] + ', "weights": ' + weights + "}"
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")
