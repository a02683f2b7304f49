"""scripts/plot_run.py: a PNG from real metrics.jsonl files, a resumed run's later records winning."""

import json
import sys
from pathlib import Path

import pytest
from conftest import make_cfg

import train_fsdp2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


def test_plot_of_two_real_runs_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image
    import plot_run

    runs = []
    for name, lr in (("lr_high", "3e-3"), ("lr_low", "1e-3")):
        run = tmp_path / name
        train_fsdp2.main(make_cfg(run, "num_train_steps=6", f"adamw_kwargs.lr={lr}", "validation.enabled=true",
                                  "validation.every_n_steps=3", "validation.num_windows=4"))  # fmt: skip
        runs.append(run)
    series = plot_run.read_metrics(runs[0])
    assert sorted(series["loss"]) == list(range(1, 7)) and sorted(series["val_bits_per_base"]) == [3, 6]
    out = plot_run.main([str(r) for r in runs] + ["--out", str(tmp_path / "both.png")])
    image = matplotlib.image.imread(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and image.shape[0] > 500 and image.shape[1] > 1000
    assert plot_run.main([str(runs[0])]) == runs[0] / "run.png" and (runs[0] / "run.png").exists()


def test_a_resumed_steps_later_record_wins_and_bad_input_is_named(tmp_path):
    import plot_run

    metrics = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.0}, {"step": 2, "loss": 3.5}, {"step": 2, "ckpt_s": 1}]
    metrics.write_text("\n".join(map(json.dumps, lines)) + "\n")
    assert plot_run.read_metrics(metrics)["loss"] == {1: 5.0, 2: 3.5}
    with pytest.raises(FileNotFoundError, match="give a run folder"):
        plot_run.read_metrics(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="holds no step records yet"):
        plot_run.read_metrics(tmp_path / "empty")
