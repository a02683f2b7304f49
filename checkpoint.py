"""Upstream's import path for checkpoints; they live in `checkpointing/`.

    from checkpoint import Checkpointer        # the training loop's handle: resume, saves, exports

The functions behind it, for one `step_N/` folder of either strategy, and the Hugging Face export:
`save_ddp`, `load_ddp`, `save_fsdp2`, `load_fsdp2` (`checkpointing/format.py`), `export_model`
(`checkpointing/export.py`). A training script written against the upstream recipe's `checkpoint.py` finds
its functions here by their names and signatures (`load_checkpoint_fsdp2`, `save_checkpoint_fsdp2`,
`save_final_model_fsdp2`, the DDP three, `should_save_checkpoint`, `get_latest_checkpoint`,
`prune_checkpoints`, `CheckpointOutput`), writing this recipe's checkpoints (`checkpointing/upstream_api.py`).
"""

from checkpointing.checkpointer import Checkpointer, prepare_checkpoint_dir
from checkpointing.export import export_model
from checkpointing.format import load_ddp, load_fsdp2, save_ddp, save_fsdp2
from checkpointing.upstream_api import (
    CheckpointOutput,
    get_latest_checkpoint,
    load_checkpoint_ddp,
    load_checkpoint_fsdp2,
    prune_checkpoints,
    save_checkpoint_ddp,
    save_checkpoint_fsdp2,
    save_final_model_ddp,
    save_final_model_fsdp2,
    should_save_checkpoint,
)

__all__ = [
    "CheckpointOutput",
    "Checkpointer",
    "export_model",
    "get_latest_checkpoint",
    "load_checkpoint_ddp",
    "load_checkpoint_fsdp2",
    "load_ddp",
    "load_fsdp2",
    "prepare_checkpoint_dir",
    "prune_checkpoints",
    "save_checkpoint_ddp",
    "save_checkpoint_fsdp2",
    "save_ddp",
    "save_final_model_ddp",
    "save_final_model_fsdp2",
    "save_fsdp2",
    "should_save_checkpoint",
]
