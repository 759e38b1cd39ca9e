"""What a drop-in swap of attention costs a pretrained model, and what it buys.

The bundled all-MiniLM-L6-v2 (``qkv.models``) encodes passages of Python's own documentation
(``pydoc_data.topics``, shipped with CPython) with exact attention, then again with every layer's
attention swapped (``MultiHeadAttention.set_attention``): sliding windows, Longformer (window +
[CLS] global), BigBird, Sparse Transformer strided, Performer at several feature counts and the
elu+1 linear kernel. No retraining: this measures the swap alone.

Error: cosine between each passage's embedding under the swap and under exact attention, and how
often a passage's nearest neighbour (by cosine, among the other passages) stays the same.
Speed: the attention operation alone at MiniLM's head shape (H=12, D=32), best of several runs, at
the passages' length and at N=4096 with the same configuration; plus the whole-corpus encode time.
All on one CPU thread and timed in CPU time of this process (on a shared machine, waiting for a
core costs wall time but no CPU time).

    python benchmarks/sparse_accuracy.py            # ~25 minutes (wall) on a busy shared 2-core machine
    python benchmarks/sparse_accuracy.py --passages 32 --quick

Writes ``benchmarks/results/sparse_accuracy.json`` and ``.png`` (error against speed-up).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import qkv
from qkv import bench, scaling
from qkv.linear import PerformerFeatures, linear_attention
from qkv.models import BertModel

RESULTS = Path(__file__).parent / "results"


def passages(count: int, words: int) -> list[str]:
    """``count`` passages of ``words`` words each, in order, from the pydoc topics corpus."""
    from pydoc_data.topics import topics

    text = " ".join(topics[name] for name in sorted(topics)).split()
    chunks = [" ".join(text[i:i + words]) for i in range(0, len(text) - words, words)]
    step = max(1, len(chunks) // count)  # spread over the whole corpus
    return chunks[::step][:count]


def variants(quick: bool) -> dict[str, dict]:
    """name -> {"attention": option for set_attention, "kwargs": ..., "op": attention op for timing}."""
    patterns = {
        "window 64": qkv.longformer(64, []),
        "longformer 64 + CLS": qkv.longformer(64, [0]),
        "window 128": qkv.longformer(128, []),
        "bigbird 16x(3+1+2)": qkv.bigbird(block_size=16, window_blocks=3, global_blocks=1, random_blocks=2),
        "strided 16": qkv.sparse_strided(16, causal=False),
    }
    out = {name: {"attention": mask} for name, mask in patterns.items()}
    for m in ((16, 256) if quick else (16, 64, 256, 1024)):
        out[f"performer m={m}"] = {"attention": "performer", "num_features": m}
    out["linear elu+1"] = {"attention": "linear"}
    return out


def swap(model: BertModel, spec: dict | None) -> None:
    for i, layer in enumerate(model.layers):
        if spec is None:
            layer.attn.set_attention("exact")
        else:
            layer.attn.set_attention(spec["attention"], num_features=spec.get("num_features", 256), feature_seed=i)


def op_time(spec: dict | None, n: int, batch: int) -> float:
    """Seconds of one attention call at MiniLM's head shape (``B, 12, n, 32``), best of many."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(batch, 12, n, 32, generator=g) for _ in range(3))
    if spec is None:
        call = lambda: qkv.attention(q, k, v)  # noqa: E731
    elif isinstance(spec["attention"], qkv.Mask):
        call = lambda: qkv.attention(q, k, v, spec["attention"])  # noqa: E731
    elif spec["attention"] == "performer":
        features = PerformerFeatures(32, spec["num_features"], seed=0)
        call = lambda: linear_attention(q, k, v, feature_map=features)  # noqa: E731
    else:
        call = lambda: linear_attention(q, k, v)  # noqa: E731
    call()
    return scaling.measure(call, device="cpu", budget_s=8, repeat=3, min_total_s=0.5, max_runs=20)["cpu_seconds"]


def nearest(emb: torch.Tensor) -> torch.Tensor:
    sim = emb @ emb.T
    sim.fill_diagonal_(-2)
    return sim.argmax(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--passages", type=int, default=128)
    p.add_argument("--words", type=int, default=160, help="words per passage (~1.4 tokens each, cut at 256)")
    p.add_argument("--quick", action="store_true", help="fewer Performer sizes")
    p.add_argument("--out", default=str(RESULTS / "sparse_accuracy.json"))
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    texts = passages(a.passages, a.words)
    model = BertModel.from_pretrained()
    tokens = model.tokenize(texts, truncation=True, max_length=256)
    lengths = tokens.attention_mask.sum(1).float()
    n_tokens = int(tokens.attention_mask.shape[1])
    print(f"{len(texts)} passages of pydoc topics, {lengths.mean():.0f} tokens on average (max {n_tokens})")
    specs = {"exact": None, **variants(a.quick)}
    rows, exact_emb, exact_nn = [], None, None
    for name, spec in specs.items():
        swap(model, spec)
        start = time.process_time()
        emb = model.encode(texts, batch_size=16, normalize=True)
        encode_s = time.process_time() - start
        if exact_emb is None:
            exact_emb, exact_nn = emb, nearest(emb)
        cos = (emb * exact_emb).sum(1)
        row = {"variant": name, "cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(),
               "nn_agreement": (nearest(emb) == exact_nn).float().mean().item(), "encode_seconds": encode_s,
               "op_seconds_short": op_time(spec, n_tokens, 16), "op_seconds_4096": op_time(spec, 4096, 1)}
        rows.append(row)
        print(f"  {name:<22} cos {row['cosine_mean']:.4f} (min {row['cosine_min']:.3f})  "
              f"NN kept {row['nn_agreement']:.1%}  encode {encode_s:.1f} s CPU", flush=True)
    swap(model, None)
    base = rows[0]
    for r in rows:
        r["speedup_short"] = base["op_seconds_short"] / r["op_seconds_short"]
        r["speedup_4096"] = base["op_seconds_4096"] / r["op_seconds_4096"]
        r["encode_speedup"] = base["encode_seconds"] / r["encode_seconds"]
    print()
    print(table(rows, n_tokens))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"passages": len(texts), "words": a.words, "mean_tokens": lengths.mean().item(), "max_tokens": n_tokens,
                "corpus": "pydoc_data.topics", "model": "all-MiniLM-L6-v2 (qkv.models, bundled)",
                "op_shape_short": [16, 12, n_tokens, 32], "op_shape_long": [1, 12, 4096, 32],
                "exact": "qkv.attention with backend=None (the dispatcher's choice)", "threads": 1,
                "clock": "CPU time of the process (time.process_time), best of several runs",
                "performer": "one draw per layer, seeds 0..5; orthogonal features"}
    with open(out, "w") as f:
        json.dump({"environment": bench.environment(), "settings": settings, "rows": rows}, f, indent=1)
    plot(rows, n_tokens, out.with_suffix(".png"))
    print(f"\nwrote {out} and {out.with_suffix('.png')}")


def table(rows, n_tokens) -> str:
    lines = [f"| variant | cosine to exact (mean) | min | nearest neighbour kept | attention speed-up at N={n_tokens} "
             "| at N=4096 | encode speed-up |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['cosine_mean']:.4f} | {r['cosine_min']:.3f} | {r['nn_agreement']:.1%} | "
                     f"{r['speedup_short']:.2f}x | {r['speedup_4096']:.2f}x | {r['encode_speedup']:.2f}x |")
    return "\n".join(lines)


def plot(rows, n_tokens, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for ax, key, title in ((axes[0], "speedup_short", f"attention op at N={n_tokens} (the passages)"),
                           (axes[1], "speedup_4096", "same configuration at N=4096")):
        for r in rows[1:]:
            err = max(1 - r["cosine_mean"], 1e-6)
            marker = "o" if r["variant"].startswith(("window", "longformer", "bigbird", "strided")) else "s"
            ax.scatter(r[key], err, marker=marker)
            ax.annotate(r["variant"], (r[key], err), fontsize=7, xytext=(4, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("speed-up over exact attention (x)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("1 - cosine to exact embeddings (mean)")
    fig.suptitle("all-MiniLM-L6-v2 with its attention swapped, no retraining (circles: exact sparse, "
                 "squares: linear/Performer)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
