"""Data parallelism over calibration samples on torch.distributed (gloo on CPU, NCCL on CUDA).

Every rank prepares the whole (cheap) sample list, then does the heavy work only for its shard,
samples rank, rank + N, rank + 2N, ... Each linear is solved by one rank chosen by cost (its
owner), and its integers are broadcast; every rank pushes its own shard through the quantized
layer. Token importance is per sample; its integration needs statistics over all tokens, so the
per-token values are gathered (one float per token and linear) and every rank integrates the
same full set, in the global sample order.

Same checkpoint as one process, by construction: every per-sample computation is the one a
single process does (batches of one sample), and no float is summed across ranks. A float sum
depends on its order (float32 or float64 alike), so the Hessian is not all-reduced: the owner
of a linear accumulates it sample by sample in the global sample order, as one process does,
from each sample's token inputs, which the sample's rank sends it (`to_owners_in_sample_order`).
The only reductions over ranks are exact: gathers, broadcasts and maxima.

`SINGLE` is the one-process case: every collective is the identity.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Callable, Iterator
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

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum over ranks: exact, so independent of the order of ranks."""
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

    def sample_counts(self, local: int) -> list[int]:
        """Every rank's number of samples, by rank."""
        if self.world == 1:
            return [local]
        counts: list = [None] * self.world
        torch.distributed.all_gather_object(counts, local)
        return counts

    def to_owners_in_sample_order(
        self, step: int, counts: list[int], mine: Callable[[str], tuple[torch.Tensor, ...]] | None,
        owners: dict[str, int], device,
    ) -> Iterator[tuple[str, tuple[torch.Tensor, ...]]]:
        """Delivers the per-sample tensors of named work items (linears) to their owners, for the
        samples step * N .. step * N + N - 1 (each rank's local sample `step`) in that order, which
        is the global sample order.

        mine(name): this rank's tensors for `name` (None when this rank has no sample `step`).
        On an owner it yields (name, tensors) for every name it owns and every such sample: its
        own (computed when yielded), or what the sample's rank sent, on `device`. A rank sends each
        owner one header and one buffer per step, with the tensors of all the names that owner
        owns; mine(name) must give the same number of tensors for every name. Every rank must
        iterate it to the end, for the same (step, owners) sequence."""
        by_owner: dict[int, list[str]] = {}
        for name, owner in owners.items():
            by_owner.setdefault(owner, []).append(name)
        for rank in range(self.world):
            if step >= counts[rank]:
                continue
            for owner, names in sorted(by_owner.items()):
                if rank == self.rank == owner:
                    for name in names:
                        yield name, mine(name)
                elif rank == self.rank:
                    _send_tensors([t for name in names for t in mine(name)], owner)
                elif self.rank == owner:
                    received = _recv_tensors(rank, device)
                    per_name = len(received) // len(names)
                    for i, name in enumerate(names):
                        yield name, received[i * per_name : (i + 1) * per_name]

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

# Point-to-point tensors: one header (count, then dtype code, ndim and up to MAX_DIMS sizes per
# tensor), so that variable-length token sets need no agreement beforehand, then every tensor's
# bytes in one buffer (each padded to 8 bytes, so that every dtype can view its slice).
_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.int32, torch.int8)
MAX_DIMS = 4
MAX_TENSORS = 16
_HEADER = 1 + MAX_TENSORS * (2 + MAX_DIMS)


def _comm_device() -> torch.device:
    """NCCL moves CUDA tensors only, gloo CPU tensors (we use it on CPU only)."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _padded_bytes(dtype: torch.dtype, shape) -> int:
    return -(-math.prod(shape) * dtype.itemsize // 8) * 8


def _send_tensors(tensors: list[torch.Tensor], dst: int) -> None:
    if len(tensors) > MAX_TENSORS or any(t.dim() > MAX_DIMS for t in tensors):
        raise ValueError(f"at most {MAX_TENSORS} tensors of at most {MAX_DIMS} dimensions per message")
    comm = _comm_device()
    header = torch.zeros(_HEADER, dtype=torch.int64)
    header[0] = len(tensors)
    for i, t in enumerate(tensors):
        at = 1 + i * (2 + MAX_DIMS)
        header[at : at + 2 + t.dim()] = torch.tensor([_DTYPES.index(t.dtype), t.dim(), *t.shape])
    torch.distributed.send(header.to(comm), dst)
    buffer = torch.zeros(sum(_padded_bytes(t.dtype, t.shape) for t in tensors), dtype=torch.uint8, device=comm)
    at = 0
    for t in tensors:
        size = t.numel() * t.element_size()
        buffer[at : at + size] = t.detach().contiguous().reshape(-1).view(torch.uint8).to(comm)
        at += _padded_bytes(t.dtype, t.shape)
    if len(buffer):  # empty token sets send their header only
        torch.distributed.send(buffer, dst)


def _recv_tensors(src: int, device) -> tuple[torch.Tensor, ...]:
    comm = _comm_device()
    header = torch.zeros(_HEADER, dtype=torch.int64, device=comm)
    torch.distributed.recv(header, src)
    header = header.tolist()
    specs = []
    for i in range(header[0]):
        at = 1 + i * (2 + MAX_DIMS)
        specs.append((_DTYPES[header[at]], header[at + 2 : at + 2 + header[at + 1]]))
    buffer = torch.empty(sum(_padded_bytes(*spec) for spec in specs), dtype=torch.uint8, device=comm)
    if len(buffer):
        torch.distributed.recv(buffer, src)
    tensors, at = [], 0
    for dtype, shape in specs:
        size = math.prod(shape) * dtype.itemsize
        # a fresh copy: a BLAS may take another code path (and summation order) for an operand
        # that is not aligned as its own allocations are
        tensors.append(buffer[at : at + size].view(dtype).reshape(shape).to(device, copy=True))
        at += _padded_bytes(dtype, shape)
    return tuple(tensors)


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
