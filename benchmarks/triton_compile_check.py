"""Compile every triton-backend kernel variant the tests use for a CUDA target, without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute but not whether they
compile: it accepts type mixes and shapes the compiler rejects. This script records the launches
of a set of problems (instead of running them), compiles each for ``--arch`` (default sm_90, the
H100/H200) with Triton's own ptxas, and prints each kernel's shared memory and spills-free status.

    PYTHONPATH=src python benchmarks/triton_compile_check.py [--arch 90] [--all-configs]
        [--kernels _decode_kernel _merge_kernel]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ["QKV_TRITON_AUTOTUNE"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import qkv  # noqa: E402
from qkv import scores  # noqa: E402
from qkv.backends.triton import configs, decode, kernels, launch  # noqa: E402
from qkv.backends.triton.programs import mask_program, score_program  # noqa: E402
from qkv.problem import make_problem  # noqa: E402

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
          torch.int8: "i8", torch.uint8: "u8", torch.int64: "i64"}


class Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self, fn, calls):
        self.fn, self.calls = fn, calls

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((self.fn, args, kwargs))


def signature(fn, args, kwargs):
    """Types, constants and the 16-divisibility attributes a real launch would specialise on
    (aligned pointers, ints divisible by 16; ints equal to 1 become constants)."""
    names = fn.arg_names
    sig, consts, attrs = {}, {}, {}
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names})
    for i, name in enumerate(names):
        v = values[name]
        if fn.params[i].is_constexpr:
            sig[name], consts[name] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TYPES[v.dtype]
            if v.data_ptr() % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int) and v == 1 and not fn.params[i].do_not_specialize:
            sig[name], consts[name] = "constexpr", 1
        elif isinstance(v, int):
            sig[name] = "i32" if -2**31 <= v < 2**31 else "i64"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            raise TypeError(f"{name}: {type(v)}")
    return sig, consts, attrs, {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages")}


def problems():
    g = torch.Generator().manual_seed(0)
    r = lambda *s, dt=torch.bfloat16: torch.randn(*s, generator=g).to(dt)  # noqa: E731
    n = 256
    ids = (torch.arange(n) * 3 // n)[None]
    masks = {"none": None, "causal": qkv.causal(), "window": qkv.sliding_window(64),
             "document": qkv.document(ids, causal=True), "prefix": qkv.prefix_lm(32),
             "global|window": qkv.sliding_window(8) | qkv.global_tokens([0, 5]),
             "block_sparse": qkv.block_sparse(torch.rand(1, 1, 4, 4, generator=g) > 0.5, 64),
             "bits": qkv.from_tensor(torch.rand(n, n, generator=g) > 0.5)}
    for name, m in masks.items():
        yield f"{name} D=128 bf16", (r(2, 8, n, 128), r(2, 2, n, 128), r(2, 2, n, 128)), dict(mask=m)
    slopes, table = scores.alibi_slopes(8), torch.randn(8, 33)
    yield "alibi+softcap D=64", (r(1, 8, n, 64), r(1, 8, n, 64), r(1, 8, n, 64)), \
        dict(mask=qkv.causal(), score_mod=scores.chain(scores.alibi(slopes), scores.softcap(30.0)), grads=1)
    yield "relative bias D=64", (r(1, 8, n, 64), r(1, 8, n, 64), r(1, 8, n, 64)), \
        dict(score_mod=scores.relative_bias(table), grads=2)
    yield "dropout fp16 D=256", (r(1, 2, n, 256, dt=torch.float16),) * 3, dict(mask=qkv.causal(), dropout_p=0.1)
    yield "fp32 D=32 Dv=64", (r(1, 2, n, 32, dt=torch.float32), r(1, 2, n, 32, dt=torch.float32),
                              r(1, 2, n, 64, dt=torch.float32)), dict(mask=qkv.causal())
    yield "forward D=512", (r(1, 2, n, 512),) * 3, dict(mask=qkv.causal(), forward_only=True)


def paged_problems():
    """Paged decode (through :class:`decode.PagedDecode`): page-aligned tiles (``PAGED`` 2) with a
    window and sinks (per-sequence tile lists), pages smaller than a tile (``PAGED`` 1), GQA 4:1."""
    g = torch.Generator().manual_seed(1)
    window = qkv.sliding_window(256) | (qkv.key_padding(4) & qkv.causal())
    for label, page, mask, dt in (("paged window+sinks bf16", 64, window, torch.bfloat16),
                                  ("paged page=16 fp16", 16, None, torch.float16)):
        lengths = torch.tensor([1000, 77, 512], dtype=torch.int32)
        width = -(-1000 // page)
        table = torch.randperm(3 * width, generator=g)[:3 * width].view(3, width).to(torch.int32)
        q = torch.randn(3, 32, 1, 128, generator=g).to(dt)
        k_pages, v_pages = (torch.randn(3 * width, 8, page, 128, generator=g).to(dt) for _ in range(2))
        yield label, q, k_pages, v_pages, table, lengths, mask


def record(all_configs: bool):
    calls = []
    for name in ("_fwd_kernel", "_dq_kernel", "_dkdv_kernel"):
        setattr(kernels, name, Recorder(getattr(kernels, name), calls))
    decode._decode_kernel = Recorder(decode._decode_kernel, calls)
    decode._merge_kernel = Recorder(decode._merge_kernel, calls)
    decode._runs_on = lambda device: True  # recording on the CPU
    for label, (q, k, v), kw in problems():
        grads = kw.pop("grads", 0)
        forward_only = kw.pop("forward_only", False)
        p = make_problem(q, k, v, **kw)
        mask, score = mask_program(p.mask, p.batch, p.nq, p.nk, p.device), score_program(p.score_mod)
        run = launch.Launch(p, mask, score)
        dims = max(p.head_dim, p.v_dim)
        f32 = p.dtype == torch.float32
        fwd = configs.candidates("fwd", dims, f32)[:None if all_configs else 1]
        bwd = configs.candidates("bwd", dims, f32)[:None if all_configs else 1]
        out = torch.zeros(p.batch, p.q_heads, p.nq, p.v_dim, dtype=p.dtype)
        lse = torch.zeros(p.batch, p.q_heads, p.nq)
        start = len(calls)
        for cfg in fwd:
            run._forward(cfg, q, k, v, out, lse)
        if not forward_only:
            # The deterministic backward, and for a few problems the atomic-dq one (set_deterministic(False)).
            for atomic in (False, True) if label.startswith(("window", "bits", "dropout")) else (False,):
                configs._DETERMINISTIC = not atomic
                for cfg in bwd:
                    configs._CACHE.clear()
                    configs._CACHE[run.key("bwd") + (("atomic dq",) if atomic else ())] = cfg
                    os.environ["QKV_TRITON_AUTOTUNE"] = "1"  # pick() takes the cached entry
                    run.backward(q, k, v, out, lse, torch.ones_like(out), None, grads == 1, grads == 2)
                    os.environ["QKV_TRITON_AUTOTUNE"] = "0"
            configs._DETERMINISTIC = True
        if mask.mode != 2 and kw.get("dropout_p", 0) == 0:  # split-KV decode of two query tokens, and its merge
            qd = q[:, :, :2].contiguous()
            pd = make_problem(qd, k, v, **kw)
            klen = torch.full((pd.batch,), pd.nk, dtype=torch.int32)
            launch_d = decode.DecodeLaunch(pd, mask_program(pd.mask, pd.batch, pd.nq, pd.nk, pd.device),
                                           score_program(pd.score_mod), klen, pd.nk)
            _decode_all(launch_d, qd, k, v, all_configs)
        for c in calls[start:]:
            yield label, c
    for label, q, k_pages, v_pages, table, lengths, mask in paged_problems():
        start = len(calls)
        plan = decode.PagedDecode(q, table, lengths, mask, page_size=k_pages.shape[2], kv_heads=k_pages.shape[1])
        _decode_all(plan.launch, q, k_pages, v_pages, all_configs)
        for c in calls[start:]:
            yield label, c


def _decode_all(launch_d, q, k, v, all_configs: bool) -> None:
    """Record the decode launch at the first (or every) decode configuration."""
    p = launch_d.p
    out = torch.empty(p.batch, p.q_heads, p.nq, p.v_dim, dtype=q.dtype)
    lse = torch.empty(p.batch, p.q_heads, p.nq)
    for cfg in configs.candidates("decode", max(p.head_dim, p.v_dim), p.dtype == torch.float32)[
            :None if all_configs else 1]:
        launch_d._run(cfg, q, k, v, out, lse)


def resources(compiled) -> str:
    """Registers and spills per thread, from cuobjdump (bundled with Triton) on the cubin."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    spill = re.search(r"STACK:(\d+)", out)
    return f"{regs.group(1) if regs else '?'} registers, stack {spill.group(1) if spill else '?'} B"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--all-configs", action="store_true", help="every autotuning candidate, not only the first")
    parser.add_argument("--kernels", nargs="+", help="only these kernels (e.g. _decode_kernel _merge_kernel)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failures = 0
    seen = set()
    for label, (fn, a, kw) in record(args.all_configs):
        if args.kernels and fn.__name__ not in args.kernels:
            continue
        sig, consts, attrs, opts = signature(fn, a, kw)
        key = (fn.__name__, repr(sorted(sig.items())), repr(sorted(consts.items())), repr(sorted(attrs)), repr(opts))
        if key in seen:  # the same specialisation compiled already (e.g. one merge kernel serves many)
            continue
        seen.add(key)
        t = time.time()
        try:
            compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=target, options=opts)
            info = f"shared {compiled.metadata.shared / 1024:.0f} KiB, {resources(compiled)}"
            if compiled.metadata.shared > 227 * 1024:
                info += "  TOO MUCH SHARED MEMORY"
                failures += 1
        except Exception as err:  # report every failure, then exit non-zero
            failures += 1
            info = "FAILED: " + " | ".join(str(err).strip().splitlines()[-6:])[:600]
        print(f"{label:<24} {fn.__name__:<14} BM={consts.get('BM')} BN={consts.get('BN')} "
              f"w={opts.get('num_warps')} s={opts.get('num_stages')}  {time.time() - t:5.1f}s  {info}", flush=True)
    print("all compiled" if not failures else f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
