"""The checkpoint folder: runs never mix, shapes never mismatch, and a bad folder is named before anything is built.

A complete checkpoint's files are hashed before and after each case: none is modified or deleted, except
by `checkpoint.overwrite=true` (asked for) or pruning by the run that wrote it.
"""

import hashlib
import re
import shutil
from pathlib import Path

import pytest
from conftest import make_cfg

import checkpointing.folders as checkpoint_folders
import train_ddp
import train_fsdp2
from checkpointing.folders import CheckpointMismatchError, complete_checkpoints
from checkpointing.run_record import read_run_info


def digest(folder: Path) -> str:
    """A hash of every file under `folder` (names and contents)."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode() + f.read_bytes())
    return h.hexdigest()


def train(script, run_dir, ckpt, *overrides):
    """A short CPU run of `script` saving every 2 steps into `ckpt`."""
    return script.main(make_cfg(run_dir, "num_train_steps=2", f"checkpoint.ckpt_dir={ckpt}",
                                "checkpoint.save_every_n_steps=2", *overrides))  # fmt: skip


@pytest.fixture
def saved(tmp_path):
    """A folder holding one complete checkpoint (step_2) of a 4-layer model, and its hash."""
    ckpt = tmp_path / "ckpt"
    train(train_fsdp2, tmp_path / "first", ckpt)
    return ckpt, digest(ckpt / "step_2")


@pytest.mark.slow
@pytest.mark.parametrize("script", [train_fsdp2, train_ddp])
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("+config_kwargs.num_hidden_layers=2", "num_hidden_layers: checkpoint 4, this run 2"),
        ("+config_kwargs.vocab_size=512", "vocab_size: checkpoint 256, this run 512"),
        ("use_sequence_packing=true", "use_sequence_packing: checkpoint False, this run True"),
    ],  # fmt: skip
)
def test_resuming_into_another_shape_or_packing_mode_is_refused(tmp_path, script, override, named):
    ckpt = tmp_path / "ckpt"
    train(script, tmp_path / "first", ckpt)
    before = digest(ckpt / "step_2")
    with pytest.raises(CheckpointMismatchError, match=named):
        train(script, tmp_path / "second", ckpt, override, "num_train_steps=4")
    assert digest(ckpt / "step_2") == before


def test_a_fresh_run_refuses_a_folder_with_complete_checkpoints(tmp_path, saved, monkeypatch):
    ckpt, before = saved
    monkeypatch.setattr(train_fsdp2, "create_model", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(ValueError, match=r"already holds complete checkpoints \(\['step_2'\]\).*checkpoint.overwrite"):
        train(train_fsdp2, tmp_path / "second", ckpt, "checkpoint.resume_from_checkpoint=false")
    assert digest(ckpt / "step_2") == before


def test_overwrite_logs_and_replaces(tmp_path, saved, capfd):
    ckpt, before = saved
    first_run = read_run_info(ckpt / "step_2")["run_id"]
    train(
        train_fsdp2, tmp_path / "second", ckpt, "checkpoint.resume_from_checkpoint=false", "checkpoint.overwrite=true"
    )
    assert "checkpoint.overwrite=true: deleting ['step_2']" in capfd.readouterr().err
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step_2"]
    assert read_run_info(ckpt / "step_2")["run_id"] != first_run


@pytest.mark.slow
def test_resume_continues_the_run_and_prunes_only_its_own(tmp_path, saved):
    ckpt, before = saved
    first_run = read_run_info(ckpt / "step_2")["run_id"]
    train(train_fsdp2, tmp_path / "second", ckpt, "num_train_steps=4")  # resumes step_2, saves step_4
    assert read_run_info(ckpt / "step_4")["run_id"] == first_run  # the resumed run is the same run
    assert digest(ckpt / "step_2") == before
    train(train_fsdp2, tmp_path / "third", ckpt, "num_train_steps=6", "checkpoint.max_checkpoints=1")
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step_6"]  # pruned by the run that wrote them


def test_a_complete_checkpoint_of_another_run_is_never_pruned(tmp_path, saved):
    ckpt, _ = saved
    ours = read_run_info(ckpt / "step_2")["run_id"]
    foreign = ckpt / "step_1"
    shutil.copytree(ckpt / "step_2", foreign)  # another run's checkpoint, older than this run's step_2
    info = foreign / "run_info.yaml"
    info.write_text(info.read_text().replace("run_id: ", "run_id: other-"))
    (ckpt / "step_0").mkdir()  # an older one of this run: pruned
    shutil.copytree(ckpt / "step_2", ckpt / "step_0", dirs_exist_ok=True)
    checkpoint_folders.prune_checkpoints(ckpt, 1, run_id=ours)
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step_1", "step_2"]


BAD_FOLDERS = {
    "file": ("a file", "is a file, not a folder"),
    "stray": (
        "a folder with a file named step_5",
        "holds ['step_5'], named like checkpoints but not checkpoint folders",
    ),
    "unwritable": ("/proc/self (no one can write there)", "is not writable"),
    "full": ("a full disk", "GiB free, and one checkpoint of this model needs about"),
}


@pytest.mark.parametrize("case", sorted(BAD_FOLDERS))
def test_a_bad_checkpoint_folder_is_named_before_anything_is_built(tmp_path, monkeypatch, case):
    ckpt = tmp_path / "ckpt"
    if case == "file":
        ckpt.write_text("not a folder")
    elif case == "stray":
        ckpt.mkdir()
        (ckpt / "step_5").write_text("stray")
    elif case == "unwritable":
        ckpt = Path("/proc/self")
    else:
        monkeypatch.setattr(checkpoint_folders.shutil, "disk_usage", lambda p: type("U", (), {"free": 2**20})())
    monkeypatch.setattr(train_fsdp2, "create_model", lambda *a, **k: pytest.fail("built before the check"))
    with pytest.raises(ValueError, match=re.escape(BAD_FOLDERS[case][1])) as error:
        train(train_fsdp2, tmp_path / "run", ckpt)
    print(f"{BAD_FOLDERS[case][0]} -> {error.value}")
