"""Ranks and the process group.

Rank and world size come from the environment torchrun sets (a plain `python` run is rank 0 of 1);
`init_distributed` starts the process group; `all_reduce_sum` and `barrier` are the collectives the loop uses.

    dist_config = DistributedConfig()
    device = cleanup.enter_context(process_group(dist_config))   # NCCL on GPUs, gloo on CPUs; destroyed at exit
"""

import os
import socket
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedConfig:
    """This process's place among the ranks, from torchrun's environment variables."""

    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", 0)))
    local_rank: int = field(default_factory=lambda: int(os.environ.get("LOCAL_RANK", 0)))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", 1)))

    def is_main_process(self) -> bool:
        """Rank 0 logs, writes run files and the export."""
        return self.rank == 0


def init_distributed(dist_config: DistributedConfig) -> torch.device:
    """Start the process group (NCCL on GPUs, plus gloo for CPU tensors; gloo on CPUs) and return the device.

    A plain `python` run is a group of one on a free local port.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", dist_config.local_rank)
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"  # gloo for CPU tensors: dcp.async_save's collectives need it
    else:
        device, backend = torch.device("cpu"), "gloo"
    init_method = None
    if "MASTER_ADDR" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            init_method = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    if not dist.is_initialized():
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=dist_config.rank,
            world_size=dist_config.world_size,
            device_id=device if device.type == "cuda" else None,
        )
    return device


@contextmanager
def process_group(dist_config: DistributedConfig):
    """`init_distributed` (yields the device), and the process group destroyed at exit, also when the run fails."""
    device = init_distributed(dist_config)
    try:
        yield device
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all ranks, in place (a no-op for one rank); returns it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()
