"""qkv's ``flex`` backend on a CUDA GPU: speed against FlexAttention called directly and SDPA's
kernels, compile counts and the dispatcher's choice, then correctness with gradients, and BlockMask
build time, each in what is left of ``CHECK_S`` seconds. One short script for a GPU session (about
8 minutes on an H200; ``--smoke`` runs tiny sizes on CPU to check the script itself).

    PYTHONPATH=src PYTHONUNBUFFERED=1 python benchmarks/gpu_flex.py      # writes $OUT/gpu_flex.json

Speed: B=2, H=16, N=8192, D=128, bfloat16 (the shape of ``shared/gpu``), masks causal, sliding
window 1024, 8 documents, prefix-LM (N/4) and window 1024 | 8 global tokens; forward and
forward+backward, median of ``triton.testing.do_bench``; TFLOP/s on the allowed scores
(``4*B*H*N*N*D*density``, x3.5 with backward), as in ``shared/gpu/gpu_check.py``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import qkv
from qkv.backends import REGISTRY
from qkv.backends import flex as qkv_flex

SMOKE = "--smoke" in sys.argv
DEV = "cpu" if SMOKE else "cuda"
BUDGET = float(os.environ.get("CHECK_S", "480"))
T0 = time.time()
OUT = os.environ.get("OUT", ".")
res: dict = {"env": {"torch": torch.__version__, "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
                     "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
# Compiled Flex called directly recompiles per mask_mod and grad mode (speed: 5 masks x 2), and
# create_block_mask(_compile=True) per mask_mod and N (blockmask_build: 9): past dynamo's
# recompile limit (8 per code object) they would run eagerly, unfused, without a word (so the
# 128k-document row of shared/gpu ran out of memory).
for _name in ("recompile_limit", "accumulated_recompile_limit", "cache_size_limit", "accumulated_cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 4096)


def left() -> float:
    return BUDGET - (time.time() - T0)


def save() -> None:
    # Kinds whose compile failed run on 'tiled' (with a warning): their qkv-flex rows are not Flex's.
    res["flex_failed"] = {str(sig): why for sig, why in qkv_flex._FAILED.items()}
    with open(os.path.join(OUT, "gpu_flex.json"), "w") as f:
        json.dump(res, f, indent=1)


def bench(fn) -> float:
    if DEV == "cuda":
        from triton.testing import do_bench
        return do_bench(fn, warmup=10, rep=60, return_mode="median")
    fn()
    times = []
    for _ in range(3):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def correctness() -> None:
    """flex vs float64 reference, forward, lse and gradients (incl. a relative-bias table)."""
    rows = []
    g = torch.Generator().manual_seed(0)
    n = 300 if not SMOKE else 40
    seg = torch.arange(n) * 3 // n
    lengths = torch.tensor([0, n * 5 // 6])  # batch 0: rows that see nothing
    masks = {"causal": qkv.causal(), "window|global": qkv.sliding_window(40) | qkv.global_tokens([0, 7]),
             "document&padding(0 rows)": qkv.document(seg, causal=True) & qkv.key_padding(lengths)}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for name, mask in masks.items():
            if left() < 40:
                print("correctness: out of time before", dtype, name, flush=True)
                break
            base = [torch.randn(2, 4 if i == 0 else 2, n, 64, generator=g) for i in range(3)]
            table = torch.randn(4, 33, generator=g) * 0.3
            ins = [t.to(DEV, dtype).requires_grad_(not SMOKE) for t in base]
            tab = table.to(DEV).requires_grad_(not SMOKE)
            ref_ins = [t.to(DEV, torch.float64).requires_grad_(not SMOKE) for t in base]
            ref_tab = table.to(DEV, torch.float64).requires_grad_(not SMOKE)
            row = {"dtype": str(dtype), "mask": name}
            try:
                got = qkv.attention(*ins, mask, score_mod=qkv.scores.relative_bias(tab), backend="flex",
                                    return_lse=not SMOKE)  # no lse from compiled Flex on CPU
                out, lse = (got, None) if SMOKE else got
                ref, ref_lse = qkv.attention(*ref_ins, mask, score_mod=qkv.scores.relative_bias(ref_tab),
                                             backend="reference", return_lse=True)
                plain = qkv.attention(*(t.detach().to(dtype) for t in ref_ins), mask,
                                      score_mod=qkv.scores.relative_bias(table.to(DEV, dtype)), backend="reference")
                row["out_err"] = (out.double() - ref).abs().max().item()
                row["plain_math_err"] = (plain.double() - ref).abs().max().item()
                row["empty_rows_zero"] = bool((out[0].float().abs().max() == 0).item()) if "0 rows" in name else None
                if not SMOKE:
                    fin = torch.isfinite(ref_lse)
                    row["lse_err"] = (lse.double() - ref_lse)[fin].abs().max().item()
                    row["lse_inf_match"] = bool(torch.equal(torch.isfinite(lse), fin))
                    w = torch.randn(ref.shape, generator=g).to(DEV)
                    grads = torch.autograd.grad((out.double() * w).sum(), [*ins, tab])
                    ref_grads = torch.autograd.grad((ref * w).sum(), [*ref_ins, ref_tab])
                    row["grad_err"] = [(a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads)]
                    row["grad_nan"] = any(bool(torch.isnan(a).any()) for a in grads)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(row)
            print("  ", row, flush=True)
    res["correctness"] = rows
    save()


def speed() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    direct = torch.compile(flex_attention, dynamic=False)
    B, H, N, D = (2, 16, 8192, 128) if not SMOKE else (1, 2, 512, 32)
    dt = torch.bfloat16 if not SMOKE else torch.float32
    W, ndoc = (1024, 8) if not SMOKE else (64, 4)
    seg = torch.arange(N, device=DEV) * ndoc // N
    glob = torch.zeros(N, dtype=torch.bool, device=DEV)
    glob[torch.arange(8) * (N // 8)] = True
    qi, ki = torch.arange(N, device=DEV).view(-1, 1), torch.arange(N, device=DEV).view(1, -1)
    masks = {
        "full": (None, None),
        "causal": (qkv.causal(), lambda b, h, i, j: j <= i),
        f"window{W}": (qkv.sliding_window(W), lambda b, h, i, j: (j <= i) & (j >= i - W)),
        f"documents{ndoc}": (qkv.document(seg), lambda b, h, i, j: seg[i] == seg[j]),
        "prefix": (qkv.prefix_lm(N // 4), lambda b, h, i, j: (j <= i) | (j < N // 4)),
        "window|global": (qkv.sliding_window(W) | qkv.global_tokens(torch.arange(8) * (N // 8)),
                          lambda b, h, i, j: ((j <= i) & (j >= i - W)) | glob[i] | glob[j]),
    }
    q, k, v = (torch.randn(B, H, N, D, device=DEV, dtype=dt, requires_grad=not SMOKE) for _ in range(3))
    rows = []
    for mname, (mask, mod) in masks.items():
        if left() < 90:
            print("speed: out of time before", mname, flush=True)
            break
        dens = 1.0 if mod is None else float(mod(0, 0, qi, ki).float().mean())
        impls = {"qkv-auto": lambda mask=mask: qkv.attention(q, k, v, mask),
                 "qkv-flex": lambda mask=mask: qkv.attention(q, k, v, mask, backend="flex"),
                 "qkv-sdpa": lambda mask=mask: qkv.attention(q, k, v, mask, backend="sdpa")}
        if mname in ("full", "causal") and DEV == "cuda":
            def cudnn(c=(mname == "causal")):
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=c)
            impls["sdpa-cudnn"] = cudnn
        if mod is not None:
            bm = create_block_mask(mod, None, None, N, N, device=DEV)
            impls["flex-direct"] = lambda bm=bm: direct(q, k, v, block_mask=bm)
        # The first qkv-flex calls compile (forward, then backward): timed, with the compile count.
        t = time.perf_counter()
        with torch.no_grad():
            impls["qkv-flex"]()
        if DEV == "cuda":
            torch.cuda.synchronize()
        first_fwd = time.perf_counter() - t
        flops = 4 * B * H * N * N * D * dens
        for name, fn in impls.items():
            r = {"mask": mname, "impl": name, "shape": [B, H, N, D], "density": dens}
            try:
                with torch.no_grad():
                    r["fwd_ms"] = bench(fn)
                if not SMOKE:
                    o = fn()
                    g = torch.randn_like(o)
                    r["fwdbwd_ms"] = bench(lambda: torch.autograd.grad(fn(), (q, k, v), g))
                    r["fwdbwd_tflops"] = 3.5 * flops / r["fwdbwd_ms"] / 1e9
                r["fwd_tflops"] = flops / r["fwd_ms"] / 1e9
            except Exception as err:
                r["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            rows.append(r)
            print("  ", r, flush=True)
        with torch.no_grad():
            d_fwd = qkv.explain_dispatch(q.detach(), k.detach(), v.detach(), mask)
        d_bwd = qkv.explain_dispatch(q, k, v, mask)
        rows.append({"mask": mname, "auto_forward": d_fwd.chosen, "auto_backward": d_bwd.chosen,
                     "first_flex_call_s": first_fwd, "flex_compiles": qkv_flex.compile_count(),
                     "explain": str(d_bwd)})
        print("   dispatch:", rows[-1], flush=True)
        res["speed"] = rows
        save()


def blockmask_build() -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from blockmask_build import masks, qkv_block_mask
    from torch.nn.attention.flex_attention import create_block_mask

    from qkv.bench import best_time
    rows = []
    for n in ([8192, 32768, 131072] if not SMOKE else [1024]):
        for name, (mask, mod) in masks(n, DEV).items():
            if left() < 30:
                break
            r = {"seq": n, "mask": name, "qkv_ms": 1e3 * best_time(lambda: qkv_block_mask(mask, n, DEV), 3, DEV)}
            for label, compiled in (("create_block_mask_ms", False), ("create_block_mask_compiled_ms", True)):
                if n > 32768 and not compiled:
                    r[label] = "skipped: N*N evaluation (128 GiB at 128k, shared/gpu)"
                    continue
                try:
                    r[label] = 1e3 * best_time(lambda: create_block_mask(mod, None, None, n, n, device=DEV,
                                                                         _compile=compiled), 3, DEV)
                except Exception as err:
                    r[label] = f"{type(err).__name__}: {str(err)[:100]}"
                    torch.cuda.empty_cache() if DEV == "cuda" else None
            rows.append(r)
            print("  ", r, flush=True)
    res["blockmask_build"] = rows
    save()


if __name__ == "__main__":
    print(res["env"], "registry:", sorted(REGISTRY), flush=True)
    # Speed first: it is issue 11's target, and each kind compiles (forward, then backward) before
    # it is timed; the correctness kinds (9, gradients included) are mostly in tests/test_flex.py's
    # CUDA tests too, which gpu_session.sh runs before this script.
    speed()
    correctness()
    blockmask_build()
    res["seconds"] = time.time() - T0
    save()
    print("done in", round(res["seconds"]), "s", flush=True)
