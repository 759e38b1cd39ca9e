"""A self-contained HTML head view of attention, and reading its data back.

The page (one file, no network: inline CSS and JavaScript, no CDN) shows the tokens in two
columns, queries (attending) on the left and keys (attended to) on the right. Hovering a token
draws its attention lines, one colour per head, line opacity = weight; a click pins it. A layer
selector and per-head toggles choose what is drawn. The page is driven by its URL fragment too,
``page.html#token=3&layer=0&head=0`` (``head=0,5`` or ``head=all``; ``side=key`` selects a key
token), which pre-selects a token so that a headless-browser screenshot shows its lines.

The data sits in ``<script type="application/json" id="qkv-head-view-data">``: the tokens, and
per (layer, head) one base64 string of little-endian weights, which the page decodes only when
that head is first shown. Exact by default (float32 or float64, read back bit for bit by
:func:`read_head_view_data`); for long inputs ``top_k`` keeps each row's largest weights (with
their key indices) and ``quantize`` stores them in one byte each (``round(255 * w)``), so that a
512-token page of 6 x 12 heads is about 2.5 MB instead of hundreds.
"""

from __future__ import annotations

import base64
import html
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .headview_page import PAGE_BODY, PAGE_SCRIPT, PAGE_STYLE
from .weights import labelled_maps

DATA_ELEMENT_ID = "qkv-head-view-data"
FORMAT = "qkv-head-view"
FORMAT_VERSION = 2
#: Inputs with more query rows than this draw only the selected token's lines (not all at once).
ALL_LINES_LIMIT = 64

_DATA_BLOCK = re.compile(r'<script type="application/json" id="' + DATA_ELEMENT_ID + r'">(.*?)</script>', re.S)


@dataclass
class HeadViewData:
    """What a head-view page holds: ``weights (L, H, Nq, Nk)`` (float32, or float64 if written
    from float64; with ``top_k`` the weights not kept are 0, with ``quantize`` each is a multiple
    of 1/255), the query ``tokens`` and ``key_tokens``, the ``layers`` and ``heads`` indices that
    label the weights (None where the written weights had no such axis), the ``title``, and how
    the page stored them: ``top_k`` (None: every weight) and ``encoding`` (``"float32"``,
    ``"float64"`` or ``"uint8"``)."""

    weights: Tensor
    tokens: list[str]
    key_tokens: list[str]
    layers: list[int] | None
    heads: list[int] | None
    title: str
    top_k: int | None = None
    encoding: str = "float32"


def head_view_html(weights, tokens, *, key_tokens=None, layers=None, heads=None, title: str | None = None,
                   top_k: int | None = None, quantize: bool = False) -> str:
    """The head-view page as a string (see :func:`write_head_view` for the arguments); e.g. for
    ``IPython.display.HTML`` in a notebook."""
    maps = labelled_maps(weights, tokens, key_tokens=key_tokens, layers=layers, heads=heads, require_tokens=True)
    title = "Attention head view" if title is None else str(title)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if not isinstance(quantize, bool):
        raise TypeError(f"quantize must be a bool, got {quantize!r}")
    data = _json_block(maps, title, top_k, quantize)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{PAGE_STYLE}</style>\n</head>\n<body>{PAGE_BODY}"
        f"<script type=\"application/json\" id=\"{DATA_ELEMENT_ID}\">{data}</script>\n"
        f"<script>{PAGE_SCRIPT}</script>\n</body>\n</html>\n"
    )


def write_head_view(weights, tokens, path, *, key_tokens=None, layers=None, heads=None,
                    title: str | None = None, top_k: int | None = None, quantize: bool = False) -> Path:
    """Write a self-contained, interactive HTML head view of attention weights.

    Args:
        weights: ``(layers, heads, Nq, Nk)``, ``(heads, Nq, Nk)`` or ``(Nq, Nk)`` attention weights
            of one input (or a sequence of per-layer ``(heads, Nq, Nk)``), finite floats.
        tokens: the ``Nq`` query tokens (strings).
        path: the ``.html`` file to write (parent folders are created).
        key_tokens: the ``Nk`` key tokens; default ``tokens`` (self-attention).
        layers, heads: indices to include (int or list), default all; the page labels them so.
        title: the page's heading.
        top_k: keep only each query row's ``top_k`` largest weights (the page draws and lists
            those); None keeps all. The file then grows with ``Nq * top_k``, not ``Nq * Nk``.
        quantize: store each weight in one byte (``round(255 * w) / 255``: two decimals hold)
            instead of four.

    Returns:
        ``path`` as a :class:`~pathlib.Path`. Without ``top_k`` and ``quantize``, float32 weights
        are stored as float32 and float64 ones as float64, so that :func:`read_head_view_data`
        returns them bit for bit.
    """
    page = head_view_html(weights, tokens, key_tokens=key_tokens, layers=layers, heads=heads, title=title,
                          top_k=top_k, quantize=quantize)
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
    try:
        shape, encoding, top_k = data["shape"], data["encoding"], data["top_k"]
        weights = _decode_maps(data["maps"], shape, encoding, top_k)
        return HeadViewData(weights, data["tokens"], data["key_tokens"], data["layers"], data["heads"],
                            data["title"], top_k, encoding)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: the head-view data block is malformed ({type(e).__name__}: {e})") from e


_NUMPY_LIKE = {"float32": (torch.float32, 4), "float64": (torch.float64, 8), "uint8": (torch.uint8, 1)}


def _encode(t: Tensor) -> str:
    """A CPU tensor's bytes (little-endian, as the page's typed arrays read them) as base64."""
    if sys.byteorder != "little":
        raise RuntimeError("the head view stores little-endian data; this machine is big-endian")
    return base64.b64encode(t.contiguous().numpy().tobytes()).decode("ascii")


def _decode(text: str, dtype: torch.dtype, count: int) -> Tensor:
    raw = bytearray(base64.b64decode(text, validate=True))
    t = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
    if t.numel() != count:
        raise ValueError(f"expected {count} values, found {t.numel()}")
    return t


def _decode_maps(maps, shape, encoding: str, top_k: int | None) -> Tensor:
    n_layers, n_heads, nq, nk = shape
    if encoding not in _NUMPY_LIKE:
        raise ValueError(f"unknown encoding {encoding!r}")
    dtype = torch.float64 if encoding == "float64" else torch.float32
    weights = torch.zeros(n_layers, n_heads, nq, nk, dtype=dtype)
    cols = nk if top_k is None else min(top_k, nk)
    for li in range(n_layers):
        for hi in range(n_heads):
            entry = maps[li][hi]
            values = _decode(entry["values"], _NUMPY_LIKE[encoding][0], nq * cols).view(nq, cols)
            values = values.to(dtype) / 255 if encoding == "uint8" else values
            if top_k is None:
                weights[li, hi] = values
            else:
                index = _decode(entry["indices"], torch.int16, nq * cols).view(nq, cols).to(torch.int64) & 0xFFFF
                weights[li, hi].scatter_(1, index, values)
    return weights


def _json_block(maps, title: str, top_k: int | None, quantize: bool) -> str:
    """The JSON data block, safe inside ``<script>`` (no ``</`` or ``<!--`` sequences)."""
    w = maps.weights
    if w.dtype != torch.float64 or quantize:
        w = w.to(torch.float32)
    n_layers, n_heads, nq, nk = w.shape
    if top_k is not None and top_k >= nk:
        top_k = None  # every weight is kept anyway
    if top_k is not None and nk > 65536:
        raise ValueError(f"top_k: key indices are stored as 16 bits, so at most 65536 keys, got {nk}")
    encoding = "uint8" if quantize else ("float64" if w.dtype == torch.float64 else "float32")
    entries = []
    for li in range(n_layers):
        row = []
        for hi in range(n_heads):
            values, indices = w[li, hi], None
            if top_k is not None:
                values, indices = values.topk(top_k, dim=-1)  # sorted, largest first
                indices = indices.to(torch.int32).to(torch.int16)  # wraps above 32767; read back as unsigned
            if quantize:
                values = torch.round(values.clamp(0, 1) * 255).to(torch.uint8)
            entry = {"values": _encode(values)}
            if indices is not None:
                entry["indices"] = _encode(indices)
            row.append(entry)
        entries.append(row)
    meta = {
        "format": FORMAT, "version": FORMAT_VERSION, "title": title, "encoding": encoding, "top_k": top_k,
        "shape": [n_layers, n_heads, nq, nk], "all_lines_limit": ALL_LINES_LIMIT,
        "tokens": maps.query_tokens, "key_tokens": maps.key_tokens, "layers": maps.layers, "heads": maps.heads,
        "maps": entries,
    }
    return json.dumps(meta, ensure_ascii=False).replace("</", "<\\/").replace("<!--", "<\\u0021--")
