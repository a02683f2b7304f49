"""Shared fixtures and the GPU markers: `gpu` tests need a CUDA GPU with TransformerEngine,
`multi_gpu` tests two of them; both are skipped cleanly elsewhere (CI runs on CPUs)."""

import sys
from pathlib import Path

import pytest
import torch

RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE_DIR))

TOKENIZER = str(RECIPE_DIR / "tokenizers" / "nucleotide_fast_tokenizer")
PARQUET = str(RECIPE_DIR / "test_genomic_sequences.parquet")


def _has_te() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    has_te = _has_te()
    n_gpus = torch.cuda.device_count() if has_te else 0
    for item in items:
        if "gpu" in item.keywords and not has_te:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU with TransformerEngine"))
        if "multi_gpu" in item.keywords and n_gpus < 2:
            item.add_marker(pytest.mark.skip(reason="needs two CUDA GPUs with TransformerEngine"))


@pytest.fixture
def tokenizer():
    from dataset import load_tokenizer

    return load_tokenizer(TOKENIZER)


def poison_embedding_gradients(model, poisoned_steps: set):
    """NaN gradients from the embedding output down, in the forward calls numbered in `poisoned_steps` (from 1;
    one per step without accumulation). A hook on the module, not the weight: a meta-built model's weights are
    replaced when it is materialised."""
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1
        if calls[0] in poisoned_steps:
            output.register_hook(lambda grad: torch.full_like(grad, float("nan")))

    model.get_input_embeddings().register_forward_hook(hook)
