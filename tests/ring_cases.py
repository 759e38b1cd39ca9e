"""The ring-attention cases, run inside the spawned ranks of ``tests/test_parallel.py``.

Every rank builds the whole problem from the same seed, computes single-process
``qkv.attention`` on the whole sequence as the reference (outputs, lse and gradients), runs
``qkv.parallel.ring_attention`` on its shard, and reports the largest differences. One spawn of 4
processes covers every case: world size 4 on the world group, world size 2 on two subgroups.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

import qkv
from qkv.parallel import RingStats, gather_sequence, ring_attention, shard_sequence
from qkv.scores import alibi, chain, relative_bias, softcap

# name -> dict(world, layout, dtype, n (int, or per-rank lengths), heads (Hq, Hkv), dims (D, Dv), mask, mod, ...)
CASES = {
    "full": dict(world=4, layout="contiguous", n=24, mask="none"),
    "causal_contiguous": dict(world=4, layout="contiguous", n=32, mask="causal"),
    "causal_zigzag": dict(world=4, layout="zigzag", n=32, mask="causal", backend="tiled"),
    "window_skips_steps": dict(world=4, layout="contiguous", n=32, mask="window"),
    "window_zigzag_relbias": dict(world=4, layout="zigzag", n=32, mask="window_both_ways", mod="relative_bias"),
    "documents_causal": dict(world=4, layout="contiguous", n=28, mask="documents_causal"),
    "documents_zigzag": dict(world=4, layout="zigzag", n=28, mask="documents"),
    "gqa_alibi_causal_zigzag": dict(world=4, layout="zigzag", n=24, heads=(4, 2), mask="causal", mod="alibi"),
    "mqa_dv_prefix_lm": dict(world=4, layout="contiguous", n=20, heads=(3, 1), dims=(8, 5), mask="prefix_lm",
                             backend="reference"),
    "uneven_contiguous_softcap": dict(world=4, layout="contiguous", n=[5, 9, 1, 11], mask="causal",
                                      mod="softcap_alibi"),
    "uneven_zigzag": dict(world=4, layout="zigzag", n=30, mask="causal"),
    "global_window_function": dict(world=4, layout="contiguous", n=24, mask="global_window_fn"),
    "bool_tensor_empty_rows": dict(world=4, layout="zigzag", n=16, mask="bool_tensor"),
    "float_bias_grad": dict(world=4, layout="contiguous", n=16, mask="float_bias"),
    "float32_causal_zigzag": dict(world=4, layout="zigzag", n=64, mask="causal", dtype=torch.float32),
    "bfloat16_gqa_window": dict(world=4, layout="contiguous", n=64, heads=(4, 2), mask="window", dtype=torch.bfloat16),
    "w2_full": dict(world=2, layout="contiguous", n=18, mask="none"),
    "w2_causal_zigzag": dict(world=2, layout="zigzag", n=20, mask="causal"),
    "w2_window": dict(world=2, layout="contiguous", n=20, mask="window", heads=(4, 2)),
    "w2_uneven_documents": dict(world=2, layout="contiguous", n=[3, 14], mask="documents_causal"),
}


def _segment_ids(n: int) -> torch.Tensor:
    bounds = [0, n // 5, n // 2, n // 2 + 3, n]  # documents that straddle shard boundaries
    ids = torch.zeros(n, dtype=torch.int64)
    for i, (a, b) in enumerate(zip(bounds, bounds[1:])):
        ids[a:b] = i
    return ids


def build_mask(name: str, n: int, batch: int, heads: int, gen: torch.Generator, dtype):
    if name == "none":
        return None
    if name == "causal":
        return qkv.causal()
    if name == "window":
        return qkv.sliding_window(3)
    if name == "window_both_ways":
        return qkv.sliding_window(3, 1)
    if name == "documents":
        return qkv.document(_segment_ids(n))
    if name == "documents_causal":
        return qkv.document(_segment_ids(n), causal=True)
    if name == "prefix_lm":
        return qkv.prefix_lm(n // 3)
    if name == "global_window_fn":
        return (qkv.sliding_window(2) | qkv.global_tokens([0, n - 3])) & qkv.from_function(
            lambda b, h, q, k: (q + k) % 7 != 3, name="not_3_mod_7")
    if name == "bool_tensor":
        allowed = torch.rand(batch, 1, n, n, generator=gen) < 0.3
        allowed[:, :, 2] = False  # a query that sees nothing anywhere
        return allowed
    if name == "float_bias":
        return torch.randn(1, heads, n, n, generator=gen, dtype=dtype).requires_grad_()
    raise KeyError(name)


def build_mod(name: str | None, heads: int, gen: torch.Generator, dtype):
    if name is None:
        return None, []
    if name == "alibi":
        slopes = (qkv.scores.alibi_slopes(heads).to(dtype) * (1 + 0.1 * torch.rand(heads, generator=gen,
                                                                                    dtype=dtype)))
        slopes.requires_grad_()
        return alibi(slopes), [slopes]
    if name == "relative_bias":
        table = torch.randn(heads, 9, generator=gen, dtype=dtype).requires_grad_()
        return relative_bias(table), [table]
    if name == "softcap_alibi":
        slopes = qkv.scores.alibi_slopes(heads).to(dtype).requires_grad_()
        return chain(alibi(slopes), softcap(2.0)), [slopes]
    raise KeyError(name)


def _clone_mod(name, tensors):
    """The same modifier over fresh leaf copies of its tensors (so reference and ring grads stay apart)."""
    copies = [t.detach().clone().requires_grad_() for t in tensors]
    if name == "alibi":
        return alibi(copies[0]), copies
    if name == "relative_bias":
        return relative_bias(copies[0]), copies
    if name == "softcap_alibi":
        return chain(alibi(copies[0]), softcap(2.0)), copies
    return None, []


def _local(x: torch.Tensor, case: dict, rank: int, world: int) -> torch.Tensor:
    if isinstance(case["n"], list):
        start = sum(case["n"][:rank])
        return x[:, :, start:start + case["n"][rank]].contiguous()
    return shard_sequence(x, case["layout"], rank=rank, world_size=world)


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; infinities must match exactly (e.g. lse = -inf rows)."""
    a, b = a.detach().double(), b.detach().double()
    if not torch.equal(torch.isinf(a), torch.isinf(b)):
        return math.inf
    finite = torch.isfinite(a)
    return float((a[finite] - b[finite]).abs().max()) if finite.any() else 0.0


def run_case(name: str, case: dict, group, rank: int, world: int) -> dict:
    dtype = case.get("dtype", torch.float64)
    hq, hkv = case.get("heads", (2, 2))
    d, dv = case.get("dims", (8, 8))
    n = sum(case["n"]) if isinstance(case["n"], list) else case["n"]
    batch = 2
    gen = torch.Generator().manual_seed(sum(map(ord, name)))
    q = torch.randn(batch, hq, n, d, generator=gen, dtype=dtype)
    k = torch.randn(batch, hkv, n, d, generator=gen, dtype=dtype)
    v = torch.randn(batch, hkv, n, dv, generator=gen, dtype=dtype)
    gout = torch.randn(batch, hq, n, dv, generator=gen, dtype=dtype)
    glse = torch.randn(batch, hq, n, generator=gen, dtype=dtype)
    mask = build_mask(case["mask"], n, batch, hq, gen, dtype)
    mod, mod_tensors = build_mod(case.get("mod"), hq, gen, dtype)

    # Reference: float64, one process, the whole sequence.
    ref_inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_mask = mask.detach().double().requires_grad_() if isinstance(mask, torch.Tensor) and mask.is_floating_point() \
        else mask
    ref_mod, ref_mod_tensors = _clone_mod(case.get("mod"), [t.double() for t in mod_tensors])
    ref_out, ref_lse = qkv.attention(*ref_inputs, ref_mask, score_mod=ref_mod, return_lse=True, backend="reference")
    _loss(ref_out, ref_lse, gout.double(), glse.double()).backward()

    # Ring: this rank's shard.
    local = [_local(t, case, rank, world).requires_grad_() for t in (q, k, v)]
    ring_mod, ring_mod_tensors = _clone_mod(case.get("mod"), mod_tensors)
    stats = RingStats()
    out, lse = ring_attention(*local, mask, group=group, layout=case["layout"], score_mod=ring_mod, return_lse=True,
                              backend=case.get("backend"), stats=stats, timeout=20)
    _loss(out, lse, _local(gout, case, rank, world), _local(glse, case, rank, world)).backward()

    errors = {"out": _err(out, _local(ref_out, case, rank, world)),
              "lse": _err(lse, _local(ref_lse, case, rank, world))}
    for label, mine, ref in zip(("dq", "dk", "dv"), local, ref_inputs):
        errors[label] = _err(mine.grad, _local(ref.grad, case, rank, world))
    for i, (mine, ref) in enumerate(zip(ring_mod_tensors, ref_mod_tensors)):
        total = mine.grad.detach().clone()
        dist.all_reduce(total, group=group)  # each rank holds its queries' share
        errors[f"dmod{i}"] = _err(total, ref.grad)
    if isinstance(mask, torch.Tensor) and mask.is_floating_point():
        total = mask.grad.detach().clone()
        dist.all_reduce(total, group=group)
        errors["dbias"] = _err(total, ref_mask.grad)
    baseline = _single_process_errors(q, k, v, mask, case, gout, glse, ref_out, ref_lse, ref_inputs, rank, world) \
        if dtype != torch.float64 else None
    return {"errors": errors, "baseline": baseline, "dtype": str(dtype), "plan": stats.plan.summary(),
            "forward_bytes": stats.forward_bytes_sent, "backward_bytes": stats.backward_bytes_sent}


def _single_process_errors(q, k, v, mask, case, gout, glse, ref_out, ref_lse, ref_inputs, rank, world) -> dict:
    """Errors of single-process qkv.attention in the same low precision (this rank's rows): the
    yardstick for the ring's errors."""
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out, lse = qkv.attention(*inputs, mask, return_lse=True)
    _loss(out, lse, gout, glse).backward()
    errors = {"out": _err(_local(out, case, rank, world), _local(ref_out, case, rank, world)),
              "lse": _err(_local(lse, case, rank, world), _local(ref_lse, case, rank, world))}
    for label, mine, ref in zip(("dq", "dk", "dv"), inputs, ref_inputs):
        errors[label] = _err(_local(mine.grad, case, rank, world), _local(ref.grad, case, rank, world))
    return errors


def _loss(out, lse, gout, glse):
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * gout.to(out.dtype)).sum() + (finite_lse * glse.to(lse.dtype)).sum()


def _expect_error(fn, exc_type) -> str:
    try:
        fn()
    except exc_type as error:
        return f"{type(error).__name__}: {error}"
    return "no error"


def run_all(rank: int, world: int) -> dict:
    """Everything, on every rank: the world-4 cases, the world-2 cases on two subgroups, bad input,
    and last a peer that never sends (the group is unusable afterwards)."""
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = pairs[rank // 2]
    results = {}
    for name, case in CASES.items():
        if case["world"] == 4:
            results[name] = run_case(name, case, None, rank, world)
        else:
            results[name] = run_case(name, case, pair, rank % 2, 2)
    # gather_sequence puts the whole sequence back on every rank, uneven shards included.
    whole = torch.randn(2, 3, 30, 4, generator=torch.Generator().manual_seed(1))
    results["gather"] = [torch.equal(gather_sequence(shard_sequence(whole, layout, rank=rank, world_size=world),
                                                     layout), whole) for layout in ("contiguous", "zigzag")]
    # Bad input: every rank raises the same ValueError (none is left waiting).
    heads = 2 if rank != 1 else 4
    x = torch.randn(1, heads, 4, 8, dtype=torch.float64)
    results["mismatched_heads"] = _expect_error(lambda: ring_attention(x, x, x), ValueError)
    y = torch.randn(1, 2, 3 + rank, 8, dtype=torch.float64)
    results["zigzag_bad_lengths"] = _expect_error(lambda: ring_attention(y, y, y, layout="zigzag"), ValueError)
    # A rank whose own arguments are wrong (k shorter than q) raises at once; the others must not
    # wait for it in the shape exchange (a bounded wait would end in RuntimeError, after 5 s).
    z = torch.randn(1, 2, 4, 8, dtype=torch.float64)
    bad_k = z[:, :, :3] if rank == 1 else z
    results["local_bad_argument"] = _expect_error(lambda: ring_attention(z, bad_k, bad_k, timeout=5.0), Exception)
    # A stuck peer: on the pair (2, 3), rank 3 takes part in the shape exchange but never sends
    # K/V; rank 2 must fail within its timeout, naming what it waited for.
    if rank >= 2:
        from qkv.parallel import comm
        if rank == 3:
            comm.Ring.start = lambda self, messages, what: comm.Pending([], what)
        z = torch.randn(1, 2, 6, 8, dtype=torch.float64)
        results["stuck_peer"] = _expect_error(
            lambda: ring_attention(z, z, z, group=pair, timeout=1.0), RuntimeError)
    return results
