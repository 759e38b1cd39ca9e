"""Attention maps as a PNG heatmap grid (matplotlib without pyplot: Agg, no display needed).

One panel per (layer, head), layers down and heads across, titled ``layer L head H``; query tokens
(who attends) label the rows, key tokens (attended to) the columns; one colour bar for all panels,
so that panels compare. A single panel is drawn larger, with the weights written in the cells.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .weights import labelled_maps


def plot_attention_grid(weights, tokens, path, *, key_tokens=None, layers=None, heads=None,
                        block: int | tuple[int, int] | None = None, title: str | None = None,
                        vmax: float | None = None, annotate: bool | None = None, cmap: str = "viridis",
                        dpi: int = 110) -> Path:
    """Draw attention maps as a grid of labelled heatmaps and save it as a PNG.

    Arguments as in :func:`attention_grid_figure`, plus ``path`` (where to write the PNG; parent
    folders are created) and ``dpi`` (the PNG's resolution). Returns ``path`` as a :class:`~pathlib.Path`.
    """
    if isinstance(dpi, bool) or not isinstance(dpi, (int, float)) or not dpi > 0:
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    fig = attention_grid_figure(weights, tokens, key_tokens=key_tokens, layers=layers, heads=heads, block=block,
                                title=title, vmax=vmax, annotate=annotate, cmap=cmap)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


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

    labels = max(nq, nk) if maps.query_tokens is not None else 14
    panel = max(2.2, 0.16 * labels + 0.9) * (1.6 if single else 1.0)
    longest = 0 if maps.query_tokens is None else max(len(t) for t in maps.query_tokens + maps.key_tokens)
    label_room = 0.075 * longest
    fig_w = n_heads * panel + label_room + 1.6
    fig_h = n_layers * panel + label_room + (0.9 if title else 0.5)
    fig = Figure(figsize=(fig_w, fig_h), layout="constrained")
    axes = fig.subplots(n_layers, n_heads, squeeze=False, sharex=True, sharey=True)
    extent = (0, nk * block_k, nq * block_q, 0) if block else None
    for li in range(n_layers):
        for hi in range(n_heads):
            ax = axes[li][hi]
            image = ax.imshow(w[li, hi], cmap=cmap, vmin=0.0, vmax=top, aspect="equal",
                              interpolation="nearest", extent=extent)
            ax.set_title(_panel_title(maps.layers, maps.heads, li, hi), fontsize=10)
            if annotate:
                _write_values(ax, w[li, hi], top)
            _label_axes(ax, maps, block, first_column=hi == 0, last_row=li == n_layers - 1)
    bar = fig.colorbar(image, ax=axes, shrink=0.9 if n_layers > 1 else 0.8, aspect=30, pad=0.02)
    bar.set_label("attention weight" + (" (pooled)" if block else ""))
    if title:
        fig.suptitle(title, fontsize=13)
    return fig


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
    if maps.query_tokens is None:
        unit = "position" if block else "index"
        if first_column:
            ax.set_ylabel(f"query {unit}")
        if last_row:
            ax.set_xlabel(f"key {unit}")
        return
    nq, nk = len(maps.query_tokens), len(maps.key_tokens)
    size = 9 if max(nq, nk) <= 16 else 7
    ax.set_xticks(range(nk))
    ax.set_yticks(range(nq))
    ax.set_xticklabels(maps.key_tokens, rotation=90, fontsize=size)
    ax.set_yticklabels(maps.query_tokens, fontsize=size)
    ax.tick_params(length=0)
    if first_column:
        ax.set_ylabel("query (attends from)")
    if last_row:
        ax.set_xlabel("key (attended to)")


def _write_values(ax, w, top: float) -> None:
    for i in range(w.shape[0]):
        for j in range(w.shape[1]):
            value = w[i, j]
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="black" if value > 0.6 * top else "white")
