"""The terminal tables of ``qkv explain``: a summary that fits the terminal, and the full table.

* :func:`summary_table`: one line per (layer, head) saying what the head does: where most query
  tokens put their largest weight (the previous token, the next one, themselves, the first or last
  token, or "content" anywhere else), how peaked its rows are (mean of each row's largest weight),
  and the token that receives the most attention in total. Lines are cut to the terminal's width.
* :func:`full_table`: for every (layer, head) and every query token, the keys it attends to most
  with their weights, one token per line (long, never wide).

``weights`` is ``(L, H, N, N)`` for one text, ``layers`` and ``heads`` label its first two axes.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import Tensor

#: Names of the patterns :func:`head_pattern` recognises, by what the largest weight points at.
PATTERNS = ("previous token", "next token", "itself", "first token", "last token", "content")


def head_pattern(weights: Tensor, tokens: list[str]) -> tuple[str, float]:
    """The commonest place a ``(N, N)`` map's rows put their largest weight, and the share of rows
    that do so: ``("previous token", 0.9)`` means 90% of the tokens attend most to the token before
    them. The first and last tokens are named (e.g. ``"first token [CLS]"``)."""
    n = weights.shape[-1]
    top = weights.argmax(dim=-1).tolist()
    kinds = []
    for i, j in enumerate(top):
        if j == 0:
            kinds.append("first token")
        elif j == n - 1:
            kinds.append("last token")
        elif j == i - 1:
            kinds.append("previous token")
        elif j == i + 1:
            kinds.append("next token")
        elif j == i:
            kinds.append("itself")
        else:
            kinds.append("content")
    kind, count = Counter(kinds).most_common(1)[0]
    if kind == "first token":
        kind = f"first token {tokens[0]}"
    elif kind == "last token":
        kind = f"last token {tokens[-1]}"
    return kind, count / len(top)


def summary_table(weights: Tensor, tokens: list[str], layers: list[int], heads: list[int], width: int) -> str:
    """One line per (layer, head), at most ``width`` characters each (see the module docstring)."""
    header = f"{'head':<8} {'largest weight goes to (share of tokens)':<40} {'peak':>5}  most attended token (share)"
    lines = [header, "-" * min(len(header), width)]
    for li, layer in enumerate(layers):
        for hi, head in enumerate(heads):
            w = weights[li, hi]
            kind, share = head_pattern(w, tokens)
            peak = w.max(dim=-1).values.mean().item()
            received = w.sum(dim=0) / w.shape[0]  # share of all attention each key receives
            j = int(received.argmax())
            lines.append(f"{f'L{layer} H{head}':<8} {f'{kind} ({share:.0%})':<40} {peak:>5.2f}  "
                         f"#{j} {tokens[j]} ({received[j].item():.0%})")
    return "\n".join(_fit(line, width) for line in lines)


def full_table(weights: Tensor, tokens: list[str], layers: list[int], heads: list[int], width: int,
               top: int = 3) -> str:
    """Every query token's ``top`` most-attended keys per (layer, head), one token per line."""
    index = max(len(str(len(tokens) - 1)), 1)
    name = min(max(len(t) for t in tokens), 16)
    lines = []
    for li, layer in enumerate(layers):
        for hi, head in enumerate(heads):
            lines.append(f"L{layer} H{head}: query token -> most-attended keys (weight)")
            best = weights[li, hi].topk(min(top, weights.shape[-1]), dim=-1)
            for i, (values, keys) in enumerate(zip(best.values.tolist(), best.indices.tolist())):
                cells = ", ".join(f"{tokens[j]} {w:.2f}" for w, j in zip(values, keys))
                lines.append(_fit(f"  {i:>{index}} {_cut(tokens[i], name):<{name}} -> {cells}", width))
    return "\n".join(lines)


def _cut(text: str, size: int) -> str:
    return text if len(text) <= size else text[:size - 1] + "~"


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[:max(width - 3, 1)] + "..."
