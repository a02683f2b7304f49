"""What the training loop does with data.

Build the loader from the config, make sure every rank has batches, move them to the device, and count
their prediction targets.

    dataloader, tokenizer = create_dataloader(cfg, dist_config)
    batches = iter_batches(dataloader, device)
    batch = to_device(next(batches), device)
"""

import itertools
import math

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from data.collate import IGNORE_INDEX
from data.loader import create_bshd_dataloader, create_thd_dataloader
from runtime.distributed import DistributedConfig


def create_dataloader(cfg: DictConfig, dist_config: DistributedConfig, cp_size: int = 1, cp_rank: int | None = None,
                      pack_rows: bool = False):  # fmt: skip
    """BSHD or THD (`use_sequence_packing`) loader and the tokenizer, from the `dataset` group.

    `pack_rows` (`model_setup.packs_bshd_batches`): BSHD micro-batches come as packed rows of their windows.

    FP8 pads token counts to multiples of 16. With context parallelism every sequence is padded so that it
    splits into 2 x cp_size equal chunks (of multiples of 16 tokens per rank with FP8), and with `cp_rank`
    the loader yields that rank's shards.
    """
    kwargs = OmegaConf.to_container(cfg.dataset, resolve=True)
    kwargs.update(cp_rank=cp_rank, cp_size=cp_size)
    if cfg.validation.enabled and cfg.validation.load_dataset_kwargs is None:
        kwargs["holdout_fraction"] = cfg.validation.fraction  # the validation records never reach training
    if cfg.fp8_config.enabled:
        kwargs["pad_to_multiple_of"] = 16
    if cp_size > 1:
        divisor = 2 * cp_size * (8 if cfg.fp8_config.enabled else 1)
        if cfg.use_sequence_packing:
            divisor = math.lcm(divisor, cfg.dataset.pad_sequences_to_be_divisible_by or 1)  # a user's value too
            kwargs.update(pad_sequences_to_be_divisible_by=divisor, pad_to_multiple_of=None)
        else:
            kwargs["pad_to_multiple_of"] = divisor
    make = create_thd_dataloader if cfg.use_sequence_packing else create_bshd_dataloader
    if not cfg.use_sequence_packing:
        kwargs["pack_rows"] = pack_rows
    return make(dist_config, **kwargs)


def iter_batches(dataloader, device: torch.device):
    """The loader's batches, once every rank has shown it has some.

    A rank without data would otherwise leave the others waiting in their next collective until a timeout.
    (The loader streams endlessly afterwards.)
    """
    batches = iter(dataloader)
    first = next(batches, None)
    empty = torch.tensor(float(first is None), device=device)
    if dist.is_initialized():
        dist.all_reduce(empty)
    if empty.item():
        raise ValueError(
            f"{int(empty.item())} of {dist.get_world_size() if dist.is_initialized() else 1} rank(s) got no data: "
            "the data set has fewer records (or files/row groups) than ranks. Use fewer ranks or more data."
        )
    return itertools.chain([first], batches)


def to_device(batch: dict, device: torch.device) -> dict:
    """Copy a batch to the device.

    An all-ones attention mask is dropped here, on the CPU, so that the model takes the faster unpadded
    ("causal") path without a GPU sync.
    """
    mask = batch.get("attention_mask")
    if mask is not None and bool(mask.all()):
        batch = {k: v for k, v in batch.items() if k != "attention_mask"}
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def count_label_tokens(batch: dict) -> torch.Tensor:
    """Count the prediction targets after the model's shift (labels[..., 1:] != -100).

    A context-parallel shard carries its targets already shifted (`shift_labels`).
    """
    if "shift_labels" in batch:
        return (batch["shift_labels"] != IGNORE_INDEX).sum()
    return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
