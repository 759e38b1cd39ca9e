"""Attention maps as a PNG heatmap grid (matplotlib without pyplot: Agg, no display needed).

One panel per (layer, head), layers down and heads across, titled ``layer L head H``; query tokens
(who attends) label the rows, key tokens (attended to) the columns; one colour bar for all panels,
so that panels compare. A single panel is drawn larger, with the weights written in the cells.

Text is text: tokens and titles are drawn as given (no ``$...$`` math, so ``$``, ``%`` and ``\\``
are plain characters), and a character the font has no glyph for (an emoji, CJK without a CJK
font) is written as its code point, ``U+1F600``, instead of a missing-glyph box and a warning.
The PNG is capped at ``max_pixels`` (the resolution drops to fit), so a large grid stays a file
a viewer opens.
"""

from __future__ import annotations

import functools
import math
import textwrap
from pathlib import Path

import torch

from .weights import labelled_maps

#: Default cap on a PNG's width x height in pixels (about 3000 x 2000).
DEFAULT_MAX_PIXELS = 6_000_000


def plot_attention_grid(weights, tokens, path, *, key_tokens=None, layers=None, heads=None,
                        block: int | tuple[int, int] | None = None, title: str | None = None,
                        vmax: float | None = None, annotate: bool | None = None, cmap: str = "viridis",
                        dpi: int = 110, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Path:
    """Draw attention maps as a grid of labelled heatmaps and save it as a PNG.

    Arguments as in :func:`attention_grid_figure`, plus ``path`` (where to write the PNG; parent
    folders are created), ``dpi`` (the PNG's resolution) and ``max_pixels`` (the most pixels,
    width x height, the PNG may have: a larger figure is saved at a lower resolution; None for no
    cap). Returns ``path`` as a :class:`~pathlib.Path`.
    """
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, int)
                                   or max_pixels < 10_000):
        raise ValueError(f"max_pixels must be an int >= 10000 or None, got {max_pixels!r}")
    fig = attention_grid_figure(weights, tokens, key_tokens=key_tokens, layers=layers, heads=heads, block=block,
                                title=title, vmax=vmax, annotate=annotate, cmap=cmap)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=capped_dpi(fig, dpi, max_pixels), format="png")
    return path


def capped_dpi(fig, dpi: float, max_pixels: int | None) -> float:
    """``dpi``, lowered so that ``fig`` saved at it has at most ``max_pixels`` pixels."""
    width, height = fig.get_size_inches()
    if max_pixels is None or width * height * dpi * dpi <= max_pixels:
        return dpi
    return math.floor(math.sqrt(max_pixels / (width * height)) * 100) / 100  # rounding down keeps under the cap


def attention_grid_figure(weights, tokens, *, key_tokens=None, layers=None, heads=None,
                          block: int | tuple[int, int] | None = None, title: str | None = None,
                          vmax: float | None = None, annotate: bool | None = None, cmap: str = "viridis"):
    """A matplotlib ``Figure`` with one labelled heatmap per (layer, head).

    Args:
        weights: ``(layers, heads, Nq, Nk)``, ``(heads, Nq, Nk)`` or ``(Nq, Nk)`` attention weights
            of one input (or a sequence of per-layer ``(heads, Nq, Nk)``), e.g. a model's
            ``torch.stack(attentions)[:, 0]`` or a :func:`~qkv.inspect.pooled_attention_map` ``[0]``.
        tokens: the ``Nq`` query tokens (row labels), or None for position axes (long or pooled maps).
        key_tokens: the ``Nk`` key tokens (column labels); default ``tokens``.
        layers, heads: indices to draw (int or list), default all; titles use these indices.
        block: for pooled maps, the ``block`` (int or ``(block_q, block_k)``) they were pooled
            with, so that the axes show token positions.
        title: a title above the grid.
        vmax: top of the colour scale (bottom is 0); default the largest weight drawn.
        annotate: write each weight in its cell; default when one panel of at most 16x16 is drawn.
        cmap: a matplotlib colour map name.

    Returns:
        a ``matplotlib.figure.Figure`` (not attached to pyplot): ``fig.axes[l * len(heads) + h]``
        shows layer ``layers[l]``, head ``heads[h]``; the last axes is the colour bar.
    """
    Figure = _figure_class()
    if block is not None and (tokens is not None or key_tokens is not None):
        raise ValueError("block: a pooled map has no token per row; pass tokens=None (axes then show positions)")
    maps = labelled_maps(weights, tokens, key_tokens=key_tokens, layers=layers, heads=heads)
    w = maps.weights.to(torch.float32).numpy()
    n_layers, n_heads, nq, nk = w.shape
    block_q, block_k = _block(block)
    single = n_layers * n_heads == 1
    if annotate is None:
        annotate = single and nq <= 16 and nk <= 16 and block is None
    top = float(w.max()) if vmax is None else float(vmax)
    top = top if top > 0 else 1.0

    longest = 0 if maps.query_tokens is None else max(len(drawable(t)) for t in maps.query_tokens + maps.key_tokens)
    grid = _Layout(n_layers, n_heads, nq if maps.query_tokens is not None else None, single=single,
                   label_room=0.075 * longest if maps.query_tokens is not None else 0.4,
                   title=drawable(str(title)) if title else None)
    fig = Figure(figsize=grid.size)
    extent = (0, nk * block_k, nq * block_q, 0) if block else None
    axes = []
    for li in range(n_layers):
        for hi in range(n_heads):
            ax = fig.add_axes(grid.panel(li, hi))
            image = ax.imshow(w[li, hi], cmap=cmap, vmin=0.0, vmax=top, aspect="equal",
                              interpolation="nearest", extent=extent)
            ax.set_title(_panel_title(maps.layers, maps.heads, li, hi), fontsize=10, parse_math=False)
            if annotate:
                _write_values(ax, w[li, hi], top)
            _label_axes(ax, maps, block, first_column=hi == 0, last_row=li == n_layers - 1)
            axes.append(ax)
    bar = fig.colorbar(image, cax=fig.add_axes(grid.colour_bar()))
    bar.set_label("attention weight" + (" (pooled)" if block else ""))
    if title:
        fig.suptitle(grid.title, fontsize=13, parse_math=False, y=1 - 0.12 / grid.size[1], va="top")
    return fig


class _Layout:
    """Where the panels go, in inches turned into figure fractions: a grid of square panels with
    a title line each, room for tick labels on the left and at the bottom, a colour bar on the
    right. Laid out by hand: matplotlib's constrained layout takes tens of seconds on 72 panels."""

    GAP_W, GAP_H, PANEL_TITLE, BAR_GAP, BAR_W, BAR_LABELS = 0.15, 0.12, 0.3, 0.25, 0.18, 0.75

    TITLE_LINE = 0.25  # inches per line of the 13-point title; about 0.1 inch per character

    def __init__(self, rows: int, cols: int, tokens: int | None, *, single: bool, label_room: float,
                 title: str | None):
        if tokens is None:
            self.side = 5.0 if single else 2.6
        else:
            self.side = max(3.5, 0.13 * tokens) if single else max(2.2, 0.16 * tokens)
        self.rows, self.cols = rows, cols
        self.left = 0.35 + label_room + 0.1
        self.bottom = 0.35 + label_room + 0.1
        grid_w = cols * self.side + (cols - 1) * self.GAP_W
        self.grid_h = rows * (self.side + self.PANEL_TITLE) + (rows - 1) * self.GAP_H
        self.width = self.left + grid_w + self.BAR_GAP + self.BAR_W + self.BAR_LABELS
        self.title = None
        self.top = 0.15
        if title:
            self.title = textwrap.fill(title, width=max(20, int(self.width / 0.11)), break_long_words=True)
            self.top = 0.35 + self.TITLE_LINE * (self.title.count("\n") + 1)
        self.height = self.bottom + self.grid_h + self.top
        self.bar_x = self.left + grid_w + self.BAR_GAP

    @property
    def size(self) -> tuple[float, float]:
        return self.width, self.height

    def panel(self, row: int, col: int) -> list[float]:
        x = self.left + col * (self.side + self.GAP_W)
        y = self.bottom + (self.rows - 1 - row) * (self.side + self.PANEL_TITLE + self.GAP_H)
        return [x / self.width, y / self.height, self.side / self.width, self.side / self.height]

    def colour_bar(self) -> list[float]:
        height = self.grid_h - self.PANEL_TITLE
        return [self.bar_x / self.width, self.bottom / self.height, self.BAR_W / self.width, height / self.height]


def drawable(text: str) -> str:
    """``text`` with every character the plot font has no glyph for written as ``U+XXXX``."""
    covered = _font_codepoints()
    if covered is None or all(ord(c) in covered or c in "\n\t" for c in text):
        return text
    return "".join(c if ord(c) in covered or c in "\n\t" else f"U+{ord(c):04X}" for c in text)


@functools.lru_cache(maxsize=1)
def _font_codepoints() -> frozenset[int] | None:
    """The code points matplotlib's default font (DejaVu Sans unless configured) has glyphs for."""
    try:
        from matplotlib import font_manager, ft2font, rcParams

        path = font_manager.findfont(font_manager.FontProperties(family=rcParams["font.family"]))
        return frozenset(ft2font.FT2Font(path).get_charmap())
    except Exception:  # an unreadable font: draw the text unchanged, as matplotlib would
        return None


def _figure_class():
    """matplotlib's ``Figure``, used without pyplot: no global state, no display, Agg for PNG."""
    try:
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot_attention_grid needs matplotlib: pip install 'qkv[models]'") from e
    return Figure


def _block(block) -> tuple[int, int]:
    if block is None:
        return 1, 1
    sizes = (block, block) if isinstance(block, int) and not isinstance(block, bool) else block
    if (not isinstance(sizes, (tuple, list)) or len(sizes) != 2
            or any(isinstance(b, bool) or not isinstance(b, int) or b <= 0 for b in sizes)):
        raise ValueError(f"block must be None, a positive int or a pair (block_q, block_k), got {block!r}")
    return sizes[0], sizes[1]


def _panel_title(layers, heads, li: int, hi: int) -> str:
    parts = []
    if layers is not None:
        parts.append(f"layer {layers[li]}")
    if heads is not None:
        parts.append(f"head {heads[hi]}")
    return " ".join(parts)


def _label_axes(ax, maps, block, *, first_column: bool, last_row: bool) -> None:
    """Tick labels and axis names on the grid's left column and bottom row only (inner panels
    get no ticks at all: computing ticks is most of the drawing time of a large grid)."""
    if not first_column:
        ax.set_yticks([])
    if not last_row:
        ax.set_xticks([])
    if maps.query_tokens is None:
        unit = "position" if block else "index"
        if first_column:
            ax.set_ylabel(f"query {unit}")
        if last_row:
            ax.set_xlabel(f"key {unit}")
        return
    nq, nk = len(maps.query_tokens), len(maps.key_tokens)
    size = 9 if max(nq, nk) <= 16 else 7
    if last_row:
        ax.set_xticks(range(nk))
        ax.set_xticklabels([drawable(t) for t in maps.key_tokens], rotation=90, fontsize=size, parse_math=False)
        ax.set_xlabel("key (attended to)")
    if first_column:
        ax.set_yticks(range(nq))
        ax.set_yticklabels([drawable(t) for t in maps.query_tokens], fontsize=size, parse_math=False)
        ax.set_ylabel("query (attends from)")
    ax.tick_params(length=0)


def _write_values(ax, w, top: float) -> None:
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            value = w[i, j]
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 * top else "white")
