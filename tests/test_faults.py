"""Fault injection on the CPU: kills during saves, SIGTERM, damaged checkpoints, NaN/Inf, bad config, bad data.

Every run is a subprocess with the same environment, so "the same losses" means bitwise the same.
Each test states the fault, what must survive, and the one-line error a user sees.
"""

import os
import shutil
import signal
import subprocess
import sys
from importlib.util import find_spec

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import (
    FAST,
    PARQUET,
    TORCHRUN_2,
    losses,
    make_cfg,
    poison_embedding_gradients,
    run_command,
)

import train_ddp
from checkpointing.folders import complete_checkpoints
from checkpointing.format import MARKER
from config.checks import check_config, validate_config, validate_cp_config
from data.sources import load_raw_dataset
from training.optimizer import NonFiniteGuard

SCRIPTS = {
    "ddp": ["train_ddp.py"],
    "fsdp2": ["train_fsdp2.py"],
    "fsdp2_async": ["train_fsdp2.py", "checkpoint.async_save=true"],
}


def train(run_dir, script: str, *overrides, kill_before_marker=None, check=True) -> subprocess.CompletedProcess:
    """One CPU run of `script` on L0_sanity; checkpoints go to `<run_dir>/../ckpt`.

    `kill_before_marker="step_N"`: SIGKILL once step_N is written, before its marker (tests/kill_before_marker.py).
    """
    entry, *extra = SCRIPTS[script]
    launch = [sys.executable] + (["tests/kill_before_marker.py", kill_before_marker] if kill_before_marker else [])
    cmd = [*launch, entry, "--config-name", "L0_sanity", *FAST, f"run_dir={run_dir}",
           f"checkpoint.ckpt_dir={run_dir.parent / 'ckpt'}", *extra, *overrides]  # fmt: skip
    return run_command(cmd, check=check)


def steps_of(ckpt_dir) -> list[int]:
    return [int(p.name.removeprefix("step_")) for p in complete_checkpoints(ckpt_dir)]


# --- Kill -9 while a checkpoint is being saved ---


@pytest.mark.slow
@pytest.mark.parametrize("script", ["ddp", "fsdp2", "fsdp2_async"])
def test_kill_during_save_resumes_from_last_complete_checkpoint(tmp_path, script):
    """SIGKILL after every rank wrote step_8 but before its COMPLETE marker: step_4 survives.

    Resuming from it gives the losses of a run that never crashed.
    """
    common = ["num_train_steps=8", "checkpoint.save_every_n_steps=4"]
    straight = tmp_path / "straight" / "run"
    train(straight, script, *common)

    crashed = tmp_path / "crashed" / "run"
    result = train(crashed, script, *common, kill_before_marker="step_8", check=False)
    assert result.returncode == -signal.SIGKILL
    ckpt = crashed.parent / "ckpt"
    assert (ckpt / "step_8").exists() and not (ckpt / "step_8" / MARKER).exists()
    assert steps_of(ckpt) == [4]

    resumed = tmp_path / "crashed" / "resumed"
    result = train(resumed, script, *common)
    assert "Ignoring incomplete checkpoint" in result.stderr and "Resumed from" in result.stderr
    assert [losses(resumed)[s] for s in range(5, 9)] == [losses(straight)[s] for s in range(5, 9)]
    assert steps_of(ckpt) == [4, 8]  # the half-written step_8 was replaced by a complete one


# --- Damaged checkpoints ---


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "damaged"),
    [("ddp", "model_optimizer.pt"), ("ddp", "rank_0.pt"), ("fsdp2", "dcp/__0_0.distcp"), ("fsdp2", "rank_0.pt")],
)
def test_damaged_checkpoint_falls_back_to_the_previous_one(tmp_path, script, damaged):
    straight = tmp_path / "straight" / "run"
    train(straight, script, "num_train_steps=8", "checkpoint.save_every_n_steps=4")
    truncate(tmp_path / "straight" / "ckpt" / "step_8" / damaged)

    resumed = tmp_path / "straight" / "resumed"
    result = train(resumed, script, "num_train_steps=8", "checkpoint.save_every_n_steps=4")
    warning = next(line for line in result.stderr.splitlines() if "could not be loaded" in line)
    assert "step_8" in warning and "falling back" in warning
    assert "Resumed from" in result.stderr and "step_4 at step 4" in result.stderr
    assert [losses(resumed)[s] for s in range(5, 9)] == [losses(straight)[s] for s in range(5, 9)]


@pytest.mark.slow
def test_every_checkpoint_damaged_is_a_clear_error(tmp_path):
    run = tmp_path / "x" / "run"
    train(run, "ddp", "num_train_steps=4", "checkpoint.save_every_n_steps=2")
    for step in ("step_2", "step_4"):
        truncate(tmp_path / "x" / "ckpt" / step / "model_optimizer.pt")
    result = train(tmp_path / "x" / "again", "ddp", "num_train_steps=6", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "No checkpoint in" in result.stderr and "checkpoint.resume_from_checkpoint=false" in result.stderr


# --- NaN / Inf ---


@pytest.mark.parametrize("fused", [False, True], ids=["checked-at-once", "fused-skip-read-one-step-late"])
def test_guard_skips_then_stops(fused):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1, fused=fused)
    guard = NonFiniteGuard("skip", 2, optimizer)

    def step(n, loss, norm):
        param.grad = torch.ones(3)
        guard.step(n, torch.tensor(loss), torch.tensor(norm))

    step(1, 1.0, 1.0)
    after_one = (param.detach().clone(), {k: v.clone() for k, v in optimizer.state[param].items()})
    assert not torch.equal(after_one[0], torch.ones(3))
    step(2, float("nan"), 1.0)
    step(3, 1.0, float("inf"))
    assert torch.equal(param, after_one[0])  # neither update applied: weights, moments, step count as they were
    assert all(torch.equal(optimizer.state[param][k], v) for k, v in after_one[1].items())
    with pytest.raises(FloatingPointError, match="step 4.*3 such step"):
        step(4, float("nan"), 1.0)
        guard.check()  # with the fused skip, the verdict is read one step later (or after the loop)
    stop = NonFiniteGuard("stop", 2, optimizer)
    with pytest.raises(FloatingPointError, match="on_nonfinite.action=stop"):
        stop.step(1, torch.tensor(float("nan")), torch.tensor(1.0))
        stop.check()


@pytest.fixture(params=[False, True], ids=["checked-at-once", "fused-skip"])
def nan_gradients(monkeypatch, request):
    """NaN gradients (on the embedding) in the steps listed in the returned set."""
    poisoned_steps = set()
    create_model = train_ddp.create_model

    def create_poisoned_model(*args, **kwargs):
        model = create_model(*args, **kwargs)
        poison_embedding_gradients(model, poisoned_steps)
        created.append(model)
        return model

    created = []
    monkeypatch.setattr(train_ddp, "create_model", create_poisoned_model)
    if request.param:  # fused AdamW (the GPU default; create_optimizer turns it off on CPUs): the on-device skip
        monkeypatch.setattr(
            train_ddp, "create_optimizer", lambda model, *args: torch.optim.AdamW(model.parameters(), fused=True)
        )
    return poisoned_steps, created


def test_nan_gradients_are_skipped_and_never_applied(tmp_path, nan_gradients):
    poisoned_steps, created = nan_gradients
    poisoned_steps.update({3, 4})
    final = train_ddp.main(make_cfg(tmp_path, "num_train_steps=6", "on_nonfinite.max_consecutive_skips=2"))
    assert torch.isfinite(torch.tensor(final))
    assert all(torch.isfinite(p).all() for p in created[0].parameters())  # NaN never reached the weights


def test_too_many_nan_steps_stop_with_a_clear_error(tmp_path, nan_gradients):
    """The run stops mid-loop, and its cleanup leaves the process as it found it (no test fixture needed)."""
    import gc

    import torch.distributed as dist

    poisoned_steps, _ = nan_gradients
    poisoned_steps.update({3, 4, 5})
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with pytest.raises(FloatingPointError, match="step 5.*max_consecutive_skips=2"):
        train_ddp.main(make_cfg(tmp_path, "num_train_steps=8", "on_nonfinite.max_consecutive_skips=2"))
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the GC schedule is undone
    assert not dist.is_initialized()  # the process group is destroyed
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the preemption handlers are put back


# --- Bad configuration: rejected before anything is built ---

BAD_CONFIGS = [
    (
        ["+dataset.micro_batchsize=2"],
        "Unknown config key 'dataset.micro_batchsize'; did you mean dataset.micro_batch_size?",
    ),
    (["+num_train_step=5"], "did you mean num_train_steps?"),
    (["use_sequence_packing=yes"], "use_sequence_packing='yes' should be true or false"),
    (["dataset.max_seq_length=long"], "dataset.max_seq_length='long' should be an integer"),
    (["grad_acc_steps=0"], "grad_acc_steps=0 must be a positive integer"),
    (["dataset.stride=-1"], "dataset.stride=-1 must be >= 0"),
    (["dataset.num_workers=-1"], "dataset.num_workers=-1 must be 0"),
    (["on_nonfinite.action=ignore"], "on_nonfinite.action='ignore' must be 'skip' or 'stop'"),
    (["cp_size=2"], "cp_size=2 needs train_fsdp2_cp.py"),
    (["fp8_config.enabled=true"], "fp8_config.enabled=true needs the TE model"),
    (["config_name_or_path=./model_configs/nope"], "config_name_or_path='./model_configs/nope' does not exist"),
    (["adamw_kwargs.lr=fast"], "adamw_kwargs.lr='fast' must be a positive number, e.g. 3e-4"),
    (["adamw_kwargs.lr=-1"], "adamw_kwargs.lr=-1 must be a positive number"),
    (["adamw_kwargs.betas=[0.9,1.5]"], "adamw_kwargs.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    (["lr_scheduler_kwargs.num_warmup_steps=-10"], "lr_scheduler_kwargs.num_warmup_steps=-10 must be an integer >= 0"),
    (["lr_scheduler_kwargs.min_lr_ratio=2"], "lr_scheduler_kwargs.min_lr_ratio=2 must be a number from 0 to 1"),
    (["validation.enabled=true", "validation.num_bases=0"], "validation.num_bases=0 must be a positive integer"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_CONFIGS)
def test_bad_config_is_named_with_its_fix(tmp_path, overrides, message):
    with pytest.raises((ValueError, FileNotFoundError)) as error:
        validate_config(make_cfg(tmp_path, *overrides), use_te=False)
    assert message in str(error.value)
    print(f"{' '.join(overrides)} -> {str(error.value).splitlines()[0]}")


def test_fp8_token_budget_and_cp_world_size_are_checked(tmp_path):
    cfg = make_cfg(
        tmp_path, "fp8_config.enabled=true", "use_sequence_packing=true", "dataset.token_micro_batch_size=1000"
    )
    with pytest.raises(ValueError, match="multiple of 16, but the THD budget is 1000"):
        validate_config(cfg, use_te=True)  # checked before the recipe is built, so no GPU is needed here
    with pytest.raises(ValueError, match="divides the number of ranks"):
        validate_cp_config(make_cfg(tmp_path, "cp_size=3"), use_te=True, world_size=4)


# --- Bad data ---


@pytest.mark.slow
def test_corrupt_parquet_is_named(tmp_path):
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"this is not parquet" * 100)
    result = train(tmp_path / "r" / "run", "fsdp2", f"dataset.load_dataset_kwargs.path={bad}", "num_train_steps=2",
                   check=False)  # fmt: skip
    assert result.returncode != 0
    assert f"{bad} is not a readable parquet file" in result.stderr


@pytest.mark.slow
def test_wrong_column_type_and_missing_column_are_named(tmp_path):
    ints = tmp_path / "ints.parquet"
    pq.write_table(pa.table({"sequence": [1234, 5678]}), ints)
    result = train(tmp_path / "r" / "a", "fsdp2", f"dataset.load_dataset_kwargs.path={ints}", "num_train_steps=2",
                   check=False)  # fmt: skip
    assert "Column 'sequence' holds int64 values, not text" in result.stderr
    result = train(tmp_path / "r" / "b", "fsdp2", "dataset.text_column=dna", "num_train_steps=2", check=False)
    assert "The data set has no column 'dna'" in result.stderr


def test_records_without_bases_and_wandb_not_installed_are_named(tmp_path, monkeypatch):
    headers = tmp_path / "headers.fa"
    headers.write_text(">a\n>b\n")
    cfg = make_cfg(tmp_path, f"dataset.load_dataset_kwargs.path={headers}", "num_train_steps=2")
    with pytest.raises(ValueError, match="1 of 1 rank\\(s\\) got no data: the data set's records hold no bases"):
        train_ddp.main(cfg)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    with pytest.raises(ValueError, match="wandb_init_args.mode=offline needs wandb, which is not installed"):
        check_config(make_cfg(tmp_path, "wandb_init_args.mode=offline"), "ddp")


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 1])
def test_text_that_is_not_utf8_is_named_with_file_and_row(tmp_path, num_workers):
    bad = tmp_path / "latin1.parquet"
    raw = pa.array([b"ACGT" * 100, b"ACGT" * 10 + b"\xff\xfe" + b"ACGT" * 10], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"sequence": raw}), bad)
    result = train(tmp_path / "r" / "run", "fsdp2", f"dataset.load_dataset_kwargs.path={bad}", "num_train_steps=2",
                   f"dataset.num_workers={num_workers}", check=False)  # fmt: skip
    assert f"{bad}, row 1 (1 row(s) in all): column 'sequence' is not valid UTF-8" in result.stderr
    assert "killed by signal" not in result.stderr  # loader workers end quietly after the error
    assert result.returncode == 2 and "Traceback" not in result.stderr  # one line, not the worker's traceback


@pytest.mark.parametrize("streaming", [True, False])  # a stream decodes at its first record; datasets wraps it else
def test_csv_text_that_is_not_utf8_is_named_with_file_and_line(tmp_path, streaming):
    bad = tmp_path / "latin1.csv"
    bad.write_bytes(b"sequence\nACGTACGT\nACG\xff\xfeTACGT\n")
    with pytest.raises(ValueError, match=rf"{bad}, line 3 \(1 line\(s\) in all\): the text is not valid UTF-8"):
        load_raw_dataset({"path": str(bad), "streaming": streaming}, "sequence")
    malformed = tmp_path / "malformed.csv"
    malformed.write_text('sequence,b\n"ACGT,1\n')
    with pytest.raises(ValueError, match=r"malformed.csv.* could not be read \(.*\); check the files' format"):
        load_raw_dataset({"path": str(malformed), "streaming": False}, "sequence")


@pytest.mark.slow
def test_a_folder_without_parquet_files_is_named_as_such(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("ACGT")
    result = train(tmp_path / "r" / "run", "fsdp2", f"dataset.load_dataset_kwargs.path={tmp_path / 'data'}",
                   "num_train_steps=2", check=False)  # fmt: skip
    assert "is a folder without parquet or FASTA files (it holds ['notes.txt'])" in result.stderr


@pytest.mark.slow
def test_a_crashing_loader_worker_surfaces_its_error(tmp_path):
    """Data pages corrupted behind a valid footer: the run stops with the worker's own error (no hang)."""
    # The worker fails reading the pages; the loader re-raises its error in the main process.
    bad = tmp_path / "pages.parquet"
    pq.write_table(pq.read_table(PARQUET), bad, row_group_size=16)
    data = bytearray(bad.read_bytes())
    data[len(data) // 3 : len(data) // 3 + 100_000] = os.urandom(100_000)
    bad.write_bytes(bytes(data))
    result = train(tmp_path / "r" / "run", "fsdp2", f"dataset.load_dataset_kwargs.path={bad}", "num_train_steps=1000",
                   "dataset.num_workers=1", check=False)  # fmt: skip
    assert result.returncode != 0
    assert "in DataLoader worker process 0" in result.stderr


@pytest.mark.slow
def test_a_rank_without_data_fails_clearly_instead_of_hanging(tmp_path):
    one = tmp_path / "one.parquet"
    pq.write_table(pa.table({"sequence": ["ACGT" * 50]}), one)
    result = run_command([*TORCHRUN_2, "train_fsdp2.py", "--config-name", "L0_sanity", *FAST, "num_train_steps=2",
                          f"run_dir={tmp_path}", f"dataset.load_dataset_kwargs.path={one}"], check=False)  # fmt: skip
    assert result.returncode != 0
    assert "1 of 2 rank(s) got no data" in result.stderr + result.stdout


def test_checkpoint_folders_from_a_crash_are_never_resumed(tmp_path):
    """A step folder without the marker (any crash mid-save) is skipped with a warning, even if newest."""
    (tmp_path / "step_4").mkdir()
    (tmp_path / "step_4" / MARKER).write_text("ok\n")
    shutil.copytree(tmp_path / "step_4", tmp_path / "step_8")
    (tmp_path / "step_8" / MARKER).unlink()
    assert steps_of(tmp_path) == [4]
