"""Context-parallel sharding on the CPU: which tokens each CP rank keeps, and that no target is lost."""

import numpy as np
import pytest
import torch
from conftest import RECIPE_DIR, build_loader
from hydra import compose, initialize_config_dir

from config.checks import validate_cp_config
from data.batches import count_label_tokens
from data.collate import IGNORE_INDEX, BshdCollator, ThdCollator, cp_shard_indices, shard_batch_for_cp
from runtime.distributed import DistributedConfig


def random_sequences(seed: int, n: int = 6) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(4, 256, rng.integers(1, 90))} for _ in range(n)]


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_each_rank_takes_chunk_r_and_its_mirror(cp_size):
    bounds = np.array([0, 8 * cp_size, 8 * cp_size + 4 * cp_size])  # two sequences, chunks of 4 and 2
    shares = [cp_shard_indices(bounds, cp_size, r) for r in range(cp_size)]
    assert sorted(np.concatenate(shares).tolist()) == list(range(bounds[-1]))  # every position exactly once
    assert len({len(s) for s in shares}) == 1  # equal work
    chunk = 8 * cp_size // (2 * cp_size)
    for r, share in enumerate(shares):
        first_sequence = share[: 2 * chunk]
        expected = [
            *range(r * chunk, (r + 1) * chunk),
            *range((2 * cp_size - 1 - r) * chunk, (2 * cp_size - r) * chunk),
        ]
        assert first_sequence.tolist() == expected


def test_indivisible_sequence_names_the_fix():
    with pytest.raises(ValueError, match="pad_sequences_to_be_divisible_by"):
        cp_shard_indices(np.array([0, 6]), 2, 0)


def reassemble(shards: list[dict], key: str, indices: list[np.ndarray], length: int) -> torch.Tensor:
    full = torch.full((shards[0][key].shape[0], length), -12345, dtype=torch.long)
    for shard, index in zip(shards, indices):
        full[:, torch.from_numpy(index)] = shard[key]
    return full


@pytest.mark.parametrize("cp_size", [1, 2, 4])
@pytest.mark.parametrize("seed", range(5))
def test_thd_shards_rebuild_the_batch_and_keep_every_target(cp_size, seed):
    batch = ThdCollator(pad_token_id=1, pad_sequences_to_be_divisible_by=2 * cp_size)(random_sequences(seed))
    shards = [shard_batch_for_cp(batch, cp_size, r) for r in range(cp_size)]
    total = batch["input_ids"].shape[1]
    indices = [cp_shard_indices(batch["cu_seq_lens_q_padded"].numpy(), cp_size, r) for r in range(cp_size)]
    assert torch.equal(reassemble(shards, "input_ids", indices, total), batch["input_ids"])
    # the target of position t is the token at t + 1, even when t + 1 sits in another rank's chunk
    shifted = reassemble(shards, "shift_labels", indices, total)
    assert torch.equal(shifted[:, :-1], batch["labels"][:, 1:]) and shifted[0, -1] == IGNORE_INDEX
    assert sum(count_label_tokens(s) for s in shards) == count_label_tokens(batch)
    for shard in shards:  # TE gets the global boundaries and divides them by cp_size itself
        assert torch.equal(shard["cu_seq_lens_q_padded"], batch["cu_seq_lens_q_padded"])
        assert shard["max_length_q"] == batch["max_length_q"] and "labels" not in shard


@pytest.mark.parametrize("cp_size", [1, 2, 4])
def test_bshd_shards_rebuild_the_batch_and_keep_every_target(cp_size):
    batch = BshdCollator(pad_token_id=1, pad_to_multiple_of=2 * cp_size)(random_sequences(7, n=3))
    length = batch["input_ids"].shape[1]
    shards = [shard_batch_for_cp(batch, cp_size, r) for r in range(cp_size)]
    indices = [cp_shard_indices(np.array([0, length]), cp_size, r) for r in range(cp_size)]
    assert torch.equal(reassemble(shards, "input_ids", indices, length), batch["input_ids"])
    shifted = reassemble(shards, "shift_labels", indices, length)
    assert torch.equal(shifted[:, :-1], batch["labels"][:, 1:])
    assert sum(count_label_tokens(s) for s in shards) == count_label_tokens(batch)
    assert all("attention_mask" not in s for s in shards)  # right padding + causal mask: pads are never seen


def cp_cfg(*overrides):
    with initialize_config_dir(config_dir=str(RECIPE_DIR / "hydra_config"), version_base="1.2"):
        return compose(config_name="L0_sanity_cp", overrides=["dataset.num_workers=0", *overrides])


@pytest.mark.parametrize(("fp8", "divisor"), [(False, 4), (True, 32)])
def test_cp_loader_pads_sequences_for_the_chunks(fp8, divisor):
    """2 x cp chunks per sequence; with FP8 each rank's chunks also hold a multiple of 16 tokens."""
    cfg = cp_cfg(f"fp8_config.enabled={fp8}", "dataset.max_seq_length=300", "dataset.micro_batch_size=3")
    loader, _ = build_loader(cfg, DistributedConfig(0, 0, 1), cp_size=2)
    for batch, _ in zip(loader, range(10)):
        lengths = np.diff(batch["cu_seq_lens_q_padded"].numpy())
        assert (lengths % divisor == 0).all()
        for rank in range(2):
            assert shard_batch_for_cp(batch, 2, rank)["input_ids"].shape[1] % (divisor // 2) == 0


def test_cp_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="needs the TE model"):
        validate_cp_config(cp_cfg(), use_te=False, world_size=2)
    with pytest.raises(
        ValueError, match=r"cp_size=2 must be a positive integer that divides the number of ranks \(3\)"
    ):
        validate_cp_config(cp_cfg(), use_te=True, world_size=3)
    validate_cp_config(cp_cfg(), use_te=True, world_size=4)  # dp 2 x cp 2


def test_cp_size_one_keeps_every_token_of_any_length():
    batch = ThdCollator(pad_token_id=1)(random_sequences(3))  # odd lengths, no CP padding
    shard = shard_batch_for_cp(batch, 1, 0)
    assert torch.equal(shard["input_ids"], batch["input_ids"])
    assert torch.equal(shard["shift_labels"][:, :-1], batch["labels"][:, 1:])


@pytest.mark.parametrize("packing", [True, False])
def test_cp_loader_yields_each_ranks_shard(packing):
    """With `cp_rank` the loader itself shards: the same shards as sharding the unsharded loader's batches.

    Sharding runs in the loader's workers, so that the loader pins the shards.
    """
    cfg = cp_cfg(f"use_sequence_packing={packing}", "dataset.max_seq_length=300", "dataset.num_workers=1")
    full, _ = build_loader(cfg, DistributedConfig(0, 0, 1), cp_size=2)
    shards = [build_loader(cfg, DistributedConfig(0, 0, 1), cp_size=2, cp_rank=r)[0] for r in range(2)]
    for batch, rank0, rank1, _ in zip(full, *shards, range(5)):
        for rank, shard in enumerate((rank0, rank1)):
            expected = shard_batch_for_cp(batch, 2, rank)
            assert shard.keys() == expected.keys()
            assert all(torch.equal(shard[k], expected[k]) for k in expected if torch.is_tensor(expected[k]))


@pytest.mark.parametrize("cp_size", [2, 4])
def test_loss_weights_are_shifted_and_sharded_with_the_labels(cp_size):
    """Each CP rank's `shift_loss_weights` weigh its `shift_labels`; the shards' summed weights make the whole's."""
    from data.collate import LabelPolicy

    rng = np.random.default_rng(5)
    samples = [{"input_ids": rng.choice([65, 67, 97, 99], size=rng.integers(5, 60))} for _ in range(4)]
    policy = LabelPolicy(lowercase_loss_weight=0.25)
    batch = ThdCollator(pad_token_id=1, pad_sequences_to_be_divisible_by=2 * cp_size, labels=policy)(samples)
    shards = [shard_batch_for_cp(batch, cp_size, r) for r in range(cp_size)]
    assert sum(count_label_tokens(s) for s in shards) == pytest.approx(count_label_tokens(batch).item())
    for shard in shards:
        weights, targets = shard["shift_loss_weights"], shard["shift_labels"]
        assert ((weights == 0) == (targets == IGNORE_INDEX)).all()  # a weight exactly where there is a target
        lowercase = (targets >= ord("a")) & (targets <= ord("z"))
        assert (
            torch.allclose(weights[lowercase], torch.tensor(0.25))
            and (weights[~lowercase & (targets >= 0)] == 1).all()
        )
