"""Data streams (`dataset.data_streams`, data/streams.py): resuming on another number of ranks continues the data.

The multiset of windows a run trains on, stopped and resumed on fewer or more ranks, equals an uninterrupted
run's, for BSHD micro-batches, THD packs and balanced packs; on the same ranks a resume is exact, batch for batch.
"""

from collections import Counter

import pytest
import torch
from conftest import build_loader, make_cfg

from config.checks import validate_config
from data.streams import StreamLoader, merge_stream_states
from runtime.distributed import DistributedConfig

LAYOUTS = {
    "bshd": [],
    "thd": ["use_sequence_packing=true"],
    "thd-lookahead": ["use_sequence_packing=true", "dataset.packing_lookahead=4"],
}


def pieces(batch: dict) -> list[tuple]:
    """The windows (or, in THD packs, the pieces of windows) of a micro-batch, as token tuples."""
    ids = batch["input_ids"]
    if "cu_seq_lens_q" in batch:
        bounds = batch["cu_seq_lens_q"].tolist()
        return [tuple(ids[0, a:b].tolist()) for a, b in zip(bounds, bounds[1:]) if b > a]
    return [tuple(row[mask.bool()].tolist()) for row, mask in zip(ids, batch["attention_mask"])]


def loaders(cfg, world_size: int) -> list:
    return [build_loader(cfg, DistributedConfig(rank, rank, world_size))[0] for rank in range(world_size)]


def train(ranks: list, steps: int, seen: Counter) -> None:
    """`steps` steps: one micro-batch per rank each, its windows counted in `seen`."""
    iterators = [iter(loader) for loader in ranks]
    for _ in range(steps):
        for it in iterators:
            seen.update(pieces(next(it)))


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("resume_on", [1, 3])
def test_resume_on_other_rank_counts_trains_each_window_once(tmp_path, layout, resume_on):
    """6 streams: 2 ranks for 3 steps then `resume_on` ranks == 2 ranks for 6 steps (each stream 2 micro-batches)."""
    cfg = make_cfg(tmp_path, *LAYOUTS[layout], "dataset.data_streams=6")
    straight = Counter()
    train(loaders(cfg, 2), 6, straight)

    resumed, first = Counter(), loaders(cfg, 2)
    train(first, 3, resumed)
    saved = [loader.state_dict() for loader in first]  # what each rank's checkpoint file holds
    merged = merge_stream_states(saved)
    assert merged["num_streams"] == 6 and sorted(merged["streams"]) == list(range(6))
    again = loaders(make_cfg(tmp_path, *LAYOUTS[layout]), resume_on)  # data_streams unset: the checkpoint's wins
    for loader in again:
        loader.resume_streams(merged["streams"], merged["num_streams"])
    assert sorted(s for loader in again for s in loader.streams) == list(range(6))
    train(again, 6 // resume_on, resumed)
    assert resumed == straight
    assert sum(straight.values()) > 12  # windows, not just micro-batches


@pytest.mark.parametrize("num_workers", [0, 1])
def test_more_streams_than_ranks_resume_exactly_on_the_same_ranks(tmp_path, num_workers):
    layout = ["use_sequence_packing=true", "dataset.data_streams=3", f"dataset.num_workers={num_workers}"]
    cfg = make_cfg(tmp_path, *layout)
    reference = iter(build_loader(cfg)[0])
    expected = [next(reference) for _ in range(8)]
    loader = build_loader(cfg)[0]
    it = iter(loader)
    head = [next(it) for _ in range(4)]
    state = loader.state_dict()
    assert state["num_streams"] == 3 and state["turn"] == 1  # streams 0, 1, 2, 0 used: stream 1 is next
    resumed = build_loader(cfg)[0]
    resumed.load_state_dict(state)
    tail = iter(resumed)
    got = head + [next(tail) for _ in range(4)]
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(got, expected))


def test_one_stream_per_rank_is_the_plain_loader_and_reads_its_old_state(tmp_path):
    """The default: each rank's one stream is the loader it always had; a checkpoint of that loader loads."""
    cfg = make_cfg(tmp_path)
    loader = build_loader(cfg)[0]
    assert loader.streams == [0] and loader.num_streams == 1
    child = loader.loaders[0]
    it = iter(loader)
    [next(it) for _ in range(3)]
    plain_state = child.state_dict()  # what checkpoints before data streams held
    expected = next(it)
    resumed = build_loader(cfg)[0]
    resumed.load_state_dict(plain_state)
    assert torch.equal(next(iter(resumed))["input_ids"], expected["input_ids"])


def test_data_streams_must_be_positive_and_needs_loader_state(tmp_path):
    with pytest.raises(ValueError, match="dataset.data_streams=0 must be a positive integer"):
        validate_config(make_cfg(tmp_path, "dataset.data_streams=0"), use_te=False)
    with pytest.raises(ValueError, match="needs dataset.use_stateful_dataloader=true"):
        build_loader(make_cfg(tmp_path, "dataset.data_streams=2", "dataset.use_stateful_dataloader=false"))


def test_more_ranks_than_streams_is_refused_with_the_fix():
    """A checkpoint of 2 streams resumed on 3 ranks: the third would have no data."""
    with pytest.raises(ValueError, match=r"2 streams .* now has 3 ranks.*Resume on at most 2 ranks"):
        StreamLoader(lambda stream, streams: object(), 2, rank=0, world_size=3)
