"""Resume from a checkpoint written by NVIDIA's upstream `llama3_native_te` recipe.

Upstream keeps its checkpoints one level down, `<ckpt_dir>/train_fsdp2/step_N/` (DCP; one entry "app"
holding model, optim, scheduler, step, epoch) and `<ckpt_dir>/train_ddp/step_N/checkpoint.pt` (the
DDP wrapper's state dict, optimizer, scheduler, step, epoch). When `ckpt_dir` holds none of our own
complete checkpoints, the entrypoints resume from the newest upstream one:

    step = resume_from_latest(...) or resume_from_upstream(ckpt_dir, "train_fsdp2", model, optimizer, scheduler)

Upstream counts steps from 0, so its `step_N` holds N + 1 updates; the run continues at step N + 1 in
our numbering (which counts updates). Weights and AdamW moments are restored exactly; the learning rate
follows this run's schedule at that step (the same values for the same `lr_scheduler_kwargs`). What
cannot carry over is named in a warning: the data loader position (upstream's loader state belongs to
its own pipeline, so this loader starts its stream afresh) and TE's FP8 scaling history (rebuilt
within a few steps). Upstream writes no completion marker: an FSDP2 folder counts once DCP has written
its `.metadata` (the last file of a save), a DDP folder once `checkpoint.pt` loads.
"""

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from checkpointing.folders import CheckpointMismatchError, last_line
from checkpointing.format import split_extra_state

logger = logging.getLogger(__name__)
LAYOUTS = {"train_fsdp2": ".metadata", "train_ddp": "checkpoint.pt"}  # upstream subfolder -> file a save ends with
NOT_CARRIED = (
    "Not carried over from the upstream checkpoint: the data loader position (this loader starts its stream "
    "from the beginning) and TE's FP8 scaling history (rebuilt in the first steps)."
)


def find_upstream_checkpoint(ckpt_dir, layout: str) -> Path | None:
    """The newest finished upstream `step_N` folder under `<ckpt_dir>/<layout>`, or None."""
    root = Path(ckpt_dir) / layout
    if not root.is_dir():
        return None
    folders = [p for p in root.glob("step_*") if p.is_dir() and p.name.removeprefix("step_").isdigit()]
    for path in sorted(folders, key=lambda p: int(p.name.removeprefix("step_")), reverse=True):
        if (path / LAYOUTS[layout]).exists():
            return path
        logger.warning("Ignoring unfinished upstream checkpoint %s (no %s).", path, LAYOUTS[layout])
    return None


def resume_from_upstream(ckpt_dir, layout: str, model, optimizer, scheduler) -> int:
    """Load the newest upstream checkpoint under `<ckpt_dir>/<layout>`; returns the step to continue from (0: none)."""
    path = find_upstream_checkpoint(ckpt_dir, layout) if ckpt_dir else None
    if path is None:
        return 0
    load = _load_fsdp2 if layout == "train_fsdp2" else _load_ddp
    updates = load(path, model, optimizer) + 1  # upstream's step_N is the (N+1)-th update
    _set_schedule_step(scheduler, updates)
    logger.warning(
        "Resumed from the upstream checkpoint %s (%d updates done; training continues with step %d). %s",
        path,
        updates,
        updates + 1,
        NOT_CARRIED,
    )
    return updates


class _UpstreamAppState(Stateful):
    """Upstream's DCP entry "app": what is read from it (model, optim, step); its scheduler state is not read."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer, self.step = model, optimizer, 0

    def state_dict(self):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        weights, _ = split_extra_state(model_state)  # upstream's FP8 scaling state is not carried over
        return {"model": weights, "optim": optim_state, "step": self.step}

    def load_state_dict(self, state):
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
            options=StateDictOptions(strict=False),
        )  # strict=False: _extra_state
        self.step = state["step"]


def _load_fsdp2(path: Path, model, optimizer) -> int:
    app = _UpstreamAppState(model, optimizer)
    try:
        dcp.load({"app": app}, checkpoint_id=str(path))
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException; its last line names the key or shape
        cause = last_line(e)
        raise CheckpointMismatchError(
            f"The upstream checkpoint {path} does not fit this model ({cause}). Resume with the config_name_or_path "
            "and config_kwargs that wrote it, or move it out of checkpoint.ckpt_dir to start afresh."
        ) from e
    return int(app.step)


def _load_ddp(path: Path, model, optimizer) -> int:
    state = torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)
    module = model.module if hasattr(model, "module") else model
    # Upstream saved the DDP wrapper (and, with torch.compile, the compiled module): strip both prefixes.
    weights = {
        k.removeprefix("module.").removeprefix("_orig_mod."): v
        for k, v in state["model"].items()
        if not k.endswith("_extra_state") and not k.endswith("rotary_emb.inv_freq")  # computed here, not loaded
    }
    missing, unexpected = module.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"The upstream checkpoint {path} does not fit this model (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}). Resume with the config_name_or_path and config_kwargs that wrote it."
        )
    optimizer.load_state_dict(state["optimizer"])
    return int(state["step"])


def _set_schedule_step(scheduler, step: int) -> None:
    """Put a `LambdaLR` at `step` (as if it had been stepped `step` times) and set the optimizer's LR to match."""
    scheduler.last_epoch = step
    lrs = [base * factor(step) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
