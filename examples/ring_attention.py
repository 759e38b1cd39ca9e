"""Ring attention on several processes: one sequence, sharded, attended exactly.

    torchrun --nproc-per-node 4 examples/ring_attention.py            # gloo on CPU
    torchrun --nproc-per-node 4 examples/ring_attention.py --n 65536  # NCCL when each rank has a GPU

Every rank builds the same random sequence (same seed), keeps its zigzag shard, and runs causal
ring attention forward and backward; rank 0 then checks the gathered output and gradients against
single-process ``qkv.attention`` on the whole sequence (when it fits), and prints what the ring
did: steps run, bytes sent, and how a sliding window skips most of the ring.
"""

from __future__ import annotations

import argparse
import datetime
import os

import torch
import torch.distributed as dist

import qkv
from qkv.parallel import RingStats, gather_sequence, ring_attention, shard_sequence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2048, help="sequence length (whole sequence)")
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--check-up-to", type=int, default=8192, help="compare with one process up to this n")
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda") if use_cuda else torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()

    gen = torch.Generator().manual_seed(0)  # the same whole sequence on every rank
    b, n, d = 1, args.n, args.head_dim
    q, k, v = (torch.randn(b, h, n, d, generator=gen).to(device) for h in (args.heads, args.kv_heads, args.kv_heads))
    local = [shard_sequence(t, "zigzag").requires_grad_() for t in (q, k, v)]

    stats = RingStats()
    out = ring_attention(*local, qkv.causal(), layout="zigzag", stats=stats)
    out.square().sum().backward()
    if rank == 0:
        plan = stats.plan.summary()
        print(f"{world} ranks ({device.type}), n={n}, {len(local[0][0, 0])} positions per rank, zigzag + causal: "
              f"{plan['steps']} steps, {plan['blocks_computed']} blocks computed; rank 0 sent "
              f"{stats.forward_bytes_sent / 2**20:.2f} MiB forward, "
              f"{stats.backward_bytes_sent / 2**20:.2f} MiB backward")

    whole_out = gather_sequence(out.detach(), "zigzag")
    whole_grads = [gather_sequence(t.grad, "zigzag") for t in local]
    if rank == 0 and n <= args.check_up_to:
        ref = [t.double().requires_grad_() for t in (q, k, v)]
        ref_out = qkv.attention(*ref, qkv.causal())
        ref_out.square().sum().backward()
        same = [t.clone().requires_grad_() for t in (q, k, v)]  # one process, same dtype: the yardstick
        same_out = qkv.attention(*same, qkv.causal())
        same_out.square().sum().backward()
        truth = [ref_out.detach(), *(t.grad for t in ref)]

        def errors(results):
            return " ".join(f"{float((a.double() - r).abs().max()):.1e}" for a, r in zip(results, truth))

        print("max error against float64, out dq dk dv: ring", errors([whole_out, *whole_grads]),
              "| one process", errors([same_out.detach(), *(t.grad for t in same)]))

    window_stats = RingStats()
    contiguous = [shard_sequence(t, "contiguous") for t in (q, k, v)]
    ring_attention(*contiguous, qkv.sliding_window(args.window), stats=window_stats)
    if rank == 0:
        plan = window_stats.plan.summary()
        print(f"sliding_window({args.window}), contiguous: {plan['steps']} of {world} ring steps run, "
              f"{plan['shards_never_sent']} of {world * world} shard deliveries never sent")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
