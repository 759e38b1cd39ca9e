"""Render the pattern pictures of docs/sparse.md from the masks themselves.

For each sparse family, the dense mask of a 128-token self-attention (black: may attend) and, drawn
over it, the analytic block view the tiled backend walks, for 16 x 16 tiles (8 x 8 for BigBird, its
block size): green outline FULL (no per-element test), orange PARTIAL, none EMPTY (skipped). Writes ``docs/images/sparse_<name>.png``.

Usage::

    python scripts/make_sparse_images.py [--out docs/images]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import qkv
from qkv.masks import EMPTY, FULL, TileGrid

N, TILE = 128, 16

PATTERNS = {
    "longformer": ("qkv.longformer(16, global_tokens=[0, 70])", qkv.longformer(16, [0, 70])),
    "bigbird": ("qkv.bigbird(block_size=8, window_blocks=3, global_blocks=1, random_blocks=2)",
                qkv.bigbird(block_size=8, window_blocks=3, global_blocks=1, random_blocks=2)),
    "dilated": ("qkv.dilated_window(8, 8, dilation=3)", qkv.dilated_window(8, 8, dilation=3)),
    "strided": ("qkv.sparse_strided(16)", qkv.sparse_strided(16)),
    "fixed": ("qkv.sparse_fixed(16, summary=3)", qkv.sparse_fixed(16, summary=3)),
}


def draw(title: str, mask: qkv.Mask, path: Path, tile: int = TILE) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    bound = mask.bind(1, 1, N, N, torch.device("cpu"))
    dense = bound.dense(1, 1, N, N).expand(1, 1, N, N)[0, 0]
    kinds = bound.block_kinds(TileGrid(N, N, tile, tile), 1, 1)[0, 0]
    fig, ax = plt.subplots(figsize=(4.6, 5.0))
    ax.imshow(~dense, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    for i in range(kinds.shape[0]):
        for j in range(kinds.shape[1]):
            kind = int(kinds[i, j])
            if kind == EMPTY:
                continue
            color = "tab:green" if kind == FULL else "tab:orange"
            ax.add_patch(patches.Rectangle((j * tile - 0.5, i * tile - 0.5), tile, tile, fill=False,
                                           edgecolor=color, linewidth=1.2))
    visited = (kinds != EMPTY).float().mean().item()
    summary = f"density {dense.float().mean():.0%}, tiles visited {visited:.0%}"
    ax.set_title(title.replace("(", "(\n", 1) + "\n" + summary, fontsize=7)
    ax.set_xlabel("key position")
    ax.set_ylabel("query position")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "images"))
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (title, mask) in PATTERNS.items():
        # BigBird's blocks of 8 are drawn with tiles of 8: aligned blocks make every visited tile FULL.
        draw(title, mask, out / f"sparse_{name}.png", tile=8 if name == "bigbird" else TILE)
        print(f"wrote {out / f'sparse_{name}.png'}")


if __name__ == "__main__":
    main()
