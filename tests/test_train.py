"""Training entrypoints on the CPU: configs, convergence, resume exactness, accumulation, LRs, checkpoints."""

import json
import math
import shutil
import sys
import time

import pytest
import torch
from conftest import (
    CONFIG_DIR,
    FAST,
    RECIPE_DIR,
    TORCHRUN_2,
    build_model,
    losses,
    make_cfg,
    run_command,
    train_straight_and_resumed,
)
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

import train_ddp
import train_fsdp2
from checkpointing.checkpointer import Checkpointer
from checkpointing.folders import find_latest_checkpoint, prune_checkpoints
from checkpointing.format import MARKER
from config.checks import DEFAULTS_YAML, check_keys_and_types
from scheduler import get_cosine_annealing_schedule_with_warmup


@pytest.mark.parametrize("name", sorted(p.stem for p in (RECIPE_DIR / "hydra_config").glob("*.yaml")))
def test_every_config_composes(name):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.2"):
        cfg = compose(config_name=name)
    assert "dataset" in cfg and "checkpoint" in cfg
    defaults = OmegaConf.to_container(OmegaConf.load(DEFAULTS_YAML))
    check_keys_and_types(OmegaConf.to_container(cfg, resolve=True), defaults)  # no typo in a tier file


@pytest.mark.slow
def test_l0_sanity_learns(tmp_path):
    cfg = make_cfg(tmp_path, "num_train_steps=40", "dataset.micro_batch_size=4")  # FAST logs every step
    final = train_fsdp2.main(cfg)
    first = losses(tmp_path)[1]
    assert abs(first - math.log(256)) < 0.5  # an untrained model is a uniform guess over 256 ids
    assert final < 1.6, f"loss went from {first:.3f} to {final:.3f}"  # DNA: about 1.9 bits = 1.3 nats per base


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("script", [train_ddp, train_fsdp2])
def test_resume_gives_identical_losses(tmp_path, script, packing):
    common = ["num_train_steps=8", f"use_sequence_packing={packing}", "checkpoint.save_every_n_steps=4"]
    expected, got = train_straight_and_resumed(script.main, make_cfg, tmp_path, common, 4)
    assert [got[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]  # bitwise


@pytest.mark.slow
def test_resume_with_balanced_packing_gives_identical_losses(tmp_path):
    """dataset.packing_lookahead: the pool of windows ahead is part of the checkpoint (with loader workers)."""
    common = ["num_train_steps=8", "use_sequence_packing=true", "checkpoint.save_every_n_steps=4",
              "dataset.packing_lookahead=8", "dataset.num_workers=1"]  # fmt: skip
    expected, got = train_straight_and_resumed(train_fsdp2.main, make_cfg, tmp_path, common, 4)
    assert [got[s] for s in range(5, 9)] == [expected[s] for s in range(5, 9)]  # bitwise


def test_ddp_and_fsdp2_agree_on_the_first_step(tmp_path):
    train_ddp.main(make_cfg(tmp_path / "ddp", "num_train_steps=1"))
    train_fsdp2.main(make_cfg(tmp_path / "fsdp2", "num_train_steps=1"))
    assert losses(tmp_path / "ddp")[1] == losses(tmp_path / "fsdp2")[1]


def test_grad_accumulation_matches_a_bigger_micro_batch(tmp_path):
    train_fsdp2.main(make_cfg(tmp_path / "mb2", "num_train_steps=3", "dataset.micro_batch_size=2"))
    train_fsdp2.main(
        make_cfg(tmp_path / "acc2", "num_train_steps=3", "dataset.micro_batch_size=1", "grad_acc_steps=2")
    )
    a, b = losses(tmp_path / "mb2"), losses(tmp_path / "acc2")
    for step in (1, 2, 3):  # token-weighted loss: padding and the split into micro-batches do not matter
        assert a[step] == pytest.approx(b[step], rel=1e-5)


def test_golden_learning_rates():
    """The upstream recipe's LRs with the L2 Lingua settings; step N runs with the scheduler at N - 1."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=3e-3)
    scheduler = get_cosine_annealing_schedule_with_warmup(optimizer, 5000, 55000, 1e-6)
    factor = scheduler.lr_lambdas[0]
    for step, golden in [(3879, 0.0023268), (16370, 0.0026947), (31387, 0.0015954), (56763, 2.5586e-5)]:
        assert 3e-3 * factor(step - 1) == pytest.approx(golden, rel=1e-3)
    assert factor(0) == 0.0 and factor(5000) == 1.0 and factor(10**6) == pytest.approx(1e-6)


def test_pruning_and_incomplete_checkpoints(tmp_path, caplog):
    for step in (10, 20, 30, 40):
        (tmp_path / f"step_{step}").mkdir()
        (tmp_path / f"step_{step}" / MARKER).write_text("ok")
    (tmp_path / "step_50").mkdir()  # a save that crashed: no marker
    assert find_latest_checkpoint(tmp_path).name == "step_40"
    assert "Ignoring incomplete checkpoint" in caplog.text
    prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_30", "step_40", "step_50"]


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp2.py"])
def test_torchrun_two_processes_on_gloo(tmp_path, script):
    run_command([*TORCHRUN_2, script, "--config-name", "L0_sanity", *FAST, "num_train_steps=4", f"run_dir={tmp_path}",
                 f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}", "checkpoint.save_every_n_steps=2",
                 "checkpoint.save_final_model=true"])  # fmt: skip
    assert len(losses(tmp_path)) == 4
    assert {p.name for p in (tmp_path / "ckpt" / "step_4").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    assert (tmp_path / "ckpt" / "final_model" / "config.json").exists()

    # The same checkpoint resumed by one process: weights and optimizer state load whole (DDP) or
    # resharded (FSDP2 DCP); the one rank continues both data streams. No step runs (num_train_steps=4),
    # so the export must equal the 2-process one exactly.
    one = tmp_path / "one_rank"
    single = [sys.executable, script, "--config-name", "L0_sanity", *FAST, "num_train_steps=4", f"run_dir={one}",
              f"checkpoint.ckpt_dir={one / 'ckpt'}", "checkpoint.save_final_model=true"]  # fmt: skip
    shutil.copytree(tmp_path / "ckpt" / "step_4", one / "ckpt" / "step_4")
    result = run_command(single)
    assert "was saved by 2 ranks and this run has 1" in result.stderr
    assert "its 2 data streams continue where they stood (2 to 2 per rank)" in result.stderr
    two_ranks = load_file(tmp_path / "ckpt" / "final_model" / "model.safetensors")
    one_rank = load_file(one / "ckpt" / "final_model" / "model.safetensors")
    assert two_ranks.keys() == one_rank.keys()
    assert all(torch.equal(two_ranks[k], one_rank[k]) for k in two_ranks)


@pytest.mark.slow
def test_fsdp2_async_save_resumes_identically(tmp_path):
    common = ["num_train_steps=6", "checkpoint.save_every_n_steps=3", "checkpoint.async_save=true"]
    # Resuming at all shows the async save was awaited at exit and its marker written.
    expected, got = train_straight_and_resumed(train_fsdp2.main, make_cfg, tmp_path, common, 3)
    assert [got[s] for s in (4, 5, 6)] == [expected[s] for s in (4, 5, 6)]


@pytest.mark.slow
def test_fsdp2_async_save_on_two_cpu_ranks(tmp_path):
    """The background write has a gloo group of its own.

    On the default group its collectives interleaved with the loop's (gloo too on CPU ranks), and the run died
    of a gloo size mismatch at the second save.
    """
    run_command([*TORCHRUN_2, "train_fsdp2.py", "--config-name", "L0_sanity", *FAST, "num_train_steps=6",
                 "checkpoint.save_every_n_steps=2", "checkpoint.async_save=true", f"run_dir={tmp_path}",
                 f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}"])  # fmt: skip
    assert all((tmp_path / "ckpt" / f"step_{s}" / MARKER).exists() for s in (2, 4, 6))


@pytest.mark.slow
@pytest.mark.parametrize("script", [train_ddp, train_fsdp2])
def test_checkpoint_saves_are_left_out_of_step_time(tmp_path, monkeypatch, script):
    """A slow save (3 s here) shows in `checkpoint_save_s`, not in the step time and tokens/s of its window."""
    save = Checkpointer.save
    monkeypatch.setattr(Checkpointer, "save", lambda *a, **k: time.sleep(3.0) or save(*a, **k))
    script.main(make_cfg(tmp_path, "num_train_steps=4", "logger.frequency=2", "checkpoint.save_every_n_steps=1",
                         f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}"))  # fmt: skip
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    saves = [r["checkpoint_save_s"] for r in records if "checkpoint_save_s" in r]
    windows = [r["step_time_s"] for r in records if "step_time_s" in r]
    assert len(saves) == 4 and min(saves) >= 3.0
    # Counted, the saves at steps 2 and 3 would add 3 s a step to the second window (the first holds step 1's
    # one-off costs: up to 1.5 s a step on a busy CI machine).
    assert len(windows) == 2 and windows[1] < 2.0


def test_ddp_gradients_live_in_its_buckets(tmp_path, monkeypatch):
    """train_ddp.py: gradients are views into DDP's all-reduce buckets (no per-step copy into them).

    Without `gradient_as_bucket_view` each parameter's gradient has its own storage.
    """
    storages, clip = [], train_ddp.clip_grad_norm

    def record_then_clip(model, max_norm):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        storages.append((len({g.untyped_storage().data_ptr() for g in grads}), len(grads)))
        return clip(model, max_norm)

    monkeypatch.setattr(train_ddp, "clip_grad_norm", record_then_clip)
    train_ddp.main(make_cfg(tmp_path, "num_train_steps=2"))
    for distinct, grads in storages:
        assert grads > 10 and distinct <= 3  # a few buckets hold every gradient


def test_hf_reference_keeps_packed_sequences_apart(tmp_path):
    """THD on the HF reference (CPU): a packed row gives each sequence the logits it has alone.

    HF's sdpa path reads the reset position_ids as boundaries only without a KV cache, which the recipe turns off.
    """
    import numpy as np

    from data.collate import ThdCollator

    torch.manual_seed(0)
    model = build_model(make_cfg(tmp_path, "use_sequence_packing=true")).eval()
    seqs = [np.random.default_rng(i).integers(4, 256, n) for i, n in enumerate((50, 40, 7))]
    batch = ThdCollator(pad_token_id=1)([{"input_ids": s} for s in seqs])
    with torch.no_grad():
        packed = model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0]
        starts = batch["cu_seq_lens_q"].tolist()
        for seq, start in zip(seqs, starts):
            alone = model(input_ids=torch.as_tensor(seq)[None]).logits[0]
            torch.testing.assert_close(packed[start : start + len(seq)], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tie", [False, True])
def test_parameter_count_behind_mfu_and_checkpoint_size(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    from model.shape import count_parameters

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)  # fmt: skip
    model = LlamaForCausalLM(config)
    assert count_parameters(config) == sum(p.numel() for p in model.parameters())
    assert count_parameters(config, with_embedding=False) == count_parameters(config) - (0 if tie else 256 * 64)
