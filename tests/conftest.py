"""Shared fixtures, helpers and the GPU markers.

`gpu` tests need a CUDA GPU with TransformerEngine, `multi_gpu` tests two of them; both are skipped
cleanly elsewhere (CI runs on CPUs). Helpers: `make_cfg` composes a tier config as Hydra would,
`build_model`/`build_loader`/`build_optimizer` build from it as the entrypoints do, `losses` reads a run's
per-step losses, `run_command` runs a training command in a subprocess.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE_DIR))

from config.options import batch_options, model_options, no_decay_on  # noqa: E402
from data.batches import create_dataloader  # noqa: E402
from model.build import build_model_config, create_model, te_available  # noqa: E402
from runtime.distributed import DistributedConfig  # noqa: E402
from training.optimizer import create_optimizer  # noqa: E402
from training.validation_loss import Validator  # noqa: E402

CONFIG_DIR = str(RECIPE_DIR / "hydra_config")
TOKENIZER = str(RECIPE_DIR / "tokenizers" / "nucleotide_fast_tokenizer")
PARQUET = str(RECIPE_DIR / "test_genomic_sequences.parquet")
# L0_sanity made fast for a CPU: short windows, the HF reference model, a log line every step.
FAST = ["dataset.max_seq_length=256", "dataset.stride=16", "dataset.num_workers=0", "use_te=false",
        "logger.frequency=1"]  # fmt: skip
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# A subprocess's environment: no leftover rendezvous variables, one thread per process (2-core machines).
ENV = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")}
ENV.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without a GPU and TE, `multi_gpu` tests with fewer than two GPUs."""
    has_te = te_available()
    n_gpus = torch.cuda.device_count() if has_te else 0
    for item in items:
        if "gpu" in item.keywords and not has_te:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU with TransformerEngine"))
        if "multi_gpu" in item.keywords and n_gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs with TransformerEngine"))


@pytest.fixture
def tokenizer():
    """The bundled nucleotide tokenizer."""
    from data.sources import load_tokenizer

    return load_tokenizer(TOKENIZER)


def make_cfg(run_dir, *overrides, name: str = "L0_sanity", base=FAST):
    """The tier config `name` with `base` and `overrides` applied, writing into `run_dir`."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.2"):
        return compose(config_name=name, overrides=[*base, f"run_dir={run_dir}", *overrides])


def build_model(cfg, use_te: bool = False, device="cpu", on_meta: bool = False):
    """The model `cfg` describes, as the entrypoints build it (before wrapping), on `device` or on meta."""
    options = dataclasses.replace(model_options(cfg, use_te), use_meta_device=on_meta)
    return create_model(options, torch.device(device))


def build_model_config_of(cfg, use_te: bool = False):
    """The model config (HF `LlamaConfig`, or `NVLlamaConfig` for TE) that `cfg` describes."""
    return build_model_config(model_options(cfg, use_te))


def build_loader(cfg, ranks=None, use_te: bool = False, cp_size: int = 1, cp_rank=None):
    """`(loader, tokenizer)` as the entrypoints build them from `cfg` (one rank unless `ranks` says otherwise)."""
    ranks = ranks or DistributedConfig(0, 0, 1)
    return create_dataloader(ranks, cfg.dataset, batch_options(cfg, use_te), cp_size, cp_rank)


def build_optimizer(cfg, model, device="cpu"):
    """AdamW as the entrypoints build it from `cfg`."""
    return create_optimizer(model, cfg.adamw_kwargs, torch.device(device), no_decay_on(cfg))


def build_validator(cfg, tokenizer, device="cpu", use_te: bool = False, **layout):
    """One process's `Validator` for `cfg`, its batches laid out as training's (`layout` overrides, e.g. pack_rows)."""
    batches = dataclasses.replace(batch_options(cfg, use_te), **layout)
    ranks = DistributedConfig(0, 0, 1)
    return Validator(cfg.validation, cfg.dataset, batches, tokenizer, ranks, torch.device(device), last_step=0)


def losses(run_dir) -> dict[int, float]:
    """Step -> logged loss, from the run's metrics.jsonl."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}


def train_straight_and_resumed(main, make, tmp_path, common: list[str], stop_at: int, *resume_overrides):
    """`main` run straight through, and once stopped at `stop_at` and resumed; returns their step -> loss.

    Checks that the second half continued from the checkpoint: a run that silently started afresh would give
    the same losses (same seed, same data) but log its first steps twice.
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    main(make(straight, *common, f"checkpoint.ckpt_dir={straight / 'ckpt'}"))
    ckpt = f"checkpoint.ckpt_dir={resumed / 'ckpt'}"
    main(make(resumed, *common, ckpt, f"num_train_steps={stop_at}"))
    main(make(resumed, *common, ckpt, *resume_overrides))
    lines = (resumed / "metrics.jsonl").read_text().splitlines()
    steps = [m["step"] for m in map(json.loads, lines) if "loss" in m]
    assert steps == sorted(set(steps)), f"the resumed run logged steps {steps}: it did not continue"
    return losses(straight), losses(resumed)


def run_command(cmd: list[str], check: bool = True, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Run `cmd` in the recipe folder; with `check`, fail the test with the output's tail if it fails."""
    result = subprocess.run(cmd, cwd=RECIPE_DIR, env={**ENV, **(env or {})}, capture_output=True, text=True,
                            timeout=timeout)  # fmt: skip
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def poison_embedding_gradients(model, poisoned_steps: set):
    """Make gradients NaN from the embedding output down, in the forward calls numbered in `poisoned_steps`.

    Calls count from 1 (one per step without accumulation). A hook on the module, not the weight: a
    meta-built model's weights are replaced when it is materialised.
    """
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] in poisoned_steps:
            output.register_hook(lambda grad: torch.full_like(grad, float("nan")))

    model.get_input_embeddings().register_forward_hook(hook)
