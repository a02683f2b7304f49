"""The checkpoint folder: complete `step_N/` folders, the run that wrote them, resume, pruning, checks.

    prepare_checkpoint_dir(cfg.checkpoint, bytes_needed, rank, device) # before the model is built
    step = resume_from_latest(ckpt_dir, load, device, run_info)        # the newest loadable checkpoint

A `COMPLETE` marker is written last, so only complete folders are resumed. Each folder's `run_info.yaml`
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
from omegaconf import OmegaConf
from torch.distributed.checkpoint.api import CheckpointException

from checkpointing.run_record import RUN_INFO_FILE
from runtime.distributed import barrier

logger = logging.getLogger(__name__)
MARKER = "COMPLETE"


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to a different model or run: never loaded, never a reason to fall back."""


def step_of(path: Path) -> int:
    """N of a `step_N` folder."""
    return int(path.name.removeprefix("step_"))


def _is_step_folder(path: Path) -> bool:
    return path.is_dir() and path.name.removeprefix("step_").isdigit()


def complete_checkpoints(ckpt_dir, warn: bool = True) -> list[Path]:
    """Complete `step_N` folders, oldest first."""
    found = [p for p in Path(ckpt_dir).glob("step_*") if _is_step_folder(p)]
    for p in found:
        if warn and not (p / MARKER).exists():
            logger.warning("Ignoring incomplete checkpoint %s (no %s marker: the save did not finish).", p, MARKER)
    return sorted((p for p in found if (p / MARKER).exists()), key=step_of)


def find_latest_checkpoint(ckpt_dir) -> Path | None:
    """The newest complete `step_N` folder, or None."""
    complete = complete_checkpoints(ckpt_dir) if ckpt_dir and Path(ckpt_dir).exists() else []
    return complete[-1] if complete else None


def read_run_info(path: Path) -> dict | None:
    """A checkpoint's `run_info.yaml` as a dict (None for checkpoints written before it existed)."""
    file = Path(path) / RUN_INFO_FILE
    return OmegaConf.to_container(OmegaConf.load(file)) if file.exists() else None


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
    if candidates:
        raise RuntimeError(
            f"No checkpoint in {ckpt_dir} could be loaded (tried {[p.name for p in candidates]}; see the warnings "
            "above). Move the damaged folders away, or start afresh with checkpoint.resume_from_checkpoint=false."
        )
    return 0


def prune_checkpoints(ckpt_dir, max_checkpoints: int | None, run_id: str | None = None) -> None:
    """Delete all but the newest `max_checkpoints` complete checkpoints of run `run_id` (None or 0: keep all)."""
    if not max_checkpoints:
        return
    for old in [p for p in complete_checkpoints(ckpt_dir, warn=False) if written_by(p, run_id)][:-max_checkpoints]:
        (old / MARKER).unlink()  # first make it incomplete, so a crash here never leaves a half-deleted "complete" one
        shutil.rmtree(old, ignore_errors=True)


def prepare_checkpoint_dir(checkpoint_cfg, bytes_needed: int, rank: int, device: torch.device) -> None:
    """Check `checkpoint.ckpt_dir` before anything is built; with `overwrite`, remove the old checkpoints.

    The folder must be a writable folder, hold nothing named like a checkpoint that is not one, have room for
    one checkpoint (`bytes_needed`), and, unless the run resumes, hold no complete checkpoint. Every rank
    checks; if one fails, all raise (so none waits for the others).
    """
    problem = _check_folder(checkpoint_cfg, bytes_needed, rank)
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
            (old / MARKER).unlink()
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
    strays = sorted(p.name for p in path.glob("step_*") if not _is_step_folder(p))
    if strays:
        return f"{name} holds {strays}, named like checkpoints but not checkpoint folders; move them away."
    free = shutil.disk_usage(path).free
    if free < bytes_needed:
        return (f"{name} has {free / 2**30:.1f} GiB free, and one checkpoint of this model needs about "
                f"{bytes_needed / 2**30:.1f} GiB; free space or choose another checkpoint.ckpt_dir.")  # fmt: skip
    complete = complete_checkpoints(path, warn=False)
    if complete and not checkpoint_cfg.resume_from_checkpoint and not checkpoint_cfg.overwrite:
        return (f"{name} already holds complete checkpoints ({[p.name for p in complete]}) and this run does not "
                "resume (checkpoint.resume_from_checkpoint=false). Use a new checkpoint.ckpt_dir, or "
                "checkpoint.overwrite=true to delete them first.")  # fmt: skip
    return None
