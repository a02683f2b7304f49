"""Tokenize DNA records into overlapping windows of `max_seq_length` tokens, `<BOS> ... <EOS>` each.

    tokenize = WindowTokenizer(tokenizer, max_seq_length=8192, stride=200, text_column="sequence")
    dataset.map(tokenize, batched=True)          # a column of text -> a column of `input_ids` windows

The semantics are HF's `return_overflowing_tokens=True, stride=...`; the nucleotide tokenizer (every
character its `ord()`) takes a byte fast path that gives the same ids.
"""

import logging

import numpy as np
from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)
_skipped_records = 0  # per process; reported in the log as records are skipped


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
    """Starts of the windows of `window` content tokens overlapping by `stride`, as HF's overflow does.

    The first at 0, each next one `window - stride` later, until one reaches the end.
    """
    if n_tokens <= window:
        return range(1)
    step = window - stride
    return range(0, step * (1 + -(-(n_tokens - window) // step)), step)


class WindowTokenizer:
    """Batched `datasets.map` function: a column of text -> a column of `input_ids` windows.

    Each window is `<BOS> ... <EOS>`, as HF's overflow makes them. With `bos_eos_only_at_record_ends` (byte
    path only) a record is tokenized as one stream `<BOS> bases <EOS>` that is then cut into windows: the first
    window starts with `<BOS>`, the last ends with `<EOS>`, interior windows carry neither (a record that fits
    one window is the same either way).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_seq_length: int,
        stride: int,
        text_column: str,
        bos_eos_only_at_record_ends: bool = False,
    ):
        n_special = len(tokenizer("")["input_ids"])  # <BOS> and <EOS> for the nucleotide tokenizer
        self.fast = is_byte_tokenizer(tokenizer)
        # A stride that does not let windows advance is fine while every record fits one window (pre-windowed
        # data, as OpenGenome2's shards); the byte path checks it per record, HF's overflow needs it always.
        if stride < 0 or (not self.fast and stride >= max_seq_length - n_special):
            raise ValueError(
                f"dataset.stride={stride} must be >= 0 and below dataset.max_seq_length={max_seq_length} minus "
                f"{n_special} special tokens; lower the stride (it is the overlap between windows)."
            )
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.stride = stride
        self.text_column = text_column
        self.bos_eos_only_at_record_ends = bos_eos_only_at_record_ends
        if bos_eos_only_at_record_ends and not self.fast:
            raise ValueError(
                "dataset.bos_eos_only_at_record_ends=true cuts the nucleotide tokenizer's id stream; this tokenizer "
                "is not one (one id per character). Set it to false."
            )

    def __call__(self, batch: dict) -> dict:
        """`{text_column: [str]}` -> `{"input_ids": [window]}` (several windows per long record)."""
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
            if self.bos_eos_only_at_record_ends:
                windows += self._record_windows(ids)
                continue
            if len(ids) > content and self.stride >= content:
                raise ValueError(
                    f"A record of {len(ids)} bases needs several windows of {content} bases, and dataset.stride="
                    f"{self.stride} would not let them advance: set dataset.stride below {content} "
                    f"(dataset.max_seq_length={self.max_seq_length} minus <BOS> and <EOS>)."
                )
            for start in window_starts(len(ids), content, self.stride):
                piece = ids[start : start + content]
                window = np.empty(len(piece) + 2, dtype=np.int32)
                window[0], window[1:-1], window[-1] = tok.bos_token_id, piece, tok.eos_token_id
                windows.append(window)
        return {"input_ids": windows}

    def _record_windows(self, ids: np.ndarray) -> list[np.ndarray]:
        """`<BOS> ids <EOS>` as one stream, cut into windows of `max_seq_length` tokens overlapping by `stride`."""
        tok, length = self.tokenizer, self.max_seq_length
        stream = np.concatenate([[tok.bos_token_id], ids, [tok.eos_token_id]]).astype(np.int32)
        if len(stream) > length and self.stride >= length:
            raise ValueError(
                f"A record of {len(ids)} bases needs several windows of {length} tokens, and dataset.stride="
                f"{self.stride} would not let them advance: set dataset.stride below {length}."
            )
        return [stream[start : start + length] for start in window_starts(len(stream), length, self.stride)]
