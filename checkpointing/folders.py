"""The checkpoint folder: complete `step_N/` folders, the run that wrote them, resume, pruning, checks.

    step = resume_from_latest(ckpt_dir, load, device, run_info)        # the newest loadable checkpoint
    prune_checkpoints(ckpt_dir, max_checkpoints=3, run_id=run_id)      # after a newer one is complete

A folder counts once its save finished (`format.is_complete`: the marker written last). Each folder's `run_info.yaml`
names the run that wrote it (`run_id`) and the model's shape. A run never mixes with another: a fresh
run refuses a folder holding another run's complete checkpoints (unless `checkpoint.overwrite=true`,
which removes them first), resuming into a different shape or packing mode is refused, and a complete
checkpoint is deleted only by pruning of the run that wrote it.
"""

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from checkpointing.format import MARKER, is_complete, unmark
from checkpointing.run_record import read_run_info

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to a different model or run: never loaded, never a reason to fall back."""


def step_folder(ckpt_dir, step: int) -> Path:
    """The folder of the checkpoint after `step` optimizer steps."""
    return Path(ckpt_dir) / f"step_{step}"


def step_of(path: Path) -> int:
    """N of a `step_N` folder."""
    return int(path.name.removeprefix("step_"))


def is_step_folder(path: Path) -> bool:
    """A folder named `step_N` (N digits)."""
    return path.is_dir() and path.name.removeprefix("step_").isdigit()


def complete_checkpoints(ckpt_dir, warn: bool = True) -> list[Path]:
    """Complete `step_N` folders, oldest first."""
    found = [p for p in Path(ckpt_dir).glob("step_*") if is_step_folder(p)]
    for p in found:
        if warn and not is_complete(p):
            logger.warning("Ignoring incomplete checkpoint %s (no %s marker: the save did not finish).", p, MARKER)
    return sorted((p for p in found if is_complete(p)), key=step_of)


def find_latest_checkpoint(ckpt_dir) -> Path | None:
    """The newest complete `step_N` folder, or None."""
    complete = complete_checkpoints(ckpt_dir) if ckpt_dir and Path(ckpt_dir).exists() else []
    return complete[-1] if complete else None


def written_by(path: Path, run_id: str | None) -> bool:
    """Whether run `run_id` wrote the checkpoint (one without `run_info.yaml` belongs to whoever resumes it)."""
    info = read_run_info(path)
    return info is None or info.get("run_id") in (None, run_id)


def check_compatible(path: Path, run_info: dict) -> None:
    """Refuse a checkpoint of another model shape, model class or packing mode, naming the differing keys."""
    saved = read_run_info(path)
    if saved is None or run_info is None:
        return
    theirs = {**saved.get("model_shape", {}), "use_sequence_packing": saved["config"].get("use_sequence_packing")}
    ours = {**run_info.get("model_shape", {}), "use_sequence_packing": run_info["config"].get("use_sequence_packing")}
    differ = {k: (theirs.get(k), ours.get(k)) for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)}
    if differ:
        listed = ", ".join(f"{k}: checkpoint {a!r}, this run {b!r}" for k, (a, b) in differ.items())
        raise CheckpointMismatchError(
            f"{path} was written for a different model or data layout ({listed}). Resume with the settings that "
            "wrote it, or start this run in a new checkpoint.ckpt_dir."
        )


def last_line(error: BaseException) -> str:
    """The cause of a load error: DCP wraps it in a multi-line report whose last line is the cause itself."""
    return (str(error).strip().splitlines() or [type(error).__name__])[-1]


def resume_from_latest(
    ckpt_dir, load: Callable[[Path], int], device: torch.device, run_info: dict | None = None
) -> int:
    """Load the newest complete checkpoint that every rank can read, with `load(path) -> step`; 0 if none.

    A checkpoint of another shape or packing mode is refused (`CheckpointMismatchError`). A corrupt or
    truncated one (bad file, missing shard) is reported with a warning naming it, and the previous complete
    one is tried; all ranks decide together, so a file that is bad on one rank only never leaves the ranks
    at different steps. Nothing is deleted. The run adopts the `run_id` of the checkpoint it resumes.
    """
    candidates = list(reversed(complete_checkpoints(ckpt_dir))) if ckpt_dir and Path(ckpt_dir).exists() else []
    for path in candidates:
        check_compatible(path, run_info)
        error = None
        try:
            step = load(path)
        except (Exception, CheckpointException) as e:  # any unreadable part: fall back (DCP's is a BaseException)
            error = e
        failed = torch.tensor(float(error is not None), device=device)
        if dist.is_initialized():
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not failed.item():
            logger.info("Resumed from %s at step %d", path, step)
            if run_info is not None:
                run_info["run_id"] = (read_run_info(path) or {}).get("run_id", run_info["run_id"])
            return step
        cause = last_line(error) if error else "failed on another rank"
        logger.warning(
            "Checkpoint %s could not be loaded (%s); falling back to the previous complete checkpoint.", path, cause
        )
    if candidates:  # a ValueError: the user's to fix, ended in one line like a bad path
        raise ValueError(
            f"No checkpoint in {ckpt_dir} could be loaded (tried {[p.name for p in candidates]}; see the warnings "
            "above). Move the damaged folders away, or start afresh with checkpoint.resume_from_checkpoint=false."
        )
    return 0


def prune_checkpoints(ckpt_dir, max_checkpoints: int | None, run_id: str | None = None) -> None:
    """Delete all but the newest `max_checkpoints` complete checkpoints of run `run_id` (None or 0: keep all)."""
    if not max_checkpoints:
        return
    for old in [p for p in complete_checkpoints(ckpt_dir, warn=False) if written_by(p, run_id)][:-max_checkpoints]:
        unmark(old)  # first make it incomplete, so a crash here never leaves a half-deleted "complete" one
        shutil.rmtree(old, ignore_errors=True)
