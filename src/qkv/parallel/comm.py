"""Point-to-point messages between the ranks of one process group, with bounded waits.

Ring attention talks only through :func:`torch.distributed.batch_isend_irecv` (gloo on CPU, NCCL
on GPUs), so it runs wherever torch.distributed runs, launched by ``torchrun`` or anything else.
Every wait is bounded: a peer that never answers raises ``RuntimeError`` naming this rank, the peer
and what was awaited, instead of hanging the job.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

#: Message tags: K/V shards, travelling gradient accumulators, accumulators returning home.
KV, GRAD, HOME = 1, 2, 3


@dataclass
class Pending:
    """Messages in flight; ``buffers`` keep send buffers alive until they are delivered."""

    works: list
    what: str
    buffers: list = field(default_factory=list)


class Ring:
    """The ranks of ``group`` in ring order, and the messages between them."""

    def __init__(self, group=None, timeout: timedelta | float | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ring_attention needs torch.distributed: call torch.distributed.init_process_group "
                               "first (or launch with torchrun)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        if self.rank < 0:
            raise ValueError("group: this process is not a member of the given process group")
        if isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
            timeout = timedelta(seconds=float(timeout))
        if timeout is not None and (not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0):
            raise ValueError(f"timeout must be a positive number of seconds or a timedelta, got {timeout!r}")
        self.timeout = timeout
        self.bytes_sent = 0

    @property
    def next(self) -> int:
        return (self.rank + 1) % self.world_size

    @property
    def prev(self) -> int:
        return (self.rank - 1) % self.world_size

    def _global(self, rank: int) -> int:
        return rank if self.group is None else dist.get_global_rank(self.group, rank)

    def start(self, messages: list[tuple[str, Tensor, int, int]], what: str) -> Pending:
        """Post ``messages`` ``("send" | "recv", tensor, peer, tag)`` (peers are ranks in the
        group) at once; returns what :meth:`wait` completes."""
        ops = []
        for kind, tensor, peer, tag in messages:
            op = dist.isend if kind == "send" else dist.irecv
            ops.append(dist.P2POp(op, tensor, self._global(peer), self.group, tag))
            if kind == "send":
                self.bytes_sent += tensor.numel() * tensor.element_size()
        works = dist.batch_isend_irecv(ops) if ops else []
        return Pending(works, what, [m[1] for m in messages])

    def wait(self, pending: Pending | None) -> None:
        if pending is None:
            return
        for work in pending.works:
            try:
                if self.timeout is None:
                    work.wait()
                else:
                    work.wait(self.timeout)
            except Exception as error:  # gloo raises RuntimeError, NCCL DistBackendError
                where = f"rank {self.rank} of {self.world_size}"
                if self.group is not None:
                    where += f" (global rank {dist.get_rank()})"
                raise RuntimeError(f"ring_attention: {where} gave up waiting for {pending.what}: {error}") from error
        pending.works = []

    def all_gather_ints(self, values: list[int], device) -> list[list[int]]:
        """Every rank's ``values`` (same length on every rank), one small collective."""
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        everyone = [torch.empty_like(mine) for _ in range(self.world_size)]
        work = dist.all_gather(everyone, mine, group=self.group, async_op=True)
        self.wait(Pending([work], "every rank's shapes (does every rank call ring_attention?)"))
        return [t.tolist() for t in everyone]

    def comm_device(self, data_device: torch.device | None) -> torch.device:
        """Where messages live: the data's device for NCCL (the current CUDA device for None),
        CPU for gloo."""
        if dist.get_backend(self.group) != "nccl":
            return torch.device("cpu")
        return torch.device("cuda", torch.cuda.current_device()) if data_device is None else data_device
