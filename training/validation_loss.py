"""Validation loss during training: a fixed set of held-out windows, evaluated every `validation.every_n_steps`.

    validator = Validator(cfg.validation, cfg.dataset, options.batches, tokenizer, dist_config, device,
                          last_step=cfg.num_train_steps, on_best=checkpointer.export_best)
    metrics = validator.run(model, step)   # {"val_loss", "val_bits_per_base", "val_perplexity", ...}; every rank

The windows come from `validation.load_dataset_kwargs` (a separate FASTA/parquet data set) or, if that is
null, from the records `data.holdout.is_held_out` puts in the `validation.fraction` that training never sees.
They are the first `validation.num_windows` windows of that stream, unshuffled: the same every time, on
any number of ranks (rank r evaluates every world_size-th micro-batch; sums are reduced in float64).

val_loss: mean natural-log loss per predicted token (every target training uses); val_perplexity:
exp(val_loss); val_bits_per_base: the natural-log loss over targets that are A, C, G or T (either case)
divided by ln 2, per such base. val_rc_gap: the mean over windows of |bits per base of the window - bits
per base of its reverse complement| (a model that reads both strands alike scores 0; nucleotide tokenizer
only). Validation runs in BF16 without FP8 autocast, so the figure does not depend on FP8 scaling history
and evaluating does not change it.
"""

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from data.batches import BatchOptions, to_device
from data.collate import IGNORE_INDEX, LabelPolicy, make_collator
from data.dna import BASE_IDS_ANY_CASE, is_base, reverse_complement_ids
from data.loader import create_tokenized_dataset
from data.windows import is_byte_tokenizer
from runtime.distributed import DistributedConfig, all_reduce_sum

logger = logging.getLogger(__name__)
MIN_VALIDATION_BASES = 100_000  # below this, a curve of bits per base is mostly sampling noise


def window_keys(validation, dataset) -> tuple[int, int, int]:
    """(micro_batch_size, max_seq_length, stride) of validation: its own keys, else the `dataset` group's."""
    micro_batch_size = validation.get("micro_batch_size") or dataset.micro_batch_size
    max_seq_length = validation.get("max_seq_length") or dataset.max_seq_length
    stride = dataset.stride if validation.get("stride") is None else validation.stride
    return micro_batch_size, max_seq_length, stride


def validation_windows(validation, dataset, tokenizer, world_size: int = 1) -> list:
    """The first `validation.num_windows` windows of the validation stream (the same on every rank).

    With `validation.num_bases`, the first windows holding that many A/C/G/T bases instead; with OpenGenome2's
    `validation.num_batches`, that many micro-batches per rank (of `world_size`).
    """
    separate = validation.load_dataset_kwargs is not None
    source = OmegaConf.to_container(validation.load_dataset_kwargs if separate else dataset.load_dataset_kwargs)
    _, max_seq_length, stride = window_keys(validation, dataset)
    stream = create_tokenized_dataset(
        DistributedConfig(0, 0, 1),
        tokenizer,
        source,
        max_seq_length,
        stride,
        dataset.text_column,
        holdout_fraction=0.0 if separate else validation.fraction,
        holdout_side="validation",
        bos_eos_only_at_record_ends=dataset.bos_eos_only_at_record_ends,
    )
    num_bases, num_windows = validation.get("num_bases"), validation.num_windows
    if validation.get("num_batches") and num_bases is None:
        micro_batch_size = window_keys(validation, dataset)[0]
        num_windows = validation.num_batches * micro_batch_size * world_size
        logger.info(
            "Validation: validation.num_batches=%d (OpenGenome2's key) is %d micro-batches of %d windows on each of "
            "%d rank(s): the first %d windows (validation.num_windows ignored).",
            validation.num_batches,
            validation.num_batches,
            micro_batch_size,
            world_size,
            num_windows,
        )
    windows, bases = [], 0
    for window in (w["input_ids"] for w in stream):
        if (len(windows) >= num_windows) if num_bases is None else bases >= num_bases:
            break
        windows.append(window)
        bases += int(is_base(np.asarray(window)).sum())
    if not windows:
        raise ValueError(
            f"No validation windows: validation.fraction={validation.fraction} of the training records is none "
            "of them. Raise validation.fraction or set validation.load_dataset_kwargs.path to a separate data set."
        )
    if bases < min(MIN_VALIDATION_BASES, num_bases or MIN_VALIDATION_BASES):
        logger.warning(
            "Validation: %d windows hold only %s bases (under %s): val_bits_per_base will move by chance and "
            "best_model follow it. Set validation.num_bases=%d (or more validation.num_windows)%s.",
            len(windows),
            f"{bases:,}",
            f"{MIN_VALIDATION_BASES:,}",
            MIN_VALIDATION_BASES,
            "" if num_bases is None or bases >= num_bases else ", with more held-out data: the set has no more",
        )
    elif num_bases is not None and bases < num_bases:
        logger.warning(
            "Validation: the held-out set has %s bases, fewer than validation.num_bases=%d.", f"{bases:,}", num_bases
        )
    logger.info("Validation: %d windows, %s bases.", len(windows), f"{bases:,}")
    return windows


def micro_batches(validation, dataset, batches: BatchOptions, windows: list, tokenizer) -> list[dict]:
    """Whole windows in micro-batches laid out as training's: THD packs of its token budget, or BSHD.

    With `validation.micro_batch_size` (or `max_seq_length`) set, the budget is that many of those windows.
    """
    size, max_seq_length, _ = window_keys(validation, dataset)
    own_size = validation.get("micro_batch_size") or validation.get("max_seq_length")
    labels = LabelPolicy(
        dataset.uppercase_labels, dataset.mask_degenerate_bases, dataset.mask_eos_label, tokenizer.eos_token_id
    )
    collate = make_collator(
        tokenizer.pad_token_id, labels, packed=batches.use_sequence_packing, pack_rows=batches.pack_rows
    )
    samples = [{"input_ids": w} for w in windows]
    if not batches.use_sequence_packing:
        return [collate(samples[i : i + size]) for i in range(0, len(samples), size)]
    budget = size * max_seq_length if own_size else dataset.token_micro_batch_size or size * max_seq_length
    groups, tokens = [[]], 0
    for sample in samples:  # never split a window: its loss would lose the context of its first part
        if groups[-1] and tokens + len(sample["input_ids"]) > budget:
            groups.append([])
            tokens = 0
        groups[-1].append(sample)
        tokens += len(sample["input_ids"])
    return [collate(group) for group in groups]


class Validator:
    """Evaluates the fixed validation windows; calls `on_best(step, metrics)` when `val_bits_per_base` improves."""

    def __init__(
        self,
        validation,
        dataset,
        batches: BatchOptions,
        tokenizer,
        dist_config: DistributedConfig,
        device: torch.device,
        *,
        last_step: int,
        best: float = math.inf,
        on_best: Callable[[int, dict], None] | None = None,
    ):
        self.every_n_steps = validation.every_n_steps
        self.last_step = last_step
        windows = validation_windows(validation, dataset, tokenizer, dist_config.world_size)
        self.num_windows = len(windows)
        mine = slice(dist_config.rank, None, dist_config.world_size)
        self.batches = micro_batches(validation, dataset, batches, windows, tokenizer)[mine]
        # The same windows on the other strand, batched alike, for val_rc_gap (a complement needs one id per base).
        self.rc_batches = None
        if is_byte_tokenizer(tokenizer):
            specials = (tokenizer.bos_token_id, tokenizer.eos_token_id)
            other_strand = [reverse_complement_ids(np.asarray(w), *specials) for w in windows]
            self.rc_batches = micro_batches(validation, dataset, batches, other_strand, tokenizer)[mine]
        self.device = device
        self.best = best
        self.on_best = on_best

    def due(self, step: int) -> bool:
        """Every `validation.every_n_steps` steps, and at the last step."""
        return step % self.every_n_steps == 0 or step == self.last_step

    @torch.no_grad()
    def run(self, model, step: int) -> dict:
        """Validation metrics of `model` after `step` (a collective: call on every rank)."""
        was_training = model.training
        model.eval()
        sums, window_bits = self._evaluate(model, self.batches)
        gap = torch.zeros(2, dtype=torch.float64, device=self.device)  # sum of |forward - other strand|, windows
        if self.rc_batches is not None:
            _, rc_bits = self._evaluate(model, self.rc_batches)
            both = ~(window_bits.isnan() | rc_bits.isnan())  # windows with a base to score on both strands
            gap += torch.stack([(window_bits - rc_bits)[both].abs().sum(), both.sum().double()])
        model.train(was_training)
        nll, n, nll_bases, n_bases, gap_sum, gap_windows = all_reduce_sum(torch.cat([sums, gap])).tolist()
        val_loss = nll / max(n, 1)
        metrics = {
            "val_loss": val_loss,
            "val_bits_per_base": nll_bases / max(n_bases, 1) / math.log(2),
            "val_perplexity": math.exp(val_loss),
            "val_windows": self.num_windows,
            "val_bases": int(n_bases),
        }
        if gap_windows:
            metrics["val_rc_gap"] = gap_sum / gap_windows
        if metrics["val_bits_per_base"] < self.best:
            self.best = metrics["val_bits_per_base"]
            if self.on_best is not None:
                self.on_best(step, metrics)
        return metrics

    def _evaluate(self, model, batches: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        """[nll, targets, nll over bases, base targets] summed, and each window's bits per base (NaN: no base)."""
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)
        base_ids = torch.tensor(BASE_IDS_ANY_CASE, dtype=torch.long, device=self.device)
        per_window = []
        for batch in batches:
            batch = to_device(batch, self.device)
            labels = batch.pop("labels")
            logits = model(**batch).logits  # [B, S, V]
            targets = labels[..., 1:]
            flat_logits = logits[..., :-1, :].flatten(0, -2).float()
            nll = F.cross_entropy(flat_logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
            nll = nll.view(targets.shape).double()
            is_base = torch.isin(targets, base_ids)
            sums += torch.stack([nll.sum(), (targets != IGNORE_INDEX).sum(), (nll * is_base).sum(), is_base.sum()])
            per_window.append(torch.stack(window_sums(batch, nll * is_base, is_base.double())))
        bits = torch.cat(per_window, dim=1) if per_window else torch.zeros(2, 0, device=self.device)
        return sums, bits[0] / bits[1] / math.log(2)  # 0/0: NaN for a window without a base


def window_sums(batch: dict, values: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per window of a micro-batch, the sums of `values` and `counts` ([B, S-1], over targets after the shift).

    A BSHD row is one window; a packed row's windows are its `cu_seq_lens_q` spans (a target belongs to the
    window of the token it predicts).
    """
    if "cu_seq_lens_q" not in batch:
        return values.sum(dim=1), counts.sum(dim=1)
    bounds = batch["cu_seq_lens_q"].long()
    predicted = torch.arange(1, values.shape[1] + 1, device=values.device)  # target t is token t + 1
    window = torch.searchsorted(bounds[1:], predicted, right=True)
    n = len(bounds) - 1
    zeros = torch.zeros(n, dtype=values.dtype, device=values.device)
    return zeros.index_add(0, window, values[0]), zeros.clone().index_add(0, window, counts[0])
