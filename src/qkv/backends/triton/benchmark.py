"""The GPU benchmark of the ``triton`` backend against its peers (``benchmarks/gpu_attention.py``,
``qkv bench --gpu-suite``). One run on one GPU; a JSON file with device, versions and date,
rewritten after every row (a run cut short keeps what it measured, and lists what it skipped).

Training shapes (bf16, H=16, ``tokens`` per batch, so ``B = tokens // N``): ``triton`` versus SDPA's
flash / cuDNN / efficient kernels and compiled FlexAttention, forward and forward+backward, for
full, causal, sliding window, packed documents and prefix-LM. SDPA serves the last three only
through a dense mask (efficient kernel). TFLOP/s count the *allowed* scores only:
``4 * B * H * N^2 * D * density`` (x3.5 for forward+backward). The first call of each contender
(compilation included) is timed apart (``first_call_s``).

Decode: one query token over a cache (``Hq=32``, ``Hkv=8``, D=128, bf16) at batch 1 and 16,
contiguous and paged (pages of 64 tokens, shuffled), against SDPA and against what a paged cache
does without the kernel (gather the pages, then SDPA). Each is timed twice: as called (eager,
``do_bench``: Python and launch overheads included) and as GPU time alone (``graph``: CUDA graphs
of 20 calls, each after an L2 flush, minus the flushes alone), for the prepared launches a model's
layers reuse (:class:`~.decode.DecodeLaunch`, :class:`~.decode.PagedDecode`). TB/s of K and V
read, next to the device's measured copy bandwidth (``bandwidth_fraction``: the 90% target), and
a paged row with a 4096-token window and 4 sinks (bytes: the keys it can see).

Before timing, ``triton`` is checked against float64 math on one mid-size problem per mask, so
that a wrong kernel is never timed. ``--budget-s`` stops starting rows that would not finish in
time (from the longest row so far) and still writes the file.
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

#: The issue's targets (H100/H200, bf16, D=128), restated in the result file next to the figures.
TARGETS = {
    "masked rows (window, documents, prefix), fwd and fwd+bwd": "triton >= 1.2x flex (speedup 'triton vs flex')",
    "full and causal": "triton >= 1.0x sdpa flash (speedup 'triton vs sdpa flash')",
    "decode": "triton kernel graph >= 0.9 of copy bandwidth (bandwidth_fraction) and >= 1.0x sdpa "
              "('triton/sdpa graph')",
    "paged decode": ">= 0.9x contiguous ('paged/contiguous graph')",
}


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
            "gpu": _gpu_properties() if device.type == "cuda" else None,
            "autotune": os.environ.get("QKV_TRITON_AUTOTUNE", "1")}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _gpu_properties() -> dict:
    props = torch.cuda.get_device_properties(0)
    info = {"capability": ".".join(map(str, torch.cuda.get_device_capability(0))), "sms": props.multi_processor_count,
            "memory_GiB": round(props.total_memory / 2**30, 1)}
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=10).stdout.strip()
        info["nvidia-smi (driver, max SM MHz, max memory MHz, power limit)"] = out
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


def training_rows(args, device, budget, log, save, rows: list) -> list[dict]:
    """Appends to ``rows`` (the result file's list, saved after every row)."""
    from . import configs
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
                if not budget.allows(f"training D={d} N={n} {name}"):
                    continue
                started = time.time()
                mask, mod, dense_fn = _mask(name, n, args.window, args.documents, device)
                g = torch.Generator(device=device).manual_seed(0)
                q, k, v = (torch.randn(b, args.heads, n, d, generator=g, device=device, dtype=torch.bfloat16)
                           .requires_grad_() for _ in range(3))
                dout = torch.randn_like(q)
                allowed = None if dense_fn is None else _dense(dense_fn, n, device)
                density = 1.0 if allowed is None else allowed.float().mean().item()
                flops = 4 * b * args.heads * n * n * d * density
                calls = {"triton": lambda: qkv.attention(q, k, v, mask, backend="triton"),
                         "triton atomic-dq": lambda: qkv.attention(q, k, v, mask, backend="triton"),
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
                       "tflops": {}, "first_call_s": {}, "errors": {}}
                for label, call in calls.items():
                    atomic = label == "triton atomic-dq"  # set_deterministic(False); its forward is triton's
                    for direction in ("fwd+bwd",) if atomic else ("fwd", "fwd+bwd"):
                        key = f"{label} {direction}"
                        try:
                            if direction == "fwd":
                                fn = call
                                with torch.no_grad():
                                    row["first_call_s"][key] = _first_call(fn)
                                    ms = _bench(fn)
                            else:
                                fn = lambda c=call: c().backward(dout)  # noqa: E731
                                configs.set_deterministic(not atomic)
                                try:
                                    row["first_call_s"][key] = _first_call(fn)
                                    ms = _bench(fn, grad_to_none=[q, k, v])
                                finally:
                                    configs.set_deterministic(True)
                        except Exception as err:  # a peer that cannot run this problem is reported, not fatal
                            row["errors"][key] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
                            continue
                        row["ms"][key] = ms
                        row["tflops"][key] = flops * (3.5 if direction != "fwd" else 1.0) / (ms * 1e-3) / 1e12
                for mine in ("triton", "triton atomic-dq"):
                    for direction in ("fwd", "fwd+bwd"):
                        t = row["ms"].get(f"{mine} {direction}")
                        for peer in ("flex", "sdpa flash", "sdpa cudnn"):
                            p = row["ms"].get(f"{peer} {direction}")
                            if t and p:
                                row.setdefault("speedup", {})[f"{mine} vs {peer} {direction}"] = p / t
                rows.append(row)
                budget.done(time.time() - started)
                save()
                log(f"D={d} N={n} B={b} {name:<9} " + "  ".join(
                    f"{k}={v:.0f}" for k, v in row["tflops"].items() if k.startswith(("triton", "flex", "sdpa flash"))))
                del q, k, v, dout, allowed
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def _first_call(fn) -> float:
    """Seconds of the first call (compilation and autotuning included), synchronised."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def copy_bandwidth(device) -> float:
    x = torch.empty(1 << 29 if device.type == "cuda" else 1 << 20, dtype=torch.int16, device=device)  # 1 GiB
    y = torch.empty_like(x)
    ms = _bench(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3) / 1e12


def _graph_ms(fn, reps: int = 20) -> float:
    """GPU milliseconds of one ``fn()``: CUDA graphs of ``reps`` calls, each after an L2 flush,
    minus a graph of the flushes alone (medians of 5 replays). No Python or launch overhead."""
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compilation, autotuning, cached tile lists) outside the capture
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()

    def capture(with_fn: bool):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(reps):
                flush.zero_()
                if with_fn:
                    fn()
        return graph

    def replay_ms(graph) -> float:
        times = []
        for _ in range(5):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    both, flushes = capture(True), capture(False)
    return max(replay_ms(both) - replay_ms(flushes), 1e-6) / reps


def _paged_copy(k, v, page: int, device, generator):
    """``(k_pages, v_pages, block_table)``: ``k, v (B, Hkv, ctx, D)`` in shuffled pages."""
    b, hkv, ctx, d = k.shape
    pages = b * ctx // page
    perm = torch.randperm(pages, device=device, generator=generator)
    kp, vp = (torch.empty(pages, hkv, page, d, dtype=k.dtype, device=device) for _ in range(2))
    for src, dst in ((k, kp), (v, vp)):
        dst[perm] = src.view(b, hkv, ctx // page, page, d).permute(0, 2, 1, 3, 4).reshape(pages, hkv, page, d)
    return kp, vp, perm.view(b, ctx // page).to(torch.int32)


def decode_rows(args, device, budget, log) -> list[dict]:
    """Decode rows (see the module docstring)."""
    from ...problem import make_problem
    from . import decode
    from .programs import mask_program, score_program

    rows = []
    hq, hkv, d, page = (32, 8, 128, 64) if device.type == "cuda" else (4, 2, 32, 16)
    window, sinks = (4096, 4) if device.type == "cuda" else (40, 2)
    cuda = device.type == "cuda"
    for b in args.decode_batch:
        for ctx in args.context:
            if not budget.allows(f"decode B={b} context={ctx}"):
                continue
            started = time.time()
            g = torch.Generator(device=device).manual_seed(0)
            q = torch.randn(b, hq, 1, d, generator=g, device=device, dtype=torch.bfloat16)
            k, v = (torch.randn(b, hkv, ctx, d, generator=g, device=device, dtype=torch.bfloat16) for _ in range(2))
            kp, vp, table = _paged_copy(k, v, page, device, g)
            lengths = torch.full((b,), ctx, dtype=torch.int32, device=device)
            p = make_problem(q, k, v)
            prepared = decode.DecodeLaunch(p, mask_program(None, b, 1, ctx, device), score_program(None),
                                           lengths, ctx)
            paged = decode.PagedDecode(q, table, lengths, page_size=page, kv_heads=hkv, max_length=ctx)
            win = qkv.sliding_window(window) | (qkv.key_padding(sinks) & qkv.causal())
            paged_window = decode.PagedDecode(q, table, lengths, win, page_size=page, kv_heads=hkv, max_length=ctx)

            def gather_sdpa():
                kk = kp[table.long()].transpose(1, 2).flatten(2, 3)
                vv = vp[table.long()].transpose(1, 2).flatten(2, 3)
                return F.scaled_dot_product_attention(q, kk, vv, enable_gqa=True)

            calls = {
                "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                "triton": lambda: qkv.attention(q, k, v, backend="triton"),
                "qkv auto": lambda: qkv.attention(q, k, v),
                "triton kernel": lambda: prepared.run(q, k, v)[0],
                "triton paged": lambda: decode.paged_attention(q, kp, vp, table, lengths, max_length=ctx),
                "triton paged kernel": lambda: paged(q, kp, vp)[0],
                "gather + sdpa": gather_sdpa,
                "triton paged window kernel": lambda: paged_window(q, kp, vp)[0],
            }
            graphed = ("sdpa", "triton kernel", "triton paged kernel", "gather + sdpa", "triton paged window kernel")
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
            sees = lambda t: torch.cat([t[:, :, :sinks], t[:, :, ctx - window - 1:]], 2).float()  # noqa: E731
            ref_window = F.scaled_dot_product_attention(q.float(), sees(k), sees(v), enable_gqa=True)
            row = {"B": b, "context": ctx, "Hq": hq, "Hkv": hkv, "D": d, "page_size": page, "window": window,
                   "sinks": sinks, "ms": {}, "TBps": {}, "max_err": {}, "errors": {}}
            kv_bytes = 2 * k.numel() * k.element_size()
            seen = b * hkv * min(ctx, window + 1 + sinks) * d * 2 * k.element_size()
            with torch.no_grad():
                for label, call in calls.items():
                    try:
                        got = call().double()
                        want = ref if "window" not in label else ref_window
                        row["max_err"][label] = (got - want.double()).abs().max().item()
                        timings = {label: lambda c=call: _bench(c)}
                        if cuda and label in graphed:
                            timings[f"{label} graph"] = lambda c=call: _graph_ms(c)
                        for name, timing in timings.items():
                            ms = timing()
                            row["ms"][name] = ms
                            row["TBps"][name] = (seen if "window" in label else kv_bytes) / (ms * 1e-3) / 1e12
                    except Exception as err:  # reported, not fatal
                        row["errors"][label] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
            sdpa_err = row["max_err"].get("sdpa")
            if sdpa_err is not None:  # bf16 error relative to SDPA's on the same problem (the window: to its own)
                row["error_vs_sdpa"] = {name: err / max(sdpa_err, 1e-6) for name, err in row["max_err"].items()}
            ms = row["ms"]
            ratios = {"paged/contiguous graph": ("triton kernel graph", "triton paged kernel graph"),
                      "paged/contiguous": ("triton kernel", "triton paged kernel"),
                      "triton/sdpa graph": ("sdpa graph", "triton kernel graph"),
                      "triton/sdpa": ("sdpa", "triton"),
                      "paged/(gather + sdpa) graph": ("gather + sdpa graph", "triton paged kernel graph"),
                      "paged/(gather + sdpa)": ("gather + sdpa", "triton paged kernel")}
            row["speed ratios"] = {name: ms[slow] / ms[fast] for name, (slow, fast) in ratios.items()
                                   if slow in ms and fast in ms}
            if budget.copy_tbps:
                row["bandwidth_fraction"] = {name: tbps / budget.copy_tbps for name, tbps in row["TBps"].items()
                                             if name.endswith("graph")}
            rows.append(row)
            budget.done(time.time() - started)
            log(f"decode B={b} ctx={ctx} " + "  ".join(f"{k}={v:.2f} TB/s" for k, v in row["TBps"].items()))
            del k, v, kp, vp, q, prepared, paged, paged_window
            if cuda:
                torch.cuda.empty_cache()
    return rows


class Budget:
    """Stops starting rows that would not end before the deadline (judged by the longest row so
    far) and records what it skipped."""

    def __init__(self, seconds: float, log):
        self.deadline = time.time() + seconds
        self.longest = 0.0
        self.skipped: list[str] = []
        self.log = log
        self.copy_tbps = None

    def allows(self, row: str) -> bool:
        if time.time() + self.longest <= self.deadline:
            return True
        self.skipped.append(row)
        return False

    def done(self, seconds: float) -> None:
        self.longest = max(self.longest, seconds)


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
    parser.add_argument("--budget-s", type=float, default=450,
                        help="seconds: start no row that would not end by then (judged by the longest row so far)")
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

    def log(msg):
        print(f"[{time.time() - start:6.1f}s] {msg}", flush=True)

    from . import configs

    budget = Budget(args.budget_s, log)
    result = {"environment": environment(device), "settings": {k: v for k, v in vars(args).items()},
              "targets": TARGETS}

    def save():
        result["triton_configs"] = {" ".join(map(str, k)): vars(v) if hasattr(v, "__dict__") else str(v)
                                    for k, v in configs.cached().items()}
        result["not_run (budget)"] = list(budget.skipped)
        result["seconds"] = time.time() - start
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, args.out)

    log(str(result["environment"]))
    result["check_error_ratio"] = {m: check(m, device, args.window, args.documents) for m in args.masks}
    log(f"correctness (triton bf16 error / plain bf16 error, vs float64): {result['check_error_ratio']}")
    over = {m: r for m, r in result["check_error_ratio"].items() if not r <= 2.0}
    if over:
        result["check_over_2x"] = over
        log(f"WARNING: triton's error is above 2x plain bf16 math's on {over}")
    save()
    if any(not r <= 10.0 for r in over.values()):
        log("triton is wrong (error above 10x): not timing")
        result["aborted"] = f"error ratio above 10 for {over}"
    else:
        if not args.skip_decode:
            result["copy_bandwidth_TBps"] = budget.copy_tbps = copy_bandwidth(device)
            log(f"device copy bandwidth {result['copy_bandwidth_TBps']:.2f} TB/s")
            result["decode"] = decode_rows(args, device, budget, log)
            save()
        if not args.skip_training:
            training_rows(args, device, budget, log, save, result.setdefault("training", []))
    save()
    log(f"wrote {args.out}" + (f"; not run (budget): {budget.skipped}" if budget.skipped else ""))
    return 0
