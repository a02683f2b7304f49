"""Data: parquet or HF data sets -> this rank's share -> windows -> shuffle -> BSHD or THD micro-batches.

    loader, tokenizer = create_thd_dataloader(DistributedConfig(), **cfg.dataset)

Pipeline (the same for streaming and map-style data):
1. `load_dataset(**load_dataset_kwargs)`; a local `path` to a parquet file or folder is read as parquet.
2. Shard by rank: whole files (or parquet row groups) when they divide evenly, otherwise every
   `world_size`-th record. DataLoader workers then split their rank's shards.
3. Tokenize each record into windows of `max_seq_length` tokens (specials included) that overlap
   by `stride` tokens, the semantics of HF `return_overflowing_tokens=True, stride=...`
   (`windows.WindowTokenizer`).
4. `WindowStream`: a seeded block shuffle (`buffer_size` windows at a time) over endless epochs,
   calling `set_epoch` on each pass; its state is a few integers plus the source's position, so a
   restored loader yields exactly the batches an uninterrupted one would have (same `num_workers`).
5. BSHD batches of `micro_batch_size` windows, or THD micro-batches packed to exactly
   `token_micro_batch_size` tokens (`packing.TokenPackingDataset`; with `packing_lookahead`, packs of
   even attention work, `packing.BalancedPackingDataset`), collated by `collate.make_collator`.

Characters outside ACGT (the policy). With the nucleotide tokenizer every character 4..255 is its
own token (its `ord()`), so N, IUPAC codes (R, Y, K, M, ...) and lowercase soft-masked bases are
kept in the input as they are; control characters 0..3 and characters above 255 become <UNK>.
Whether they are also training targets is the collator's label policy (`collate.LabelPolicy`):
`uppercase_labels` predicts a lowercase base as its uppercase base, `mask_degenerate_bases` drops every
non-ACGT target but <EOS>, `mask_eos_label` drops <EOS> too.
Leading and trailing whitespace is stripped; records that are empty after that are skipped and
counted in the log.
"""

import functools
import itertools
import logging
import warnings

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import PreTrainedTokenizerBase

from data.collate import ContextParallelCollator, LabelPolicy, make_collator
from data.dna import reverse_complement_ids
from data.holdout import held_out_filter
from data.packing import BalancedPackingDataset, TokenPackingDataset
from data.sources import describe_decode_error, load_raw_dataset, load_tokenizer
from data.windows import WindowTokenizer, is_byte_tokenizer
from runtime.distributed import DistributedConfig
from runtime.preemption import loader_worker_init

logger = logging.getLogger(__name__)
# torchdata 0.11's StatefulDataLoader calls torch.set_vital, which newer torch deprecates: a warning per
# loader that tells users nothing.
warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)


def create_tokenized_dataset(
    distributed_config: DistributedConfig,
    tokenizer: PreTrainedTokenizerBase,
    load_dataset_kwargs: dict,
    max_seq_length: int,
    stride: int,
    text_column: str = "sequence",
    num_workers: int = 0,
    holdout_fraction: float = 0.0,
    holdout_side: str = "train",
    bos_eos_only_at_record_ends: bool = False,
) -> datasets.IterableDataset:
    """This rank's share of the data as an HF `IterableDataset` of `{"input_ids": window}`.

    With `holdout_fraction`, records are split by `holdout.is_held_out` (by name, else by sequence): the
    "train" side drops the held-out records, the "validation" side keeps only them.
    """
    ds = load_raw_dataset(load_dataset_kwargs, text_column)
    if holdout_fraction:
        ds = ds.filter(held_out_filter(text_column, holdout_fraction, keep=holdout_side == "validation"), batched=True)
    world, rank = distributed_config.world_size, distributed_config.rank
    tokenize = WindowTokenizer(tokenizer, max_seq_length, stride, text_column, bos_eos_only_at_record_ends)
    if isinstance(ds, datasets.IterableDataset):
        if ds.num_shards < world * max(num_workers, 1):
            ds = ds.reshard()  # parquet: one shard per row group, so that ranks and workers get whole shards
        ds = split_dataset_by_node(ds, rank=rank, world_size=world)
        return ds.map(tokenize, batched=True, remove_columns=ds.column_names)
    ds = split_dataset_by_node(ds, rank=rank, world_size=world)
    ds = ds.map(tokenize, batched=True, remove_columns=ds.column_names, desc="Tokenizing")
    if len(ds) < max(num_workers, 1):
        raise ValueError(
            f"Rank {rank} has {len(ds)} windows for {max(num_workers, 1)} loader worker(s): its records are empty or "
            "too few. Use more data, fewer ranks or fewer dataset.num_workers."
        )
    return ds.to_iterable_dataset(num_shards=max(num_workers, 1))


class WindowStream(IterableDataset):
    """Endless (or `num_epochs`) stream of windows in seeded block-shuffled order, exactly resumable.

    Reads `buffer_size` windows, yields them in the order `rng(seed, epoch, block)` gives, repeats.
    Unlike a streaming shuffle buffer (whose contents a checkpoint would have to hold, and which
    `datasets` drops on resume) its state is the source position at the start of the current block
    and the offset inside it; resuming re-reads that one block. With `reverse_complement_prob` the same
    generator also picks the windows that are yielded as their other strand (`dna.reverse_complement_ids`),
    so the choice is as seeded and as resumable as the order.
    """

    def __init__(
        self,
        source: datasets.IterableDataset,
        buffer_size: int,
        seed: int,
        num_epochs: int | None = None,
        describe_decode_error=str,
        reverse_complement_prob: float = 0.0,
        special_ids: tuple[int, int] = (2, 0),
    ):
        if buffer_size < 1:
            raise ValueError(f"dataset.buffer_size must be >= 1, got {buffer_size}.")
        self.describe_decode_error = describe_decode_error
        self.reverse_complement_prob, self.special_ids = reverse_complement_prob, special_ids  # (<BOS>, <EOS>)
        self.source, self.buffer_size, self.seed, self.num_epochs = source, buffer_size, seed, num_epochs
        self.epoch, self._block, self._offset, self._block_state = 0, 0, 0, None

    def __iter__(self):
        worker = get_worker_info().id if get_worker_info() else 0
        while self.num_epochs is None or self.epoch < self.num_epochs:
            self.source.set_epoch(self.epoch)
            if self._block_state is not None:
                self.source.load_state_dict(self._block_state)
            windows = iter(self.source)
            yielded_any = False
            while block := self._read_block(windows):
                rng = np.random.default_rng([self.seed, worker, self.epoch, self._block])
                order = rng.permutation(len(block))
                flip = rng.random(len(block)) < self.reverse_complement_prob if self.reverse_complement_prob else None
                for i in order[self._offset :]:
                    self._offset += 1
                    yielded_any = True
                    yield self._other_strand(block[i]) if flip is not None and flip[i] else block[i]
                self._block, self._offset, self._block_state = self._block + 1, 0, self.source.state_dict()
            self.epoch, self._block, self._offset, self._block_state = self.epoch + 1, 0, 0, None
            if not yielded_any and self.num_epochs is None:
                return  # this worker has no data at all: end rather than spin

    def _other_strand(self, window: dict) -> dict:
        return {**window, "input_ids": reverse_complement_ids(np.asarray(window["input_ids"]), *self.special_ids)}

    def _read_block(self, windows) -> list:
        try:
            return list(itertools.islice(windows, self.buffer_size))
        except UnicodeDecodeError as e:  # text that is not UTF-8: name the file and row, not a 24-frame trace
            raise ValueError(self.describe_decode_error(e)) from None

    def state_dict(self) -> dict:
        """Epoch, block and offset in the block, and the source's position at the block's start."""
        return {"epoch": self.epoch, "block": self._block, "offset": self._offset, "block_state": self._block_state}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`: the current block is read again and the yielded part skipped."""
        self.epoch, self._block, self._offset, self._block_state = (
            state["epoch"],
            state["block"],
            state["offset"],
            state["block_state"],
        )


def create_bshd_dataloader(
    distributed_config: DistributedConfig, tokenizer_name_or_path: str, load_dataset_kwargs: dict, **dataset
):
    """[micro_batch_size, L] micro-batches of windows; returns `(loader, tokenizer)`.

    Padded on the right; with `pack_rows` a micro-batch with padding comes as one packed [1, T] row of its
    windows instead (`collate.PackedRowsCollator`). `dataset`: the other keys of the `dataset` group
    (`_dataloader` lists them).
    """
    return _dataloader(distributed_config, tokenizer_name_or_path, load_dataset_kwargs, packed=False, **dataset)


def create_thd_dataloader(
    distributed_config: DistributedConfig, tokenizer_name_or_path: str, load_dataset_kwargs: dict, **dataset
):
    """Packed [1, T] micro-batches of `token_micro_batch_size` tokens; returns `(loader, tokenizer)`.

    The default budget, `micro_batch_size * max_seq_length`, is the token count of a full BSHD batch. With
    `packing_lookahead` the packs are built from that many windows ahead for even attention work
    (`packing.BalancedPackingDataset`). `dataset`: the other keys of the `dataset` group.
    """
    return _dataloader(distributed_config, tokenizer_name_or_path, load_dataset_kwargs, packed=True, **dataset)


def _dataloader(
    distributed_config: DistributedConfig,
    tokenizer_name_or_path: str,
    load_dataset_kwargs: dict,
    *,
    packed: bool,
    micro_batch_size: int,
    max_seq_length: int = 8192,
    stride: int = 200,
    buffer_size: int = 1000,
    seed: int = 42,
    num_workers: int = 1,
    text_column: str = "sequence",
    token_micro_batch_size: int | None = None,
    split_samples: bool = True,
    packing_lookahead: int = 0,
    pack_rows: bool = False,
    pad_to_multiple_of: int | None = None,
    pad_sequences_to_be_divisible_by: int | None = None,
    uppercase_labels: bool = False,
    mask_degenerate_bases: bool = False,
    mask_eos_label: bool = False,
    reverse_complement_prob: float = 0.0,
    bos_eos_only_at_record_ends: bool = False,
    lowercase_loss_weight: float = 1.0,
    use_stateful_dataloader: bool = True,
    prefetch_factor: int = 4,
    num_epochs: int | None = None,
    cp_rank: int | None = None,
    cp_size: int = 1,
    holdout_fraction: float = 0.0,
    **unused,
):
    """The loader of either layout; each keyword is the `dataset` key of the same name (`defaults.yaml`).

    `cp_rank`: the loader yields that context-parallel rank's shard of each micro-batch (`cp_size` ranks).
    `holdout_fraction`: the records held out for validation never reach training.
    """
    tokenizer = load_tokenizer(tokenizer_name_or_path)
    windows = create_tokenized_dataset(
        distributed_config,
        tokenizer,
        load_dataset_kwargs,
        max_seq_length,
        stride,
        text_column,
        num_workers,
        holdout_fraction,
        bos_eos_only_at_record_ends=bos_eos_only_at_record_ends,
    )
    explain = functools.partial(describe_decode_error, load_dataset_kwargs, text_column)
    if reverse_complement_prob and not is_byte_tokenizer(tokenizer):
        raise ValueError(
            f"dataset.reverse_complement_prob={reverse_complement_prob} complements bases, which needs the nucleotide "
            f"tokenizer (one id per character); {tokenizer_name_or_path!r} is not one. Set it to 0."
        )
    specials = (tokenizer.bos_token_id, tokenizer.eos_token_id)
    stream = WindowStream(windows, buffer_size, seed + distributed_config.rank, num_epochs, explain,
                          reverse_complement_prob, specials)  # fmt: skip
    items, batch_size = stream, micro_batch_size  # BSHD: the loader groups windows into micro-batches
    if packed:  # THD: each item is already a micro-batch's windows, filling the token budget
        budget = token_micro_batch_size or micro_batch_size * max_seq_length
        if packing_lookahead:  # even attention work per pack (and so per rank)
            items, batch_size = BalancedPackingDataset(stream, budget, packing_lookahead), None
        else:
            items, batch_size = TokenPackingDataset(stream, budget, split_samples), None
    labels = LabelPolicy(
        uppercase_labels, mask_degenerate_bases, mask_eos_label, tokenizer.eos_token_id, lowercase_loss_weight
    )
    collate = make_collator(
        tokenizer.pad_token_id,
        labels,
        packed=packed,
        pack_rows=pack_rows,
        pad_to_multiple_of=pad_to_multiple_of,
        pad_sequences_to_be_divisible_by=pad_sequences_to_be_divisible_by,
    )
    if cp_rank is not None:  # context parallelism: the loader yields this rank's part of every sequence
        collate = ContextParallelCollator(collate, cp_size, cp_rank)
    loader_class = StatefulDataLoader if use_stateful_dataloader else DataLoader
    loader = loader_class(
        items,
        batch_size=batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        worker_init_fn=loader_worker_init() if num_workers > 0 else None,  # workers ignore SIGTERM: the main saves
    )
    return loader, tokenizer
