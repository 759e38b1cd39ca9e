"""Every mask kind x every score-modifier kind of the property tests, through compiled Flex on the
CPU, against the float64 reference; none may fall back to tiled.

One compile per kind (66 kinds, ~8 s each on 2 cores), so it runs only with ``QKV_SLOW=1``; the
default suite compiles a bounded set of kinds (``test_flex.py``). Kinds are compiled in one
process one after the other, which is what tripped torch's CPU template before
``qkv.backends.flex_cpu_fix`` (whether a kind compiled depended on what compiled before it).
"""

import os
import warnings

import pytest
import torch

import qkv
from qkv.backends import flex
from tests.strategies import MASK_KINDS, MOD_KINDS, make_mask, make_mod

pytestmark = pytest.mark.skipif(os.environ.get("QKV_SLOW") != "1", reason="slow (~10 min): set QKV_SLOW=1")


def test_every_mask_and_score_modifier_kind_compiles_on_cpu_and_matches():
    g = torch.Generator().manual_seed(3)
    batch, heads, kv_heads, n, dim = 2, 4, 2, 200, 32
    failures, fallbacks = [], []
    for mask_kind in MASK_KINDS:
        for mod_kind in MOD_KINDS:
            mask = make_mask(mask_kind, batch, heads, n, n, g)
            mod, bias, _ = make_mod(mod_kind, heads, batch, n, n, torch.float32, g, grad=False)
            q = torch.randn(batch, heads, n, dim, generator=g)
            k, v = (torch.randn(batch, kv_heads, n, dim, generator=g) for _ in range(2))
            if bias is not None:
                mask = bias if mask is None else mask  # a float bias takes the mask's place
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                got = qkv.attention(q, k, v, mask, score_mod=mod, backend="flex")
            want = qkv.attention(q.double(), k.double(), v.double(), mask, score_mod=mod, backend="reference")
            label = f"{mask_kind} x {mod_kind}"
            if any("could not compile" in str(w.message) for w in caught):
                fallbacks.append(label)
            err = (got.double() - want).abs().max().item()
            if not err <= 2e-5:
                failures.append(f"{label}: max error {err:.3g}")
    assert not fallbacks, f"fell back to tiled: {fallbacks}; {flex._FAILED}"
    assert not failures, failures
