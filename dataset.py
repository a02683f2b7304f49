"""Upstream's import path for the data loaders; they live in `data/loader.py`.

from dataset import create_thd_dataloader
loader, tokenizer = create_thd_dataloader(DistributedConfig(), **cfg.dataset)
"""

from data.loader import create_bshd_dataloader, create_thd_dataloader, create_tokenized_dataset

__all__ = ["create_bshd_dataloader", "create_thd_dataloader", "create_tokenized_dataset"]
