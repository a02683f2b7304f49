"""Upstream's import path for checkpoints; they live in `checkpointing/`.

from checkpoint import save_checkpoint_fsdp2, load_checkpoint_fsdp2, save_final_model
"""

from checkpointing.format import (
    load_checkpoint_ddp,
    load_checkpoint_fsdp2,
    save_checkpoint_ddp,
    save_checkpoint_fsdp2,
    save_final_model,
)

__all__ = ["load_checkpoint_ddp", "load_checkpoint_fsdp2", "save_checkpoint_ddp", "save_checkpoint_fsdp2",
           "save_final_model"]  # fmt: skip
