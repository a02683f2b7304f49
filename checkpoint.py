"""Upstream's import path for checkpoints; they live in `checkpointing/`.

    from checkpoint import Checkpointer        # the training loop's handle: resume, saves, exports

The functions behind it, for one `step_N/` folder of either strategy, and the Hugging Face export:
`save_ddp`, `load_ddp`, `save_fsdp2`, `load_fsdp2` (`checkpointing/format.py`), `export_model`
(`checkpointing/export.py`).
"""

from checkpointing.checkpointer import Checkpointer, prepare_checkpoint_dir
from checkpointing.export import export_model
from checkpointing.format import load_ddp, load_fsdp2, save_ddp, save_fsdp2

__all__ = [
    "Checkpointer",
    "export_model",
    "load_ddp",
    "load_fsdp2",
    "prepare_checkpoint_dir",
    "save_ddp",
    "save_fsdp2",
]
