"""Checkpoints under `checkpoint.ckpt_dir`: one `step_N/` folder per save, and the final export.

A checkpoint holds the model, optimizer, scheduler, step, RNG states, TE's FP8 scaling state
(`_extra_state`) and every rank's dataloader state (`rank_R.pt`, one per rank). DDP writes the
model and optimizer with `torch.save` on rank 0; FSDP2 writes them sharded with
`torch.distributed.checkpoint` (optionally asynchronously, one save in flight).

A `COMPLETE` marker is written last, after every rank has finished, with `run_info.yaml` (the run and
the model shape); which folders count, resume, pruning and the folder checks are `checkpoint_folders.py`.
Older complete checkpoints of the same run are pruned to `max_checkpoints` only after a newer one is
complete.
"""

import logging
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from checkpointing.folders import MARKER, prune_checkpoints, read_run_info
from checkpointing.run_record import write_run_info
from runtime.distributed import barrier

logger = logging.getLogger(__name__)
_pending_async_save = None  # (future, folder) of the FSDP2 save in flight


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

    A checkpoint from a different number of ranks resumes too (the model and optimizer are whole or
    resharded by DCP), but the data streams cannot be resharded: the loader then starts its stream anew,
    and RNG states are not restored.
    """
    saved_ranks = len(list(path.glob("rank_*.pt")))
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if saved_ranks != world_size:
        if rank == 0:
            logger.warning(
                "%s was saved by %d ranks and this run has %d: model, optimizer, scheduler and step are restored, "
                "but the data loader starts its stream from the beginning and RNG states are fresh. Resume with "
                "%d ranks to continue the exact data order.", path, saved_ranks, world_size, saved_ranks,
            )  # fmt: skip
        state = torch.load(path / "rank_0.pt", weights_only=False)
        scheduler.load_state_dict(state["scheduler"])
        return state
    state = torch.load(path / f"rank_{rank}.pt", weights_only=False)  # our own file: holds numpy RNG state
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


def split_extra_state(model_state: dict) -> tuple[dict, dict]:
    """(weights, TE's `_extra_state` entries: FP8 scaling state) of a model state dict."""
    extra = {k: v for k, v in model_state.items() if k.endswith("_extra_state")}
    return {k: v for k, v in model_state.items() if k not in extra}, extra


def _finish(path: Path, rank: int, ckpt_dir, max_checkpoints, run_info: dict | None) -> None:
    barrier()  # every rank has written its part
    if os.environ.get("RECIPE_FAULT_KILL_BEFORE_MARKER") == path.name:  # fault-injection tests only
        os.kill(os.getpid(), 9)
    if rank == 0:
        if run_info is not None:
            write_run_info(path, run_info)
        (path / MARKER).write_text("ok\n")
        prune_checkpoints(ckpt_dir, max_checkpoints, (run_info or {}).get("run_id"))
        logger.info("Saved checkpoint %s", path)
    barrier()


def _prepare_folder(ckpt_dir, step: int, rank: int, run_info: dict | None) -> Path:
    path = Path(ckpt_dir) / f"step_{step}"
    saved = read_run_info(path) if (path / MARKER).exists() else None
    if saved and run_info and saved.get("run_id") != run_info.get("run_id"):
        raise RuntimeError(f"{path} is a complete checkpoint of another run; it is never overwritten.")
    if rank == 0 and path.exists():
        shutil.rmtree(path)  # a leftover of a crashed save, or a damaged checkpoint of this run resume fell back from
    barrier()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- DDP ---


def save_checkpoint_ddp(ckpt_dir, step, model, optimizer, scheduler, dataloader, rank: int, max_checkpoints=None,
                        run_info: dict | None = None):  # fmt: skip
    """Write `step_N/`: model and optimizer whole from rank 0, each rank's own state, then the marker."""
    path = _prepare_folder(ckpt_dir, step, rank, run_info)
    module = model.module if hasattr(model, "module") else model
    weights, extra = split_extra_state(module.state_dict())
    if rank == 0:
        torch.save({"model": weights, "optimizer": optimizer.state_dict()}, path / "model_optimizer.pt")
    torch.save(_rank_state(step, scheduler, dataloader, extra), path / f"rank_{rank}.pt")
    _finish(path, rank, ckpt_dir, max_checkpoints, run_info)


def load_checkpoint_ddp(path: Path, model, optimizer, scheduler, dataloader, rank: int) -> int:
    """Restore a `save_checkpoint_ddp` folder into the (DDP-wrapped or bare) model; returns its step."""
    module = model.module if hasattr(model, "module") else model
    state = torch.load(path / "model_optimizer.pt", map_location="cpu", weights_only=False)
    rank_state = _restore_rank_state(path, rank, scheduler, dataloader)
    with _trusted_te_extra_state():
        module.load_state_dict({**state["model"], **rank_state["model_extra_state"]})
    optimizer.load_state_dict(state["optimizer"])
    return rank_state["step"]


# --- FSDP2 ---


def save_checkpoint_fsdp2(ckpt_dir, step, model, optimizer, scheduler, dataloader, rank: int, max_checkpoints=None,
                          async_save: bool = False, run_info: dict | None = None):  # fmt: skip
    """Write `step_N/`: sharded model and optimizer with DCP, each rank's own state, then the marker.

    With `async_save` the DCP write runs in the background; the next save or `wait_for_async_save` finishes
    it and only then writes the marker.
    """
    wait_for_async_save(ckpt_dir, max_checkpoints, rank)
    path = _prepare_folder(ckpt_dir, step, rank, run_info)
    model_state, optim_state = get_state_dict(model, optimizer)
    weights, extra = split_extra_state(model_state)
    torch.save(_rank_state(step, scheduler, dataloader, extra), path / f"rank_{rank}.pt")
    state = {"model": weights, "optimizer": optim_state}
    if async_save:
        global _pending_async_save
        _pending_async_save = (dcp.async_save(state, checkpoint_id=str(path / "dcp")), path, run_info)
        return
    dcp.save(state, checkpoint_id=str(path / "dcp"))
    _finish(path, rank, ckpt_dir, max_checkpoints, run_info)


def wait_for_async_save(ckpt_dir, max_checkpoints, rank: int) -> None:
    """Finish the save in flight (its marker is written only now); call before the next save and at exit."""
    global _pending_async_save
    if _pending_async_save is None:
        return
    future, path, run_info = _pending_async_save
    _pending_async_save = None
    future.result()
    _finish(path, rank, ckpt_dir, max_checkpoints, run_info)


def load_checkpoint_fsdp2(path: Path, model, optimizer, scheduler, dataloader, rank: int) -> int:
    """Restore a `save_checkpoint_fsdp2` folder (DCP reshards to this world size); returns its step."""
    model_state, optim_state = get_state_dict(model, optimizer)
    weights, _ = split_extra_state(model_state)
    state = {"model": weights, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
        options=StateDictOptions(strict=False),
    )  # fmt: skip
    rank_state = _restore_rank_state(path, rank, scheduler, dataloader)
    if rank_state["model_extra_state"]:
        with _trusted_te_extra_state():
            model.load_state_dict(rank_state["model_extra_state"], strict=False)
    return rank_state["step"]


# --- Final export ---


def save_final_model(ckpt_dir, model, tokenizer, rank: int, use_te: bool, fsdp2: bool,
                     run_info: dict | None = None, name: str = "final_model") -> Path:  # fmt: skip
    """Write `<ckpt_dir>/<name>`, a Hugging Face directory (`AutoModelForCausalLM` loads it).

    Written next to it first and swapped in at the end, so an earlier export is never left half-replaced.
    """
    from checkpointing.export import export_te_model

    final = Path(ckpt_dir) / name
    path = final.with_name(f"{name}.partial")
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
    module = model.module if hasattr(model, "module") else model
    if fsdp2:  # a collective: every rank takes part, rank 0 receives the full tensors
        # FP8 weights (use_quantized_model_init) cannot be offloaded as they are (TE's tensor refuses
        # `copy_(..., non_blocking=True)`): gathered on the GPU, then dequantized and moved by the export.
        offload = not getattr(module.config, "use_quantized_model_init", False)
        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=offload))
    else:
        state = module.state_dict()
    if rank == 0:
        if use_te:
            export_te_model(path, state, module.config, tokenizer)
        else:
            module.config.use_cache = True  # off for training only (see model_setup.build_model_config)
            module.save_pretrained(path, state_dict=state)
            module.config.use_cache = False
            tokenizer.save_pretrained(path)
        if run_info is not None:
            write_run_info(path, run_info)
        old = final.with_name(f"{name}.old")
        if final.exists():
            final.rename(old)
        path.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        logger.info("Exported the model to %s", final)
    barrier()
    return final
