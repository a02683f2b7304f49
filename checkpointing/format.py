"""What one `step_N/` checkpoint holds: the only module that names its files.

    save_ddp(path, step, model=..., optimizer=..., scheduler=..., dataloader=..., rank=rank)
    step = load_fsdp2(path, model=..., optimizer=..., scheduler=..., dataloader=..., rank=rank)
    weights = read_model_weights(path, template)             # for inference: no process group needed

A checkpoint holds the model, optimizer, scheduler, step, RNG states, TE's FP8 scaling state
(`_extra_state`) and every rank's dataloader state (`rank_R.pt`, one per rank). DDP writes the model and
optimizer whole from rank 0 (`model_optimizer.pt`); FSDP2 writes them sharded with
`torch.distributed.checkpoint` (`dcp/`, optionally in the background: `save_fsdp2` then returns the write's
future). The `COMPLETE` marker, written last with `run_info.yaml` once every rank has finished
(`mark_complete`), is what makes a folder a checkpoint (`checkpointing/folders.py` reads it).
"""

import logging
import os
import random
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from checkpointing.run_record import write_run_info
from data.streams import merge_stream_states

logger = logging.getLogger(__name__)
MARKER = "COMPLETE"  # written last: a folder without it is a save that did not finish
MODEL_OPTIMIZER_FILE = "model_optimizer.pt"  # DDP: model and optimizer, whole
DCP_FOLDER = "dcp"  # FSDP2: model and optimizer, sharded


def rank_file(rank: int) -> str:
    """The file of one rank's own state: step, scheduler, RNG, FP8 scaling state, data loader position."""
    return f"rank_{rank}.pt"


def is_complete(path: Path) -> bool:
    """Whether `path` is a checkpoint whose save finished (its marker exists)."""
    return (Path(path) / MARKER).exists()


def mark_complete(path: Path, run_info: dict | None) -> None:
    """Make `path` a checkpoint: its run record, then the marker (call on one rank, after every rank wrote)."""
    if run_info is not None:
        write_run_info(path, run_info)
    (Path(path) / MARKER).write_text("ok\n")


def unmark(path: Path) -> None:
    """Make a complete checkpoint incomplete before deleting it, so a crash mid-delete never leaves half a one."""
    (Path(path) / MARKER).unlink()


def split_extra_state(model_state: dict) -> tuple[dict, dict]:
    """(weights, TE's `_extra_state` entries: FP8 scaling state) of a model state dict."""
    extra = {k: v for k, v in model_state.items() if k.endswith("_extra_state")}
    return {k: v for k, v in model_state.items() if k not in extra}, extra


def _rank_state(step: int, scheduler, dataloader, extra_model_state: dict) -> dict:
    state = {
        "step": step,
        "scheduler": scheduler.state_dict(),
        "rng": {
            "python": random.getstate(),
            "numpy": np.random.get_state(),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        },
        "model_extra_state": extra_model_state,  # TE FP8 scaling state: per rank, outside DCP's dedup
    }
    if hasattr(dataloader, "state_dict"):
        state["dataloader"] = dataloader.state_dict()
    return state


def _restore_rank_state(path: Path, rank: int, scheduler, dataloader) -> dict:
    """Restore this rank's scheduler, RNG and dataloader state.

    A checkpoint from a different number of ranks resumes too: the model and optimizer are whole or resharded
    by DCP, and the data streams (`data/streams.py`) are handed out to this run's ranks, each continuing
    where it stood; RNG states are not restored (they were per rank).
    """
    saved_ranks = len(list(path.glob(rank_file("*"))))
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if saved_ranks != world_size:
        # Every rank file, for its streams' positions; mmap: their tensors (FP8 scaling state) are not read.
        states = [torch.load(path / rank_file(r), weights_only=False, mmap=True) for r in range(saved_ranks)]
        scheduler.load_state_dict(states[0]["scheduler"])
        if hasattr(dataloader, "resume_streams") and all("dataloader" in s for s in states):
            merged = merge_stream_states([s["dataloader"] for s in states])
            dataloader.resume_streams(merged["streams"], merged["num_streams"])
            if rank == 0:
                streams = merged["num_streams"]
                logger.info(
                    "%s was saved by %d ranks and this run has %d: model, optimizer, scheduler and step are restored, "
                    "and its %d data streams continue where they stood (%d to %d per rank); RNG states are fresh.",
                    path,
                    saved_ranks,
                    world_size,
                    streams,
                    streams // world_size,
                    -(-streams // world_size),
                )
        elif rank == 0:
            logger.warning(
                "%s was saved by %d ranks and this run has %d: model, optimizer, scheduler and step are restored, "
                "but the data loader starts its stream from the beginning (no loader state was saved) and RNG "
                "states are fresh.",
                path,
                saved_ranks,
                world_size,
            )
        return states[0]
    state = torch.load(path / rank_file(rank), weights_only=False)  # our own file: holds numpy RNG state
    scheduler.load_state_dict(state["scheduler"])
    if "dataloader" in state and hasattr(dataloader, "load_state_dict"):
        dataloader.load_state_dict(state["dataloader"])
    rng = state["rng"]
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


@contextmanager
def _trusted_te_extra_state():
    """Let TE unpickle FP8 state (DelayedScaling's amax history) from our own checkpoints.

    TE refuses unless told the source is trusted. These are the run's own checkpoint files, so opt in while
    loading them, and only then.
    """
    key = "NVTE_ALLOW_UNSAFE_PICKLE_EXTRA_STATE"
    previous = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = previous


# --- DDP: the model and optimizer whole, from rank 0 ---


def save_ddp(path: Path, step: int, *, model, optimizer, scheduler, dataloader, rank: int) -> None:
    """Write rank 0's `model_optimizer.pt` and this rank's `rank_R.pt` into `path`."""
    module = model.module if hasattr(model, "module") else model
    weights, extra = split_extra_state(module.state_dict())
    if rank == 0:
        torch.save({"model": weights, "optimizer": optimizer.state_dict()}, path / MODEL_OPTIMIZER_FILE)
    torch.save(_rank_state(step, scheduler, dataloader, extra), path / rank_file(rank))


def load_ddp(path: Path, *, model, optimizer, scheduler, dataloader, rank: int) -> int:
    """Restore a `save_ddp` folder into the (DDP-wrapped or bare) model; returns its step."""
    module = model.module if hasattr(model, "module") else model
    state = torch.load(path / MODEL_OPTIMIZER_FILE, map_location="cpu", weights_only=False)
    rank_state = _restore_rank_state(path, rank, scheduler, dataloader)
    with _trusted_te_extra_state():
        module.load_state_dict({**state["model"], **rank_state["model_extra_state"]})
    optimizer.load_state_dict(state["optimizer"])
    return rank_state["step"]


# --- FSDP2: the model and optimizer sharded with DCP ---


def save_fsdp2(path: Path, step: int, *, model, optimizer, scheduler, dataloader, rank: int, async_save: bool):
    """Write `dcp/` and this rank's `rank_R.pt`; with `async_save`, returns the future of DCP's background write."""
    model_state, optim_state = get_state_dict(model, optimizer)
    weights, extra = split_extra_state(model_state)
    torch.save(_rank_state(step, scheduler, dataloader, extra), path / rank_file(rank))
    state = {"model": weights, "optimizer": optim_state}
    if async_save:
        return dcp.async_save(state, checkpoint_id=str(path / DCP_FOLDER), process_group=_async_save_group())
    dcp.save(state, checkpoint_id=str(path / DCP_FOLDER))
    return None


_ASYNC_GROUPS = {}  # the default group -> a gloo group of the same ranks for background saves


def _async_save_group():
    """A gloo group of its own for DCP's background write (made on every rank at the first async save).

    The write's collectives run in a thread; on the default group they could interleave with the training
    loop's (on CPU ranks both are gloo: a deadlock). None without a process group.
    """
    if not dist.is_initialized():
        return None
    default = dist.group.WORLD
    if default not in _ASYNC_GROUPS:
        _ASYNC_GROUPS[default] = dist.new_group(backend="gloo")
    return _ASYNC_GROUPS[default]


def load_fsdp2(path: Path, *, model, optimizer, scheduler, dataloader, rank: int) -> int:
    """Restore a `save_fsdp2` folder (DCP reshards to this world size); returns its step."""
    model_state, optim_state = get_state_dict(model, optimizer)
    weights, _ = split_extra_state(model_state)
    state = {"model": weights, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / DCP_FOLDER))
    set_state_dict(
        model,
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),
    )
    rank_state = _restore_rank_state(path, rank, scheduler, dataloader)
    if rank_state["model_extra_state"]:
        with _trusted_te_extra_state():
            model.load_state_dict(rank_state["model_extra_state"], strict=False)
    return rank_state["step"]


# --- Reading the weights back without a training setup (inference) ---


def read_model_weights(path: Path, template: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint of either strategy, with `template`'s names and shapes (DCP shards).

    No process group is needed: DCP reads the shards of any world size into the template's full tensors.
    """
    path = Path(path)
    if (path / MODEL_OPTIMIZER_FILE).exists():  # DDP: one file
        return torch.load(path / MODEL_OPTIMIZER_FILE, map_location="cpu", weights_only=False)["model"]
    state = {"model": template}
    with warnings.catch_warnings():  # DCP's "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp.load(state, checkpoint_id=str(path / DCP_FOLDER))
    return state["model"]
