"""Tokenizer, windowing, collators, packing and loader-state tests (CPU)."""

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import PARQUET, TOKENIZER

from data.collate import IGNORE_INDEX, BshdCollator, LabelPolicy, ThdCollator, mask_genomic_labels
from data.dna import reverse_complement, reverse_complement_ids
from data.loader import create_bshd_dataloader, create_thd_dataloader
from data.packing import BalancedPackingDataset, TokenPackingDataset
from data.windows import WindowTokenizer, byte_token_ids, is_byte_tokenizer, window_starts
from runtime.distributed import DistributedConfig

# ---- tokenizer ----


def test_tokenizer_ids_and_round_trip(tokenizer):
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.unk_token_id) == (
        0,
        1,
        2,
        3,
    )
    assert len(tokenizer) == 256 and is_byte_tokenizer(tokenizer)
    text = "ACGTNacgtRYKM\n-"
    ids = tokenizer(text)["input_ids"]
    assert ids == [2, *map(ord, text), 0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("AC\u4e00\x01G")["input_ids"] == [2, 65, 67, 3, 3, 71, 0]


def test_byte_fast_path_equals_tokenizer(tokenizer):
    rng = np.random.default_rng(0)
    alphabet = list("ACGTacgtNRYKMSW\n ") + ["\x00", "\x02", "é", "\u4e00"]
    for _ in range(20):
        text = "".join(rng.choice(alphabet, size=int(rng.integers(1, 300))))
        expected = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert byte_token_ids(text, tokenizer.unk_token_id).tolist() == expected


@pytest.mark.parametrize(
    ("n_bp", "window", "stride", "expected"),
    [(3000, 1000, 800, 12), (998, 1000, 0, 1), (999, 1000, 0, 2), (10, 1000, 500, 1)],
)
def test_window_counts(tokenizer, n_bp, window, stride, expected):
    out = WindowTokenizer(tokenizer, window, stride, "sequence")({"sequence": ["A" * n_bp]})
    assert len(out["input_ids"]) == expected
    assert all(len(w) <= window and w[0] == 2 and w[-1] == 0 for w in out["input_ids"])


def test_windows_match_hf_overflow_semantics(tokenizer):
    rng = np.random.default_rng(1)
    texts = ["".join(rng.choice(list("ACGTN"), size=n)) for n in (5, 97, 98, 99, 250, 1000, 1234)]
    fast = WindowTokenizer(tokenizer, 100, 30, "sequence")({"sequence": texts})["input_ids"]
    hf = tokenizer(texts, max_length=100, stride=30, truncation=True, return_overflowing_tokens=True)["input_ids"]
    assert [w.tolist() for w in fast] == hf
    assert list(window_starts(250, 98, 30)) == [0, 68, 136, 204]


def test_bos_eos_only_at_record_ends(tokenizer):
    """One stream `<BOS> bases <EOS>` per record cut into windows: interior windows carry neither special."""
    bases = "".join(np.random.default_rng(0).choice(list("ACGT"), size=250))
    windows = WindowTokenizer(tokenizer, 100, 20, "sequence", bos_eos_only_at_record_ends=True)(
        {"sequence": [bases, "ACGT"]})["input_ids"]  # fmt: skip
    stream = [2, *map(ord, bases), 0]  # 252 tokens: windows at 0, 80, 160 (the last reaches the end)
    assert [list(w) for w in windows[:3]] == [stream[0:100], stream[80:180], stream[160:260]]
    assert list(windows[3]) == [2, *map(ord, "ACGT"), 0]  # a record that fits one window: as before
    assert [w[0] == 2 for w in windows[:3]] == [True, False, False] and [w[-1] == 0 for w in windows[:3]] == [
        False, False, True]  # fmt: skip


def test_a_stride_that_cannot_advance_is_fine_while_records_fit_one_window(tokenizer):
    """As upstream: pre-windowed records (OpenGenome2's shards) need no stride; a longer record names the fix."""
    tokenize = WindowTokenizer(tokenizer, 100, 200, "sequence")
    windows = tokenize({"sequence": ["ACGT" * 24, "ACG"]})["input_ids"]  # 96 and 3 bases: one window each
    assert [len(w) for w in windows] == [98, 5]
    with pytest.raises(
        ValueError, match="A record of 99 bases needs several windows of 98 bases, and dataset.stride=200"
    ):
        tokenize({"sequence": ["A" * 99]})
    with pytest.raises(ValueError, match="dataset.stride=-1"):
        WindowTokenizer(tokenizer, 100, -1, "sequence")


# ---- collators ----


def _random_samples(rng, n, max_len=50):
    return [{"input_ids": rng.integers(4, 256, size=int(rng.integers(1, max_len)))} for _ in range(n)]


def test_bshd_labels_and_mask_align():
    samples = [{"input_ids": np.array([2, 65, 67, 0])}, {"input_ids": np.array([2, 71, 0])}]
    batch = BshdCollator(pad_token_id=1, pad_to_multiple_of=8)(samples)
    assert batch["input_ids"].shape == (2, 8)
    assert batch["input_ids"][1].tolist() == [2, 71, 0, 1, 1, 1, 1, 1]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][1].tolist() == [2, 71, 0] + [IGNORE_INDEX] * 5
    assert torch.equal(batch["labels"] != IGNORE_INDEX, batch["attention_mask"].bool())


@pytest.mark.parametrize("pad_to_multiple_of", [None, 16])
def test_thd_invariants_on_random_inputs(pad_to_multiple_of):
    rng = np.random.default_rng(2)
    collate = ThdCollator(pad_token_id=1, pad_to_multiple_of=pad_to_multiple_of)
    for _ in range(200):
        samples = _random_samples(rng, int(rng.integers(1, 8)))
        batch = collate(samples)
        lengths = [len(s["input_ids"]) for s in samples]
        cu, total = batch["cu_seq_lens_q"], batch["input_ids"].shape[1]
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == total
        assert torch.equal(cu, batch["cu_seq_lens_k"])
        assert torch.diff(cu).tolist()[: len(lengths)] == lengths
        assert batch["max_length_q"] == batch["max_length_k"] == int(torch.diff(cu).max())
        if pad_to_multiple_of:
            assert total % 16 == 0 and total - sum(lengths) < 16
        else:
            assert total == sum(lengths)
        flat = np.concatenate([s["input_ids"] for s in samples])
        assert batch["input_ids"][0, : len(flat)].tolist() == flat.tolist()
        labels = batch["labels"][0]
        # The first label of every sequence is masked: no prediction crosses a boundary.
        assert (labels[cu[:-1].long()] == IGNORE_INDEX).all()
        assert (labels[len(flat) :] == IGNORE_INDEX).all()
        inner = torch.ones(total, dtype=torch.bool)
        inner[cu[:-1].long()] = False
        inner[len(flat) :] = False
        assert torch.equal(labels[inner], batch["input_ids"][0][inner])
        starts = torch.repeat_interleave(cu[:-1], torch.diff(cu)).long()
        assert torch.equal(batch["position_ids"][0], torch.arange(total) - starts)


def test_thd_padded_sequences_for_context_parallel():
    samples = [{"input_ids": np.arange(4, 9)}, {"input_ids": np.arange(4, 7)}]  # lengths 5 and 3
    batch = ThdCollator(pad_token_id=1, pad_sequences_to_be_divisible_by=4)(samples)
    assert batch["cu_seq_lens_q"].tolist() == [0, 5, 8]
    assert batch["cu_seq_lens_q_padded"].tolist() == [0, 8, 12]
    assert batch["pad_between_seqs"] is True
    assert batch["input_ids"][0].tolist() == [4, 5, 6, 7, 8, 1, 1, 1, 4, 5, 6, 1]
    assert (batch["labels"][0, [0, 5, 6, 7, 8, 11]] == IGNORE_INDEX).all()


def test_genomic_label_masking():
    ids = np.array([ord(c) for c in "ACgtNRa"] + [0, 2], dtype=np.int64)
    out = mask_genomic_labels(ids.copy(), uppercase_labels=True, mask_degenerate_bases=True, eos_id=0)
    assert out.tolist() == [65, 67, 71, 84, -100, -100, 65, 0, -100]
    out = mask_genomic_labels(ids.copy(), uppercase_labels=False, mask_degenerate_bases=True, eos_id=0)
    assert out.tolist() == [65, 67, 103, 116, -100, -100, 97, 0, -100]
    policy = LabelPolicy(uppercase_labels=True, mask_degenerate_bases=True)
    batch = BshdCollator(1, labels=policy)([{"input_ids": ids}])
    assert batch["input_ids"][0].tolist() == ids.tolist()  # the input keeps the characters


def test_lowercase_loss_weight_gives_soft_masked_targets_their_weight():
    """`loss_weights` beside `labels`: the weight where the data has a lowercase base, 1 elsewhere, 0 off target."""
    policy = LabelPolicy(uppercase_labels=True, mask_degenerate_bases=True, lowercase_loss_weight=0.1)
    window = np.array([2, *map(ord, "ACgtN"), 0], dtype=np.int64)
    bshd = BshdCollator(1, labels=policy)([{"input_ids": window}, {"input_ids": window[:4]}])
    expected = [0.0, 1.0, 1.0, 0.1, 0.1, 0.0, 1.0]  # <BOS> and N are no targets; <EOS> is one
    assert bshd["loss_weights"][0].tolist() == pytest.approx(expected)
    assert bshd["loss_weights"][1].tolist() == pytest.approx([0.0, 1.0, 1.0, 0.1, 0.0, 0.0, 0.0])  # padding: 0
    thd = ThdCollator(1, labels=policy)([{"input_ids": window}, {"input_ids": window}])
    assert thd["loss_weights"][0].tolist() == pytest.approx(expected * 2)  # (each sequence's first label: ignored)
    from data.batches import count_label_tokens

    assert count_label_tokens(thd) == pytest.approx(2 * sum(expected[1:]) - 0)  # the loss divisor: summed weights
    assert "loss_weights" not in BshdCollator(1, labels=LabelPolicy(uppercase_labels=True))([{"input_ids": window}])


def test_mask_eos_label_drops_eos_as_opengenome2_masks_it():
    """`dataset.mask_eos_label`: no target on <EOS> (OpenGenome2's degenerate masking drops it; ours keeps it)."""
    ids = np.array([2, *(ord(c) for c in "ACgtN"), 0], dtype=np.int64)
    og2 = LabelPolicy(mask_degenerate_bases=True, mask_eos_label=True).labels_for(ids)
    assert og2.tolist() == [-100, 65, 67, 103, 116, -100, -100]
    assert LabelPolicy(mask_degenerate_bases=True).labels_for(ids).tolist()[-1] == 0  # ours: <EOS> a target
    assert LabelPolicy(mask_eos_label=True).labels_for(ids).tolist() == [2, 65, 67, 103, 116, 78, -100]


# ---- packing ----


class _ListStream(torch.utils.data.IterableDataset):
    def __init__(self, samples):
        self.samples, self.pos = samples, 0

    def __iter__(self):
        while self.pos < len(self.samples):
            self.pos += 1
            yield self.samples[self.pos - 1]

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


@pytest.mark.parametrize("split_samples", [True, False])
def test_packing_keeps_every_token_once(split_samples):
    rng = np.random.default_rng(3)
    samples = _random_samples(rng, 300, max_len=64)
    packs = list(TokenPackingDataset(_ListStream(samples), 64, split_samples=split_samples))
    flat_in = np.concatenate([s["input_ids"] for s in samples])
    flat_out = np.concatenate([s["input_ids"] for p in packs for s in p])
    assert np.array_equal(flat_in, flat_out)
    sizes = [sum(len(s["input_ids"]) for s in p) for p in packs]
    if split_samples:
        assert all(n == 64 for n in sizes[:-1]) and 0 < sizes[-1] <= 64
    else:
        assert all(n <= 64 for n in sizes)
        assert sum(len(p) for p in packs) == len(samples)  # no sample was cut


def test_packing_state_resumes_exactly():
    rng = np.random.default_rng(4)
    samples = _random_samples(rng, 100)
    reference = list(TokenPackingDataset(_ListStream(samples), 40))
    packer = TokenPackingDataset(_ListStream(samples), 40)
    it = iter(packer)
    head = [next(it) for _ in range(7)]
    state = packer.state_dict()
    resumed = TokenPackingDataset(_ListStream(samples), 40)
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = [[s["input_ids"].tolist() for s in p] for p in head + rest]
    assert got == [[s["input_ids"].tolist() for s in p] for p in reference]


def _unique_samples(rng, n, max_len):
    """Samples whose tokens are all different numbers, so that each token can be traced."""
    lengths = rng.integers(1, max_len + 1, size=n)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return [{"input_ids": np.arange(a, a + n_tokens)} for a, n_tokens in zip(starts, lengths)]


def _costs(packs):
    return np.array([sum(len(s["input_ids"]) ** 2 for s in p) for p in packs], dtype=float)


def test_balanced_packing_keeps_every_token_once_and_the_budget():
    rng = np.random.default_rng(5)
    samples = _unique_samples(rng, 400, max_len=96)
    packs = list(BalancedPackingDataset(_ListStream(samples), 128, lookahead=16))
    tokens = np.concatenate([s["input_ids"] for p in packs for s in p])
    assert np.array_equal(np.sort(tokens), np.arange(sum(len(s["input_ids"]) for s in samples)))
    sizes = [sum(len(s["input_ids"]) for s in p) for p in packs]
    assert all(n == 128 for n in sizes[:-1]) and 0 < sizes[-1] <= 128
    for pack in packs:  # a piece of a sample is a run of its consecutive tokens
        assert all(np.array_equal(np.diff(s["input_ids"]), np.ones(len(s["input_ids"]) - 1)) for s in pack)


def test_balanced_packing_evens_out_attention_work():
    """Mixed lengths (a few long windows among short records): pack costs vary far less than in stream order."""
    rng = np.random.default_rng(6)
    lengths = np.where(rng.random(2000) < 0.2, 256, rng.integers(8, 64, size=2000))
    samples = [{"input_ids": np.arange(n)} for n in lengths]
    in_order = _costs(list(TokenPackingDataset(_ListStream(samples), 512)))[:-1]
    balanced = _costs(list(BalancedPackingDataset(_ListStream(samples), 512, lookahead=32)))[:-1]
    assert balanced.std() / balanced.mean() < 0.5 * in_order.std() / in_order.mean()
    assert balanced.max() < in_order.max()  # the costliest pack, which the other ranks wait for, is cheaper


def test_balanced_packing_state_resumes_exactly_and_no_sample_waits_too_long():
    rng = np.random.default_rng(7)
    samples = _unique_samples(rng, 150, max_len=60)
    reference = list(BalancedPackingDataset(_ListStream(samples), 40, lookahead=8))
    packer = BalancedPackingDataset(_ListStream(samples), 40, lookahead=8)
    it = iter(packer)
    head = [next(it) for _ in range(9)]
    resumed = BalancedPackingDataset(_ListStream(samples), 40, lookahead=8)
    resumed.load_state_dict(packer.state_dict())
    got = [[s["input_ids"].tolist() for s in p] for p in head + list(resumed)]
    assert got == [[s["input_ids"].tolist() for s in p] for p in reference]
    # A sample that arrived i-th enters the pool by pack i and leaves within lookahead packs of entering.
    first_seen = {}
    for k, pack in enumerate(reference):
        for piece in pack:
            first_seen.setdefault(int(piece["input_ids"][0]), k)
    for i, sample in enumerate(samples):
        start = int(sample["input_ids"][0])
        assert first_seen[start] <= i + 8 + 1, (i, first_seen[start])


def test_packing_rejects_oversized_sample_without_splitting():
    with pytest.raises(ValueError, match="does not fit max_tokens_per_batch=4"):
        list(TokenPackingDataset(_ListStream([{"input_ids": np.arange(5)}]), 4, split_samples=False))


# ---- loaders ----

LOADER_KW = dict(tokenizer_name_or_path=TOKENIZER, micro_batch_size=2, max_seq_length=256, stride=16, buffer_size=50)


def _batches_equal(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a
    )


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("make_loader", [create_bshd_dataloader, create_thd_dataloader])
def test_loader_state_round_trip(make_loader, streaming, num_workers):
    """Restoring a loader's state yields exactly the batches the uninterrupted loader yields next.

    Also across an epoch boundary (the bundled data holds ~9,600 windows of 256; we take 60 batches).
    """
    kwargs = dict(LOADER_KW, num_workers=num_workers, load_dataset_kwargs={"path": PARQUET, "streaming": streaming})
    if make_loader is create_thd_dataloader:
        kwargs["pad_to_multiple_of"] = 16
    loader, _ = make_loader(DistributedConfig(), **kwargs)
    it = iter(loader)
    for _ in range(11):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(25)]
    del it

    restored, _ = make_loader(DistributedConfig(), **kwargs)
    restored.load_state_dict(state)
    it = iter(restored)
    got = [next(it) for _ in range(25)]
    assert all(_batches_equal(a, b) for a, b in zip(got, expected))


def test_reverse_complement_prob_trains_either_strand_seeded_and_resumable():
    """Each window comes as itself or its other strand (same order as without the key), seeded, exact on resume."""
    kwargs = dict(LOADER_KW, micro_batch_size=1, num_workers=0, load_dataset_kwargs={"path": PARQUET})
    plain, _ = create_bshd_dataloader(DistributedConfig(), **kwargs)
    flipped, _ = create_bshd_dataloader(DistributedConfig(), **kwargs, reverse_complement_prob=0.5)
    pairs = [(a["input_ids"][0].numpy(), b) for a, b, _ in zip(plain, flipped, range(200))]
    same = [np.array_equal(a, b["input_ids"][0].numpy()) for a, b in pairs]
    for (window, batch), kept in zip(pairs, same):
        if not kept:
            other = reverse_complement_ids(window, bos_id=2, eos_id=0)
            assert np.array_equal(batch["input_ids"][0].numpy(), other) and torch.equal(
                batch["labels"][0], batch["input_ids"][0]
            )
    assert 0.35 < 1 - np.mean(same) < 0.65
    loader, _ = create_bshd_dataloader(DistributedConfig(), **kwargs, reverse_complement_prob=0.5)
    it = iter(loader)
    for _ in range(37):
        next(it)
    state = loader.state_dict()
    expected = [next(it) for _ in range(30)]
    restored, _ = create_bshd_dataloader(DistributedConfig(), **kwargs, reverse_complement_prob=0.5)
    restored.load_state_dict(state)
    assert all(_batches_equal(a, b) for a, b in zip(iter(restored), expected))


def test_reverse_complement_of_iupac_codes_and_soft_masked_bases():
    assert reverse_complement("ACGTRYKMBVDHSWN") == "NWSDHBVKMRYACGT"
    assert reverse_complement("acgtNnry-") == "-rynNacgt"
    window = np.array([2, *map(ord, "AAcgR"), 0])  # <BOS> ... <EOS>: the specials keep their places
    assert "".join(map(chr, reverse_complement_ids(window, 2, 0)[1:-1])) == "YcgTT"


@pytest.mark.parametrize("pad_to_multiple_of", [None, 16])
def test_packed_rows_hold_the_padded_batches_tokens_and_targets(pad_to_multiple_of):
    """`pack_rows`: a padded BSHD micro-batch comes as one packed row, one without padding as it was.

    The packed row holds the same windows, targets and target count, and no pads.
    """
    from data.batches import count_label_tokens

    kwargs = dict(LOADER_KW, num_workers=0, pad_to_multiple_of=pad_to_multiple_of, uppercase_labels=True,
                  load_dataset_kwargs={"path": PARQUET})  # fmt: skip
    padded, _ = create_bshd_dataloader(DistributedConfig(), **kwargs)
    packed, _ = create_bshd_dataloader(DistributedConfig(), **kwargs, pack_rows=True)
    kinds = set()
    for bshd, thd, _ in zip(padded, packed, range(40)):
        mask = bshd["attention_mask"].bool()
        if mask.all():  # equal windows (full ones, mostly) stay rows: TE runs its BSHD kernels on them
            kinds.add("rows")
            assert "cu_seq_lens_q" not in thd
            assert all(torch.equal(thd[k], bshd[k]) for k in ("input_ids", "labels", "attention_mask"))
            continue
        kinds.add("packed")
        lengths = mask.sum(1).tolist()
        cu = thd["cu_seq_lens_q"].tolist()
        assert [b - a for a, b in zip(cu, cu[1:])][: len(lengths)] == lengths  # one sequence per window
        real = cu[len(lengths)]
        assert cu[-1] - real < (pad_to_multiple_of or 1)  # at most the FP8 round-up, as one padding sequence
        assert torch.equal(thd["input_ids"][0, :real], bshd["input_ids"][mask])
        # Targets: what each token predicts, shifted inside its own row (BSHD) or the packed row (THD).
        bshd_targets = torch.cat([row[1:n] for row, n in zip(bshd["labels"], lengths)])
        thd_targets = thd["labels"][0, 1:real]
        thd_targets = thd_targets[thd_targets != IGNORE_INDEX]
        assert torch.equal(bshd_targets[bshd_targets != IGNORE_INDEX], thd_targets)
        assert count_label_tokens(thd) == count_label_tokens(bshd)
        assert thd["position_ids"][0, :real].tolist() == [p for n in lengths for p in range(n)]
    assert kinds == {"rows", "packed"}  # the bundled data has long records and short ones


def test_stream_crosses_epochs_and_reshuffles(tmp_path):
    path = tmp_path / "tiny.parquet"
    pq.write_table(pa.table({"sequence": ["ACGT" * (i + 1) for i in range(12)]}), path)
    kwargs = dict(LOADER_KW, micro_batch_size=1, num_workers=0, load_dataset_kwargs={"path": str(path)})
    loader, _ = create_bshd_dataloader(DistributedConfig(), **kwargs)
    seen = [len(b["input_ids"][0]) for b, _ in zip(loader, range(36))]
    epochs = [seen[i : i + 12] for i in range(0, 36, 12)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)  # every record once per epoch
    assert epochs[0] != epochs[1]  # and a new order each epoch


def test_ranks_read_disjoint_shares():
    shares = []
    for rank in range(2):
        cfg = DistributedConfig(rank=rank, local_rank=rank, world_size=2)
        kwargs = dict(
            LOADER_KW,
            micro_batch_size=1,
            num_workers=0,
            num_epochs=1,
            max_seq_length=100_000,
            load_dataset_kwargs={"path": PARQUET, "streaming": True},
        )
        loader, _ = create_bshd_dataloader(cfg, **kwargs)
        shares.append({tuple(b["input_ids"][0, :40].tolist()) for b in loader})
    n_records = pq.read_metadata(PARQUET).num_rows
    assert not shares[0] & shares[1] and len(shares[0]) + len(shares[1]) == n_records


# ---- bad input ----


def test_missing_file_names_the_path():
    with pytest.raises(FileNotFoundError, match="no_such.parquet"):
        create_bshd_dataloader(DistributedConfig(), **LOADER_KW, load_dataset_kwargs={"path": "./no_such.parquet"})


def test_missing_column_names_the_column(tmp_path):
    path = tmp_path / "wrong.parquet"
    pq.write_table(pa.table({"dna": ["ACGT"], "species": ["E. coli"]}), path)  # two text columns: which one?
    with pytest.raises(ValueError, match="no column 'sequence'.*dataset.text_column"):
        create_bshd_dataloader(DistributedConfig(), **LOADER_KW, load_dataset_kwargs={"path": str(path)})


def _windows(load_dataset_kwargs) -> list[list[int]]:
    kwargs = dict(LOADER_KW, micro_batch_size=1, num_workers=0, num_epochs=1, max_seq_length=100_000, buffer_size=1)
    loader, _ = create_bshd_dataloader(DistributedConfig(), **kwargs, load_dataset_kwargs=load_dataset_kwargs)
    return [b["input_ids"][0].tolist() for b in loader]


@pytest.mark.parametrize("streaming", [True, False])
@pytest.mark.parametrize("kind", ["csv", "tsv", "jsonl", "csv-builder"])
def test_csv_tsv_json_with_extra_columns_give_the_parquet_windows(tmp_path, kind, streaming, caplog):
    """The same windows as the parquet of the same records, whatever else the file holds.

    Other columns are dropped (a stream's unknown columns once broke the map: "Column lengths mismatch"); a
    file without `sequence` but with a `text` column uses it, with a warning.
    """
    table = pq.read_table(PARQUET).slice(0, 12)
    records = table.column("sequence").to_pylist()
    column = "text" if kind == "jsonl" else "sequence"
    frame = pa.table({"id": list(range(len(records))), column: records, "length": [len(r) for r in records]})
    path = tmp_path / f"data.{kind.split('-')[0]}"
    if kind == "jsonl":
        frame.to_pandas().to_json(path, orient="records", lines=True)
    else:
        frame.to_pandas().to_csv(path, index=False, sep="\t" if kind == "tsv" else ",")
    source = {"path": "csv", "data_files": str(path)} if kind == "csv-builder" else {"path": str(path)}
    expected = {"path": str(tmp_path / "same.parquet"), "streaming": streaming}
    pq.write_table(pa.table({"sequence": records}), expected["path"])
    with caplog.at_level(logging.WARNING):
        assert _windows({**source, "streaming": streaming}) == _windows(expected)
    assert ("using its text column 'text'" in caplog.text) == (kind == "jsonl")


@pytest.mark.parametrize("streaming", [True, False])
def test_empty_dataset_is_an_error(tmp_path, streaming):
    path = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"sequence": pa.array([], pa.string())}), path)
    with pytest.raises(ValueError, match="has no records"):
        create_bshd_dataloader(
            DistributedConfig(), **LOADER_KW, load_dataset_kwargs={"path": str(path), "streaming": streaming}
        )


def test_blank_records_are_skipped_and_counted(tmp_path, caplog):
    path = tmp_path / "blank.parquet"
    pq.write_table(pa.table({"sequence": ["ACGT", "", "   \n", "GGCC"]}), path)
    kwargs = dict(LOADER_KW, micro_batch_size=1, num_workers=0, num_epochs=1)
    loader, _ = create_bshd_dataloader(DistributedConfig(), **kwargs, load_dataset_kwargs={"path": str(path)})
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    assert len(batches) == 2
    assert "Skipped 2 empty or whitespace-only records" in caplog.text
