"""torch.distributed helpers of block-wise inference and training under ``torchrun``: join and leave the process
group, this process's rank and device, the module inside a DDP wrapper, and a barrier that is a no-op in a single
process."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (``0, 1`` outside ``torch.distributed``)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrapped(network: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, or ``network`` itself."""
    return network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network


def barrier() -> None:
    """Wait for every rank (nothing outside ``torch.distributed``)."""
    if rank_and_world()[1] > 1:
        dist.barrier()


def init_distributed() -> None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1): NCCL on GPUs, gloo on CPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")


def finalize_distributed() -> None:
    """Leave the process group, if any."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(device: str | torch.device) -> torch.device:
    """``device``, or under ``torchrun`` on GPUs the one GPU of this process (``cuda:LOCAL_RANK``)."""
    device = torch.device(device)
    if device.type == "cuda" and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device
