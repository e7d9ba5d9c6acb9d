"""Data parallelism over calibration samples on torch.distributed (gloo on CPU, NCCL on CUDA).

Every rank prepares the whole (cheap) sample list, then does the heavy work only for its shard,
samples rank, rank + N, rank + 2N, ... Per layer the ranks sum their partial Hessians
(accumulated in float64, so that the summation order of ranks changes nothing once H is rounded
to the solver's float32), each linear is solved by one rank chosen by cost and its integers are
broadcast, and every rank pushes its own shard through the quantized layer. Token importance is
per sample; its integration needs statistics over all tokens, so the per-token values are
gathered (one float per token and linear) and every rank integrates the same full set.

`SINGLE` is the one-process case: every collective is the identity.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's samples: every world-th item, starting at rank."""
        return items[self.rank :: self.world]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def gather_samples(self, local: list, total: int) -> list:
        """Per-sample values of every rank, back in the global sample order (0 .. total-1)."""
        if self.world == 1:
            return local
        parts: list = [None] * self.world
        torch.distributed.all_gather_object(parts, [v.cpu() if isinstance(v, torch.Tensor) else v for v in local])
        out: list = [None] * total
        for rank, values in enumerate(parts):
            out[rank :: self.world] = values
        return out

    def owners(self, costs: list[float]) -> list[int]:
        """Assigns work items to ranks, largest first to the least-loaded rank (greedy by cost)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
            rank = min(range(self.world), key=lambda r: load[r])
            owner[i] = rank
            load[rank] += costs[i]
        return owner

    def broadcast(self, value, src: int):
        """An arbitrary (picklable) value from rank src to all ranks."""
        if self.world == 1:
            return value
        box = [value if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


SINGLE = Dist()


def init_from_env(device_type: str, timeout_s: float) -> Dist:
    """Joins the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    MASTER_ADDR, ...); a single process when WORLD_SIZE is absent or 1. A collective that waits
    longer than timeout_s (a dead or failed rank) raises instead of hanging."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return SINGLE
    if not torch.distributed.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    # CPU threads per rank: OMP_NUM_THREADS, which torchrun sets to 1 unless the user sets it
    # (e.g. cores / ranks). Results equal a single process that runs with the same thread count;
    # another thread count changes float summation order inside matmuls (docs/distributed.md).
    return Dist(torch.distributed.get_rank(), world)


def shutdown() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
