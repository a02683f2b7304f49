"""Shared fixtures, helpers and the GPU markers.

`gpu` tests need a CUDA GPU with TransformerEngine, `multi_gpu` tests two of them; both are skipped
cleanly elsewhere (CI runs on CPUs). Helpers: `make_cfg` composes a tier config as Hydra would,
`losses` reads a run's per-step losses, `run_command` runs a training command in a subprocess.
"""

import gc
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


def _has_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without a GPU and TE, `multi_gpu` tests with fewer than two GPUs."""
    has_te = _has_te()
    n_gpus = torch.cuda.device_count() if has_te else 0
    for item in items:
        if "gpu" in item.keywords and not has_te:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU with TransformerEngine"))
        if "multi_gpu" in item.keywords and n_gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs with TransformerEngine"))


@pytest.fixture(autouse=True)
def automatic_gc_after_each_test():
    """A training run in this process that stopped with an error left its loop's GC schedule (`python_gc`) on."""
    yield
    gc.unfreeze()
    gc.enable()


@pytest.fixture
def tokenizer():
    """The bundled nucleotide tokenizer."""
    from data.sources import load_tokenizer

    return load_tokenizer(TOKENIZER)


def make_cfg(run_dir, *overrides, name: str = "L0_sanity", base=FAST):
    """The tier config `name` with `base` and `overrides` applied, writing into `run_dir`."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.2"):
        return compose(config_name=name, overrides=[*base, f"run_dir={run_dir}", *overrides])


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
