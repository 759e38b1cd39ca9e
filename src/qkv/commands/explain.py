"""``qkv explain``: run the bundled pretrained encoder (all-MiniLM-L6-v2) on a text through qkv's
attention and show what it attends to: a summary table (what each head does), a PNG heatmap grid
and an interactive HTML head view. ``--compare`` shows context at work: the same word's vectors in
two sentences, before and after attention.

Any text up to the model's limit (512 tokens) runs in seconds: the encoder computes each layer's
attention once; a map longer than a panel can label is mean-pooled into blocks
(:func:`qkv.inspect.pool_weights`) and the PNG is capped in pixels; the head view of a long text
keeps each token's ``--top-k`` largest weights in one byte each. Longer texts need ``--truncate``.
Every option is checked before the model loads.
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
from pathlib import Path

import torch

from .usage import UsageError, backend_name, existing_dir, existing_file, index_list, indices, positive

DEFAULT_TEXT = "The cat sat on the mat"
#: Texts longer than this many tokens get the compact head view (top-k weights, one byte each).
COMPACT_HEAD_VIEW = 64
#: A grid panel labels every token up to this many tokens (by number of panels drawn), else pools.
LABEL_LIMITS = ((1, 64), (12, 32), (math.inf, 16))
#: A pooled panel has about this many cells per side.
POOLED_CELLS = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("text", nargs="?", default=None,
                        help=f"text to explain, '-' to read standard input (default: {DEFAULT_TEXT!r})")
    parser.add_argument("--file", metavar="PATH", help="read the text from this UTF-8 file instead (default: none)")
    parser.add_argument("--truncate", action="store_true",
                        help="explain the first 512 tokens of a longer text (default: refuse a text over the "
                             "model's limit)")
    parser.add_argument("--layer", type=index_list, metavar="L[,L...]",
                        help="only these layers, 0-based, e.g. 2 or 0,2,5 (default: all)")
    parser.add_argument("--head", type=index_list, metavar="H[,H...]",
                        help="only these heads, 0-based, e.g. 8 or 0,8 (default: all)")
    parser.add_argument("--table", choices=("summary", "full", "none"), default="summary",
                        help="summary: one line per head; full: every token's most-attended keys; none")
    parser.add_argument("--out", default="out/explain", help="directory for attention.png and head_view.html")
    parser.add_argument("--top-k", type=int, default=16, metavar="K",
                        help=f"weights kept per token and head in the head view of texts over {COMPACT_HEAD_VIEW} "
                             "tokens")
    parser.add_argument("--max-pixels", type=int, default=6_000_000, metavar="N",
                        help="largest PNG, width x height in pixels (the resolution drops to fit)")
    parser.add_argument("--model", metavar="DIR", help="a BERT-family checkpoint directory (default: bundled MiniLM)")
    parser.add_argument("--backend", help="qkv attention backend for the encoder, e.g. tiled (default: automatic)")
    parser.add_argument("--compare", nargs=2, metavar=("TEXT_A", "TEXT_B"),
                        help="compare --word's vectors in two texts instead (default: off)")
    parser.add_argument("--word", help="the word to follow with --compare (default: none)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar on long texts")


def run(args: argparse.Namespace) -> int:
    directory = _check_options(args)
    from qkv.models import BertConfig

    config = BertConfig.from_file(directory / "config.json")
    layers = indices("--layer", args.layer, config.num_hidden_layers, "layers")
    heads = indices("--head", args.head, config.num_attention_heads, "heads")
    if args.compare:
        return _compare(directory, args)
    text = _read_text(args)
    tokens, ids, dropped = _tokenize(directory, config, text, args.truncate)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    progress = _Progress(enabled=len(tokens) > COMPACT_HEAD_VIEW and not args.no_progress)
    progress.stage("loading the model")
    from qkv.models import BertModel

    model = BertModel.from_pretrained(directory, backend=args.backend)
    progress.stage("running the encoder")
    with torch.no_grad():
        output = model(ids, output_attentions=True)
    weights = torch.stack([a[0] for a in output.attentions])  # (layers, heads, N, N), all of them
    del output
    chosen = weights[layers][:, heads]  # the --layer / --head selection, for the tables
    progress.stage("writing the table")
    width = shutil.get_terminal_size((100, 24)).columns
    lines = [f"{len(tokens)} tokens: {_shorten(' '.join(tokens), max(width * 3 - 12, 40))}"]
    if dropped:
        lines.append(f"(--truncate: the text has {len(tokens) + dropped} tokens, the model takes at most "
                     f"{config.max_tokens}; the last {dropped} are left out)")
    if args.table != "none":
        from .explain_table import full_table, summary_table

        if args.table == "summary":
            lines += ["", _shorten(f"what each of {len(layers)} x {len(heads)} heads does (--table full: every "
                                   "token's most-attended keys):", width),
                      summary_table(chosen, tokens, layers, heads, width)]
        else:
            lines += ["", full_table(chosen, tokens, layers, heads, width)]
    progress.write("\n".join(lines))
    del chosen

    title = _title(args, text, len(tokens))
    progress.stage("drawing the PNG")
    png = _draw_png(weights, tokens, layers, heads, out / "attention.png", title, args.max_pixels)
    progress.stage("writing the head view")
    from qkv.inspect import write_head_view

    compact = len(tokens) > COMPACT_HEAD_VIEW
    html = write_head_view(weights, tokens, out / "head_view.html", layers=layers, heads=heads, title=title,
                           top_k=args.top_k if compact else None, quantize=compact)
    progress.close()
    print(f"\nwrote {png} (heatmaps) and {html} (open in a browser: hover a token to see its attention)")
    return 0


def _check_options(args: argparse.Namespace) -> Path:
    """Every option that can be checked without the model; returns the checkpoint directory."""
    positive("--top-k", args.top_k)
    if args.max_pixels < 10_000:
        raise UsageError(f"--max-pixels must be at least 10000, got {args.max_pixels}")
    backend_name("--backend", args.backend)
    if args.compare and not args.word:
        raise UsageError("--compare needs --word (the word to follow in both texts)")
    if args.word and not args.compare:
        raise UsageError("--word goes with --compare TEXT_A TEXT_B")
    if args.compare and (args.text is not None or args.file is not None):
        raise UsageError("--compare takes its two texts itself; leave out the TEXT argument and --file")
    if args.file is not None and args.text is not None:
        raise UsageError("--file: give the text either as an argument or with --file, not both")
    existing_file("--file", args.file)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out must be a directory, but {out} is a file")
    if args.model is not None:
        return existing_dir("--model", args.model, needs="config.json",
                            hint=" (expected a checkpoint directory with config.json and the weights)")
    from qkv.models import default_model_path

    try:
        return default_model_path()
    except ImportError as e:
        raise UsageError(f"--model: {e}") from None


def _read_text(args: argparse.Namespace) -> str:
    """The text to explain; :class:`UsageError` if it is empty or only whitespace (the model
    would see nothing but [CLS] [SEP])."""
    if args.file is not None:
        text, source = Path(args.file).read_text(encoding="utf-8"), f"--file {args.file}"
    elif args.text == "-":
        text, source = sys.stdin.read(), "standard input"
    else:
        text, source = (DEFAULT_TEXT if args.text is None else args.text), "TEXT"
    if not text.strip():
        raise UsageError(f"the text ({source}) is empty: nothing to explain")
    return text


def _tokenize(directory: Path, config, text: str, truncate: bool) -> tuple[list[str], torch.Tensor, int]:
    """Tokens, ids ``(1, N)`` and how many tokens ``--truncate`` dropped; refuses long texts without it."""
    from qkv.models import BertTokenizer

    tokenizer = BertTokenizer.from_file(directory / "tokenizer.json", pad_id=config.pad_token_id,
                                        max_length=config.max_tokens)
    total = len(tokenizer.tokenizer.encode(text).ids)
    if total > config.max_tokens and not truncate:
        raise UsageError(f"the text is {total} tokens long, more than the model's limit of {config.max_tokens}; "
                         f"pass --truncate to explain its first {config.max_tokens} tokens")
    batch = tokenizer(text, truncation=True)
    return batch.tokens[0], batch.input_ids, total - len(batch.tokens[0])


def _draw_png(weights, tokens, layers, heads, path: Path, title: str, max_pixels: int) -> Path:
    """The heatmap grid: labelled cells for short texts, mean-pooled blocks for long ones."""
    from qkv.inspect import plot_attention_grid, pool_weights

    n, panels = len(tokens), len(layers) * len(heads)
    label_limit = next(limit for most, limit in LABEL_LIMITS if panels <= most)
    if n <= label_limit:
        return plot_attention_grid(weights, tokens, path, layers=layers, heads=heads, title=title,
                                   annotate=panels == 1 and n <= 16, max_pixels=max_pixels)
    block = max(1, -(-n // POOLED_CELLS))
    pooled = pool_weights(weights, block) if block > 1 else weights
    note = f", mean over {block} x {block} token blocks" if block > 1 else ""
    return plot_attention_grid(pooled, None, path, layers=layers, heads=heads, block=block if block > 1 else None,
                               title=title + note, max_pixels=max_pixels)


def _title(args: argparse.Namespace, text: str, n: int) -> str:
    quoted = f'"{_shorten(" ".join(text.split()), 70)}"'
    return (f"all-MiniLM-L6-v2, {quoted}" if args.model is None else quoted) + (f" ({n} tokens)" if n > 16 else "")


def _shorten(text: str, size: int) -> str:
    return text if len(text) <= size else text[:size - 3] + "..."


def _compare(directory: Path, args: argparse.Namespace) -> int:
    from qkv.models import BertModel, compare_word_in_contexts
    from qkv.models.words import find_word

    for label, text in zip(("TEXT_A", "TEXT_B"), args.compare):
        try:
            find_word(text, args.word)
        except ValueError:
            raise UsageError(f"--word {args.word!r} does not occur as a whole word in {label} {text!r}") from None
    model = BertModel.from_pretrained(directory, backend=args.backend)
    result = compare_word_in_contexts(model, args.compare[0], args.compare[1], args.word)
    a, b = args.compare
    print(f"'{args.word}' in\n  A: {a}\n  B: {b}")
    print(f"static embeddings (before attention): cosine {result['static_cosine']:.3f}")
    print(f"contextual vectors (after {len(result['contextual_cosine_by_layer']) - 1} layers): "
          f"cosine {result['contextual_cosine']:.3f}")
    print("by layer: " + "  ".join(f"{i}: {c:.3f}" for i, c in enumerate(result["contextual_cosine_by_layer"])))
    print("(layer 0 is the embedding output, positions included; attention moves the word's vector towards its context)")
    return 0


class _Progress:
    """A tqdm bar over the stages of a long run (on stderr); silent for short texts."""

    STAGES = 5

    def __init__(self, enabled: bool):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=self.STAGES, desc="qkv explain", unit="stage", file=sys.stderr, leave=False,
                            bar_format="{desc}: {n_fmt}/{total_fmt} stages {bar:20} {elapsed}")
        self.started = False

    def stage(self, name: str) -> None:
        if self.bar is not None:
            if self.started:
                self.bar.update(1)
            self.started = True
            self.bar.set_description_str(f"qkv explain: {name}")

    def write(self, text: str) -> None:
        if self.bar is None:
            print(text)
        else:
            self.bar.write(text, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()
