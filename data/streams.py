"""Data streams: the unit of data order that outlives a change in the number of ranks.

    loader = StreamLoader(build_stream, num_streams=cfg.dataset.data_streams or world_size, rank, world_size)

Stream s of S is exactly the loader rank s of S ranks builds (its share of the records, its shuffle seed,
its workers, its packing), so with S equal to the number of ranks, the default, each rank has one stream
and nothing differs from a plain loader. S is fixed when a run starts and kept by every resume; rank r of W
owns streams r, r + W, r + 2W, ... and takes one micro-batch from each in turn. A checkpoint holds every
stream's position (its loader's state): a run resumed on W' ranks hands the S streams out anew and each
continues where it stood, so no window is trained twice and none is skipped, at any W' <= S. (To grow past
the starting number of ranks later, start with `dataset.data_streams` set to the most you will use.)
What this costs: a rank with k streams runs k loaders (k x `dataset.num_workers` processes) and reads
k/S of the data, as k ranks would.
"""

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)


class StreamLoader:
    """One rank's micro-batches from its data streams, in turn; its state is every stream's position."""

    def __init__(self, build_stream: Callable[[int, int], object], num_streams: int, rank: int, world_size: int):
        """`build_stream(s, S)`: the loader of stream s of S (a `StatefulDataLoader`)."""
        self.build_stream, self.rank, self.world_size = build_stream, rank, world_size
        self.assign(num_streams)

    def assign(self, num_streams: int) -> None:
        """Own streams rank, rank + world_size, ... of `num_streams` (built anew)."""
        if num_streams < self.world_size:
            raise ValueError(
                f"This run's data is {num_streams} streams (dataset.data_streams, fixed when the run started) and "
                f"it now has {self.world_size} ranks: a rank would have no data. Resume on at most {num_streams} "
                "ranks, or start a run with dataset.data_streams set to the most ranks it will use."
            )
        self.num_streams = num_streams
        self.streams = list(range(self.rank, num_streams, self.world_size))
        self.loaders = {s: self.build_stream(s, num_streams) for s in self.streams}
        self.turn = 0  # index into self.streams of the stream the next micro-batch comes from

    def __iter__(self):
        iterators = {s: iter(loader) for s, loader in self.loaders.items()}
        yielded = set()
        while iterators:
            stream = self.streams[self.turn % len(self.streams)]
            self.turn = (self.turn + 1) % len(self.streams)  # before the yield: a state saved now resumes after it
            if stream not in iterators:
                continue
            batch = next(iterators[stream], None)
            if batch is None:  # a finite stream (num_epochs) has ended, or an empty one: the others go on
                del iterators[stream]
                if stream not in yielded and len(self.streams) > 1:
                    logger.warning(
                        "Data stream %d of %d has no data (fewer files, row groups or records than streams?): "
                        "this rank trains on its other streams.",
                        stream,
                        self.num_streams,
                    )
                continue
            yielded.add(stream)
            yield batch

    def state_dict(self) -> dict:
        """The number of streams, whose turn is next, and each owned stream's loader state."""
        return {
            "num_streams": self.num_streams,
            "turn": self.turn,
            "streams": {s: loader.state_dict() for s, loader in self.loaders.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from this rank's own `state_dict()` (same ranks, same streams)."""
        state = as_stream_state(state, self.rank, self.world_size)
        self.resume_streams(state["streams"], state["num_streams"], state["turn"])

    def resume_streams(self, states: dict, num_streams: int, turn: int = 0) -> None:
        """Continue streams saved by any number of ranks: `states` maps each stream to its loader state."""
        if num_streams != self.num_streams:  # the run's streams were fixed when it started: the checkpoint's win
            logger.info(
                "Data: resuming the checkpoint's %d data streams (this run was set up with %d; "
                "dataset.data_streams applies to a run's start only).",
                num_streams,
                self.num_streams,
            )
            self.assign(num_streams)
        missing = [s for s in self.streams if s not in states]
        if missing:
            raise ValueError(f"The checkpoint holds no position for data stream(s) {missing} of {num_streams}.")
        for stream in self.streams:
            self.loaders[stream].load_state_dict(states[stream])
        self.turn = turn % len(self.streams)


def as_stream_state(state: dict, rank: int, world_size: int) -> dict:
    """A rank's saved loader state as stream states; a plain loader's (one stream per rank) is stream `rank`."""
    if "streams" in state and "num_streams" in state:
        return state
    return {"num_streams": world_size, "turn": 0, "streams": {rank: state}}


def merge_stream_states(rank_states: list[dict]) -> dict:
    """The stream states of every rank's file (rank i's at index i), as one: what a resume on any ranks reads."""
    merged = {"num_streams": None, "turn": 0, "streams": {}}
    for rank, state in enumerate(rank_states):
        state = as_stream_state(state, rank, len(rank_states))
        merged["num_streams"] = state["num_streams"]
        merged["streams"].update(state["streams"])
    return merged
