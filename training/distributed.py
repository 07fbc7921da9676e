"""Process setup for one process or a `torchrun` group (PyTorch DDP), and the device choice.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them this is a single process. The
backend follows the device: nccl on CUDA, gloo on CPU. Our code never starts processes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class TorchDeviceError(RuntimeError):
    """PyTorch cannot use the requested --device here (training and evaluation); a bundle that
    cannot run on a device is star_runtime's DeviceError, a BundleError."""


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(choice: str, local_rank: int = 0) -> torch.device:
    """'auto' -> CUDA when present, else CPU; 'cuda' without a GPU is a TorchDeviceError."""
    if choice not in ("auto", "cpu", "cuda"):
        raise TorchDeviceError(f"--device must be auto, cpu or cuda, not {choice!r}")
    if choice == "cuda" and not torch.cuda.is_available():
        raise TorchDeviceError("--device cuda was asked for, but PyTorch sees no CUDA GPU")
    if choice == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(device_choice: str) -> DistContext:
    """Read the torchrun environment, pick the device and join the process group if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_choice, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, device)


def teardown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum a small float64 vector over the ranks (a no-op for one process)."""
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()
