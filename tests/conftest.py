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
