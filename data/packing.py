"""Packing: windows laid end to end into micro-batches of an exact token budget (THD, `use_sequence_packing`).

    packs = TokenPackingDataset(windows, max_tokens_per_batch=16384)                 # in stream order
    packs = BalancedPackingDataset(windows, max_tokens_per_batch=16384, lookahead=64) # even attention work

Both yield lists of `{"input_ids": window}` that fill the budget exactly (a window that overflows is split,
its tail opens the next pack); the THD collator turns each list into one packed row. Both resume exactly.

`dataset.packing_lookahead`: packs hold the same number of tokens but not the same attention work (a
pack of two 8k windows costs 2 x 8192^2 in attention, one of many short records far less), and
data-parallel ranks wait for the rank with the costliest pack at every step. `BalancedPackingDataset`
keeps `lookahead` windows of its rank's stream in a pool and builds each pack from the longest window in
the pool plus the shortest ones until the budget is full, so packs, and ranks, carry similar attention
work without any communication. A window that has waited `lookahead` packs is taken first, so none waits
longer. `scripts/benchmark_pack_balance.py` measures the effect on the loader's real packs.
"""

import numpy as np
from torch.utils.data import IterableDataset


class TokenPackingDataset(IterableDataset):
    """Groups a stream of samples into micro-batches of exactly `max_tokens_per_batch` tokens.

    With `split_samples` (the default) the sample that overflows a batch is split: its head fills
    the batch and its tail starts the next one, so every token is used exactly once and every full
    batch has the same size (a multiple of 16 if the budget is, as FP8 needs). Without it, a sample
    that does not fit starts the next batch (batches are then at most the budget; a sample longer
    than the budget is an error). The last batch of a finite stream may be short.

    Exactly resumable under `torchdata.stateful_dataloader.StatefulDataLoader`: the state is the
    inner dataset's state plus the carried-over tail.
    """

    def __init__(self, dataset, max_tokens_per_batch: int, split_samples: bool = True):
        if max_tokens_per_batch < 1:
            raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens_per_batch}.")
        self.dataset = dataset
        self.max_tokens_per_batch = max_tokens_per_batch
        self.split_samples = split_samples
        self._carry: np.ndarray | None = None  # tokens taken from the inner stream, not yet yielded

    def __iter__(self):
        budget = self.max_tokens_per_batch
        batch, n_tokens = [], 0
        source = iter(self.dataset)
        while True:
            if self._carry is None:
                try:
                    self._carry = np.asarray(next(source)["input_ids"])
                except StopIteration:
                    break
            sample = self._carry
            room = budget - n_tokens
            if len(sample) <= room:
                batch.append({"input_ids": sample})
                n_tokens += len(sample)
                self._carry = None
            elif self.split_samples:
                batch.append({"input_ids": sample[:room]})
                n_tokens = budget
                self._carry = sample[room:]
            elif len(sample) > budget:
                raise ValueError(
                    f"A sample of {len(sample)} tokens does not fit max_tokens_per_batch={budget}; "
                    "raise the budget, lower dataset.max_seq_length, or enable sample splitting."
                )
            else:
                n_tokens = budget  # close this batch; the sample opens the next one
            if n_tokens == budget:
                out, batch, n_tokens = batch, [], 0
                yield out
        if batch:
            yield batch

    def state_dict(self) -> dict:
        """The inner stream's state and the tokens carried over into the next batch."""
        # A partly built batch is never part of the state: the snapshot is taken between batches.
        return {"dataset": self.dataset.state_dict(), "carry": None if self._carry is None else self._carry.copy()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`."""
        self.dataset.load_state_dict(state["dataset"])
        self._carry = state["carry"]


class BalancedPackingDataset(IterableDataset):
    """Micro-batches of exactly `max_tokens_per_batch` tokens, chosen from `lookahead` samples ahead."""

    def __init__(self, dataset, max_tokens_per_batch: int, lookahead: int):
        if max_tokens_per_batch < 1 or lookahead < 1:
            raise ValueError(f"max_tokens_per_batch={max_tokens_per_batch} and lookahead={lookahead} must be >= 1.")
        self.dataset = dataset
        self.max_tokens_per_batch = max_tokens_per_batch
        self.lookahead = lookahead
        self._pool: list[list] = []  # [tokens, packs waited], in arrival order

    def __iter__(self):
        source, exhausted = iter(self.dataset), False
        while True:
            while not exhausted and len(self._pool) < self.lookahead:
                try:
                    self._pool.append([np.asarray(next(source)["input_ids"]), 0])
                except StopIteration:
                    exhausted = True
            if not self._pool:
                return
            batch = self._take_pack()
            for item in self._pool:
                item[1] += 1
            yield batch

    def _next_index(self, first: bool) -> int:
        """The oldest overdue sample; else the longest to open a pack, the shortest to fill it."""
        overdue = [i for i, (_, waited) in enumerate(self._pool) if waited >= self.lookahead]
        if overdue:
            return max(overdue, key=lambda i: self._pool[i][1])
        lengths = [len(tokens) for tokens, _ in self._pool]
        return int(np.argmax(lengths) if first else np.argmin(lengths))

    def _take_pack(self) -> list[dict]:
        batch, room = [], self.max_tokens_per_batch
        while room and self._pool:
            i = self._next_index(first=not batch)
            tokens = self._pool[i][0]
            if len(tokens) <= room:
                batch.append({"input_ids": tokens})
                room -= len(tokens)
                self._pool.pop(i)
            else:  # split: the head fills the pack, the tail stays in the pool
                batch.append({"input_ids": tokens[:room]})
                self._pool[i][0] = tokens[room:]
                room = 0
        return batch

    def state_dict(self) -> dict:
        """The inner stream's state and the pool (taken between batches)."""
        return {"dataset": self.dataset.state_dict(), "pool": [[t.copy(), w] for t, w in self._pool]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a `state_dict()`."""
        self.dataset.load_state_dict(state["dataset"])
        self._pool = [[np.asarray(t), w] for t, w in state["pool"]]
