"""Baselines for bits per base: k-mer Markov models fitted on training records, scored like a language model.

    python evaluate.py --model markov:5 --train-data train.fa.gz --data held_out.fa.gz    # order 5
    python evaluate.py --model markov:0 --train-data train.fa.gz --data held_out.fa.gz    # base composition

A Markov model of order k predicts each base from the k before it: p(b | context) = (count(context b) +
alpha) / (count(context) + 4 alpha) over A, C, G, T (contexts read case-insensitively; a context with a
non-ACGT character, or shorter than k at a window's start, backs off to the longest clean suffix). It
gives log-probabilities for exactly the targets `evaluate.py` scores, through the same code path as a
model (`token_log_probs`), so the figures compare on the same windows. Order 0 is base composition
(about 2 bits per base).
"""

import numpy as np
from tqdm import tqdm

from data.dna import BASE_IDS_ANY_CASE, BASES
from data.sources import load_tokenizer, read_records
from runtime.paths import RECIPE_DIR

BASE_INDEX = np.full(256, -1, dtype=np.int64)  # id -> 0..3 for A, C, G, T (either case), -1 for anything else
BASE_INDEX[BASE_IDS_ANY_CASE] = np.tile(np.arange(len(BASES)), 2)


def load_baseline(spec: str, train_data: str | None, text_column: str = "sequence"):
    """`markov:K` fitted on the records of `train_data`, and the nucleotide tokenizer: a `(model, tokenizer)`."""
    if not train_data:
        raise ValueError(f"--model {spec} needs --train-data (the records to count k-mers in).")
    order = spec.split(":", 1)[1]
    if not order.isdigit():
        raise ValueError(f"--model {spec}: the Markov order must be a whole number, as in markov:5.")
    records = read_records(train_data, text_column, option="--train-data")
    model = MarkovModel(int(order)).fit(seq for _, seq in tqdm(records, desc=f"counting {order}-mers", unit=" rec"))
    return model, load_tokenizer(str(RECIPE_DIR / "tokenizers" / "nucleotide_fast_tokenizer"))


class MarkovModel:
    """Base counts per context for every order up to `order` (lower orders back off a context's start)."""

    def __init__(self, order: int, alpha: float = 1.0):
        self.order, self.alpha = order, alpha
        self.counts = [np.zeros((4**k, 4), dtype=np.float64) for k in range(order + 1)]

    def fit(self, sequences) -> "MarkovModel":
        """Count (context, next base) pairs of every order in `sequences` (strings)."""
        for sequence in sequences:
            idx = BASE_INDEX[np.frombuffer(sequence.encode("latin-1", "replace"), dtype=np.uint8)]
            for k, (contexts, valid) in enumerate(_context_codes(idx, self.order)):
                ok = valid & (idx >= 0)
                pairs = contexts[ok] * 4 + idx[ok]  # bincount, not np.add.at: the same counts, far faster
                self.counts[k] += np.bincount(pairs, minlength=4 ** (k + 1)).reshape(-1, 4)
        return self

    def log_probs(self, ids: np.ndarray) -> np.ndarray:
        """Log p(ids[t] | ids[:t]) for t = 1..n-1, as a language model's `token_log_probs` gives them.

        Non-ACGT targets get log(1/256) (they do not count in bits per base).
        """
        idx = BASE_INDEX[ids]
        out = np.full(len(ids) - 1, np.log(1 / 256))
        targets = idx[1:]
        done = np.zeros(len(targets), dtype=bool)
        codes = list(_context_codes(idx, self.order))
        for k in range(self.order, -1, -1):  # the longest clean context first
            contexts, valid = codes[k]
            use = valid[1:] & (targets >= 0) & ~done
            table = self.counts[k][contexts[1:][use]]
            probs = (table[np.arange(use.sum()), targets[use]] + self.alpha) / (table.sum(1) + 4 * self.alpha)
            out[use] = np.log(probs)
            done |= use
        return out


def _context_codes(idx: np.ndarray, order: int):
    """For k = 0..order: each position t's code of bases t-k..t-1 (base 4) and whether all k are A/C/G/T.

    Each order is built on the one before (one pass over `idx` per order).
    """
    n = len(idx)
    codes, valid = np.zeros(n, dtype=np.int64), np.ones(n, dtype=bool)
    yield codes, valid
    for j in range(1, order + 1):
        shifted = np.full(n, -1, dtype=np.int64)
        shifted[j:] = idx[:-j]
        codes = codes + np.where(shifted >= 0, shifted, 0) * 4 ** (j - 1)
        valid = valid & (shifted >= 0)
        yield codes, valid
