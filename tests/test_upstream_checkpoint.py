"""Resuming from checkpoints in the upstream recipe's layout (written here by a small fixture as upstream does)."""

import json
import logging

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import FAST, TORCHRUN_2, build_model, build_optimizer, losses, make_cfg, run_command
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.checkpoint.stateful import Stateful

import train_ddp
import train_fsdp2
from checkpointing.folders import CheckpointMismatchError, find_latest_checkpoint
from checkpointing.upstream import resume_from_upstream
from scheduler import get_cosine_annealing_schedule_with_warmup

CPU = torch.device("cpu")


def trained_state(cfg, updates: int):
    """A model, AdamW and schedule after `updates` steps on random tokens (the state an upstream run would hold)."""
    torch.manual_seed(0)
    model = build_model(cfg, use_te=False, device=CPU, on_meta=False)
    optimizer = build_optimizer(cfg, model)
    scheduler = get_cosine_annealing_schedule_with_warmup(optimizer, **cfg.lr_scheduler_kwargs)
    for _ in range(updates):
        ids = torch.randint(0, model.config.vocab_size, (2, 32))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


class _UpstreamApp(Stateful):
    """Upstream's AppState as it saves: model, optim, scheduler, step, epoch under one DCP key "app"."""

    def __init__(self, model, optimizer, scheduler, step):
        self.model, self.optimizer, self.scheduler, self.step = model, optimizer, scheduler, step

    def state_dict(self):
        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optim": optim_state, "scheduler": self.scheduler.state_dict(),
                "step": self.step, "epoch": 0}  # fmt: skip

    def load_state_dict(self, state):
        raise NotImplementedError


def write_upstream(ckpt_dir, layout, model, optimizer, scheduler, step):
    """`<ckpt_dir>/<layout>/step_<step>` as upstream's save_checkpoint_fsdp2 / save_checkpoint_ddp write it."""
    folder = ckpt_dir / layout / f"step_{step}"
    folder.mkdir(parents=True)
    torch.save({"num_workers": 1, "num_ranks": 1}, folder / "dataloader_rank_0.pt")  # its loader state: not read
    if layout == "train_fsdp2":
        dcp.save({"app": _UpstreamApp(model, optimizer, scheduler, step)}, checkpoint_id=str(folder))
    else:  # the DDP wrapper's state dict: every key starts with "module."
        weights = {f"module.{k}": v for k, v in model.state_dict().items()}
        torch.save({"model": weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "step": step, "epoch": 0}, folder / "checkpoint.pt")  # fmt: skip
    return folder


@pytest.mark.parametrize("layout", ["train_fsdp2", "train_ddp"])
def test_upstream_checkpoint_restores_weights_moments_and_step(tmp_path, layout, caplog):
    cfg = make_cfg(tmp_path, "lr_scheduler_kwargs.num_warmup_steps=2")
    model, optimizer, scheduler = trained_state(cfg, updates=3)
    write_upstream(tmp_path / "ckpt", layout, model, optimizer, scheduler, step=2)  # upstream's step_2: 3 updates
    unfinished = tmp_path / "ckpt" / layout / "step_9"  # a newer save that never finished
    unfinished.mkdir()

    fresh, fresh_optimizer, fresh_scheduler = trained_state(cfg, updates=0)
    with caplog.at_level(logging.WARNING):
        step = resume_from_upstream(tmp_path / "ckpt", layout, fresh, fresh_optimizer, fresh_scheduler)
    assert step == 3
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    saved, restored = optimizer.state_dict()["state"], fresh_optimizer.state_dict()["state"]
    for index in saved:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(saved[index][key], restored[index][key]), (index, key)
    assert fresh_scheduler.last_epoch == scheduler.last_epoch == 3
    assert fresh_optimizer.param_groups[0]["lr"] == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12)
    assert "Ignoring unfinished upstream checkpoint" in caplog.text and "data loader position" in caplog.text


@pytest.mark.parametrize("layout", ["train_fsdp2", "train_ddp"])
def test_upstream_checkpoint_of_another_shape_is_refused(tmp_path, layout):
    small = make_cfg(tmp_path, "++config_kwargs.num_hidden_layers=1")
    write_upstream(tmp_path / "ckpt", layout, *trained_state(small, updates=1), step=0)
    model, optimizer, scheduler = trained_state(make_cfg(tmp_path), updates=0)
    with pytest.raises(CheckpointMismatchError, match="does not fit this model"):
        resume_from_upstream(tmp_path / "ckpt", layout, model, optimizer, scheduler)


@pytest.mark.slow
@pytest.mark.parametrize("script", [train_fsdp2, train_ddp])
def test_entrypoint_continues_an_upstream_run_then_resumes_its_own(tmp_path, script, capfd):
    layout = script.__name__
    overrides = ["checkpoint.save_every_n_steps=3", "lr_scheduler_kwargs.num_warmup_steps=4"]
    cfg = make_cfg(tmp_path, *overrides)
    write_upstream(tmp_path / "ckpt", layout, *trained_state(cfg, updates=5), step=4)

    ckpt = f"checkpoint.ckpt_dir={tmp_path / 'ckpt'}"
    script.main(make_cfg(tmp_path / "run", *overrides, ckpt, "num_train_steps=7"))
    assert f"upstream checkpoint {tmp_path / 'ckpt' / layout / 'step_4'} (5 updates done" in capfd.readouterr().err
    assert sorted(losses(tmp_path / "run")) == [6, 7]  # continues after upstream's 5 updates
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    schedule = get_cosine_annealing_schedule_with_warmup(
        torch.optim.SGD([torch.zeros(1)], lr=1.0), **cfg.lr_scheduler_kwargs
    )
    assert record["lr"] == pytest.approx(cfg.adamw_kwargs.lr * schedule.lr_lambdas[0](6), rel=1e-9)  # its step 6
    assert find_latest_checkpoint(tmp_path / "ckpt").name == "step_6"  # our own layout from here on

    script.main(make_cfg(tmp_path / "run2", *overrides, ckpt, "num_train_steps=8"))
    assert sorted(losses(tmp_path / "run2")) == [7, 8]  # our step_6 wins over upstream's step_4


def test_upstream_checkpoint_functions_read_and_write_the_recipe_s_checkpoints(tmp_path):
    """A script written against upstream's checkpoint.py, its checkpoints done by the recipe's functions.

    They load the entrypoint's checkpoint and save the next ones; the entrypoint resumes from those, and its
    losses equal a run that never stopped.
    """
    from conftest import build_loader

    import checkpoint

    def make(run_dir, *extra):
        return make_cfg(run_dir, "checkpoint.save_every_n_steps=2", *extra)

    ckpt = tmp_path / "ckpt"
    train_ddp.main(
        make(tmp_path / "straight", "num_train_steps=6", f"checkpoint.ckpt_dir={tmp_path / 'straight_ckpt'}")
    )
    train_ddp.main(make(tmp_path / "first", "num_train_steps=2", f"checkpoint.ckpt_dir={ckpt}"))

    # Upstream's loop for steps 3 and 4 (its own training code; the recipe's functions do the checkpoints).
    cfg = make(tmp_path / "script", f"checkpoint.ckpt_dir={ckpt}")
    model = build_model(cfg, use_te=False, device=CPU)
    optimizer = build_optimizer(cfg, model)
    scheduler = get_cosine_annealing_schedule_with_warmup(optimizer, **cfg.lr_scheduler_kwargs)
    loader, _ = build_loader(cfg)
    model, optimizer, scheduler, loader, start_step, epoch = checkpoint.load_checkpoint_ddp(
        model, optimizer, scheduler, ckpt, dist_config=None, dataloader=loader
    )
    assert (start_step, epoch) == (3, 0)
    batches = iter(loader)
    for step in range(start_step, 5):
        batch = next(batches)
        model(**batch).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if checkpoint.should_save_checkpoint(step, 1):
            checkpoint.save_checkpoint_ddp(model, optimizer, scheduler, ckpt, step, 7, None, loader, max_checkpoints=1)
    assert checkpoint.get_latest_checkpoint(ckpt) == (ckpt / "step_4", 4)
    # step_3 pruned (max_checkpoints=1); step_2 is the entrypoint run's (pruning never deletes another run's)
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_2", "step_4"]
    assert checkpoint.load_checkpoint_ddp(model, optimizer, scheduler, ckpt, None, loader).epoch == 7
    assert not checkpoint.should_save_checkpoint(0, 2) and not checkpoint.should_save_checkpoint(4, 0)

    train_ddp.main(make(tmp_path / "last", "num_train_steps=6", f"checkpoint.ckpt_dir={ckpt}"))
    straight, last = losses(tmp_path / "straight"), losses(tmp_path / "last")
    assert sorted(last) == [5, 6] and [last[s] for s in (5, 6)] == [straight[s] for s in (5, 6)]


@pytest.mark.slow
@pytest.mark.parametrize("async_save", [False, True])
def test_upstream_style_fsdp2_script_on_two_ranks_hands_over_exactly(tmp_path, async_save):
    """An upstream-style FSDP2 script between two train_fsdp2 runs (2 ranks) hands the run over exactly.

    train_fsdp2 to step 2; the script resumes with load_checkpoint_fsdp2, saves steps 3 and 4 (DCP, in the
    background or not) and exports; train_fsdp2 resumes to step 6 with a straight run's losses.
    """
    ckpt, straight = tmp_path / "ckpt", tmp_path / "straight"
    entry = [*TORCHRUN_2, "train_fsdp2.py", "--config-name", "L0_sanity", *FAST, "checkpoint.save_every_n_steps=2"]
    run_command([*entry, f"run_dir={straight}", f"checkpoint.ckpt_dir={tmp_path / 's_ckpt'}", "num_train_steps=6"])
    run_command([*entry, f"run_dir={tmp_path / 'a'}", f"checkpoint.ckpt_dir={ckpt}", "num_train_steps=2"])
    script = run_command([*TORCHRUN_2, "tests/upstream_style_fsdp2.py", str(ckpt), str(tmp_path / "b"), "4",
                          str(int(async_save))])  # fmt: skip
    assert "resumed at step 3, epoch 0" in script.stdout
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_2", "step_4"]  # step_3 pruned, marker written
    assert (ckpt / "step_4" / "COMPLETE").exists() and (ckpt / "final_model" / "config.json").exists()
    run_command([*entry, f"run_dir={tmp_path / 'c'}", f"checkpoint.ckpt_dir={ckpt}", "num_train_steps=6"])
    resumed, reference = losses(tmp_path / "c"), losses(straight)
    assert sorted(resumed) == [5, 6] and [resumed[s] for s in (5, 6)] == [reference[s] for s in (5, 6)]
