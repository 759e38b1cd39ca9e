"""Ring attention across processes equals single-process attention on the whole sequence.

One spawn of 4 gloo processes on loopback runs every case of ``tests/ring_cases.py`` (world size
4, and world size 2 on two subgroups); each test below checks one case's outputs, lse and
gradients (q, k, v, score-modifier tensors, additive bias) against float64 ``qkv.attention`` on
the whole sequence. Collectives time out after 30 s and the spawn is killed after 150 s, so a
stuck rank fails the tests with its traceback instead of hanging the suite.
"""

from __future__ import annotations

import pytest
import torch

from qkv.parallel import (build_plan, chunk_bounds, shard_pieces, shard_positions, shard_sequence,
                          unshard_sequence)
from qkv.parallel.pairs import GlobalMask

import qkv

from . import ring_cases
from .distributed import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

TOLERANCE = {"torch.float64": 1e-10, "torch.float32": 2e-5}
#: Low precision: the ring's error against float64 stays within this factor of single-process
#: qkv.attention's error in the same dtype, plus a floor near the dtype's rounding of O(1) values
#: (each block's upstream gradient ``w * dout`` is rounded once more than one process's ``dout``).
LOW_PRECISION_FACTOR, LOW_PRECISION_FLOOR = 2.5, {"torch.float32": 1e-6, "torch.bfloat16": 1e-3}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(ring_cases.run_all, 4, timeout_s=150, group_timeout_s=30)


@pytest.mark.parametrize("name", list(ring_cases.CASES))
def test_matches_single_process(ranks, name):
    for rank, results in enumerate(ranks):
        result = results[name]
        if result["baseline"] is not None:  # low precision: against one process in the same dtype
            floor = LOW_PRECISION_FLOOR[result["dtype"]]
            tol = {key: LOW_PRECISION_FACTOR * err + floor for key, err in result["baseline"].items()}
        else:
            tol = dict.fromkeys(result["errors"], TOLERANCE[result["dtype"]])
        if result["dtype"] == "torch.float32":  # and within float32 tolerance outright
            tol = {key: min(t, 2e-5 if key in ("out", "lse") else 1e-4) for key, t in tol.items()}
        bad = {key: err for key, err in result["errors"].items() if not err <= tol[key]}
        assert not bad, f"{name}, rank {rank}: errors {bad} above {tol}"


def test_causal_contiguous_skips_steps_above_the_diagonal(ranks):
    plan = ranks[0]["causal_contiguous"]["plan"]
    # Shard j is needed by the ranks after it only: it travels W - 1 - j hops; half the blocks of
    # a full ring (those above the diagonal) are never sent.
    assert plan["reach"] == [3, 2, 1, 0]
    assert plan["blocks_computed"] == 10 and plan["shards_never_sent"] == 6


def test_sliding_window_runs_one_hop(ranks):
    plan = ranks[0]["window_skips_steps"]["plan"]
    assert plan["steps"] == 2 and plan["reach"] == [1, 1, 1, 0]
    # The shard of the last rank is never sent; nothing else travels more than one hop.
    assert ranks[3]["window_skips_steps"]["forward_bytes"] == 0
    assert ranks[0]["window_skips_steps"]["forward_bytes"] > 0


def test_zigzag_causal_needs_every_shard(ranks):
    plan = ranks[0]["causal_zigzag"]["plan"]
    assert plan["steps"] == 4 and plan["blocks_skipped_in_hand"] == 0


def test_gather_sequence_on_every_rank(ranks):
    assert all(results["gather"] == [True, True] for results in ranks)


def test_bad_input_raises_on_every_rank(ranks):
    for rank, results in enumerate(ranks):
        assert results["mismatched_heads"].startswith("ValueError") and "query heads" in results["mismatched_heads"]
        assert results["zigzag_bad_lengths"].startswith("ValueError") and "zigzag" in results["zigzag_bad_lengths"]


def test_a_rank_with_bad_arguments_fails_every_rank_at_once(ranks):
    """Rank 1 passes k shorter than q: it raises its own error, and every other rank a ValueError
    naming rank 1, instead of waiting for it in the shape exchange until the timeout."""
    assert ranks[1]["local_bad_argument"].startswith("ValueError: q and k must hold the same positions")
    for rank in (0, 2, 3):
        message = ranks[rank]["local_bad_argument"]
        assert message.startswith("ValueError: ring_attention: rank 1 of the group passed invalid arguments"), message


def test_stuck_peer_times_out_with_a_message(ranks):
    message = ranks[2]["stuck_peer"]
    assert message.startswith("RuntimeError") and "(global rank 2) gave up waiting for the K/V shard of rank 1" \
        in message, message


# --------------------------------------------------------------------------- no processes needed


def test_chunk_bounds_follow_tensor_split():
    for length in (0, 1, 7, 30):
        for parts in (1, 3, 8):
            sizes = [b - a for a, b in chunk_bounds(length, parts)]
            assert sizes == [t.numel() for t in torch.arange(length).tensor_split(parts)]


@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_shard_and_unshard_round_trip(layout):
    x = torch.randn(2, 3, 29, 4)
    shards = [shard_sequence(x, layout, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(unshard_sequence(shards, layout), x)
    for r, shard in enumerate(shards):
        assert torch.equal(shard, x[:, :, shard_positions(29, 4, r, layout)])
    if layout == "zigzag":
        assert shard_pieces(16, 4, 1, layout) == [(2, 4), (12, 14)]


def test_shard_helpers_reject_bad_arguments():
    with pytest.raises(ValueError, match="layout"):
        shard_pieces(8, 2, 0, "striped")
    with pytest.raises(ValueError, match="rank"):
        shard_pieces(8, 2, 2)
    with pytest.raises(ValueError, match="dim"):
        shard_sequence(torch.zeros(2, 8), rank=0, world_size=2, dim=3)


def test_plan_zigzag_balances_causal_work():
    """Causal work per rank (visible query-key pairs) in both layouts: zigzag evens it out."""
    n, world = 64, 4

    def work(layout):
        pieces = [shard_pieces(n, world, r, layout) for r in range(world)]
        per_rank = []
        for r in range(world):
            rows = torch.cat([torch.arange(a, b) for a, b in pieces[r]])
            per_rank.append(int((rows + 1).sum()))
        return per_rank

    contiguous, zigzag = work("contiguous"), work("zigzag")
    assert max(contiguous) / min(contiguous) > 5
    assert max(zigzag) == min(zigzag)
    pieces = [shard_pieces(n, world, r, "zigzag") for r in range(world)]
    plan = build_plan(pieces, GlobalMask(qkv.causal(), 1, 1, n, "cpu").is_empty)
    assert plan.reach == (3, 3, 3, 3)


def test_ring_attention_needs_a_process_group():
    x = torch.randn(1, 1, 4, 8)
    from qkv.parallel import ring_attention
    if torch.distributed.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        ring_attention(x, x, x)


def test_one_rank_is_plain_attention(tmp_path):
    """World size 1 (in this process): no messages, the result of qkv.attention."""
    import torch.distributed as dist
    from qkv.parallel import RingStats, ring_attention
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        q, k, v = (torch.randn(1, 2, 9, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
        stats = RingStats()
        out, lse = ring_attention(q, k, v, qkv.causal(), return_lse=True, stats=stats)
        ref, ref_lse = qkv.attention(q, k, v, qkv.causal(), return_lse=True)
        assert torch.allclose(out, ref, atol=1e-12) and torch.allclose(lse, ref_lse, atol=1e-12)
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))
        ref_grads = torch.autograd.grad(ref.sum() + ref_lse.sum(), (q, k, v))
        assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(grads, ref_grads))
        assert stats.plan.steps == 1 and stats.forward_bytes_sent == 0
    finally:
        dist.destroy_process_group()
