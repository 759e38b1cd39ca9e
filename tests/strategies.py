"""Hypothesis strategies for attention problems: shapes, masks (single and composed), score
modifiers and bias, built from a drawn seed so that every example uses fresh random tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from hypothesis import strategies as st

import qkv
from qkv import scores

MASK_KINDS = ["none", "causal", "window", "padding", "document", "prefix", "global", "block_sparse",
              "tensor", "bool_tensor", "function"]
MOD_KINDS = ["none", "alibi", "softcap", "relative", "chain", "bias"]
HEAD_DIMS = [8, 16, 64, 80, 128]


@dataclass
class Case:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kwargs: dict = field(default_factory=dict)
    label: str = ""
    learnable: list = field(default_factory=list)  # extra tensors that get gradients (bias, tables)

    def inputs(self):
        return [self.q, self.k, self.v, *self.learnable]


def make_mask(kind: str, batch: int, heads: int, nq: int, nk: int, g: torch.Generator):
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    ri = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    if kind == "none":
        return None
    if kind == "causal":
        return qkv.causal()
    if kind == "window":
        return qkv.sliding_window(ri(0, 12), ri(0, 4))
    if kind == "padding":
        return qkv.key_padding(torch.randint(0, nk + 1, (batch,), generator=g))
    if kind == "document":
        cuts = torch.sort(torch.randint(0, nk + 1, (3,), generator=g)).values
        seg = (torch.arange(nk)[None, :] >= cuts[:, None]).sum(0)
        q_seg = None
        if nq > nk:
            q_cuts = torch.sort(torch.randint(0, nq + 1, (3,), generator=g)).values
            q_seg = (torch.arange(nq)[None, :] >= q_cuts[:, None]).sum(0)
        return qkv.document(seg, causal=bool(ri(0, 1)), q_segment_ids=q_seg)
    if kind == "prefix":
        return qkv.prefix_lm(ri(0, nk))
    if kind == "global":
        return qkv.global_tokens(torch.randperm(nk, generator=g)[: ri(0, min(3, nk))]) | qkv.sliding_window(ri(0, 6))
    if kind == "block_sparse":
        bs = [4, 8, 16][ri(0, 2)]
        n = -(-nk // bs)
        return qkv.block_sparse(r(batch, 1, n, n) > 0.5, bs)
    if kind == "tensor":
        return qkv.from_tensor(r(batch, heads, nq, nk) > 0.4)
    if kind == "bool_tensor":
        return r(1, heads, nq, nk) > 0.3
    if kind == "function":
        return qkv.from_function(lambda b, h, q, k: ((q * 7 + k * 3 + h) % 5) != 0, "mod5")
    raise ValueError(kind)


def make_mod(kind: str, heads: int, batch: int, nq: int, nk: int, dtype, g: torch.Generator, grad: bool):
    """(score_mod, bias, learnable tensors)."""
    if kind == "none":
        return None, None, []
    if kind == "alibi":
        return scores.alibi(heads, symmetric=bool(torch.randint(0, 2, (1,), generator=g))), None, []
    if kind == "softcap":
        return scores.softcap(float(torch.rand(1, generator=g)) * 3 + 0.5), None, []
    if kind == "relative":
        table = (torch.randn(heads, 11, generator=g) * 0.5).to(dtype).requires_grad_(grad)
        return scores.relative_bias(table), None, [table] if grad else []
    if kind == "chain":
        table = (torch.randn(9, generator=g) * 0.5).to(dtype).requires_grad_(grad)
        return scores.chain(scores.relative_bias(table), scores.softcap(2.0)), None, [table] if grad else []
    if kind == "bias":
        shape = [(batch, heads, nq, nk), (1, heads, 1, nk), (batch, 1, nq, 1), (nq, nk)][int(torch.randint(0, 4, (1,), generator=g))]
        bias = torch.randn(*shape, generator=g).to(dtype).requires_grad_(grad)
        return None, bias, [bias] if grad else []
    raise ValueError(kind)


@st.composite
def cases(draw, dtype=torch.float64, grad=True, mask_kinds=MASK_KINDS, mod_kinds=MOD_KINDS, compose=True,
          max_n=45):
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    batch = draw(st.integers(1, 2))
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    nq = draw(st.integers(1, max_n))
    nk = draw(st.integers(1, max_n))
    d = draw(st.sampled_from(HEAD_DIMS))
    dv = draw(st.sampled_from([d, 8, 24]))
    mask_kind = draw(st.sampled_from(mask_kinds))
    mask = make_mask(mask_kind, batch, heads, nq, nk, g)
    label = mask_kind
    if compose and draw(st.booleans()) and mask is not None and not isinstance(mask, torch.Tensor):
        other_kind = draw(st.sampled_from([m for m in mask_kinds if m not in ("none", "bool_tensor")]))
        other = make_mask(other_kind, batch, heads, nq, nk, g)
        op = draw(st.sampled_from(["&", "|", "~"]))
        mask = {"&": lambda: mask & other, "|": lambda: mask | other, "~": lambda: ~mask}[op]()
        label = f"{mask_kind}{op}{other_kind}" if op != "~" else f"~{mask_kind}"
    mod_kind = draw(st.sampled_from(mod_kinds))
    if mod_kind == "bias" and isinstance(mask, torch.Tensor):
        mod_kind = "none"  # one tensor mask at a time
    score_mod, bias, learnable = make_mod(mod_kind, heads, batch, nq, nk, dtype, g, grad)
    scale = draw(st.sampled_from([None, 0.3]))
    t = lambda *s: torch.randn(*s, generator=g).to(dtype).requires_grad_(grad)  # noqa: E731
    kwargs = {"mask": bias if bias is not None else mask, "score_mod": score_mod, "scale": scale}
    return Case(t(batch, heads, nq, d), t(batch, kv_heads, nk, d), t(batch, kv_heads, nk, dv), kwargs,
                f"B={batch} H={heads}/{kv_heads} Nq={nq} Nk={nk} D={d} Dv={dv} mask={label} mod={mod_kind}",
                learnable)
