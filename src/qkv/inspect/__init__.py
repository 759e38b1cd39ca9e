"""Looking inside attention: maps at any length and pictures a person can read.

* :mod:`qkv.inspect.maps`: :func:`attention_rows` (exact weights of chosen query rows) and
  :func:`pooled_attention_map` (block-pooled map), both from qkv's own math for any mask, score
  modifier or grouped heads, without materialising ``Nq x Nk`` weights.
* :mod:`qkv.inspect.pool`: :func:`pool_weights`, the same pooling for weights a model returned.
* :mod:`qkv.inspect.plot`: :func:`plot_attention_grid`, a labelled matplotlib heatmap grid (PNG),
  and :func:`attention_grid_figure`, the same as a matplotlib ``Figure``.
* :mod:`qkv.inspect.headview`: :func:`write_head_view`, a self-contained interactive HTML head view,
  and :func:`read_head_view_data` to read its embedded data back.
* :mod:`qkv.inspect.screenshot`: :func:`screenshot_html`, a headless-Chromium screenshot of a page.

The maps need only torch; plotting needs matplotlib (``pip install 'qkv[models]'``), imported
when a plot is drawn.
"""

from .headview import HeadViewData, head_view_html, read_head_view_data, write_head_view
from .maps import attention_rows, pooled_attention_map
from .plot import attention_grid_figure, plot_attention_grid
from .pool import pool_weights
from .screenshot import find_browser, screenshot_html

__all__ = ["attention_rows", "pooled_attention_map", "pool_weights", "plot_attention_grid", "attention_grid_figure",
           "write_head_view", "head_view_html", "read_head_view_data", "HeadViewData", "screenshot_html",
           "find_browser"]
