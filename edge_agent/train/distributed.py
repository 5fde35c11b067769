"""Data-parallel training across processes started by torchrun (DDP: gloo on CPU, NCCL on GPUs).

fit.py calls in here at a few points; a single process (WORLD_SIZE unset or 1) trains exactly as before.
The global batch (--batch-size) is split evenly across the processes, so steps, epochs and the learning rate
mean what they mean in one process; each process samples its own crops (seed + rank); only rank 0 exports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from edge_agent.errors import ConfigError

RANK_SEED_STRIDE = 1_000_003  # crop and noise seeds of rank r: seed + r * stride (rank 0 = one process)


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = World()


def init(device: str) -> World:
    """The process group from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    import torch.distributed as dist

    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        nccl = device != "cpu" and torch.cuda.is_available()
        if nccl:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group("nccl" if nccl else "gloo")
    return world


def place(world: World, device: torch.device) -> torch.device:
    """One GPU per process: cuda:LOCAL_RANK."""
    return torch.device("cuda", world.local_rank) if device.type == "cuda" and world.size > 1 else device


def check(world: World, model: str, batch_size: int) -> None:
    if world.size == 1:
        return
    if model not in ("vae", "ae"):
        raise ConfigError(f"--model {model} trains in one process only; run it without torchrun (vae and ae scale)")
    if batch_size % world.size:
        raise ConfigError(f"--batch-size {batch_size} does not split evenly across {world.size} processes; use a "
                        f"multiple of {world.size}")


def rank_seed(seed: int, world: World) -> int:
    return seed + RANK_SEED_STRIDE * world.rank


class ShardedSampler:
    """Each process draws its 1/size share of the global batch from its own rank-seeded sampler."""

    def __init__(self, sampler, world: World):
        self.sampler = sampler
        self.world = world

    def sample(self, n: int) -> torch.Tensor:
        return self.sampler.sample(n // self.world.size)


class _Loss(nn.Module):
    """DDP synchronises gradients of what runs through its forward, so the loss runs inside one."""

    def __init__(self, model: nn.Module, loss: Callable[[nn.Module, torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.loss(self.model, x)


def loss_step(model: nn.Module, loss: Callable[[nn.Module, torch.Tensor], torch.Tensor], world: World,
              seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> the loss; under DDP the gradients are averaged across processes in backward (= the global batch's
    mean, since the shares are equal). BatchNorm statistics stay per process; rank 0's buffers are broadcast."""
    if world.size == 1:
        return lambda x: loss(model, x)
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    # A 1-input-channel conv's weight gradient has an ambiguous stride on its size-1 dim; harmless here.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    torch.manual_seed(rank_seed(seed, world))  # the VAE's sampling noise differs per process, like the crops
    device = next(model.parameters()).device
    return DistributedDataParallel(_Loss(model, loss), device_ids=[device.index] if device.type == "cuda" else None)


def any_rank(world: World, flag: bool) -> bool:
    """True on every process when it is true on one: all stop at the same step (the time budget), or DDP hangs."""
    if world.size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def agreed_max(world: World, value: float) -> float:
    """The largest of every process's value (one all_reduce): e.g. the elapsed time the schedule and budget use."""
    if world.size == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def finish(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
