"""The compiled-Flex checks on the CPU, run as a script in a fresh process with an empty inductor
cache (``tests/test_flex.py`` starts it at collection, see ``tests/background.py``): what
compiles is then the same every run (a bug of torch's CPU template depended on the symbols
handed out before in the process), nothing is a cache hit, and the two compiles (~12 s and ~20 s)
run alongside the rest of the suite. Prints ``<check>: ok`` or ``<check>: FAILED`` and the
traceback for each check; exits 1 if any failed.

    python tests/flex_compiled_cpu.py
"""

from __future__ import annotations

import traceback
import warnings

import torch

import qkv
from qkv.backends import flex


def close(got, want, tol, what):
    """``got`` within ``tol`` of ``want`` everywhere (the same infinities count as equal), no NaN
    (also what ``tests/test_flex.py`` compares with)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    same_inf = torch.isinf(got) & (got == want)
    assert not torch.isnan(got).any(), f"{what}: NaN"
    diff = torch.where(same_inf, 0.0, (got.double() - want.double()).abs())
    assert diff.numel() == 0 or diff.max().item() <= tol, f"{what}: max diff {diff.max().item():.3g}"


def modifiers_compile():
    """ALiBi then a soft cap, one kind. Its captured slopes tripped the template's naming (fixed by
    ``qkv.backends.flex_cpu_fix``); the cap's float must be a constant of the kernel (a symbol gave
    "unbacked_bindings"). One compile for two lengths. Runs first: in a fresh process it failed
    without either fix. Every other mask x modifier kind: ``tests/test_flex_compiled_sweep.py``."""
    g = torch.Generator().manual_seed(2)
    mod = qkv.scores.chain(qkv.scores.alibi(4), qkv.scores.softcap(5.0))
    counts = []
    for n in (300, 333):
        q, k, v = (torch.randn(2, 4, n, 32, generator=g) for _ in range(3))
        got = qkv.attention(q, k, v, score_mod=mod, backend="flex")
        want = qkv.attention(q.double(), k.double(), v.double(), score_mod=mod, backend="reference")
        close(got, want, 2e-5, f"{mod.name} N={n}")
        counts.append(flex.compile_count())
    assert not flex._FAILED, flex._FAILED  # compiled, not fallen back to tiled
    assert counts[1] == counts[0], counts


def no_recompile():
    """One compiled kind: window, prefix, document ids, key lengths (one of them 0: empty rows),
    batch and sequence length all change, and the compile count does not move after the first."""
    g = torch.Generator().manual_seed(0)
    failed_before, counts = dict(flex._FAILED), []
    for n, batch, window, prefix, docs, lengths in [(200, 2, 16, [5, 40], 3, [0, 150]), (333, 2, 50, [100, 0], 5, [333, 9]),
                                                     (130, 3, 7, [0, 9, 130], 2, [130, 1, 64])]:
        ids = torch.arange(n) * docs // n
        mask = ((qkv.sliding_window(window) | qkv.prefix_lm(torch.tensor(prefix)) | qkv.global_tokens([3, n - 9]))
                & qkv.document(ids) & qkv.key_padding(torch.tensor(lengths)))
        mod = qkv.scores.alibi(torch.rand(4, generator=g))
        q, k, v = (torch.randn(batch, 4, n, 32, generator=g) for _ in range(3))
        got = qkv.attention(q, k[:, :2], v[:, :2], mask, score_mod=mod, backend="flex")
        want = qkv.attention(q.double(), k[:, :2].double(), v[:, :2].double(), mask, score_mod=mod, backend="reference")
        close(got, want, 2e-5, f"compiled N={n}")
        if lengths[0] == 0:
            assert torch.equal(got[0], torch.zeros_like(got[0]))  # rows that see nothing: zeros
        counts.append(flex.compile_count())
    assert flex._FAILED == failed_before, flex._FAILED  # this kind compiled, not fallen back to tiled
    assert counts[1] == counts[0] and counts[2] == counts[0], counts


CHECKS = {"modifiers compile": modifiers_compile, "no recompile": no_recompile}


def main() -> int:
    warnings.simplefilter("error", RuntimeWarning)  # a fallback to tiled warns: fail on it
    failed = False
    for name, check in CHECKS.items():
        try:
            check()
            print(f"{name}: ok", flush=True)
        except Exception:  # noqa: BLE001 - report every check
            failed = True
            print(f"{name}: FAILED\n{traceback.format_exc()}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
