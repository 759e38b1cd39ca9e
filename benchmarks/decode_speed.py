"""Decode speed: tokens/s with a KV cache versus recomputing the whole sequence for every token.

A small decoder (``qkv.nn.Decoder``) generates at contexts 256 .. 4096. *Cached*: the context is
prefilled into a ``qkv.cache.KVCache`` once (not timed), then each new token is one forward step of
a single token over the cache. *Recompute*: each new token is a full causal forward pass over the
context plus that token, which is what decoding without a cache costs. A cached step does
``O(context)`` attention work and a recomputation ``O(context^2)``; the log-log plot shows the
slopes. Each cached token's logits are checked against the recomputation's before timing.

    python benchmarks/decode_speed.py                  # writes benchmarks/results/decode_speed.{json,png}
    python benchmarks/decode_speed.py --contexts 256 512 --steps 8   # quick look

Results depend on the machine; the JSON records device, thread count, versions, date and load
average (other work on the machine slows both columns).

``twin``: qkv's ``Decoder.generate`` against a plain-PyTorch twin of the same architecture
(``plain_decoder.py``: same weights, a ``torch.cat`` KV cache, SDPA), greedy, a 32-token prompt and
256 new tokens, batch 1 and 8, eager and with the compiled decode step (``generate(compile=True)``).
Runs are interleaved in one process (each round times every contender once, in rotating order) and
the medians are reported, with the median of the per-round ratios, so that load from other work on
a shared machine falls on all contenders alike. Also: aten ops per decode step (torch.profiler),
and ``qkv.attention``'s overhead over ``F.scaled_dot_product_attention`` on decode-step problems::

    python benchmarks/decode_speed.py twin            # writes benchmarks/results/decode_twin.json
    python benchmarks/decode_speed.py twin --rounds 3 --new-tokens 64   # quick look
    python benchmarks/decode_speed.py twin --device cuda --batches 1 16  # GPU: eager and CUDA-graph tokens/s
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import qkv
from qkv.cache import KVCache
from qkv.nn import Decoder

sys.path.insert(0, str(Path(__file__).parent))
from plain_decoder import PlainDecoder  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def seconds(fn, repeats: int) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs (after one warm-up run)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def measure(model: Decoder, context: int, steps: int, repeats: int, vocab: int) -> dict:
    ids = torch.randint(0, vocab, (1, context + steps), generator=torch.Generator().manual_seed(context))
    # Cached: prefill `context` tokens, then time `steps` single-token steps (the context grows by one each).
    cache = KVCache(batch_size=1, capacity=context + steps, **model.cache_spec())
    model(ids[:, :context], cache)
    step_times = []
    for t in range(context, context + steps):
        start = time.perf_counter()
        logits = model(ids[:, t:t + 1], cache)
        step_times.append(time.perf_counter() - start)
        if t == context:  # the cached step computes what a full pass computes
            full = model(ids[:, :t + 1])[:, -1:]
            torch.testing.assert_close(logits, full, atol=1e-4, rtol=1e-4)
    cached = statistics.median(step_times)
    recompute = seconds(lambda: model(ids[:, :context + 1]), repeats)
    return {"context": context, "cached_s_per_token": cached, "recompute_s_per_token": recompute,
            "cached_tokens_per_s": 1 / cached, "recompute_tokens_per_s": 1 / recompute, "speedup": recompute / cached}


def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) against log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.mean(lx), statistics.mean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in rows]
    cached = [r["cached_s_per_token"] * 1e3 for r in rows]
    recompute = [r["recompute_s_per_token"] * 1e3 for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ax.loglog(ctx, recompute, "o-", label="recompute full sequence", color="tab:red")
    ax.loglog(ctx, cached, "o-", label="KV cache (one token per step)", color="tab:blue")
    # reference slopes: context^2 through the last recomputation, context through the last cached step
    ax.loglog(ctx, [recompute[-1] * (c / ctx[-1]) ** 2 for c in ctx], "--", color="gray", label="∝ context²")
    ax.loglog(ctx, [cached[-1] * c / ctx[-1] for c in ctx], ":", color="gray", label="∝ context")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("time per generated token (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def table(rows: list[dict]) -> str:
    lines = ["| context | cached tokens/s | recompute tokens/s | speed-up |", "|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['context']} | {r['cached_tokens_per_s']:.1f} | {r['recompute_tokens_per_s']:.2f} "
                     f"| {r['speedup']:.0f}x |")
    return "\n".join(lines)


def environment(device: str = "cpu") -> dict:
    info = {"type": "cpu", "name": cpu_name(), "logical_cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "load_average": os.getloadavg(),
            "load_average_at_start": os.getloadavg()}
    if torch.device(device).type == "cuda":
        info = {**info, "type": "cuda", "name": torch.cuda.get_device_name(device), "host_cpu": cpu_name(),
                "cuda": torch.version.cuda}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": info,
        "versions": {"qkv": qkv.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                     "platform": platform.platform()},
    }


def interleaved(contenders: dict, rounds: int, clock=time.thread_time) -> dict[str, list[float]]:
    """Times by ``clock`` of every contender over ``rounds`` rounds, each round running all of them
    once in an order rotated by one per round (after one warm-up run each). The default clock is
    the CPU time of this thread: with one torch thread all the work runs on it, and time spent
    waiting for a core that other jobs hold is not counted (wall time would count it)."""
    names = list(contenders)
    for name in names:
        contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = clock()
            contenders[name]()
            times[name].append(clock() - start)
    return times


def summarize_times(times: dict[str, list[float]], peer: str, work: float) -> dict:
    """Medians as ``work / s`` rates, and each contender's speed relative to ``peer`` (ratio of
    medians and median of the per-round ratios; > 1 = faster than the peer)."""
    out = {}
    for name, ts in times.items():
        out[name] = {"median_s": statistics.median(ts), "rate": work / statistics.median(ts),
                     "speed_vs_" + peer: statistics.median(times[peer]) / statistics.median(ts),
                     "median_round_ratio_vs_" + peer: statistics.median(p / t for p, t in zip(times[peer], ts)),
                     "all_s": ts}
    return out


def op_counts(step, steps: int) -> dict:
    """aten ops per call of ``step()`` under torch.profiler: all of them (nested included), the
    top-level ones (called from Python, not from another aten op), and the commonest top-level."""
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    common = Counter(e.name for e in top).most_common(12)
    return {"aten_ops_per_step": len(aten) / steps, "top_level_aten_ops_per_step": len(top) / steps,
            "commonest_top_level": {name: count / steps for name, count in common}}


@torch.no_grad()
def profile_steps(model: Decoder, twin: PlainDecoder, vocab: int, prompt_len: int, steps: int = 16) -> dict:
    """Op counts of one batch-1 decode step at context ``prompt_len``, qkv (eager) and the twin."""
    ids = torch.randint(0, vocab, (1, prompt_len + 1), generator=torch.Generator().manual_seed(1))
    cache = KVCache(batch_size=1, capacity=prompt_len + 2 * steps + 4, **model.cache_spec())
    model(ids[:, :prompt_len], cache)
    token = ids[:, prompt_len:]

    def qkv_step():
        model(token, cache)

    _, past = twin(ids[:, :prompt_len], None, 0)
    state = {"past": past, "pos": prompt_len}

    def plain_step():
        _, state["past"] = twin(token, state["past"], state["pos"])
        state["pos"] += 1

    return {"qkv": op_counts(qkv_step, steps), "plain": op_counts(plain_step, steps)}


_FLOOR_PLANS: dict = {}


def python_floor(q, k, v, mask=None, *, scale=None, backend=None):
    """The least a Python-level dispatcher can do before running SDPA: one call with qkv's
    signature, and one dict lookup keyed by the shapes, dtype and device (what ``qkv.attention``'s
    fast path does, without its checks). Its overhead over SDPA is the floor for qkv's."""
    plan = _FLOOR_PLANS.get((q.shape, k.shape, v.shape, q.dtype, q.device, mask, scale, backend))
    if plan is None:
        _FLOOR_PLANS[(q.shape, k.shape, v.shape, q.dtype, q.device, mask, scale, backend)] = True
    return F.scaled_dot_product_attention(q, k, v)


def attention_overhead(rounds: int, calls: int = 200, block: int = 10) -> list[dict]:
    """Per-call time of ``qkv.attention`` minus ``F.scaled_dot_product_attention`` on decode-step
    problems (one query over ``Nk`` cached keys): at least 15 rounds of ``calls`` calls of each
    contender, run in alternating blocks of ``block`` calls (so that a slow spell of a shared
    machine falls on all of them), CPU time of this thread; the overhead is the median over the
    rounds of the round's difference (the differences are a few µs, the kernels' own spread on
    larger problems more)."""
    rounds = max(rounds, 15)
    rows = []
    g = torch.Generator().manual_seed(0)
    for batch, heads, nk, dim in ((1, 1, 16, 16), (1, 4, 512, 64), (1, 8, 288, 32), (8, 8, 288, 32)):
        q = torch.randn(batch, heads, 1, dim, generator=g)
        k, v = torch.randn(2, batch, heads, nk, dim, generator=g)
        contenders = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
                      "qkv": lambda: qkv.attention(q, k, v),
                      "qkv_causal": lambda: qkv.attention(q, k, v, qkv.causal()),
                      "floor": lambda: python_floor(q, k, v)}
        names = list(contenders)
        for fn in contenders.values():  # warm-up: the fast path decides each signature once
            for _ in range(block):
                fn()
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            spent = dict.fromkeys(names, 0.0)
            for b in range(calls // block):
                for name in names[(r + b) % len(names):] + names[:(r + b) % len(names)]:
                    fn = contenders[name]
                    start = time.thread_time()
                    for _ in range(block):
                        fn()
                    spent[name] += time.thread_time() - start
            for name in names:
                times[name].append(spent[name] / (calls // block * block))

        def overhead_us(name):  # median over rounds of (this round's qkv time - its sdpa time) per call
            return statistics.median(a - b for a, b in zip(times[name], times["sdpa"])) * 1e6

        rows.append({"B": batch, "H": heads, "Nq": 1, "Nk": nk, "D": dim, "dtype": "float32",
                     "sdpa_us": statistics.median(times["sdpa"]) * 1e6,
                     "qkv_overhead_us": overhead_us("qkv"), "qkv_causal_overhead_us": overhead_us("qkv_causal"),
                     "python_floor_overhead_us": overhead_us("floor"),
                     "dispatch": qkv.explain_dispatch(q, k, v).chosen})
    return rows


def twin_main(args) -> int:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    on_cuda = device.type == "cuda"
    config = dict(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers, num_heads=args.heads)
    model = Decoder(**config).eval().to(device)
    twin = PlainDecoder.from_qkv(model).to(device)
    can_compile = "compile" in Decoder.generate.__code__.co_varnames and not args.no_compile
    clock = "wall time, torch.cuda.synchronize() after each call" if on_cuda else \
        "the CPU time of the one thread that runs everything (time.thread_time; wall times in all_wall_s)"
    result = {"benchmark": "decode_twin", **environment(args.device),
              "model": {**config, "mlp_dim": 4 * args.dim, "positional": "rope", "activation": "swiglu",
                        "norm": "rmsnorm", "dtype": "float32"},
              "method": (f"greedy generate, {args.prompt}-token prompt + {args.new_tokens} new tokens (prefill "
                         f"included), {args.rounds} interleaved rounds in one process (order rotated each "
                         f"round), medians of {clock}; tokens/s = batch * new tokens / "
                         "median time; speed ratios > 1 mean faster than the plain twin. The machine may be "
                         "shared with other work: compare the ratios, not the absolute rates, across runs. The "
                         "compiled step is compiled before timing (first_call_s: the first call of each, "
                         "compiling included)" + ("; on CUDA the compiled step replays a CUDA graph "
                                                  "(mode='reduce-overhead')" if on_cuda else "")),
              "generate": []}

    def finished(fn):  # a call's time includes its kernels: wait for the device
        return (lambda: (fn(), torch.cuda.synchronize(device))[0]) if on_cuda else fn

    out = args.out or RESULTS / ("decode_twin_cuda.json" if on_cuda else "decode_twin.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    def save():  # after every batch too: a run cut short (a GPU session's time limit) keeps what it measured
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2) + "\n")
        tmp.replace(out)

    for batch in args.batches:
        prompt = torch.randint(0, args.vocab, (batch, args.prompt), generator=torch.Generator().manual_seed(batch))
        prompt = prompt.to(device)
        contenders = {
            "plain": finished(lambda: twin.generate(prompt, args.new_tokens)),
            "qkv": finished(lambda: model.generate(prompt, args.new_tokens, temperature=0)),
        }
        if can_compile:
            contenders["qkv_compiled"] = finished(
                lambda: model.generate(prompt, args.new_tokens, temperature=0, compile=True))
        outputs, first_call_s = {}, {}
        for name, fn in contenders.items():  # also compiles
            start = time.perf_counter()
            outputs[name] = fn()
            first_call_s[name] = time.perf_counter() - start
        same = {name: bool(torch.equal(out, outputs["plain"])) for name, out in outputs.items()}
        wall: dict[str, list[float]] = {name: [] for name in contenders}

        def timed(name, fn):
            def run():
                start = time.perf_counter()
                fn()
                wall[name].append(time.perf_counter() - start)
            return run

        times = interleaved({name: timed(name, fn) for name, fn in contenders.items()}, args.rounds,
                            clock=time.perf_counter if on_cuda else time.thread_time)
        summary = summarize_times(times, "plain", batch * args.new_tokens)
        for name in summary:
            summary[name]["all_wall_s"] = wall[name][1:]  # without the warm-up run
        result["generate"].append({"batch": batch, "same_tokens_as_plain": same, "first_call_s": first_call_s,
                                   "load_average": os.getloadavg(), "results": summary})
        line = ", ".join(f"{name} {s['rate']:7.1f} tok/s ({s['speed_vs_plain']:.2f}x, rounds "
                         f"{s['median_round_ratio_vs_plain']:.2f}x)" for name, s in summary.items())
        print(f"batch {batch}: {line}; same tokens: {same}", flush=True)
        save()
    if on_cuda:  # the op counts and the overhead microbenchmark are CPU measurements
        result["op_counts"] = result["attention_overhead"] = "not run on CUDA"
    else:
        result["op_counts"] = profile_steps(model, twin, args.vocab, args.prompt)
        for name, c in result["op_counts"].items():
            print(f"{name}: {c['aten_ops_per_step']:.0f} aten ops per decode step "
                  f"({c['top_level_aten_ops_per_step']:.0f} top-level)", flush=True)
        result["attention_overhead"] = attention_overhead(args.rounds)
    for r in [] if on_cuda else result["attention_overhead"]:
        print(f"attention B={r['B']} H={r['H']} Nk={r['Nk']} D={r['D']}: sdpa {r['sdpa_us']:.1f} us, qkv +"
              f"{r['qkv_overhead_us']:.1f} us, qkv causal +{r['qkv_causal_overhead_us']:.1f} us, "
              f"python floor +{r['python_floor_overhead_us']:.1f} us", flush=True)
    result["device"]["load_average"] = os.getloadavg()  # at the end
    save()
    print()
    print(twin_table(result))
    print(f"wrote {out}")
    return 0


def twin_table(result: dict) -> str:
    """The markdown table of a ``decode_twin`` result (docs/cache.md)."""
    lines = ["| batch | plain loop tokens/s | qkv eager | qkv compiled |", "|---:|---:|---:|---:|"]
    for row in result["generate"]:
        r = row["results"]
        cells = [f"{r['plain']['rate']:.0f}"]
        for name in ("qkv", "qkv_compiled"):
            if name in r:
                cells.append(f"{r[name]['rate']:.0f} ({r[name]['speed_vs_plain']:.2f}x; rounds "
                             f"{r[name]['median_round_ratio_vs_plain']:.2f}x)")
            else:
                cells.append("-")
        lines.append(f"| {row['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def twin_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="decode_speed.py twin", description="qkv generate vs a plain twin")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true", help="skip the compiled decode step")
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (issue 14's GPU run: --batches 1 16)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/decode_twin.json (decode_twin_cuda.json on CUDA)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--steps", type=int, default=32, help="cached decode steps timed per context")
    parser.add_argument("--repeats", type=int, default=3, help="timed recomputations per context")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: a single-token step is too small to split, and "
                             "extra threads only add synchronisation, badly so on a busy machine)")
    parser.add_argument("--out", type=Path, default=RESULTS / "decode_speed")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["twin"]:
        return twin_main(twin_parser().parse_args(argv[1:]))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    config = dict(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers, num_heads=args.heads)
    model = Decoder(**config).eval()
    load_before = os.getloadavg()
    rows = []
    for context in args.contexts:
        rows.append(measure(model, context, args.steps, args.repeats, args.vocab))
        r = rows[-1]
        print(f"context {context:>6}: cached {r['cached_tokens_per_s']:8.1f} tok/s, "
              f"recompute {r['recompute_tokens_per_s']:7.2f} tok/s", flush=True)
    ctx = [r["context"] for r in rows]
    slopes = {"cached": loglog_slope(ctx, [r["cached_s_per_token"] for r in rows]),
              "recompute": loglog_slope(ctx, [r["recompute_s_per_token"] for r in rows])} if len(rows) > 1 else {}
    result = {
        "benchmark": "decode_speed",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": "cpu", "name": cpu_name(), "logical_cores": os.cpu_count(),
                   "torch_threads": torch.get_num_threads(), "load_average_before": load_before,
                   "load_average_after": os.getloadavg()},
        "versions": {"qkv": qkv.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
                     "platform": platform.platform()},
        "model": {**config, "mlp_dim": 4 * args.dim, "positional": "rope", "activation": "swiglu",
                  "dtype": "float32", "batch_size": 1},
        "method": {"cached": f"median of {args.steps} single-token steps after prefilling the context",
                   "recompute": f"median of {args.repeats} full causal forward passes over context + 1 tokens"},
        "loglog_slopes": slopes,
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    title = (f"qkv.nn.Decoder d={args.dim} L={args.layers} H={args.heads}, batch 1, float32, "
             f"{torch.get_num_threads()} threads\n{cpu_name()}")
    plot(rows, args.out.with_suffix(".png"), title)
    print()
    print(table(rows))
    if slopes:
        print(f"\nlog-log slope of time per token vs context: cached {slopes['cached']:.2f}, "
              f"recompute {slopes['recompute']:.2f}")
    print(f"wrote {args.out.with_suffix('.json')} and {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
