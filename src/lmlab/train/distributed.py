"""Scaling out on PyTorch's own engine: torchrun sets the environment, DDP or FSDP2 wrap the model."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from lmlab.utils.device import default_device


@dataclass
class Dist:
    """Where this process stands: rank, world size, device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        """Only the main process writes logs and checkpoints."""
        return self.rank == 0


def setup(device: str | None = None) -> Dist:
    """Join the process group when launched by torchrun (gloo on CPU, nccl on GPU); a no-op otherwise."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return Dist(device=default_device(device))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = default_device(device).type == "cuda"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return Dist(rank, world, local, torch.device(f"cuda:{local}" if use_cuda else "cpu"))


def wrap(model: nn.Module, d: Dist, strategy: str) -> nn.Module:
    """DDP (every process holds the whole model, gradients are averaged) or FSDP2 (parameters sharded)."""
    if d.world == 1:
        return model
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)


def all_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """The mean of a tensor over all processes."""
    if d.world > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world
    return value


def barrier(d: Dist) -> None:
    """Wait for every process."""
    if d.world > 1:
        dist.barrier()


def teardown() -> None:
    """Leave the process group cleanly at the end of a command (torchrun warns, and nccl may hang, without it)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
