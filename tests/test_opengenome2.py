"""NVIDIA's OpenGenome2 recipe (opengenome2_llama_native_te) as a drop-in: its tiers, keys and defaults here."""

import pytest
import torch
from conftest import FAST, build_model_config_of, build_optimizer, losses, make_cfg

import train_fsdp2
from config.checks import validate_config
from training.validation_loss import validation_windows

OG2_TIERS = ["og2_7b_thd_gqa", "og2_7b_thd_gqa_fp8", "og2_7b_thd_gqa_global_shuffle"]
# An OG2 tier shrunk to run on a CPU in seconds: 2 small layers on the bundled DNA, held-out records for validation.
SMALL = ["config_kwargs.num_hidden_layers=2", "config_kwargs.hidden_size=64", "config_kwargs.intermediate_size=128",
         "config_kwargs.num_attention_heads=4", "config_kwargs.num_key_value_heads=2", "+config_kwargs.head_dim=16",
         "dataset.load_dataset_kwargs={path: ./test_genomic_sequences.parquet, streaming: true}",
         "validation.load_dataset_kwargs=null", "validation.fraction=0.05", "validation.num_windows=8",
         "dataset.micro_batch_size=1", "grad_acc_steps=1", "num_train_steps=3"]  # fmt: skip


@pytest.mark.parametrize("tier", OG2_TIERS)
def test_og2_tiers_have_upstreams_shapes_and_defaults(tmp_path, tier):
    cfg = make_cfg(tmp_path, name=tier, base=[])
    shape = build_model_config_of(cfg, use_te=True)
    assert (shape.num_hidden_layers, shape.hidden_size, shape.intermediate_size) == (32, 4096, 14336)
    assert (shape.num_attention_heads, shape.num_key_value_heads, shape.vocab_size) == (32, 8, 256)
    assert (shape.embedding_std, shape.output_layer_std) == (1.0, pytest.approx(0.02 / 64**0.5))
    assert not shape.tie_word_embeddings and cfg.use_sequence_packing and cfg.fp32_master_weights
    assert cfg.dataset.mask_degenerate_bases and cfg.dataset.mask_eos_label and cfg.defaults_from == "opengenome2"
    fp8 = tier.endswith("_fp8")
    assert shape.layer_precision == ([None] + ["fp8"] * 30 + [None] if fp8 else None)
    if not fp8:  # (FP8 needs TE: checked on a GPU)
        validate_config(cfg, use_te=False)


def test_an_og2_tier_trains_with_its_defaults_and_says_which_are_upstreams(tmp_path, capfd):
    """The OG2 tier, shrunk, trains on the HF path; the log names the OG2 defaults that replace ours, once."""
    train_fsdp2.main(make_cfg(tmp_path, *SMALL, name="og2_7b_thd_gqa"))
    notes = [line for line in capfd.readouterr().err.splitlines() if "defaults_from=opengenome2" in line]
    assert len(notes) == 1
    for expected in (
        "spike_no_more_embedding_init=True (ours: False)",
        "fp32_master_weights=True (ours: False)",
        "dataset.mask_eos_label=True (ours: False)",
        "checkpoint.save_final_model=True (ours: False)",
    ):
        assert expected in notes[0]
    # set by the tier (eps 1e-8, as OG2's 7B run) or by this test (workers, log frequency): not OG2's defaults then
    assert not any(key in notes[0] for key in ("adamw_kwargs.eps", "dataset.num_workers", "logger.frequency"))
    steps = losses(tmp_path)
    assert sorted(steps) == [1, 2, 3] and all(torch.isfinite(torch.tensor(list(steps.values()))))


def test_og2_tier_optimizer_groups_follow_upstream(tmp_path):
    cfg = make_cfg(tmp_path, *SMALL, name="og2_7b_thd_gqa", base=FAST)
    model = torch.nn.ModuleDict({"embed_tokens": torch.nn.Embedding(4, 4), "proj": torch.nn.Linear(4, 4)})
    decay, no_decay = build_optimizer(cfg, model).param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])] and len(no_decay["params"]) == 2


def test_validation_window_keys(tmp_path, tokenizer):
    """`validation.max_seq_length`, `stride` and `micro_batch_size` (OG2's 7B tier sets them): null = dataset's."""
    cfg = make_cfg(tmp_path, "validation.enabled=true", "validation.num_windows=30")
    default = validation_windows(cfg.validation, cfg.dataset, tokenizer)
    assert max(len(w) for w in default) == cfg.dataset.max_seq_length == 256
    short = make_cfg(tmp_path, "validation.enabled=true", "validation.num_windows=30", "validation.max_seq_length=64")
    windows = validation_windows(short.validation, short.dataset, tokenizer)
    assert max(len(w) for w in windows) == 64
    assert list(windows[0][-1 - 16 : -1]) == list(windows[1][1:17])  # dataset.stride=16: consecutive windows overlap
    wide = make_cfg(tmp_path, "validation.enabled=true", "validation.num_windows=30", "validation.max_seq_length=64",
                    "validation.stride=40")  # fmt: skip
    windows = validation_windows(wide.validation, wide.dataset, tokenizer)
    assert list(windows[0][-1 - 40 : -1]) == list(windows[1][1:41])
    with pytest.raises(ValueError, match="validation.micro_batch_size=0 must be a positive integer"):
        validate_config(make_cfg(tmp_path, "validation.enabled=true", "validation.micro_batch_size=0"), use_te=False)


def test_validation_num_batches_is_micro_batches_per_rank(tmp_path, tokenizer):
    """OG2's `validation.num_batches`: num_batches x micro_batch_size x ranks windows, num_windows ignored."""
    cfg = make_cfg(tmp_path, "validation.enabled=true", "validation.num_batches=3", "validation.micro_batch_size=2")
    assert len(validation_windows(cfg.validation, cfg.dataset, tokenizer)) == 6
    assert len(validation_windows(cfg.validation, cfg.dataset, tokenizer, world_size=4)) == 24
    plain = make_cfg(tmp_path, "validation.enabled=true", "validation.num_windows=5")
    assert len(validation_windows(plain.validation, plain.dataset, tokenizer)) == 5
    with pytest.raises(ValueError, match="validation.num_batches=0 must be a positive integer"):
        validate_config(make_cfg(tmp_path, "validation.enabled=true", "validation.num_batches=0"), use_te=False)
