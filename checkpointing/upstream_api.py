"""The upstream recipe's checkpoint functions, by its names and signatures, writing this recipe's format.

    from checkpoint import load_checkpoint_fsdp2, save_checkpoint_fsdp2, save_final_model_fsdp2
    model, optimizer, scheduler, dataloader, step, epoch = load_checkpoint_fsdp2(
        model, optimizer, scheduler, ckpt_dir, dist_config, dataloader)       # step to run next (0: none found)
    save_checkpoint_fsdp2(model, optimizer, scheduler, ckpt_dir, step, epoch, dist_config, dataloader)

For a training script written against NVIDIA's `llama3_native_te/checkpoint.py`. The folders are ours
(`step_N/` with `format.py`'s files and the completion marker), so the recipe's entrypoints resume from
them and these functions resume from the entrypoints' checkpoints. As upstream: `step` is the step just
run, and loading returns it + 1 (the step to run next); `epoch` is saved and returned. Unlike upstream:
only complete checkpoints are found (a crashed save is skipped), a folder is made a checkpoint only once
every rank has written, and RNG and FP8 scaling state come back too. `process_group` and DDP's
`weights_only` are accepted and not needed (the default group; our own files are trusted).
"""

import logging
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

from checkpointing.export import export_model
from checkpointing.folders import find_latest_checkpoint, step_folder, step_of
from checkpointing.folders import prune_checkpoints as _prune
from checkpointing.format import load_ddp, load_fsdp2, mark_complete, save_ddp, save_fsdp2

logger = logging.getLogger(__name__)


class CheckpointOutput(NamedTuple):
    """What the load functions return: the restored objects and the step to run next."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dataloader: object
    step: int
    epoch: int


def get_latest_checkpoint(ckpt_path) -> tuple[Path | None, int]:
    """The newest complete `step_N` folder under `ckpt_path` and N, or (None, 0)."""
    latest = find_latest_checkpoint(ckpt_path)
    return (latest, step_of(latest)) if latest else (None, 0)


def should_save_checkpoint(step: int, save_every_n_steps: int) -> bool:
    """Every `save_every_n_steps` steps after step 0 (never when it is 0 or less)."""
    return save_every_n_steps > 0 and step > 0 and step % save_every_n_steps == 0


def prune_checkpoints(ckpt_path, max_checkpoints: int) -> None:
    """Keep the newest `max_checkpoints` complete checkpoints written by these functions.

    Unlike upstream, never those of an entrypoint's run (they carry its run record): `checkpointing/folders.py`.
    """
    _prune(ckpt_path, max_checkpoints)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _load(load, model, optimizer, scheduler, ckpt_path, dataloader) -> CheckpointOutput:
    path, _ = get_latest_checkpoint(ckpt_path)
    if path is None:
        logger.info("No checkpoint in %s: starting from scratch.", ckpt_path)
        return CheckpointOutput(model, optimizer, scheduler, dataloader, 0, 0)
    step = load(path, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader, rank=_rank())
    epoch = torch.load(path / "epoch.pt", weights_only=True) if (path / "epoch.pt").exists() else 0
    logger.info("Loaded checkpoint %s (step %d).", path, step)
    return CheckpointOutput(model, optimizer, scheduler, dataloader, step + 1, epoch)


def _save(save, model, optimizer, scheduler, ckpt_path, step, epoch, dataloader, max_checkpoints, **kwargs):
    """Write `step_<step>`; rank 0 marks it complete once every rank has written (or, async, once DCP has)."""
    path, rank = step_folder(ckpt_path, step), _rank()
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    if dist.is_initialized():
        dist.barrier()
    future = save(
        path, step, model=model, optimizer=optimizer, scheduler=scheduler, dataloader=dataloader, rank=rank, **kwargs
    )
    if rank == 0:
        torch.save(epoch, path / "epoch.pt")

    def finish(*_):
        if rank == 0:
            mark_complete(path, None)
            _prune(ckpt_path, max_checkpoints)

    if future is not None:  # DCP's async save: its future ends after the metadata, i.e. after every rank's shards
        future.add_done_callback(finish)
        return future
    if dist.is_initialized():
        dist.barrier()
    finish()
    return None


def load_checkpoint_ddp(model, optimizer, scheduler, ckpt_path, dist_config, dataloader=None, weights_only=True):
    """Restore the newest complete checkpoint under `ckpt_path` into the DDP model; CheckpointOutput."""
    return _load(load_ddp, model, optimizer, scheduler, ckpt_path, dataloader)


def save_checkpoint_ddp(
    model, optimizer, scheduler, ckpt_path, step, epoch, dist_config, dataloader=None, max_checkpoints=None
):
    """Write `<ckpt_path>/step_<step>` (model and optimizer from rank 0, every rank's loader state)."""
    _save(save_ddp, model, optimizer, scheduler, ckpt_path, step, epoch, dataloader, max_checkpoints)


def load_checkpoint_fsdp2(model, optimizer, scheduler, ckpt_path, dist_config, dataloader=None, process_group=None):
    """Restore the newest complete checkpoint under `ckpt_path` into the FSDP2 model (DCP); CheckpointOutput."""
    return _load(load_fsdp2, model, optimizer, scheduler, ckpt_path, dataloader)


def save_checkpoint_fsdp2(
    model,
    optimizer,
    scheduler,
    ckpt_path,
    step,
    epoch,
    dist_config,
    dataloader=None,
    process_group=None,
    max_checkpoints=None,
    async_save=False,
):
    """Write `<ckpt_path>/step_<step>` with DCP; `async_save`: in the background (returns DCP's future)."""
    args = (model, optimizer, scheduler, ckpt_path, step, epoch, dataloader, max_checkpoints)
    return _save(save_fsdp2, *args, async_save=async_save)


def save_final_model_ddp(model, save_directory, dist_config):
    """A Hugging Face directory of the weights (`checkpointing/export.py`); call on every rank."""
    export_model(save_directory, model, None, rank=_rank(), fsdp2=False)


def save_final_model_fsdp2(model, save_directory, dist_config):
    """A Hugging Face directory of the gathered weights (a collective: call on every rank)."""
    export_model(save_directory, model, None, rank=_rank(), fsdp2=True)
