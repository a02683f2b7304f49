"""The training loop's one handle on `checkpoint.ckpt_dir`: resume, interval and preemption saves, exports.

    prepare_checkpoint_dir(cfg.checkpoint, options.model, rank, device)  # before anything is built
    checkpointer = Checkpointer(cfg.checkpoint, run_info, rank, strategy="fsdp2", model=model, optimizer=optimizer,
                                scheduler=scheduler, dataloader=dataloader, tokenizer=tokenizer)
    step = checkpointer.resume(device)        # the newest complete checkpoint (or upstream's newest), else 0
    if checkpointer.due(step, stop):
        checkpointer.save(step)               # FSDP2 with async_save: returns while DCP writes
    checkpointer.finish()                     # after the loop: the save in flight, then final_model if asked

With `checkpoint.ckpt_dir` null every call does nothing. The folder is checked (writable, room for a
checkpoint, no other run's checkpoints unless `overwrite`) before the model is built. A save writes
`step_N/` (`format.py` names its files), and once every rank has written its part, rank 0 marks it complete
and prunes older checkpoints of the run to `max_checkpoints`; an async save is completed by the next save or
by `finish`. A run that fails never completes the save in flight: the folder stays incomplete and the
previous checkpoint stays the newest.
"""

import logging
import math
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from checkpointing import format as step_files
from checkpointing.export import export_model
from checkpointing.folders import (
    complete_checkpoints,
    is_step_folder,
    prune_checkpoints,
    resume_from_latest,
    step_folder,
)
from checkpointing.run_record import read_run_info
from checkpointing.upstream import resume_from_upstream
from model.build import ModelOptions, checkpoint_bytes
from runtime.distributed import barrier

logger = logging.getLogger(__name__)
STRATEGIES = ("ddp", "fsdp2")


class Checkpointer:
    """Saves, resumes and exports one run's model, optimizer, scheduler and data position under `ckpt_dir`."""

    def __init__(
        self,
        checkpoint_cfg,
        run_info: dict,
        rank: int,
        *,
        strategy: str,
        model,
        optimizer,
        scheduler,
        dataloader,
        tokenizer,
    ):
        """`checkpoint_cfg`: the `checkpoint` group; `run_info`: the run record each checkpoint and export carries."""
        assert strategy in STRATEGIES, strategy
        self.cfg, self.ckpt_dir = checkpoint_cfg, checkpoint_cfg.ckpt_dir
        self.strategy, self.rank, self.run_info = strategy, rank, run_info
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.dataloader, self.tokenizer = dataloader, tokenizer
        self.async_save = bool(checkpoint_cfg.async_save) and strategy == "fsdp2"  # DDP saves synchronously
        self._in_flight = None  # (DCP's future, folder) of the FSDP2 save still being written

    def _state(self) -> dict:
        return {
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "dataloader": self.dataloader,
            "rank": self.rank,
        }

    def resume(self, device: torch.device) -> int:
        """Load the newest complete checkpoint (or, with none of ours, upstream's newest); the step to go on from.

        The run adopts the `run_id` of the checkpoint it resumes (`folders.resume_from_latest`).
        """
        if not self.ckpt_dir or not self.cfg.resume_from_checkpoint:
            return 0
        load = step_files.load_fsdp2 if self.strategy == "fsdp2" else step_files.load_ddp
        step = resume_from_latest(self.ckpt_dir, lambda path: load(path, **self._state()), device, self.run_info)
        # none of ours: the newest of upstream's <ckpt_dir>/train_<strategy>/step_N folders, if any
        return step or resume_from_upstream(
            self.ckpt_dir, f"train_{self.strategy}", self.model, self.optimizer, self.scheduler
        )

    def due(self, step: int, stop: bool) -> bool:
        """Whether to save after `step`: every `save_every_n_steps` (null: never), and when the run is preempted."""
        every = self.cfg.save_every_n_steps
        return bool(self.ckpt_dir) and (stop or bool(every and step % every == 0))

    def save(self, step: int) -> None:
        """Write `step_N/`; it is complete (marked) once every rank has written, or when the next save starts."""
        self._complete_in_flight()
        path = self._prepare_folder(step)
        if self.strategy == "ddp":
            step_files.save_ddp(path, step, **self._state())
            self._complete(path)
            return
        future = step_files.save_fsdp2(path, step, **self._state(), async_save=self.async_save)
        if future is None:
            self._complete(path)
        else:
            self._in_flight = (future, path)

    def finish(self) -> None:
        """After the loop: complete the save in flight, then export `final_model` if `save_final_model`."""
        self._complete_in_flight()
        if self.ckpt_dir and self.cfg.save_final_model:
            self.export()

    def export(self, name: str = "final_model", **info) -> Path | None:
        """Write `<ckpt_dir>/<name>`, a Hugging Face directory of the current weights (every rank takes part)."""
        if not self.ckpt_dir:
            return None
        folder, fsdp2 = Path(self.ckpt_dir) / name, self.strategy == "fsdp2"
        return export_model(
            folder, self.model, self.tokenizer, rank=self.rank, fsdp2=fsdp2, run_info={**self.run_info, **info}
        )

    def export_best(self, step: int, metrics: dict) -> None:
        """Validation's callback on a new best `val_bits_per_base`: `best_model/` if `save_best_model`."""
        if self.cfg.save_best_model:
            self.export("best_model", best={"step": step, **metrics})

    def best_so_far(self) -> float:
        """The `val_bits_per_base` of `<ckpt_dir>/best_model`, so that a resumed run keeps the best it had."""
        info = read_run_info(Path(self.ckpt_dir) / "best_model") if self.ckpt_dir else None
        return (info or {}).get("best", {}).get("val_bits_per_base", math.inf)

    def _prepare_folder(self, step: int) -> Path:
        path = step_folder(self.ckpt_dir, step)
        saved = read_run_info(path) if step_files.is_complete(path) else None
        if saved and saved.get("run_id") != self.run_info.get("run_id"):
            raise RuntimeError(f"{path} is a complete checkpoint of another run; it is never overwritten.")
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # a leftover of a crashed save, or a damaged checkpoint resume fell back from
        barrier()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _complete_in_flight(self) -> None:
        if self._in_flight is not None:
            future, path = self._in_flight
            self._in_flight = None
            future.result()
            self._complete(path)

    def _complete(self, path: Path) -> None:
        barrier()  # every rank has written its part
        if self.rank == 0:
            step_files.mark_complete(path, self.run_info)
            prune_checkpoints(self.ckpt_dir, self.cfg.max_checkpoints, self.run_info.get("run_id"))
            logger.info("Saved checkpoint %s", path)
        barrier()


def prepare_checkpoint_dir(checkpoint_cfg, model: ModelOptions, rank: int, device: torch.device) -> None:
    """Check `checkpoint.ckpt_dir` before anything is built; with `overwrite`, remove the old checkpoints.

    The folder must be a writable folder, hold nothing named like a checkpoint that is not one, have room for
    one checkpoint of `model`, and, unless the run resumes, hold no complete checkpoint. Every rank checks; if
    one fails, all raise (so none waits for the others). Nothing to do without a `ckpt_dir`.
    """
    if not checkpoint_cfg.ckpt_dir:
        return
    problem = _check_folder(checkpoint_cfg, checkpoint_bytes(model), rank)
    failed = torch.tensor(float(problem is not None), device=device)
    if dist.is_initialized():
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failed.item():
        raise ValueError(problem or "checkpoint.ckpt_dir failed its checks on another rank; see that rank's log.")
    complete = complete_checkpoints(checkpoint_cfg.ckpt_dir, warn=False)
    if complete and not checkpoint_cfg.resume_from_checkpoint and rank == 0:  # overwrite=true (checked above)
        logger.warning(
            "checkpoint.overwrite=true: deleting %s in %s.", [p.name for p in complete], checkpoint_cfg.ckpt_dir
        )
        for old in complete:
            step_files.unmark(old)
            shutil.rmtree(old)
    barrier()


def _check_folder(checkpoint_cfg, bytes_needed: int, rank: int) -> str | None:
    """What is wrong with the checkpoint folder, in one line with the fix, or None."""
    path, name = Path(checkpoint_cfg.ckpt_dir).expanduser(), f"checkpoint.ckpt_dir={checkpoint_cfg.ckpt_dir!r}"
    if path.exists() and not path.is_dir():
        return f"{name} is a file, not a folder; point checkpoint.ckpt_dir at a folder."
    probe = path / f".write_test_rank{rank}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        return f"{name} is not writable ({e.strerror}); choose a folder this job can write to."
    strays = sorted(p.name for p in path.glob("step_*") if not is_step_folder(p))
    if strays:
        return f"{name} holds {strays}, named like checkpoints but not checkpoint folders; move them away."
    free = shutil.disk_usage(path).free
    if free < bytes_needed:
        return (
            f"{name} has {free / 2**30:.1f} GiB free, and one checkpoint of this model needs about "
            f"{bytes_needed / 2**30:.1f} GiB; free space or choose another checkpoint.ckpt_dir."
        )
    complete = complete_checkpoints(path, warn=False)
    if complete and not checkpoint_cfg.resume_from_checkpoint and not checkpoint_cfg.overwrite:
        return (
            f"{name} already holds complete checkpoints ({[p.name for p in complete]}) and this run does not "
            "resume (checkpoint.resume_from_checkpoint=false). Use a new checkpoint.ckpt_dir, or "
            "checkpoint.overwrite=true to delete them first."
        )
    return None
