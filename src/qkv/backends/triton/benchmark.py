"""The GPU benchmark of the ``triton`` backend against its peers (``benchmarks/gpu_attention.py``,
``qkv bench --gpu-suite``). One run on one GPU; a JSON file with device, versions and date.

Training shapes (bf16, H=16, ``tokens`` per batch, so ``B = tokens // N``): ``triton`` versus SDPA's
flash / cuDNN / efficient kernels and compiled FlexAttention, forward and forward+backward, for
full, causal, sliding window, packed documents and prefix-LM. SDPA serves the last three only
through a dense mask (efficient kernel). TFLOP/s count the *allowed* scores only:
``4 * B * H * N^2 * D * density`` (x3.5 for forward+backward).

Decode: one query token over a cache (``Hq=32``, ``Hkv=8``, D=128, bf16) at batch 1 and 16,
contiguous and paged (pages of 64 tokens, shuffled), against SDPA; TB/s of K and V read, next to
the device's measured copy bandwidth.

Before timing, ``triton`` is checked against float32 math on one mid-size problem per mask, so
that a wrong kernel is never timed. ``--budget-s`` stops early (and still writes the file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

import qkv

MASKS = ("full", "causal", "window", "documents", "prefix")


def _mask(name: str, n: int, window: int, documents: int, device):
    """(qkv mask, Flex mask_mod, dense bool (N, N) builder, density)."""
    seg = (torch.arange(n, device=device) * documents // n).to(torch.int32)
    prefix = n // 4
    if name == "full":
        return None, None, None
    if name == "causal":
        return qkv.causal(), (lambda b, h, i, j: j <= i), (lambda i, j: j <= i)
    if name == "window":
        return (qkv.sliding_window(window), (lambda b, h, i, j: (j <= i) & (j >= i - window)),
                (lambda i, j: (j <= i) & (j >= i - window)))
    if name == "documents":
        return (qkv.document(seg), (lambda b, h, i, j: seg[i] == seg[j]), (lambda i, j: seg[i] == seg[j]))
    if name == "prefix":
        return (qkv.prefix_lm(prefix), (lambda b, h, i, j: (j < prefix) | (j <= i)),
                (lambda i, j: (j < prefix) | (j <= i)))
    raise ValueError(f"unknown mask {name!r}; choose from {MASKS}")


def _dense(fn, n, device):
    i = torch.arange(n, device=device).view(-1, 1)
    j = torch.arange(n, device=device).view(1, -1)
    return fn(i, j)


def _bench(fn, grad_to_none=None) -> float:
    if not torch.cuda.is_available():  # --smoke: the interpreter on CPU, one timed run
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=10, rep=50, grad_to_none=grad_to_none, return_mode="median")


def _sdpa(backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
              "efficient": SDPBackend.EFFICIENT_ATTENTION}[backend_name]

    def call(q, k, v, attn_mask=None, is_causal=False):
        with sdpa_kernel([kernel]):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)

    return call


def environment(device) -> dict:
    import triton

    info = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__,
            "triton": triton.__version__, "qkv": qkv.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu (interpreter smoke run)",
            "cuda": torch.version.cuda,
            "autotune": os.environ.get("QKV_TRITON_AUTOTUNE", "1")}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def check(mask_name: str, device, window: int, documents: int) -> float:
    """Max error of triton (bf16) vs float32 math on one problem, relative to SDPA-math's bf16 error."""
    n, d = (1024, 128) if device.type == "cuda" else (48, 32)
    g = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 4, n, d, generator=g, device=device) for _ in range(3))
    mask, _, dense_fn = _mask(mask_name, n, window, documents, device)
    allowed = None if dense_fn is None else _dense(dense_fn, n, device)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=allowed)
    lo = [t.bfloat16() for t in (q, k, v)]
    got = qkv.attention(*lo, mask, backend="triton").double()
    base = F.scaled_dot_product_attention(*lo, attn_mask=allowed).double()
    return (got - want).abs().max().item() / max((base - want).abs().max().item(), 1e-6)


def training_rows(args, device, deadline, log) -> list[dict]:
    rows = []
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # One compile per (shape, mask); a high recompile limit keeps Flex compiled (never eager) throughout.
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, 4096)
    flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else None
    for d in args.head_dims:
        for n in args.seq:
            b = max(1, args.tokens // n)
            for name in args.masks:
                if time.time() > deadline:
                    log("budget spent: stopping")
                    return rows
                mask, mod, dense_fn = _mask(name, n, args.window, args.documents, device)
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(b, args.heads, n, d, generator=g, device=device, dtype=torch.bfloat16)
                           .requires_grad_() for _ in range(3))
                dout = torch.randn_like(q)
                allowed = None if dense_fn is None else _dense(dense_fn, n, device)
                density = 1.0 if allowed is None else allowed.float().mean().item()
                flops = 4 * b * args.heads * n * n * d * density
                calls = {"triton": lambda: qkv.attention(q, k, v, mask, backend="triton"),
                         "qkv auto": lambda: qkv.attention(q, k, v, mask)}
                if name in ("full", "causal"):
                    for kern in ("flash", "cudnn", "efficient"):
                        calls[f"sdpa {kern}"] = (lambda f=_sdpa(kern): f(q, k, v, is_causal=name == "causal"))
                else:
                    calls["sdpa efficient + dense mask"] = lambda f=_sdpa("efficient"): f(q, k, v, attn_mask=allowed)
                if flex is not None:
                    block_mask = None if mod is None else create_block_mask(mod, None, None, n, n, device=device)
                    calls["flex"] = lambda: flex(q, k, v, block_mask=block_mask)
                row = {"D": d, "N": n, "B": b, "H": args.heads, "mask": name, "density": density, "ms": {},
                       "tflops": {}, "errors": {}}
                for label, call in calls.items():
                    for direction in ("fwd", "fwd+bwd"):
                        key = f"{label} {direction}"
                        try:
                            if direction == "fwd":
                                with torch.no_grad():
                                    ms = _bench(call)
                            else:
                                ms = _bench(lambda: call().backward(dout), grad_to_none=[q, k, v])
                        except Exception as err:  # a peer that cannot run this problem is reported, not fatal
                            row["errors"][key] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                            continue
                        row["ms"][key] = ms
                        row["tflops"][key] = flops * (3.5 if direction != "fwd" else 1.0) / (ms * 1e-3) / 1e12
                for direction in ("fwd", "fwd+bwd"):
                    t = row["ms"].get(f"triton {direction}")
                    for peer in ("flex", "sdpa flash", "sdpa cudnn"):
                        p = row["ms"].get(f"{peer} {direction}")
                        if t and p:
                            row.setdefault("speedup", {})[f"vs {peer} {direction}"] = p / t
                rows.append(row)
                log(f"D={d} N={n} B={b} {name:<9} " + "  ".join(
                    f"{k}={v:.0f}" for k, v in row["tflops"].items() if k.startswith(("triton", "flex", "sdpa flash"))))
                del q, k, v, dout, allowed
                torch.cuda.empty_cache()
    return rows


def copy_bandwidth(device) -> float:
    x = torch.empty(1 << 29 if device.type == "cuda" else 1 << 20, dtype=torch.int16, device=device)  # 1 GiB
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3) / 1e12


def decode_rows(args, device, deadline, log) -> list[dict]:
    from . import paged_attention

    rows = []
    hq, hkv, d, page = (32, 8, 128, 64) if device.type == "cuda" else (4, 2, 32, 16)
    for b in args.decode_batch:
        for ctx in args.context:
            if time.time() > deadline:
                log("budget spent: stopping")
                return rows
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(b, hq, 1, d, generator=g, device=device, dtype=torch.bfloat16)
            k, v = (torch.randn(b, hkv, ctx, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
            pages = b * ctx // page
            perm = torch.randperm(pages, device=device)
            k_pages = k.view(b, hkv, ctx // page, page, d).permute(0, 2, 1, 3, 4).reshape(pages, hkv, page, d)
            v_pages = v.view(b, hkv, ctx // page, page, d).permute(0, 2, 1, 3, 4).reshape(pages, hkv, page, d)
            kp, vp = torch.empty_like(k_pages), torch.empty_like(v_pages)
            kp[perm], vp[perm] = k_pages, v_pages
            table = perm.view(b, ctx // page).to(torch.int32)
            lengths = torch.full((b,), ctx, dtype=torch.int32, device=device)
            calls = {
                "triton": lambda: qkv.attention(q, k, v, backend="triton"),
                "triton paged": lambda: paged_attention(q, kp, vp, table, lengths),
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                "qkv auto": lambda: qkv.attention(q, k, v),
            }
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
            row = {"B": b, "context": ctx, "Hq": hq, "Hkv": hkv, "D": d, "ms": {}, "TBps": {}, "max_err": {}}
            bytes_read = 2 * k.numel() * k.element_size()
            with torch.no_grad():
                for label, call in calls.items():
                    row["max_err"][label] = (call().float() - ref).abs().max().item()
                    ms = _bench(call)
                    row["ms"][label], row["TBps"][label] = ms, bytes_read / (ms * 1e-3) / 1e12
            row["paged/contiguous"] = row["ms"]["triton"] / row["ms"]["triton paged"]
            row["triton/sdpa speed"] = row["ms"]["sdpa"] / row["ms"]["triton"]
            rows.append(row)
            log(f"decode B={b} ctx={ctx} " + "  ".join(f"{k}={v:.2f} TB/s" for k, v in row["TBps"].items()))
            del k, v, kp, vp, k_pages, v_pages
            torch.cuda.empty_cache()
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Most telling first: --budget-s stops starting new problems, so the order is the priority.
    parser.add_argument("--seq", type=int, nargs="+", default=[8192, 16384, 4096, 2048])
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per batch (B = tokens // N)")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--documents", type=int, default=8)
    parser.add_argument("--decode-batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--context", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-decode", action="store_true")
    parser.add_argument("--budget-s", type=float, default=480, help="stop starting new problems after this")
    parser.add_argument("--autotune", action="store_true", help="time every tile configuration on first use "
                        "(adds minutes of compilation on a fresh machine); default: each list's first")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1 "
                        "(checks the script, times nothing meaningful)")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_attention.json"))


def main(args: argparse.Namespace) -> int:
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("gpu_attention: --smoke needs TRITON_INTERPRET=1 (set before Python starts)")
        device = torch.device("cpu")
        args.seq, args.tokens, args.heads, args.head_dims = [64], 64, 2, [32]
        args.decode_batch, args.context, args.window, args.documents = [2], [128], 16, 3
    elif not torch.cuda.is_available():
        raise SystemExit("gpu_attention: needs a CUDA device")
    else:
        device = torch.device("cuda")
    if not args.autotune:
        os.environ["QKV_TRITON_AUTOTUNE"] = "0"
    start = time.time()
    deadline = start + args.budget_s

    def log(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    from . import configs

    result = {"environment": environment(device), "settings": {k: v for k, v in vars(args).items()}}
    log(str(result["environment"]))
    result["check_error_ratio"] = {m: check(m, device, args.window, args.documents) for m in args.masks}
    log(f"correctness (triton bf16 error / plain bf16 error, vs float64): {result['check_error_ratio']}")
    over = {m: r for m, r in result["check_error_ratio"].items() if not r <= 2.0}
    if over:
        result["check_over_2x"] = over
        log(f"WARNING: triton's error is above 2x plain bf16 math's on {over}")
    if any(not r <= 10.0 for r in over.values()):
        log("triton is wrong (error above 10x): not timing")
        result["aborted"] = f"error ratio above 10 for {over}"
    else:
        if not args.skip_decode:
            result["copy_bandwidth_TBps"] = copy_bandwidth(device)
            log(f"device copy bandwidth {result['copy_bandwidth_TBps']:.2f} TB/s")
            result["decode"] = decode_rows(args, device, deadline, log)
        if not args.skip_training:
            result["training"] = training_rows(args, device, deadline, log)
    result["triton_configs"] = {" ".join(map(str, k)): vars(v) if hasattr(v, "__dict__") else str(v)
                                for k, v in configs.cached().items()}
    result["seconds"] = time.time() - start
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    log(f"wrote {args.out}")
    return 0
