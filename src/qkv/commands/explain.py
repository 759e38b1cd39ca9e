"""``qkv explain``: run the bundled pretrained encoder (all-MiniLM-L6-v2) on a text through qkv's
attention and show what it attends to: a table of each token's most-attended token per layer and
head, a PNG heatmap grid and an interactive HTML head view. ``--compare`` shows context at work:
the same word's vectors in two sentences, before and after attention."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

DEFAULT_TEXT = "The cat sat on the mat"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", default=DEFAULT_TEXT, help=f"text to run (default: {DEFAULT_TEXT!r})")
    parser.add_argument("--layer", type=int, help="only this layer (0-based)")
    parser.add_argument("--head", type=int, help="only this head (0-based)")
    parser.add_argument("--out", default="out/explain", help="directory for the PNG and HTML (default: out/explain)")
    parser.add_argument("--model", metavar="DIR", help="a BERT-family checkpoint directory (default: bundled MiniLM)")
    parser.add_argument("--backend", help="qkv attention backend for the encoder (default: automatic)")
    parser.add_argument("--compare", nargs=2, metavar=("TEXT_A", "TEXT_B"),
                        help="compare --word's vectors in two texts instead")
    parser.add_argument("--word", help="the word to follow with --compare")


def top_attention_table(weights: torch.Tensor, tokens: list[str], layers: list[int], heads: list[int]) -> str:
    """One row per (layer, head), one column per query token; each cell names the key that token
    attends to most and its weight. ``weights``: ``(L, H, N, N)``."""
    cells = {}
    for layer in layers:
        for head in heads:
            top = weights[layer, head].max(dim=-1)
            cells[layer, head] = [f"{tokens[j]} {w:.2f}" for w, j in zip(top.values.tolist(), top.indices.tolist())]
    width = max(len(c) for row in cells.values() for c in row + tokens) + 2
    lines = ["query ->".ljust(9) + "".join(t.ljust(width) for t in tokens)]
    for (layer, head), row in cells.items():
        lines.append(f"L{layer} H{head}".ljust(9) + "".join(c.ljust(width) for c in row))
    return "\n".join(lines)


def _pick(name: str, value: int | None, size: int) -> list[int]:
    if value is None:
        return list(range(size))
    if not 0 <= value < size:
        raise SystemExit(f"--{name} must be in [0, {size - 1}], got {value}")
    return [value]


def _compare(model, args) -> int:
    from qkv.models import compare_word_in_contexts

    if not args.word:
        raise SystemExit("--compare needs --word (the word to follow in both texts)")
    result = compare_word_in_contexts(model, args.compare[0], args.compare[1], args.word)
    a, b = args.compare
    print(f"'{args.word}' in\n  A: {a}\n  B: {b}")
    print(f"static embeddings (before attention): cosine {result['static_cosine']:.3f}")
    print(f"contextual vectors (after {len(result['contextual_cosine_by_layer']) - 1} layers): "
          f"cosine {result['contextual_cosine']:.3f}")
    print("by layer: " + "  ".join(f"{i}: {c:.3f}" for i, c in enumerate(result["contextual_cosine_by_layer"])))
    print("(layer 0 is the embedding output, positions included; attention moves the word's vector towards its context)")
    return 0


def run(args: argparse.Namespace) -> int:
    from qkv.inspect import plot_attention_grid, write_head_view
    from qkv.models import BertModel

    model = BertModel.from_pretrained(args.model, backend=args.backend)
    if args.compare:
        return _compare(model, args)
    batch = model.tokenize(args.text)
    with torch.no_grad():
        output = model(**batch.model_inputs(), output_attentions=True)
    weights = torch.stack(output.attentions)[:, 0]  # (layers, heads, N, N)
    tokens = batch.tokens[0]
    layers = _pick("layer", args.layer, weights.shape[0])
    heads = _pick("head", args.head, weights.shape[1])
    print(f"{len(tokens)} tokens: {' '.join(tokens)}")
    print(f"most-attended key per query token (weight), {len(layers)} layer(s) x {len(heads)} head(s):\n")
    print(top_attention_table(weights, tokens, layers, heads))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = f'all-MiniLM-L6-v2, "{args.text}"' if args.model is None else f'"{args.text}"'
    png = plot_attention_grid(weights, tokens, out / "attention.png", layers=layers, heads=heads, title=title,
                              annotate=len(layers) * len(heads) == 1)
    html = write_head_view(weights, tokens, out / "head_view.html", layers=layers, heads=heads, title=title)
    print(f"\nwrote {png} (heatmaps) and {html} (open in a browser: hover a token to see its attention)")
    return 0
