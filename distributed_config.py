"""Upstream's import path for the ranks and the process group; they live in `runtime/distributed.py`.

from distributed_config import DistributedConfig
"""

from runtime.distributed import DistributedConfig, all_reduce_sum, barrier, init_distributed

__all__ = ["DistributedConfig", "all_reduce_sum", "barrier", "init_distributed"]
