"""Upstream's import path for the data loaders; they live in `data/loader.py`.

from dataset import create_thd_dataloader
loader, tokenizer = create_thd_dataloader(DistributedConfig(), **cfg.dataset)
"""

import numpy as np

from data.loader import create_bshd_dataloader, create_thd_dataloader
from data.loader import create_tokenized_dataset as _windows

__all__ = ["create_bshd_dataloader", "create_thd_dataloader", "create_tokenized_dataset"]


def create_tokenized_dataset(*args, **kwargs):
    """Upstream's `create_tokenized_dataset`: rows whose `input_ids` are lists of ints, as upstream's yield.

    Same arguments as `data.loader.create_tokenized_dataset`. (The training loader keeps NumPy arrays: no
    conversion per window.)
    """
    return _windows(*args, **kwargs).map(lambda row: {"input_ids": np.asarray(row["input_ids"]).tolist()})
