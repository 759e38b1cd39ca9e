"""qkv.inspect pictures: the PNG grid (valid, labelled, showing the given weights), the HTML head
view (self-contained, data round-trips exactly, the page draws the right lines) and headless
Chromium screenshots (skipped with a reason when no browser is installed)."""

import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from qkv.inspect import (attention_grid_figure, find_browser, plot_attention_grid, pooled_attention_map,
                         read_head_view_data, screenshot_html, write_head_view)
from qkv.inspect.headview import head_view_html

PIL = pytest.importorskip("PIL.Image")
pytest.importorskip("matplotlib")

TOKENS = ["[CLS]", "the", "cat", "sat", "on", "the", "mat", "[SEP]"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
needs_browser = pytest.mark.skipif(find_browser() is None, reason="no Chromium-family browser on PATH "
                                   "(apt-get install chromium, or set QKV_BROWSER)")


def random_weights(*shape, dtype=torch.float32):
    """Rows of random attention weights that sum to 1 (fresh each run)."""
    return torch.softmax(torch.randn(*shape, dtype=torch.float64) * 2, dim=-1).to(dtype)


# --------------------------------------------------------------------------------------------
# PNG grid
# --------------------------------------------------------------------------------------------


def test_png_is_valid_and_scales_with_dpi(tmp_path):
    w = random_weights(2, 3, 8, 8)
    small = plot_attention_grid(w, TOKENS, tmp_path / "a" / "small.png", dpi=50)
    large = plot_attention_grid(w, TOKENS, tmp_path / "large.png", dpi=100)
    for path in (small, large):
        assert path.read_bytes()[:8] == PNG_MAGIC
        with PIL.open(path) as image:
            image.verify()
    with PIL.open(small) as a, PIL.open(large) as b:
        assert abs(b.size[0] - 2 * a.size[0]) <= 2 and abs(b.size[1] - 2 * a.size[1]) <= 2
        assert 400 <= b.size[0] <= 4000 and 300 <= b.size[1] <= 4000
    import matplotlib.image
    pixels = matplotlib.image.imread(large)
    assert pixels.shape[:2] == (b.size[1], b.size[0])
    assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_grid_shape_follows_layers_and_heads(tmp_path):
    w = random_weights(4, 4, 8, 8)
    wide = plot_attention_grid(w, TOKENS, tmp_path / "wide.png", layers=0, dpi=40)
    tall = plot_attention_grid(w, TOKENS, tmp_path / "tall.png", heads=[2], dpi=40)
    with PIL.open(wide) as a, PIL.open(tall) as b:
        assert a.size[0] > a.size[1] and b.size[1] > b.size[0]


def test_panels_show_the_chosen_weights_with_labels():
    w = random_weights(6, 12, 8, 8)
    fig = attention_grid_figure(w, TOKENS, layers=[5, 1], heads=[3, 0, 11], title="MiniLM")
    panels = fig.axes[:-1]
    assert len(panels) == 6
    for n, ax in enumerate(panels):
        layer, head = [5, 1][n // 3], [3, 0, 11][n % 3]
        assert ax.get_title() == f"layer {layer} head {head}"
        shown = torch.as_tensor(ax.images[0].get_array().data)
        torch.testing.assert_close(shown, w[layer, head], rtol=0, atol=0)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == TOKENS
    assert [t.get_text() for t in panels[-1].get_xticklabels()] == TOKENS
    assert panels[0].get_ylabel() == "query (attends from)"
    assert panels[-1].get_xlabel() == "key (attended to)"
    assert fig.axes[-1].get_ylabel() == "attention weight"  # the colour bar
    assert fig._suptitle.get_text() == "MiniLM"


def test_single_panel_writes_the_weights_in_the_cells():
    w = random_weights(2, 2, 8, 8)
    fig = attention_grid_figure(w, TOKENS, layers=1, heads=0)
    (panel,) = fig.axes[:-1]
    texts = sorted((round(t.get_position()[1]), round(t.get_position()[0]), t.get_text()) for t in panel.texts)
    assert len(texts) == 64
    assert [t[2] for t in texts] == [f"{v:.2f}" for v in w[1, 0].flatten().tolist()]


def test_pooled_maps_and_other_shapes_plot_on_position_axes(tmp_path):
    q, k = torch.randn(1, 2, 100, 8), torch.randn(1, 2, 100, 8)
    pooled = pooled_attention_map(q, k, block=10)[0]  # (heads, 10, 10), no layer axis
    fig = attention_grid_figure(pooled, None, block=10)
    assert [ax.get_title() for ax in fig.axes[:-1]] == ["head 0", "head 1"]
    assert fig.axes[0].images[0].get_extent() == [0, 100, 100, 0]
    assert fig.axes[0].get_ylabel() == "query position" and fig.axes[0].get_xlabel() == "key position"
    path = plot_attention_grid(random_weights(3, 5), ["a", "b", "c"], tmp_path / "cross.png",
                               key_tokens=["v", "w", "x", "y", "z"])
    assert path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("call,error,message", [
    (lambda: attention_grid_figure(random_weights(2, 2, 3, 3), ["a", "b"]), ValueError, "got 2 tokens"),
    (lambda: attention_grid_figure(random_weights(1, 2, 2, 3, 3), ["a"] * 3), ValueError, "pick one batch element"),
    (lambda: attention_grid_figure(random_weights(2, 2, 3, 3), ["a"] * 3, layers=[2]), ValueError, "out of range"),
    (lambda: attention_grid_figure(random_weights(2, 3, 3), ["a"] * 3, layers=0), ValueError, "no layers axis"),
    (lambda: attention_grid_figure(random_weights(3, 4), ["a"] * 3), ValueError, "key_tokens"),
    (lambda: attention_grid_figure(torch.ones(3, 3, dtype=torch.long), None), TypeError, "floating"),
    (lambda: attention_grid_figure(torch.full((3, 3), float("nan")), None), ValueError, "finite"),
    (lambda: attention_grid_figure(random_weights(3, 3), "abc"), TypeError, "sequence of strings"),
    (lambda: plot_attention_grid(random_weights(3, 3), None, "x.png", dpi=0), ValueError, "dpi"),
    (lambda: attention_grid_figure(random_weights(3, 3), ["a"] * 3, block=4), ValueError, "tokens=None"),
])
def test_bad_inputs_raise_clear_errors(call, error, message):
    with pytest.raises(error, match=message):
        call()


# --------------------------------------------------------------------------------------------
# HTML head view
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_view_data_round_trips_exactly(tmp_path, dtype):
    w = random_weights(3, 4, 8, 8, dtype=dtype)
    w[0, 0, 0, :3] = torch.tensor([0.0, 1e-12, 1.0], dtype=dtype)  # extremes
    path = write_head_view(w, TOKENS, tmp_path / "sub" / "view.html", title="The cat")
    data = read_head_view_data(path)
    assert data.weights.dtype == dtype and data.weights.shape == w.shape
    assert torch.equal(data.weights, w)
    assert data.tokens == TOKENS and data.key_tokens == TOKENS
    assert data.layers == [0, 1, 2] and data.heads == [0, 1, 2, 3] and data.title == "The cat"


def test_head_view_subsets_and_cross_attention_round_trip(tmp_path):
    w = random_weights(6, 12, 3, 5)
    queries, keys = ["a", "b", "c"], ["k0", "k1", "k2", "k3", "k4"]
    data = read_head_view_data(write_head_view(w, queries, tmp_path / "v.html", key_tokens=keys,
                                               layers=[4, 2], heads=7))
    assert torch.equal(data.weights, w[[4, 2]][:, [7]])
    assert data.layers == [4, 2] and data.heads == [7]
    assert data.tokens == queries and data.key_tokens == keys
    one_layer = read_head_view_data(write_head_view(w[0], queries, tmp_path / "h.html", key_tokens=keys))
    assert one_layer.layers is None and one_layer.heads == list(range(12))
    assert torch.equal(one_layer.weights, w[:1])


def test_head_view_is_self_contained_and_escapes_tokens(tmp_path):
    tricky = ["</script><script>alert(1)</script>", "<!--", "a & b", '"quoted"', "café", "##s", "\\", "<b>"]
    page = head_view_html(random_weights(2, 2, 8, 8), tricky, title="<i>not markup</i>")
    assert not re.search(r"https?://", page)
    assert "<link" not in page and " src=" not in page and "@import" not in page
    assert page.count("</script>") == 2  # the data block's and the code's, nothing from the tokens
    assert "<title>&lt;i&gt;not markup&lt;/i&gt;</title>" in page
    path = tmp_path / "t.html"
    path.write_text(page, encoding="utf-8")
    assert read_head_view_data(path).tokens == tricky


def test_reading_a_page_without_data_names_the_file(tmp_path):
    path = tmp_path / "other.html"
    path.write_text("<html><body>hello</body></html>")
    with pytest.raises(ValueError, match="other.html: no <script"):
        read_head_view_data(path)


# --------------------------------------------------------------------------------------------
# In a real browser (headless Chromium)
# --------------------------------------------------------------------------------------------


def rendered_lines(page, fragment):
    """``{(head, query, key): opacity}`` of the lines the page drew, read from Chromium's DOM."""
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([find_browser(), "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={profile}", "--virtual-time-budget=2000", "--dump-dom",
                              f"{page.resolve().as_uri()}#{fragment}"],
                             capture_output=True, text=True, timeout=120).stdout
    assert "<svg" in dom, "the page did not render"
    lines = {}
    for tag in re.findall(r"<line [^>]*>", dom):
        attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', tag))
        key = int(attrs["data-head"]), int(attrs["data-query"]), int(attrs["data-key"])
        lines[key] = float(attrs["stroke-opacity"])
    return lines


@needs_browser
def test_page_draws_one_line_per_weight_of_the_selected_token(tmp_path):
    w = random_weights(6, 4, 8, 8)
    page = write_head_view(w, TOKENS, tmp_path / "view.html", layers=[0, 1, 5])
    lines = rendered_lines(page, "token=2&layer=5&head=1,3")  # layer 5 is the page's third layer
    expected = {(h, 2, j): float(w[5, h, 2, j]) for h in (1, 3) for j in range(8) if w[5, h, 2, j] > 0.002}
    assert lines.keys() == expected.keys()
    for key, value in expected.items():
        assert lines[key] == pytest.approx(value, rel=1e-6)
    incoming = rendered_lines(page, "token=6&side=key&layer=0&head=0")
    assert incoming.keys() == {(0, i, 6) for i in range(8) if w[0, 0, i, 6] > 0.002}


@needs_browser
def test_screenshot_shows_the_page(tmp_path):
    page = write_head_view(random_weights(2, 3, 8, 8), TOKENS, tmp_path / "view.html")
    plain = screenshot_html(page, tmp_path / "plain.png", size=(800, 500))
    chosen = screenshot_html(page, tmp_path / "shots" / "cat.png", fragment="token=2&layer=1&head=0", size=(800, 500))
    import numpy as np
    images = []
    for path in (plain, chosen):
        assert path.read_bytes()[:8] == PNG_MAGIC
        with PIL.open(path) as image:
            assert image.size == (800, 500)
            images.append(np.asarray(image.convert("RGB"), dtype=np.int16))
    assert (images[1] != 255).any(axis=-1).mean() > 0.02  # text and lines, not a blank page
    assert np.abs(images[0] - images[1]).sum() > 0  # selecting a token changes the picture


@needs_browser
def test_screenshot_script_runs(tmp_path):
    import sys
    page = write_head_view(random_weights(2, 3, 8, 8), TOKENS, tmp_path / "view.html")
    script = Path(__file__).resolve().parents[1] / "scripts" / "screenshot_headview.py"
    result = subprocess.run([sys.executable, str(script), str(page), str(tmp_path / "s.png"),
                             "--token", "3", "--layer", "1", "--head", "0,2", "--size", "700x450"],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    with PIL.open(tmp_path / "s.png") as image:
        assert image.size == (700, 450)


def test_screenshot_without_a_browser_says_how_to_get_one(tmp_path, monkeypatch):
    page = write_head_view(random_weights(2, 3, 3), ["a", "b", "c"], tmp_path / "v.html")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("QKV_BROWSER", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install chromium"):
        screenshot_html(page, tmp_path / "x.png")
