"""Packs with even attention work: `dataset.packing_lookahead` (THD).

Packed micro-batches hold the same number of tokens but not the same attention work: a pack of two
8k windows costs 2 x 8192^2 in attention, one of many short records far less. Data-parallel ranks then
wait for the rank with the costliest pack at every step. `BalancedPackingDataset` keeps `lookahead`
windows of its rank's stream in a pool and builds each pack from the longest window in the pool plus the
shortest ones until the token budget is exactly full (the last one split, its tail back into the pool).
Every pack then holds about one long sequence and short ones, so packs, and ranks, carry similar attention
work without any communication. A window that has waited `lookahead` packs is taken first, so none waits
longer. Every token is used exactly once, and the state (the stream's state, the pool and its ages)
resumes exactly. `scripts/benchmark_pack_balance.py` measures the effect on the loader's real packs.
"""

import numpy as np
from torch.utils.data import IterableDataset


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
