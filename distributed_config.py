"""Rank and world size from the environment torchrun sets; a plain `python` run is rank 0 of 1."""

import os
from dataclasses import dataclass, field


@dataclass(frozen=True)
class DistributedConfig:
    rank: int = field(default_factory=lambda: int(os.environ.get("RANK", 0)))
    local_rank: int = field(default_factory=lambda: int(os.environ.get("LOCAL_RANK", 0)))
    world_size: int = field(default_factory=lambda: int(os.environ.get("WORLD_SIZE", 1)))

    def is_main_process(self) -> bool:
        return self.rank == 0
