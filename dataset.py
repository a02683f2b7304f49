"""Data: load a parquet file, a folder of parquet files or any HF dataset, shard by rank, tokenize into
overlapping windows, shuffle, and serve BSHD or THD micro-batches from a `StatefulDataLoader`.

    loader, stream = create_thd_dataloader(DistributedConfig(), **cfg.dataset)

Pipeline (the same for streaming and map-style data):
1. `load_dataset(**load_dataset_kwargs)`; a local `path` to a parquet file or folder is read as parquet.
2. Shard by rank: whole files (or parquet row groups) when they divide evenly, otherwise every
   `world_size`-th record. DataLoader workers then split their rank's shards.
3. Tokenize each record into windows of `max_seq_length` tokens (specials included) that overlap
   by `stride` tokens, the semantics of HF `return_overflowing_tokens=True, stride=...`.
4. `WindowStream`: a seeded block shuffle (`buffer_size` windows at a time) over endless epochs,
   calling `set_epoch` on each pass; its state is a few integers plus the source's position, so a
   restored loader yields exactly the batches an uninterrupted one would have (same `num_workers`).
5. BSHD batches of `micro_batch_size` windows, or THD micro-batches packed to exactly
   `token_micro_batch_size` tokens (`collator.TokenPackingDataset`).

Characters outside ACGT (the policy). With the nucleotide tokenizer every character 4..255 is its
own token (its `ord()`), so N, IUPAC codes (R, Y, K, M, ...) and lowercase soft-masked bases are
kept in the input as they are; control characters 0..3 and characters above 255 become <UNK>.
Whether they are also training targets is the collator's label policy: `uppercase_labels` predicts
a lowercase base as its uppercase base, `mask_degenerate_bases` drops every non-ACGT target.
Leading and trailing whitespace is stripped; records that are empty after that are skipped and
counted in the log.
"""

import itertools
import logging
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from collator import BshdCollator, ContextParallelCollator, ThdCollator, TokenPackingDataset
from distributed_config import DistributedConfig

logger = logging.getLogger(__name__)
RECIPE_DIR = Path(__file__).resolve().parent
_skipped_records = 0  # per process; reported in the log as records are skipped


def resolve_path(path: str | Path) -> Path:
    """A relative path is looked up in the working directory first, then in the recipe folder."""
    path = Path(path).expanduser()
    if path.is_absolute() or path.exists():
        return path
    return RECIPE_DIR / path if (RECIPE_DIR / path).exists() else path


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or path.endswith(".parquet")


def normalize_load_kwargs(load_dataset_kwargs: dict) -> dict:
    """Turn a local parquet file or folder into `load_dataset("parquet", data_files=...)` and check
    that every local file exists, so a typo fails here and not deep inside `datasets`."""
    kwargs = dict(load_dataset_kwargs)
    kwargs.setdefault("split", "train")
    path = str(kwargs.get("path", ""))
    if not path:
        raise ValueError(
            "dataset.load_dataset_kwargs.path is required: a parquet file or folder, or an HF dataset name."
        )
    local = resolve_path(path)
    # A folder of parquet files; a folder with a README.md is a local copy of an HF dataset repo, which
    # `load_dataset(path)` reads with its own split configuration.
    if local.is_dir() and any(local.glob("**/*.parquet")) and not (local / "README.md").exists():
        kwargs.update(path="parquet", data_files=sorted(str(p) for p in local.glob("**/*.parquet")))
    elif local.is_file():
        kwargs.update(path="parquet", data_files=str(local))
    elif _looks_local(path) and path != "parquet":
        raise FileNotFoundError(
            f"dataset.load_dataset_kwargs.path={path!r} does not exist (looked in {Path.cwd()} and {RECIPE_DIR}). "
            "Point it at a parquet file, a folder of parquet files, or an HF dataset name."
        )
    files = kwargs.get("data_files")
    if isinstance(files, (str, Path)):
        files = [files]
    if isinstance(files, (list, tuple)):
        resolved = []
        for f in map(str, files):
            if "://" in f or any(c in f for c in "*?["):  # remote or a glob: left to `datasets`
                resolved.append(f)
                continue
            if not resolve_path(f).exists():
                raise FileNotFoundError(
                    f"dataset.load_dataset_kwargs.data_files entry {f!r} does not exist (looked in {Path.cwd()} "
                    f"and {RECIPE_DIR}). Fix the path or override dataset.load_dataset_kwargs.data_files=..."
                )
            resolved.append(str(resolve_path(f)))
        kwargs["data_files"] = resolved
    return kwargs


def load_tokenizer(tokenizer_name_or_path: str) -> PreTrainedTokenizerBase:
    path = resolve_path(tokenizer_name_or_path)
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else tokenizer_name_or_path)


def is_byte_tokenizer(tokenizer: PreTrainedTokenizerBase) -> bool:
    """True for the nucleotide tokenizer: every character 4..255 maps to its `ord()`."""
    vocab = tokenizer.get_vocab()
    return len(vocab) == 256 and all(vocab.get(chr(i)) == i for i in range(4, 256))


def byte_token_ids(text: str, unk_id: int) -> np.ndarray:
    """The nucleotide tokenizer without the tokenizer: a byte view of Latin-1 text is the `ord()` map."""
    try:
        ids = np.frombuffer(text.encode("latin-1"), dtype=np.uint8).astype(np.int32)
    except UnicodeEncodeError:  # rare: characters above 255 become <UNK>
        ids = np.array([ord(c) if ord(c) < 256 else unk_id for c in text], dtype=np.int32)
    ids[ids < 4] = unk_id
    return ids


def window_starts(n_tokens: int, window: int, stride: int) -> range:
    """Starts of the windows of `window` content tokens overlapping by `stride`, as HF's overflow does:
    the first at 0, each next one `window - stride` later, until one reaches the end."""
    if n_tokens <= window:
        return range(1)
    step = window - stride
    return range(0, step * (1 + -(-(n_tokens - window) // step)), step)


class WindowTokenizer:
    """Batched `datasets.map` function: a column of text -> a column of `input_ids` windows."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_seq_length: int, stride: int, text_column: str):
        n_special = len(tokenizer("")["input_ids"])  # <BOS> and <EOS> for the nucleotide tokenizer
        if not 0 <= stride < max_seq_length - n_special:
            raise ValueError(
                f"dataset.stride={stride} must be >= 0 and below dataset.max_seq_length={max_seq_length} minus "
                f"{n_special} special tokens; lower the stride (it is the overlap between windows)."
            )
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.stride = stride
        self.text_column = text_column
        self.fast = is_byte_tokenizer(tokenizer)

    def __call__(self, batch: dict) -> dict:
        global _skipped_records
        texts = [t.strip() if isinstance(t, str) else "" for t in batch[self.text_column]]
        kept = [t for t in texts if t]
        if len(kept) < len(texts):
            _skipped_records += len(texts) - len(kept)
            logger.warning(
                "Skipped %d empty or whitespace-only records in column %r (%d so far in this process).",
                len(texts) - len(kept),
                self.text_column,
                _skipped_records,
            )
        if not self.fast:
            out = self.tokenizer(
                kept,
                max_length=self.max_seq_length,
                stride=self.stride,
                truncation=True,
                return_overflowing_tokens=True,
                return_attention_mask=False,
            )
            return {"input_ids": [np.asarray(ids, dtype=np.int32) for ids in out["input_ids"]]}
        tok, content = self.tokenizer, self.max_seq_length - 2
        windows = []
        for text in kept:
            ids = byte_token_ids(text, tok.unk_token_id)
            for start in window_starts(len(ids), content, self.stride):
                piece = ids[start : start + content]
                window = np.empty(len(piece) + 2, dtype=np.int32)
                window[0], window[1:-1], window[-1] = tok.bos_token_id, piece, tok.eos_token_id
                windows.append(window)
        return {"input_ids": windows}


def _check_parquet_files(files: list[str]) -> None:
    """Read each local parquet footer: a corrupt or empty file is named here, before any worker starts."""
    n_rows = 0
    for f in files:
        if "://" in f or any(c in f for c in "*?["):
            return  # remote or glob: `datasets` reports its own errors
        try:
            n_rows += pq.read_metadata(f).num_rows
        except (OSError, pa.ArrowException) as e:
            raise ValueError(
                f"{f} is not a readable parquet file ({e}); re-export it or drop it from data_files."
            ) from e
    if n_rows == 0:
        raise ValueError(f"The data set {files} has no records; check dataset.load_dataset_kwargs.")


def load_raw_dataset(load_dataset_kwargs: dict, text_column: str) -> datasets.Dataset | datasets.IterableDataset:
    kwargs = normalize_load_kwargs(load_dataset_kwargs)
    checked = kwargs["path"] == "parquet" and isinstance(kwargs.get("data_files"), list)
    if checked:
        _check_parquet_files(kwargs["data_files"])  # also rejects an empty data set
    try:
        ds = datasets.load_dataset(**kwargs)
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        raise FileNotFoundError(
            f"Could not load dataset.load_dataset_kwargs={load_dataset_kwargs}: {e}. "
            "Point dataset.load_dataset_kwargs.path at a parquet file, a folder of parquet files or an HF dataset."
        ) from e
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise ValueError(f"load_dataset returned splits {list(ds)}; set dataset.load_dataset_kwargs.split to one.")
    columns = ds.column_names
    if columns is not None and text_column not in columns:
        raise ValueError(
            f"The data set has no column {text_column!r} (columns: {columns}); set dataset.text_column to the one "
            "holding the sequences."
        )
    feature = (ds.features or {}).get(text_column)
    if isinstance(feature, datasets.Value) and feature.dtype not in ("string", "large_string"):
        raise ValueError(
            f"Column {text_column!r} holds {feature.dtype} values, not text; set dataset.text_column to the column "
            "holding the sequences as strings."
        )
    if isinstance(ds, datasets.Dataset):
        empty = len(ds) == 0
    else:  # a remote stream: peek at one record (local parquet was checked from its footers)
        empty = not checked and next(iter(ds.take(1)), None) is None
    if empty:
        raise ValueError(f"The data set {kwargs.get('data_files') or kwargs['path']} has no records; check the path.")
    return ds


def create_tokenized_dataset(
    distributed_config: DistributedConfig,
    tokenizer: PreTrainedTokenizerBase,
    load_dataset_kwargs: dict,
    max_seq_length: int,
    stride: int,
    text_column: str = "sequence",
    num_workers: int = 0,
) -> datasets.IterableDataset:
    """This rank's share of the data as an HF `IterableDataset` of `{"input_ids": window}`."""
    ds = load_raw_dataset(load_dataset_kwargs, text_column)
    world, rank = distributed_config.world_size, distributed_config.rank
    tokenize = WindowTokenizer(tokenizer, max_seq_length, stride, text_column)
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
    and the offset inside it; resuming re-reads that one block.
    """

    def __init__(self, source: datasets.IterableDataset, buffer_size: int, seed: int, num_epochs: int | None = None):
        if buffer_size < 1:
            raise ValueError(f"dataset.buffer_size must be >= 1, got {buffer_size}.")
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
            while block := list(itertools.islice(windows, self.buffer_size)):
                rng = np.random.default_rng([self.seed, worker, self.epoch, self._block])
                order = rng.permutation(len(block))
                for i in order[self._offset :]:
                    self._offset += 1
                    yielded_any = True
                    yield block[i]
                self._block, self._offset, self._block_state = self._block + 1, 0, self.source.state_dict()
            self.epoch, self._block, self._offset, self._block_state = self.epoch + 1, 0, 0, None
            if not yielded_any and self.num_epochs is None:
                return  # this worker has no data at all: end rather than spin

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "block": self._block, "offset": self._offset, "block_state": self._block_state}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._block, self._offset, self._block_state = (
            state["epoch"],
            state["block"],
            state["offset"],
            state["block_state"],
        )


def _make_loader(dataset, collate_fn, batch_size, num_workers: int, use_stateful_dataloader: bool, cp_rank, cp_size):
    if cp_rank is not None:  # context parallelism: the loader yields this rank's part of every sequence
        collate_fn = ContextParallelCollator(collate_fn, cp_size, cp_rank)
    loader_cls = StatefulDataLoader if use_stateful_dataloader else DataLoader
    return loader_cls(
        dataset,
        batch_size=batch_size,
        collate_fn=collate_fn,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        prefetch_factor=4 if num_workers > 0 else None,
    )


def _build_stream(
    distributed_config,
    tokenizer_name_or_path,
    load_dataset_kwargs,
    max_seq_length,
    stride,
    buffer_size,
    seed,
    text_column,
    num_workers,
    num_epochs,
):
    tokenizer = load_tokenizer(tokenizer_name_or_path)
    source = create_tokenized_dataset(
        distributed_config, tokenizer, load_dataset_kwargs, max_seq_length, stride, text_column, num_workers
    )
    return tokenizer, WindowStream(source, buffer_size, seed + distributed_config.rank, num_epochs)


def create_bshd_dataloader(
    distributed_config: DistributedConfig,
    tokenizer_name_or_path: str,
    load_dataset_kwargs: dict,
    micro_batch_size: int,
    max_seq_length: int = 8192,
    stride: int = 200,
    buffer_size: int = 1000,
    seed: int = 42,
    num_workers: int = 1,
    text_column: str = "sequence",
    pad_to_multiple_of: int | None = None,
    uppercase_labels: bool = False,
    mask_degenerate_bases: bool = False,
    use_stateful_dataloader: bool = True,
    num_epochs: int | None = None,
    cp_rank: int | None = None,
    cp_size: int = 1,
    **unused,
):
    """Padded [micro_batch_size, L] batches (with `cp_rank`: that context-parallel rank's shard of them).
    Returns `(loader, tokenizer)`."""
    tokenizer, stream = _build_stream(
        distributed_config,
        tokenizer_name_or_path,
        load_dataset_kwargs,
        max_seq_length,
        stride,
        buffer_size,
        seed,
        text_column,
        num_workers,
        num_epochs,
    )
    collator = BshdCollator(
        tokenizer.pad_token_id, pad_to_multiple_of, uppercase_labels, mask_degenerate_bases, tokenizer.eos_token_id
    )
    loader = _make_loader(stream, collator, micro_batch_size, num_workers, use_stateful_dataloader, cp_rank, cp_size)
    return loader, tokenizer


def create_thd_dataloader(
    distributed_config: DistributedConfig,
    tokenizer_name_or_path: str,
    load_dataset_kwargs: dict,
    micro_batch_size: int,
    max_seq_length: int = 8192,
    stride: int = 200,
    buffer_size: int = 1000,
    seed: int = 42,
    num_workers: int = 1,
    text_column: str = "sequence",
    token_micro_batch_size: int | None = None,
    split_samples: bool = True,
    pad_to_multiple_of: int | None = None,
    pad_sequences_to_be_divisible_by: int | None = None,
    uppercase_labels: bool = False,
    mask_degenerate_bases: bool = False,
    use_stateful_dataloader: bool = True,
    num_epochs: int | None = None,
    cp_rank: int | None = None,
    cp_size: int = 1,
    **unused,
):
    """Packed [1, T] micro-batches of `token_micro_batch_size` tokens (default `micro_batch_size *
    max_seq_length`, the same token count as a full BSHD batch; with `cp_rank`: that context-parallel rank's
    shard of them). Returns `(loader, tokenizer)`."""
    tokenizer, stream = _build_stream(
        distributed_config,
        tokenizer_name_or_path,
        load_dataset_kwargs,
        max_seq_length,
        stride,
        buffer_size,
        seed,
        text_column,
        num_workers,
        num_epochs,
    )
    packed = TokenPackingDataset(stream, token_micro_batch_size or micro_batch_size * max_seq_length, split_samples)
    collator = ThdCollator(
        tokenizer.pad_token_id,
        pad_to_multiple_of,
        pad_sequences_to_be_divisible_by,
        uppercase_labels,
        mask_degenerate_bases,
        tokenizer.eos_token_id,
    )
    return _make_loader(packed, collator, None, num_workers, use_stateful_dataloader, cp_rank, cp_size), tokenizer
