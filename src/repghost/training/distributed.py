"""Process-group set-up for torchrun (gloo on CPU, nccl on CUDA) and small collective helpers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "DistContext",
    "init_distributed",
    "all_reduce_sum",
    "all_ranks_agree",
    "average_bn_statistics",
    "all_gather_objects",
    "barrier",
    "shutdown",
    "ShardSampler",
    "SkipSampler",
]


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: Optional[str] = None) -> DistContext:
    """Join the torchrun process group if launched by torchrun, else run as a single process."""
    want = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(0, 1, 0, want)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want.type == "cuda":
        want = torch.device("cuda", local_rank)
        torch.cuda.set_device(want)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if want.type == "cuda" else "gloo")
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, want)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all ranks (in place); a no-op outside a process group."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ranks_agree(flag: bool, device: torch.device) -> bool:
    """``True`` on every rank if ``flag`` is true on every rank, else ``False`` on every rank.

    A decision that decides whether a rank enters a collective (here: whether to train on a batch)
    must be the same on all ranks, or the ranks that go ahead wait for the others forever.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    votes = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(votes, op=dist.ReduceOp.SUM)
    return int(votes.item()) == dist.get_world_size()


def average_bn_statistics(model: torch.nn.Module) -> None:
    """Average, over ranks, the running statistics of the BatchNorms in ``model`` that are training.

    Written here rather than timm's ``distribute_bn``: that one averages every ``running_mean`` /
    ``running_var`` buffer, frozen ones included (eval-mode BatchNorms of a detector's frozen
    stages, torchvision's ``FrozenBatchNorm2d``), and a float32 sum divided by the world size does
    not always give the same value back, so frozen statistics would drift by rounding every epoch.
    A no-op outside a process group.
    """
    from torch.nn.modules.batchnorm import _BatchNorm

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats:
            for buf in (m.running_mean, m.running_var):
                all_reduce_sum(buf).div_(dist.get_world_size())


def all_gather_objects(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` outside a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class ShardSampler(Sampler[int]):
    """Every ``world_size``-th index from ``rank``, with no padding.

    torch's DistributedSampler pads the last shard with repeated samples, which would count some
    validation images twice; evaluation sums exact counts over ranks instead.
    """

    def __init__(self, length: int, rank: int, world_size: int) -> None:
        self.indices = list(range(rank, length, world_size))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SkipSampler(Sampler[int]):
    """The indices of ``sampler`` after the first ``skip`` ones (resuming in the middle of an epoch)."""

    def __init__(self, sampler: Sampler[int], skip: int) -> None:
        self.sampler = sampler
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        it = iter(self.sampler)
        for _ in range(self.skip):
            next(it, None)
        return it

    def __len__(self) -> int:
        return max(0, len(self.sampler) - self.skip)  # type: ignore[arg-type]
