"""What the training loop does with data: build the loader, stream its batches to the device, count targets.

    dataloader, tokenizer = create_dataloader(dist_config, cfg.dataset, options.batches)
    batches = iter_batches(dataloader, device, watch=perf.count_batch)   # device batches; `watch` sees each
    num_targets = count_label_tokens(next(batches))

`BatchOptions` is how micro-batches are laid out; it follows from keys of several groups
(`config.options.batch_options`), and validation lays out its windows the same way.
"""

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from data.collate import IGNORE_INDEX
from data.loader import create_bshd_dataloader, create_thd_dataloader
from data.streams import StreamLoader
from runtime.distributed import DistributedConfig


@dataclass(frozen=True)
class BatchOptions:
    """How windows become micro-batches, beyond the `dataset` group's own keys."""

    use_sequence_packing: bool = False  # THD packs of the token budget; else BSHD micro-batches of windows
    pack_rows: bool = False  # BSHD micro-batches with padding as one packed row (the TE model, no CP)
    pad_for_fp8: bool = False  # FP8 GEMMs need token counts that are multiples of 16
    holdout_fraction: float = 0.0  # records kept out of training for validation (`validation.fraction`)

    @property
    def token_multiple(self) -> int:
        """What a micro-batch's token count is padded to a multiple of (FP8: 16)."""
        return 16 if self.pad_for_fp8 else 1


def create_dataloader(
    dist_config: DistributedConfig, dataset, batches: BatchOptions, cp_size: int = 1, cp_rank: int | None = None
):
    """BSHD or THD loader and the tokenizer, from the `dataset` group laid out as `batches` says.

    With context parallelism every sequence is padded so that it splits into 2 x cp_size equal chunks (of
    multiples of 16 tokens per rank with FP8), and with `cp_rank` the loader yields that rank's shards.
    """
    kwargs = OmegaConf.to_container(dataset, resolve=True) if OmegaConf.is_config(dataset) else dict(dataset)
    kwargs.update(cp_rank=cp_rank, cp_size=cp_size, holdout_fraction=batches.holdout_fraction)
    if batches.pad_for_fp8:
        kwargs["pad_to_multiple_of"] = batches.token_multiple
    if not batches.use_sequence_packing and kwargs.get("pad_sequences_to_be_divisible_by"):
        # BSHD: each micro-batch's length is padded to a multiple instead (upstream's collator does so too)
        multiple = kwargs.pop("pad_sequences_to_be_divisible_by")
        kwargs["pad_to_multiple_of"] = math.lcm(multiple, kwargs.get("pad_to_multiple_of") or 1)
    if cp_size > 1:
        divisor = 2 * cp_size * (8 if batches.pad_for_fp8 else 1)
        if batches.use_sequence_packing:
            divisor = math.lcm(divisor, kwargs.get("pad_sequences_to_be_divisible_by") or 1)  # a user's value too
            kwargs.update(pad_sequences_to_be_divisible_by=divisor, pad_to_multiple_of=None)
        else:
            kwargs["pad_to_multiple_of"] = math.lcm(divisor, kwargs.get("pad_to_multiple_of") or 1)
    num_streams = kwargs.pop("data_streams", None) or dist_config.world_size

    def build_stream(stream: int, streams: int):
        """The loader rank `stream` of `streams` ranks would build: one data stream (data/streams.py)."""
        ranks = DistributedConfig(rank=stream, local_rank=dist_config.local_rank, world_size=streams)
        if batches.use_sequence_packing:
            return create_thd_dataloader(ranks, **kwargs)
        return create_bshd_dataloader(ranks, pack_rows=batches.pack_rows, **kwargs)

    if not kwargs.get("use_stateful_dataloader", True):  # no loader state to save: nothing to carry across resumes
        if num_streams != dist_config.world_size:
            raise ValueError(
                f"dataset.data_streams={num_streams} needs dataset.use_stateful_dataloader=true (stream positions are "
                "loader states)."
            )
        return build_stream(dist_config.rank, dist_config.world_size)
    built = {}

    def stream_loader(stream: int, streams: int):
        loader, built["tokenizer"] = build_stream(stream, streams)
        return loader

    return StreamLoader(stream_loader, num_streams, dist_config.rank, dist_config.world_size), built["tokenizer"]


def iter_batches(dataloader, device: torch.device, watch: Callable[[dict, float], None] | None = None) -> Iterator:
    """The loader's batches on `device`, once every rank has shown it has some.

    A rank without data would otherwise leave the others waiting in their next collective until a timeout.
    (The loader streams endlessly afterwards.) `watch(batch, seconds)` gets each batch while it is still on
    the CPU (counting its work costs no GPU sync) and the time the loop waited for it.
    """
    loader = iter(dataloader)
    first = next(loader, None)
    empty = torch.tensor(float(first is None), device=device)
    if dist.is_initialized():
        dist.all_reduce(empty)
    if empty.item():
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        raise ValueError(
            f"{int(empty.item())} of {world_size} rank(s) got no data: "
            + (
                "the data set's records hold no bases (empty sequences, a FASTA of headers only?); point it at "
                "records with sequences."
                if world_size == 1
                else "the data set has fewer records (or files/row "
                "groups) than ranks, or its records hold no bases. Use fewer ranks or more data."
            )
        )
    batch, waited = first, 0.0  # the first batch was fetched above, before the loop
    while batch is not None:
        if watch is not None:
            watch(batch, waited)
        yield to_device(batch, device)
        start = time.perf_counter()
        batch = next(loader, None)
        waited = time.perf_counter() - start


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
    """Count the prediction targets after the model's shift (labels[..., 1:] != -100): the loss's divisor.

    A context-parallel shard carries its targets already shifted (`shift_labels`). With loss weights
    (`dataset.lowercase_loss_weight`) each target counts at its weight, so the loss is the weighted mean.
    """
    if "shift_loss_weights" in batch:
        return batch["shift_loss_weights"].sum()
    if "loss_weights" in batch:
        return batch["loss_weights"][..., 1:].sum()
    if "shift_labels" in batch:
        return (batch["shift_labels"] != IGNORE_INDEX).sum()
    return (batch["labels"][..., 1:] != IGNORE_INDEX).sum()
