"""Collation: windows -> BSHD or THD micro-batches, with the genomic label policy and context-parallel shards.

Labels follow the Hugging Face convention: `labels` equals `input_ids` (not shifted) and the model
shifts them, so position t predicts token t + 1. -100 marks positions that are never a target.

BSHD: `input_ids`, `attention_mask`, `labels` of shape [B, L], padded on the right to the longest
sample (optionally to a multiple of `pad_to_multiple_of`, e.g. 16 for FP8).

THD: every sample of the micro-batch is flattened into one row, `input_ids`/`labels`/`position_ids`
of shape [1, T], with the boundaries in `cu_seq_lens_q/k` (int32, zero-prefixed, last entry T) and
the longest sequence in `max_length_q/k`. The first label of every sequence is -100, so after the
model's shift the last token of one sequence never predicts the first token of the next.
"""

from dataclasses import dataclass

import numpy as np
import torch

from data.dna import BASE_IDS, BASE_IDS_ANY_CASE

IGNORE_INDEX = -100


def mask_genomic_labels(
    labels: np.ndarray, uppercase_labels: bool, mask_degenerate_bases: bool, eos_id: int, mask_eos_label: bool = False
):
    """Genomic label policy, applied in place to a 1-D id array (ids are `ord()` of the character).

    `uppercase_labels`: a soft-masked (lowercase) base is predicted as its uppercase base, so the
    model learns the sequence and not the repeat annotation. `mask_degenerate_bases`: a label that
    is not A, C, G or T (N, IUPAC codes, other bytes, <BOS>, <PAD>, <UNK>) is not a target; <EOS>
    stays a target so that the model learns where a sequence ends, unless `mask_eos_label` (OpenGenome2
    masks it with the degenerate bases).
    """
    if uppercase_labels:
        lower = (labels >= ord("a")) & (labels <= ord("z"))
        labels[lower] -= ord("a") - ord("A")
    if mask_degenerate_bases:
        keep = np.isin(labels, BASE_IDS if uppercase_labels else BASE_IDS_ANY_CASE) | (labels == eos_id)
        labels[~keep & (labels != IGNORE_INDEX)] = IGNORE_INDEX
    if mask_eos_label:
        labels[labels == eos_id] = IGNORE_INDEX
    return labels


@dataclass(frozen=True)
class LabelPolicy:
    """Which positions are prediction targets, as what, and how much each weighs: the `dataset` keys of the same names.

    `lowercase_loss_weight` (1.0: every target alike) is the loss weight of a target that is a lowercase
    (soft-masked, repeat) character in the data, whether or not `uppercase_labels` predicts it as uppercase;
    with it, batches carry `loss_weights` next to `labels` (0 where there is no target).
    """

    uppercase_labels: bool = False
    mask_degenerate_bases: bool = False
    mask_eos_label: bool = False
    eos_token_id: int = 0
    lowercase_loss_weight: float = 1.0

    @property
    def weighted(self) -> bool:
        """Whether batches carry `loss_weights`."""
        return self.lowercase_loss_weight != 1.0

    def weights_for(self, input_ids: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Each position's loss weight (`labels` as `labels_for` gave them, after any masking)."""
        lowercase = (input_ids >= ord("a")) & (input_ids <= ord("z"))
        weights = np.where(lowercase, self.lowercase_loss_weight, 1.0).astype(np.float32)
        weights[labels == IGNORE_INDEX] = 0.0
        return weights

    def labels_for(self, input_ids: np.ndarray) -> np.ndarray:
        """The labels of one window (not shifted: the model shifts them)."""
        labels = input_ids.astype(np.int64, copy=True)
        if self.uppercase_labels or self.mask_degenerate_bases or self.mask_eos_label:
            mask_genomic_labels(labels, self.uppercase_labels, self.mask_degenerate_bases, self.eos_token_id,
                                self.mask_eos_label)  # fmt: skip
        return labels


class BshdCollator:
    """Pads a list of `{"input_ids": 1-D array}` samples into [B, L] tensors."""

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        labels: LabelPolicy = LabelPolicy(),
    ):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.policy = labels

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        """`input_ids`, `attention_mask` and `labels` of shape [B, L]."""
        seqs = [np.asarray(s["input_ids"]) for s in samples]
        length = max(len(s) for s in seqs)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = np.full((len(seqs), length), self.pad_token_id, dtype=np.int64)
        labels = np.full((len(seqs), length), IGNORE_INDEX, dtype=np.int64)
        attention_mask = np.zeros((len(seqs), length), dtype=np.int64)
        for row, seq in enumerate(seqs):
            input_ids[row, : len(seq)] = seq
            labels[row, : len(seq)] = self.policy.labels_for(seq)
            attention_mask[row, : len(seq)] = 1
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }
        if self.policy.weighted:
            batch["loss_weights"] = torch.from_numpy(self.policy.weights_for(input_ids, labels))
        return batch


class ThdCollator:
    """Flattens a list of `{"input_ids": 1-D array}` samples into one packed [1, T] row.

    `pad_to_multiple_of`: append one padding sequence so that T is a multiple (16 for FP8).
    `pad_sequences_to_be_divisible_by`: pad every sequence to a multiple (2 x cp for context
    parallelism); the tokens then sit at `cu_seq_lens_*_padded` offsets while `cu_seq_lens_*` keep
    the real lengths, and `pad_between_seqs` tells TE attention to skip the gaps.
    """

    def __init__(
        self,
        pad_token_id: int,
        pad_to_multiple_of: int | None = None,
        pad_sequences_to_be_divisible_by: int | None = None,
        labels: LabelPolicy = LabelPolicy(),
    ):
        self.policy = labels
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.pad_sequences_to_be_divisible_by = pad_sequences_to_be_divisible_by

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor | int | bool]:
        """One packed [1, T] row with `cu_seq_lens_q/k` and `max_length_q/k` (see the module docstring)."""
        seqs = [np.asarray(s["input_ids"]) for s in samples]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        padded = lengths
        if self.pad_sequences_to_be_divisible_by:
            k = self.pad_sequences_to_be_divisible_by
            padded = -(-lengths // k) * k
        if self.pad_to_multiple_of and padded.sum() % self.pad_to_multiple_of:
            # One extra all-padding sequence: real sequences keep their boundaries and masks.
            extra = self.pad_to_multiple_of - padded.sum() % self.pad_to_multiple_of
            seqs.append(np.zeros(0, dtype=np.int64))
            lengths = np.append(lengths, 0)
            padded = np.append(padded, extra)
        cu_padded = np.concatenate([[0], np.cumsum(padded)])
        total = int(cu_padded[-1])

        input_ids = np.full(total, self.pad_token_id, dtype=np.int64)
        labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
        for seq, start in zip(seqs, cu_padded[:-1]):
            input_ids[start : start + len(seq)] = seq
            seq_labels = self.policy.labels_for(seq)
            if len(seq_labels):
                seq_labels[0] = IGNORE_INDEX  # the previous sequence's last token must not predict it
            labels[start : start + len(seq)] = seq_labels
        position_ids = np.arange(total) - np.repeat(cu_padded[:-1], padded)

        batch = {
            "input_ids": torch.from_numpy(input_ids)[None],
            "labels": torch.from_numpy(labels)[None],
            "position_ids": torch.from_numpy(position_ids)[None],
        }
        if self.policy.weighted:
            batch["loss_weights"] = torch.from_numpy(self.policy.weights_for(input_ids, labels))[None]
        if self.pad_sequences_to_be_divisible_by:
            real = np.where(lengths > 0, lengths, padded)  # the extra padding sequence counts as real
            cu = torch.from_numpy(np.concatenate([[0], np.cumsum(real)])).to(torch.int32)
            cu_pad = torch.from_numpy(cu_padded).to(torch.int32)
            batch.update(cu_seq_lens_q_padded=cu_pad, cu_seq_lens_k_padded=cu_pad.clone(), pad_between_seqs=True)
        else:
            cu = torch.from_numpy(cu_padded).to(torch.int32)
        max_length = int(padded.max())
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max_length, max_length_k=max_length)
        return batch


class PackedRowsCollator:
    """BSHD micro-batches for a THD-built TE model, without a GEMM on a pad (`config.options.packs_rows`).

    Windows of one length stay a [B, L] batch (`BshdCollator`, nothing to pad: the model runs TE's BSHD
    kernels, a few percent faster than THD on full windows); any other micro-batch becomes one packed
    row of the same windows (`ThdCollator`).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None, labels: LabelPolicy = LabelPolicy()):
        self.rows = BshdCollator(pad_token_id, pad_to_multiple_of, labels)
        self.packed = ThdCollator(pad_token_id, pad_to_multiple_of, labels=labels)
        self.multiple = pad_to_multiple_of or 1

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor | int | bool]:
        """`BshdCollator`'s batch (its mask all ones) or `ThdCollator`'s packed row."""
        lengths = {len(s["input_ids"]) for s in samples}
        if len(lengths) == 1 and lengths.pop() % self.multiple == 0:
            return self.rows(samples)
        return self.packed(samples)


def make_collator(
    pad_token_id: int,
    labels: LabelPolicy,
    *,
    packed: bool,
    pack_rows: bool = False,
    pad_to_multiple_of: int | None = None,
    pad_sequences_to_be_divisible_by: int | None = None,
):
    """The collator of a layout: THD packs (`packed`), packed rows (`pack_rows`) or padded BSHD.

    Training's loader and validation both take theirs from here, so their batches are laid out alike.
    """
    if packed:
        return ThdCollator(pad_token_id, pad_to_multiple_of, pad_sequences_to_be_divisible_by, labels)
    return (PackedRowsCollator if pack_rows else BshdCollator)(pad_token_id, pad_to_multiple_of, labels)


def cp_shard_indices(cu_seq_lens_padded: np.ndarray, cp_size: int, cp_rank: int) -> np.ndarray:
    """Positions of a packed row that context-parallel rank `cp_rank` keeps.

    Each sequence (padded to a multiple of 2 x cp_size) is cut into 2 x cp_size equal chunks and the
    rank takes chunks `cp_rank` and `2 x cp_size - 1 - cp_rank`: one early and one late chunk, so that
    every rank does the same share of causal attention work. This is the layout TE's context-parallel
    attention expects (its "dual chunk swap" load balancing).
    """
    if cp_size == 1:  # nothing to split
        return np.arange(int(cu_seq_lens_padded[-1]))
    pieces = []
    for start, end in zip(cu_seq_lens_padded[:-1].tolist(), cu_seq_lens_padded[1:].tolist()):
        if (end - start) % (2 * cp_size):
            raise ValueError(
                f"A sequence of {end - start} tokens cannot be split into 2 x cp_size = {2 * cp_size} equal chunks; "
                "pad sequences to a multiple of it (ThdCollator(pad_sequences_to_be_divisible_by=...))."
            )
        chunk = (end - start) // (2 * cp_size)
        for c in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(np.arange(start + c * chunk, start + (c + 1) * chunk))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def shard_batch_for_cp(batch: dict, cp_size: int, cp_rank: int) -> dict:
    """This context-parallel rank's part of a BSHD or THD batch (every rank of the group gets the same batch).

    Labels are shifted *before* sharding: `shift_labels[t]` is the target of position t, so the target of
    the last token of a chunk (the first token of the next chunk, which may live on another rank) is
    kept. THD batches keep the global `cu_seq_lens_*` and `max_length_*`: TE divides them by cp_size
    itself. BSHD batches drop the padding mask: with right padding and a causal mask no real token
    ever attends to a pad, so plain causal attention is exact.
    """
    labels = batch["labels"]
    shift_labels = torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
    weights = batch.get("loss_weights")
    shift_weights = None if weights is None else torch.nn.functional.pad(weights[..., 1:], (0, 1), value=0.0)
    if "cu_seq_lens_q_padded" in batch:  # THD
        bounds = batch["cu_seq_lens_q_padded"].numpy()
    elif "cu_seq_lens_q" in batch:
        bounds = batch["cu_seq_lens_q"].numpy()
    else:  # BSHD: every row is one sequence of the same length
        bounds = np.array([0, labels.shape[1]])
    index = torch.from_numpy(cp_shard_indices(bounds, cp_size, cp_rank))
    sharded = {k: v for k, v in batch.items() if k not in ("labels", "attention_mask", "loss_weights")}
    for key, value in (
        ("input_ids", batch["input_ids"]),
        ("position_ids", batch.get("position_ids")),
        ("shift_labels", shift_labels),
        ("shift_loss_weights", shift_weights),  # shifted with the labels they weigh
    ):
        if value is not None:
            sharded[key] = value[:, index]
    return sharded


class ContextParallelCollator:
    """A collator whose batches are already this context-parallel rank's shard (`shard_batch_for_cp`).

    Sharding runs in the loader's workers and the loader pins the result, so the training loop's copy to
    the GPU stays asynchronous (pinning in the loop would allocate pinned memory, which can wait on the GPU).
    """

    def __init__(self, collator, cp_size: int, cp_rank: int):
        self.collator, self.cp_size, self.cp_rank = collator, cp_size, cp_rank

    def __call__(self, features):
        """This rank's shard of the wrapped collator's batch."""
        return shard_batch_for_cp(self.collator(features), self.cp_size, self.cp_rank)
