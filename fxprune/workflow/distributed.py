"""Process-group plumbing for running the workflow under ``torchrun``.

``torchrun --nproc_per_node=N fxprune run ...`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``
and the rendezvous variables in each process's environment; :func:`init_distributed` reads
them and joins the group (gloo on CPU, NCCL on CUDA). In a plain single process it does
nothing and every helper here degrades to a no-op, so the rest of the workflow has one code
path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from fxprune.workflow.errors import ConfigError

__all__ = ["DistContext", "init_distributed", "resolve_device", "all_reduce_sum", "barrier",
           "shutdown_distributed", "launch_rank"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def enabled(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, reports and progress bars."""
        return self.rank == 0


def launch_rank() -> int:
    """This process's rank as the launcher set it (``RANK``; 0 outside ``torchrun``).

    Unlike :class:`DistContext`, readable after the job has left its process group, e.g. to
    let only rank 0 print a command's final summary.
    """
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto`` is CUDA when present (this process's GPU under torchrun), else CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise ConfigError(f"--device {device!r}: {exc}") from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine")
        if resolved.index is None:
            resolved = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
    return resolved


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment, if there is one.

    Returns the single-process context when ``WORLD_SIZE`` is unset or 1. Calling it again
    once the group exists returns the existing group's context.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    if not dist.is_available():
        raise ConfigError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    use_cuda = resolve_device(device, local_rank).type == "cuda"
    backend = "nccl" if use_cuda else "gloo"
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(local_rank % torch.cuda.device_count())
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                       local_rank=local_rank, backend=dist.get_backend())


def shutdown_distributed(ctx: DistContext) -> None:
    """Leave the process group joined by :func:`init_distributed`."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over all processes (in place) and return it; identity in one process."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(ctx: DistContext) -> None:
    """Wait for every process (e.g. until rank 0 has written a file the others read)."""
    if ctx.enabled:
        dist.barrier()
