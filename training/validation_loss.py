"""Validation during training: a fixed set of held-out windows, evaluated every `validation.every_n_steps`.

    validator = Validator(cfg, tokenizer, dist_config, device, pack_rows=packs_bshd_batches(cfg, use_te))
    metrics = validator.run(model)    # {"val_loss", "val_bits_per_base", "val_perplexity", ...}; every rank

The windows come from `validation.load_dataset_kwargs` (a separate FASTA/parquet data set) or, if that is
null, from the records `holdout.is_held_out` puts in the `validation.fraction` that training never sees.
They are the first `validation.num_windows` windows of that stream, unshuffled: the same every time, on
any number of ranks (rank r evaluates every world_size-th micro-batch; sums are reduced in float64).

val_loss: mean natural-log loss per predicted token (every target training uses); val_perplexity:
exp(val_loss); val_bits_per_base: the natural-log loss over targets that are A, C, G or T (either case)
divided by ln 2, per such base. Validation runs in BF16 without FP8 autocast, so the figure does not
depend on FP8 scaling history and evaluating does not change it.
"""

import itertools
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from data.batches import to_device
from data.collate import IGNORE_INDEX, BshdCollator, PackedRowsCollator, ThdCollator
from data.loader import create_tokenized_dataset
from runtime.distributed import DistributedConfig, all_reduce_sum

ACGT_IDS = torch.tensor([ord(c) for c in "ACGTacgt"])


def validation_windows(cfg: DictConfig, tokenizer) -> list:
    """The first `validation.num_windows` windows of the validation stream (the same on every rank)."""
    separate = cfg.validation.load_dataset_kwargs is not None
    source = OmegaConf.to_container(
        cfg.validation.load_dataset_kwargs if separate else cfg.dataset.load_dataset_kwargs
    )
    stream = create_tokenized_dataset(
        DistributedConfig(0, 0, 1), tokenizer, source, cfg.dataset.max_seq_length, cfg.dataset.stride,
        cfg.dataset.text_column, holdout_fraction=0.0 if separate else cfg.validation.fraction,
        holdout_side="validation",
    )  # fmt: skip
    windows = [w["input_ids"] for w in itertools.islice(stream, cfg.validation.num_windows)]
    if not windows:
        raise ValueError(
            f"No validation windows: validation.fraction={cfg.validation.fraction} of the training records is none "
            "of them. Raise validation.fraction or set validation.load_dataset_kwargs.path to a separate data set."
        )
    return windows


def micro_batches(cfg: DictConfig, windows: list, tokenizer, pack_rows: bool = False) -> list[dict]:
    """Whole windows in packed THD micro-batches of the training token budget, or BSHD micro-batches.

    `pack_rows`: BSHD micro-batches as training gets them from the loader (`collator.PackedRowsCollator`).
    """
    d = cfg.dataset
    policy = dict(uppercase_labels=d.uppercase_labels, mask_degenerate_bases=d.mask_degenerate_bases,
                  eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    samples = [{"input_ids": w} for w in windows]
    if not cfg.use_sequence_packing:
        collate = (PackedRowsCollator if pack_rows else BshdCollator)(tokenizer.pad_token_id, **policy)
        return [collate(samples[i : i + d.micro_batch_size]) for i in range(0, len(samples), d.micro_batch_size)]
    budget, groups, tokens = d.token_micro_batch_size or d.micro_batch_size * d.max_seq_length, [[]], 0
    for sample in samples:  # never split a window: its loss would lose the context of its first part
        if groups[-1] and tokens + len(sample["input_ids"]) > budget:
            groups.append([])
            tokens = 0
        groups[-1].append(sample)
        tokens += len(sample["input_ids"])
    return [ThdCollator(tokenizer.pad_token_id, **policy)(group) for group in groups]


def best_so_far(ckpt_dir) -> float:
    """The `val_bits_per_base` of `<ckpt_dir>/best_model`, so that a resumed run keeps the best it had."""
    from checkpointing.folders import read_run_info

    info = read_run_info(Path(ckpt_dir) / "best_model") if ckpt_dir else None
    return (info or {}).get("best", {}).get("val_bits_per_base", math.inf)


class Validator:
    """Evaluates the fixed validation windows and keeps the best `val_bits_per_base` seen."""

    def __init__(self, cfg: DictConfig, tokenizer, dist_config: DistributedConfig, device: torch.device,
                 best: float = math.inf, pack_rows: bool = False):  # fmt: skip
        self.every_n_steps = cfg.validation.every_n_steps
        self.last_step = cfg.num_train_steps
        windows = validation_windows(cfg, tokenizer)
        self.num_windows = len(windows)
        self.batches = micro_batches(cfg, windows, tokenizer, pack_rows)[dist_config.rank :: dist_config.world_size]
        self.device = device
        self.best = best

    def due(self, step: int) -> bool:
        """Every `validation.every_n_steps` steps, and at the last step."""
        return step % self.every_n_steps == 0 or step == self.last_step

    @torch.no_grad()
    def run(self, model) -> dict:
        """Validation metrics of `model` (a collective: call on every rank); `improved` marks a new best."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # nll, targets, nll over ACGT, ACGT targets
        for batch in self.batches:
            batch = to_device(batch, self.device)
            labels = batch.pop("labels")
            logits = model(**batch).logits  # [B, S, V]
            targets = labels[..., 1:]
            nll = F.cross_entropy(logits[..., :-1, :].flatten(0, -2).float(), targets.flatten(),
                                  ignore_index=IGNORE_INDEX, reduction="none")  # fmt: skip
            valid = targets.flatten() != IGNORE_INDEX
            is_base = torch.isin(targets.flatten(), ACGT_IDS.to(targets.device))
            sums += torch.stack([nll.sum(), valid.sum(), (nll * is_base).sum(), is_base.sum()]).double()
        model.train(was_training)
        nll, n, nll_bases, n_bases = all_reduce_sum(sums).tolist()
        val_loss = nll / max(n, 1)
        bits_per_base = nll_bases / max(n_bases, 1) / math.log(2)
        improved = bits_per_base < self.best
        self.best = min(self.best, bits_per_base)
        return {"val_loss": val_loss, "val_bits_per_base": bits_per_base, "val_perplexity": math.exp(val_loss),
                "val_windows": self.num_windows, "val_bases": int(n_bases), "improved": improved}  # fmt: skip
