"""The run record: what made a run, written next to its results (the one module that knows `run_info.yaml`).

The run folder, every `step_N/` and every export get a `run_info.yaml`: the resolved config, the git
revision, the world size, library versions, the device, the model's shape and the run's id.

    info = describe_run(cfg, world_size, use_te, device, model.config)
    write_run_files(run_dir_for(cfg.run_dir), info)          # config.yaml and run_info.yaml (one rank)
    read_run_info(ckpt_dir / "step_500")                     # as a dict, or None
"""

import platform
import subprocess
import uuid
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from runtime.paths import RECIPE_DIR

RUN_INFO_FILE = "run_info.yaml"
# What a checkpoint's weights and optimizer state are shaped by; resume refuses a checkpoint that differs in any.
MODEL_SHAPE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


def run_dir_for(run_dir: str | None) -> Path:
    """`run_dir`, else Hydra's output folder (`outputs/<date>/<time>`), else `outputs/run`; created."""
    if run_dir:
        path = Path(run_dir)
    else:
        try:
            from hydra.core.hydra_config import HydraConfig

            path = Path(HydraConfig.get().runtime.output_dir)
        except ValueError:  # main(cfg) called without Hydra
            path = Path("outputs") / "run"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=RECIPE_DIR, capture_output=True, text=True, timeout=10)


def git_revision() -> str:
    """The recipe folder's commit (with "-dirty" if tracked files differ from it), or "unknown" outside git."""
    try:
        head = _git("rev-parse", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = _git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def new_run_id() -> str:
    """A fresh id, the same on every rank (rank 0 draws it)."""
    run_id = [uuid.uuid4().hex[:12]]
    if dist.is_initialized():
        dist.broadcast_object_list(run_id, src=0)
    return run_id[0]


def model_shape(model_config) -> dict:
    """The model class and the config values its weights are shaped by."""
    shape = {k: getattr(model_config, k, None) for k in MODEL_SHAPE_KEYS}
    shape["model_type"] = model_config.model_type  # "nvllama" (TE) or "llama" (HF): different weight names
    return shape


def describe_run(cfg: DictConfig, world_size: int, use_te: bool, device: torch.device, model_config=None) -> dict:
    """The resolved config and what ran it, as a plain dict (computed once, on every rank, a collective).

    `run_id` names this run in its checkpoints; a resumed run takes over the id of the checkpoint it loads.
    """
    import datasets
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
    }
    if use_te:
        import transformer_engine

        versions["transformer_engine"] = transformer_engine.__version__
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    return {
        "run_id": new_run_id(),
        "model_shape": model_shape(model_config) if model_config is not None else None,
        "git_revision": git_revision(),
        "world_size": world_size,
        "model": "TE" if use_te else "HF reference",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": versions,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }


def write_run_info(folder: Path, info: dict) -> None:
    """Write `run_info.yaml` into `folder` (call on one rank)."""
    (Path(folder) / RUN_INFO_FILE).write_text(OmegaConf.to_yaml(OmegaConf.create(info)))


def write_run_files(run_dir: Path, info: dict) -> None:
    """The run folder's `config.yaml` (the resolved config) and `run_info.yaml` (call on one rank)."""
    (Path(run_dir) / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(info["config"])))
    write_run_info(run_dir, info)


def read_run_info(path: Path) -> dict | None:
    """The `run_info.yaml` of a run folder, checkpoint or export as a dict (None where there is none)."""
    file = Path(path) / RUN_INFO_FILE
    return OmegaConf.to_container(OmegaConf.load(file)) if file.exists() else None
