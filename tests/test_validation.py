"""Validation during training: held-out records never trained on, a fixed window set, bits per base by hand."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TOKENIZER, build_model, build_validator, make_cfg
from test_fasta import write_fasta

import train_fsdp2
from checkpointing.run_record import read_run_info
from data.dna import reverse_complement
from data.loader import create_tokenized_dataset
from data.sources import load_tokenizer
from runtime.distributed import DistributedConfig
from training.validation_loss import validation_windows

RNG = np.random.default_rng(0)
# Random records: a window of one never occurs in another, so a window tells which record it came from.
RECORDS = ["".join(RNG.choice(list("ACGT"), size=int(n))) for n in RNG.integers(300, 3000, size=60)]


@pytest.fixture
def genome(tmp_path):
    path = tmp_path / "genome.fa"
    write_fasta(path, RECORDS)
    return path


def record_of(window) -> int:
    text = "".join(map(chr, window[1:-1]))
    (index,) = [i for i, r in enumerate(RECORDS) if text in r]
    return index


def val_cfg(tmp_path, genome, *overrides):
    return make_cfg(tmp_path, f"dataset.load_dataset_kwargs.path={genome}", "validation.enabled=true",
                    "validation.fraction=0.2", "validation.num_windows=20", *overrides)  # fmt: skip


def test_held_out_records_never_reach_training_on_any_rank(tmp_path, genome):
    cfg = val_cfg(tmp_path, genome)
    tokenizer = load_tokenizer(TOKENIZER)
    validation = {record_of(w) for w in validation_windows(cfg.validation, cfg.dataset, tokenizer)}
    trained = set()
    for rank in range(2):
        ds = create_tokenized_dataset(DistributedConfig(rank, 0, 2), tokenizer, {"path": str(genome)}, 256, 16,
                                      holdout_fraction=0.2)  # fmt: skip
        trained |= {record_of(w["input_ids"]) for w in ds}
    assert validation and not validation & trained
    assert len(trained) + len(validation) <= len(RECORDS) and len(trained) > 0.6 * len(RECORDS)
    # The same windows however many ranks evaluate them, and every time.
    assert [list(w) for w in validation_windows(cfg.validation, cfg.dataset, tokenizer)] == [
        list(w) for w in validation_windows(cfg.validation, cfg.dataset, tokenizer)
    ]


def test_num_bases_sizes_the_set_in_bases_and_a_small_set_is_warned_about(tmp_path, genome, caplog):
    tokenizer = load_tokenizer(TOKENIZER)

    def bases_of(windows):
        return sum(int(np.isin(np.asarray(w), [ord(c) for c in "ACGT"]).sum()) for w in windows)

    by_count = validation_windows(val_cfg(tmp_path, genome).validation, val_cfg(tmp_path, genome).dataset, tokenizer)
    assert len(by_count) == 20 and "only" in caplog.text and "validation.num_bases=100000" in caplog.text
    caplog.clear()
    cfg = val_cfg(tmp_path, genome, "validation.num_bases=3000")  # num_windows=20 is then ignored
    windows = validation_windows(cfg.validation, cfg.dataset, tokenizer)
    assert bases_of(windows) >= 3000 > bases_of(windows[:-1])  # the first windows that hold 3000 bases
    assert [list(w) for w in windows] == [list(w) for w in by_count[: len(windows)]]  # the same stream, cut by bases
    assert "only" not in caplog.text  # asked for fewer than the floor, and got them
    cfg = val_cfg(tmp_path, genome, "validation.num_bases=1000000000")
    everything = validation_windows(cfg.validation, cfg.dataset, tokenizer)
    assert len(everything) > 20 and "the set has no more" in caplog.text


@pytest.mark.parametrize("layout", ["bshd", "thd", "packed_rows"])
def test_val_bits_per_base_equals_a_hand_computation(tmp_path, genome, layout):
    cfg = val_cfg(tmp_path, genome, f"use_sequence_packing={layout == 'thd'}", "dataset.max_seq_length=256")
    tokenizer = load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    model = build_model(cfg, use_te=False, device=torch.device("cpu"), on_meta=False)
    validator = build_validator(cfg, tokenizer, pack_rows=layout == "packed_rows")
    if layout == "packed_rows":  # the TE model's BSHD micro-batches (HF's sdpa masks packed rows by position_ids)
        assert {"cu_seq_lens_q" in b for b in validator.batches} == {True, False}  # padded ones packed, full ones rows
    metrics = validator.run(model, step=0)
    nll_bases, n_bases, nll_all, n_all, gaps = 0.0, 0, 0.0, 0, []

    def bits_per_base(ids):  # one window at a time, no padding, no packing
        ids = torch.as_tensor(np.asarray(ids), dtype=torch.long)[None]
        nll = F.cross_entropy(model(input_ids=ids).logits[0, :-1].float(), ids[0, 1:], reduction="none")
        bases = torch.isin(ids[0, 1:], torch.tensor([ord(c) for c in "ACGTacgt"]))
        return nll, bases, nll[bases].sum().item() / int(bases.sum()) / math.log(2)

    with torch.no_grad():
        for window in validation_windows(cfg.validation, cfg.dataset, tokenizer):
            nll, bases, forward = bits_per_base(window)
            nll_bases, n_bases = nll_bases + nll[bases].sum().item(), n_bases + int(bases.sum())
            nll_all, n_all = nll_all + nll.sum().item(), n_all + len(nll)
            other_strand = [ord(c) for c in reverse_complement("".join(map(chr, window[1:-1])))]
            gaps.append(abs(forward - bits_per_base([window[0], *other_strand, window[-1]])[2]))
    assert metrics["val_bits_per_base"] == pytest.approx(nll_bases / n_bases / math.log(2), rel=1e-5)
    assert metrics["val_rc_gap"] == pytest.approx(np.mean(gaps), rel=1e-4) and metrics["val_rc_gap"] > 0
    assert metrics["val_loss"] == pytest.approx(nll_all / n_all, rel=1e-5)
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    assert metrics["val_bases"] == n_bases and metrics["val_windows"] == 20


@pytest.mark.slow
def test_validation_in_training_exports_the_best_and_resumes_it(tmp_path, genome):
    common = ["validation.every_n_steps=3", "checkpoint.save_best_model=true", "checkpoint.save_every_n_steps=3",
              f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}"]  # fmt: skip
    train_fsdp2.main(val_cfg(tmp_path / "a", genome, *common, "num_train_steps=6"))
    train_fsdp2.main(val_cfg(tmp_path / "b", genome, *common, "num_train_steps=9"))  # resumes at 6
    straight = tmp_path / "straight"
    train_fsdp2.main(val_cfg(straight, genome, *common[:-1], f"checkpoint.ckpt_dir={straight / 'ckpt'}",
                             "num_train_steps=9"))  # fmt: skip
    events = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    resumed = {e["step"]: e["val_bits_per_base"] for e in events if "val_bits_per_base" in e}
    events = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    uninterrupted = {e["step"]: e["val_bits_per_base"] for e in events if "val_bits_per_base" in e}
    assert sorted(uninterrupted) == [3, 6, 9]  # every validation.every_n_steps, and at the end
    assert resumed == {9: uninterrupted[9]}  # the same checkpoint gives the same figure
    best = read_run_info(tmp_path / "ckpt" / "best_model")["best"]
    assert best["val_bits_per_base"] == min(uninterrupted.values())
    assert (tmp_path / "ckpt" / "best_model" / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["checkpoint.save_best_model=true"], "checkpoint.save_best_model=true needs validation.enabled=true"),
        (["validation.enabled=true", "validation.fraction=1.5"], "validation.fraction=1.5 must be between 0 and 1"),
    ],  # fmt: skip
)
def test_validation_config_errors(tmp_path, overrides, message):
    from config.checks import validate_config

    with pytest.raises(ValueError, match=message):
        validate_config(make_cfg(tmp_path, *overrides), use_te=False)


def test_a_separate_validation_set(tmp_path, genome):
    other = tmp_path / "other.fa"
    write_fasta(other, RECORDS[:5])
    cfg = val_cfg(tmp_path, genome, f"+validation.load_dataset_kwargs.path={other}")
    windows = validation_windows(cfg.validation, cfg.dataset, load_tokenizer(TOKENIZER))
    assert {record_of(w) for w in windows} <= set(range(5))


def validation_on_two_ranks_equals_one_process(tmp_path, genome, *overrides, use_te=False, device="cpu", rel=1e-5,
                                               dtype=torch.float32):  # fmt: skip
    """Train on two ranks with validation at the end; one process re-validates the export: the same figure."""
    from conftest import FAST, TORCHRUN_2, run_command

    from use.inference import load_model

    args = [f"dataset.load_dataset_kwargs.path={genome}", "validation.enabled=true", "validation.fraction=0.2",
            "validation.num_windows=20", "validation.every_n_steps=100", "num_train_steps=4",
            "checkpoint.save_final_model=true", *overrides]  # fmt: skip
    base = [o for o in FAST if not o.startswith("use_te=")] + [f"use_te={str(use_te).lower()}"]
    run = tmp_path / "run"
    run_command([*TORCHRUN_2, "train_fsdp2.py", "--config-name", "L0_sanity", *base, *args, f"run_dir={run}",
                 f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}"])  # fmt: skip
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    (two_ranks,) = [e["val_bits_per_base"] for e in events if "val_bits_per_base" in e]
    model, tokenizer = load_model(tmp_path / "ckpt" / "final_model", use_te=use_te, device=device, dtype=dtype)
    cfg = make_cfg(tmp_path / "one", *args, base=base)
    one = build_validator(cfg, tokenizer, device).run(model, step=0)
    assert one["val_windows"] == 20
    assert two_ranks == pytest.approx(one["val_bits_per_base"], rel=rel)


@pytest.mark.slow
def test_validation_on_two_ranks_equals_one_process(tmp_path, genome):
    validation_on_two_ranks_equals_one_process(tmp_path, genome)


@pytest.mark.multi_gpu
def test_validation_on_two_gpus_fsdp2_fp8_thd(tmp_path, genome):
    """Validation in an FSDP2 FP8 THD run on two GPUs; the export re-validated on one (bf16: rel 1e-3)."""
    validation_on_two_ranks_equals_one_process(
        tmp_path, genome, "use_sequence_packing=true", "fp8_config.enabled=true", "dataset.num_workers=1",
        use_te=True, device="cuda", rel=1e-3, dtype=torch.bfloat16,
    )  # fmt: skip


@pytest.mark.gpu
def test_te_validation_of_packed_rows_equals_padded_bshd(tmp_path, genome):
    """The TE model validates BSHD micro-batches as training feeds them (padded ones as packed rows): same figure."""
    cfg = val_cfg(tmp_path, genome, "dataset.max_seq_length=256")
    tokenizer = load_tokenizer(TOKENIZER)
    torch.manual_seed(0)
    model = build_model(cfg, use_te=True, device=torch.device("cuda"), on_meta=False)
    padded, packed = (build_validator(cfg, tokenizer, "cuda", pack_rows=rows) for rows in (False, True))
    assert {"cu_seq_lens_q" in b for b in packed.batches} == {True, False}
    packed_bits, padded_bits = (v.run(model, step=0)["val_bits_per_base"] for v in (packed, padded))
    assert packed_bits == pytest.approx(padded_bits, rel=1e-3)


def test_val_rc_gap_is_zero_for_a_model_that_reads_both_strands_alike(tmp_path, genome):
    """A model with an all-zero LM head predicts the same uniform distribution on either strand."""
    cfg = val_cfg(tmp_path, genome, "dataset.max_seq_length=256")
    model = build_model(cfg)
    torch.nn.init.zeros_(model.lm_head.weight)
    metrics = build_validator(cfg, load_tokenizer(TOKENIZER)).run(model, step=0)
    assert metrics["val_rc_gap"] == 0.0 and metrics["val_bits_per_base"] == pytest.approx(8.0)  # log2(256)
