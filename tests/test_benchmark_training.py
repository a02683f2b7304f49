"""scripts/benchmark_training.py: what each row launches (nothing runs here)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


class Done:
    """A row's process, already finished (what a fake `launch` returns)."""

    def poll(self):
        """Exit code 0: done."""
        return 0


@pytest.fixture
def fake_data(tmp_path, monkeypatch):
    """The rows' parquet paths, under tmp_path and never written (for tests that only read the commands)."""
    import benchmark_training as bt

    monkeypatch.setattr(bt, "long_dna_parquet", lambda work: tmp_path / "long.parquet")
    monkeypatch.setattr(bt, "mixed_dna_parquet", lambda work: tmp_path / "mixed.parquet")
    monkeypatch.setattr(bt, "whole_windows_parquet", lambda work, window: tmp_path / f"whole_{window}.parquet")


@pytest.mark.parametrize("profile", [False, True])
def test_profile_steps_reach_recipe_and_bare_rows(tmp_path, monkeypatch, fake_data, profile):
    """`--profile-steps 12 14` profiles the same steps of a recipe row (profiler.*) and of a bare row."""
    import benchmark_training as bt

    launched = []
    monkeypatch.setattr(bt.subprocess, "Popen", lambda command, **kwargs: launched.append(command))
    monkeypatch.setattr(sys, "argv", ["benchmark_training.py", *(["--profile-steps", "12", "14"] if profile else [])])
    args = bt.parse_args()
    rows = {r["name"]: r for r in bt.ROWS}
    for name in ("bare TE stack FP8 current BSHD", "TE FP8 current BSHD full windows DDP"):
        bt.launch(rows[name], [0], args, tmp_path)
    bare, recipe = launched
    assert "train_ddp.py" in recipe and "--train-row" in bare
    if profile:
        assert bare[bare.index("--profile-steps") + 1 :][:2] == ["12", "14"]
    else:
        assert "--profile-steps" not in bare
    expected = ["profiler.enabled=true", "profiler.start_step=12", "profiler.end_step=14"]
    assert all(o in recipe for o in expected) == profile and any(o in recipe for o in expected) == profile


def test_finished_rows_are_written_before_the_run_ends(tmp_path, monkeypatch):
    """A run cut short (a device call's time limit) keeps the rows that finished, merged into --append's file."""
    import json

    import benchmark_training as bt

    def launch(row, gpu_ids, args, work):
        run_dir = work / row["name"].replace(" ", "_")
        run_dir.mkdir(parents=True, exist_ok=True)
        window = {"step": 20, "loss": 1.0, "tokens_per_s_per_gpu": 1000.0 + len(row["name"]), "step_time_s": 0.2}
        (run_dir / "metrics.jsonl").write_text(json.dumps(window) + "\n")
        return Done()

    monkeypatch.setattr(bt, "launch", launch)
    monkeypatch.setattr(bt.time, "sleep", lambda s: None)
    launch(bt.ROWS[0], [0], None, tmp_path / "earlier")  # a row of an earlier run, in the file to append to
    earlier = bt.summarize(bt.ROWS[0], tmp_path / "earlier" / bt.ROWS[0]["name"].replace(" ", "_"), left_out=10)
    (tmp_path / "results.json").write_text(json.dumps({"notes": "earlier", "rows": [earlier]}))
    monkeypatch.setattr(sys, "argv", ["benchmark_training.py", "--append", "--out", str(tmp_path)])
    args = bt.parse_args()
    rows = [r for r in bt.ROWS if r["group"] == "bare"][:3]
    seen = []
    previous = json.loads((tmp_path / "results.json").read_text())

    def save(results):
        seen.append([r["name"] for r in results])
        return bt.write_results(results, "now", tmp_path, previous)

    bt.run_all(rows, num_gpus=1, args=args, on_result=save)
    assert seen == [[rows[0]["name"]], [r["name"] for r in rows[:2]], [r["name"] for r in rows]]
    written = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in written["rows"]] == [bt.ROWS[0]["name"], *(r["name"] for r in rows)]
    assert written["rows"][1]["tokens_per_s_per_gpu"] == 1000.0 + len(rows[0]["name"])
    assert written["notes"] == "earlier<br>now"  # merged into the starting file each time, never compounded
    assert written["rows"][1]["step_time_curve"] == [[20, 0.2]]  # every window's step time, not only the mean


def test_longest_window_targets_count_offload_rows_and_skip_failed_ones():
    """The one-GPU 512k goal is met by either plain checkpointing or activation_cpu_offload; errors never count."""
    import benchmark_report as br

    def long(name, **extra):
        return {"group": "long", "name": name, **extra}

    results = [long("long 256k 1 GPU"), long("long 512k 1 GPU", error="OOM"), long("long 512k 1 GPU offload"),
               long("long 1024k 1 GPU offload", error="OOM"), long("long 1024k CP 2 GPU", error="x")]  # fmt: skip
    measured = {what: value for what, value, _ in br.targets(results) if what.startswith("longest window")}
    assert measured == {
        "longest window trained on 1 GPU, checkpointing (thousand tokens)": 256,
        "longest window trained on 1 GPU, + activation_cpu_offload (thousand tokens)": 512,
        "longest window trained on 1 GPU, either (thousand tokens)": 512,
        "longest window trained on 2 GPUs with cp=2 (thousand tokens)": None,
    }
    assert br.gpu_of([{"name": "x"}, {"device": "NVIDIA H100 80GB HBM3"}]) == "H100"
    assert br.gpu_of([]) == "GPU"


def test_rows_with_their_own_few_steps_log_each_step_and_leave_out_the_first(tmp_path, monkeypatch, fake_data):
    """A 3-step long row logs every step, so its mean is steps 2-3 (not a window holding step 1's setup)."""
    import json

    import benchmark_training as bt

    launched = []
    monkeypatch.setattr(bt.subprocess, "Popen", lambda command, **kwargs: launched.append(command))
    monkeypatch.setattr(sys, "argv", ["benchmark_training.py"])
    args = bt.parse_args()
    rows = {r["name"]: r for r in bt.ROWS}
    for name in ("long 8k 1 GPU", "long 256k 1 GPU offload", "TE BF16 THD"):
        bt.launch(rows[name], [0], args, tmp_path)
    short, longer, default = launched
    assert "num_train_steps=3" in short and "logger.frequency=1" in short
    assert "num_train_steps=2" in longer and "logger.frequency=1" in longer
    assert f"dataset.load_dataset_kwargs.path={tmp_path / 'whole_262144.parquet'}" in longer
    assert f"num_train_steps={args.steps}" in default and f"logger.frequency={args.log_every}" in default

    first_step_setup = [{"step": 1, "tokens_per_s_per_gpu": 100.0, "step_time_s": 4.0}]
    steady = [{"step": s, "tokens_per_s_per_gpu": 1000.0, "step_time_s": 0.2} for s in (2, 3)]
    lines = [{**m, "loss": 5.0, "mfu": 0.5} for m in first_step_setup + steady]

    def ran(row, gpu_ids, args, work):  # the row logged its steps (as many as it has) and ended
        run_dir = work / row["name"].replace(" ", "_")
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(m) for m in lines[: row["steps"]]))
        return Done()

    monkeypatch.setattr(bt, "launch", ran)
    monkeypatch.setattr(bt.time, "sleep", lambda s: None)
    args.work_dir = str(tmp_path / "ran")
    # run_all summarizes each row as schedule() says: steps 2-3 of the 3-step row, the only step of a one-step row
    one_step = rows["long 1024k 1 GPU offload"]  # a very long window: its only step is its measure, setup included
    three, one = bt.run_all([rows["long 8k 1 GPU"], one_step], num_gpus=1, args=args)
    assert three["tokens_per_s_per_gpu"] == 1000.0 and three["step_time_s"] == pytest.approx(0.2)
    assert one["step_time_s"] == pytest.approx(4.0)
    assert bt.schedule(one_step, args) == (1, 1, 0)
    assert bt.schedule(rows["TE BF16 THD"], args) == (args.steps, args.log_every, args.warmup)


def long_rows():
    """Long-context results in no order: plain and offload rows, a failed one and a CP row."""

    def long(name, **extra):
        return {"group": "long", "name": name, "tokens_per_s_per_gpu": 1.0, "peak_memory_gib": 1.0, **extra}

    return [
        long("long 256k 1 GPU"),
        long("long 8k 1 GPU"),
        long("long 512k 1 GPU", error="OOM"),
        long("long 512k 1 GPU offload"),
        long("long 256k 1 GPU offload"),
        long("long 1024k CP 2 GPU"),
    ]


def test_long_context_plot_draws_each_memory_option_by_window_length():
    """Plain and offload rows are separate lines, shortest window first; failed and CP rows are not drawn."""
    import benchmark_report as br

    series = {label: [r["name"] for r in rows] for label, rows in br.long_context_series(long_rows()).items()}
    assert series == {
        "checkpointing": ["long 8k 1 GPU", "long 256k 1 GPU"],
        "+ activation_cpu_offload": ["long 256k 1 GPU offload", "long 512k 1 GPU offload"],
    }


def test_long_context_plot_is_written(tmp_path):
    """The plot file of those rows (matplotlib is not a test requirement: skips without it)."""
    pytest.importorskip("matplotlib")
    import benchmark_report as br

    br.plot(long_rows(), tmp_path)
    assert (tmp_path / "long_context.png").stat().st_size > 0


def test_long_window_rows_train_one_whole_window_every_step(tmp_path):
    """Each pack of a long-window row is one sequence of the full window, across the epoch boundary.

    The joined 2.4 Mbp record alone ends in a short window: at 256k, step 2 held 40,653 + 221,491 tokens here.
    """
    import benchmark_training as bt
    import torch

    from data.loader import create_thd_dataloader
    from runtime.distributed import DistributedConfig

    window = 256 * 1024
    rows = {r["name"]: r for r in bt.long_context_rows()}
    assert "{whole_windows}" in rows["long 256k 1 GPU"]["overrides"]
    path = bt.whole_windows_parquet(tmp_path, window)
    loader, _ = create_thd_dataloader(DistributedConfig(), str(bt.RECIPE_DIR / "tokenizers/nucleotide_fast_tokenizer"),
                                      {"path": str(path)}, micro_batch_size=1, max_seq_length=window, stride=0,
                                      num_workers=2)  # fmt: skip
    batches = iter(loader)
    for _ in range(10):  # 9 windows an epoch
        assert torch.diff(next(batches)["cu_seq_lens_q"]).tolist() == [window]


def test_mixed_rows_read_8k_and_2k_records_in_turn(tmp_path):
    """MIXED_DNA's records alternate 8,190 and 2,046 bases (one full and one short window per BSHD pair)."""
    import benchmark_training as bt
    import pyarrow.parquet as pq

    lengths = [len(s) for s in pq.read_table(bt.mixed_dna_parquet(tmp_path)).column("sequence").to_pylist()]
    assert len(lengths) > 160 and len(lengths) % 2 == 0  # more than a 50-step row reads (THD: ~160), whole pairs
    assert lengths == [8190, 2046] * (len(lengths) // 2)


def test_row_steps_runs_a_row_in_the_steps_given_and_rejects_unknown_names(tmp_path, monkeypatch, fake_data):
    """`--row-steps "long 512k 1 GPU offload=1"` runs that row one step (measured); others keep theirs."""
    import benchmark_training as bt

    only = "long 512k 1 GPU offload,long 256k 1 GPU offload"
    monkeypatch.setattr(sys, "argv", ["benchmark_training.py", "--groups", "long", "--only", only,
                                      "--row-steps", "long 512k 1 GPU offload=1"])  # fmt: skip
    args = bt.parse_args()
    rows = {r["name"]: r for r in bt.chosen_rows(args)}
    assert set(rows) == set(only.split(","))
    assert bt.schedule(rows["long 512k 1 GPU offload"], args) == (1, 1, 0)
    assert bt.schedule(rows["long 256k 1 GPU offload"], args) == (2, 1, 1)
    assert next(r for r in bt.ROWS if r["name"] == "long 512k 1 GPU offload")["steps"] == 2  # ROWS unchanged
    launched = []
    monkeypatch.setattr(bt.subprocess, "Popen", lambda command, **kwargs: launched.append(command))
    bt.launch(rows["long 512k 1 GPU offload"], [0], args, tmp_path)
    assert "num_train_steps=1" in launched[0]

    args.row_steps = "long 512k 1 GPU=1"  # a row --only did not choose
    with pytest.raises(SystemExit, match=r"\['long 512k 1 GPU'\]"):
        bt.chosen_rows(args)
    args.row_steps = "long 512k 1 GPU offload=0"
    with pytest.raises(SystemExit, match="'long 512k 1 GPU offload': '0'"):
        bt.chosen_rows(args)


def test_main_runs_the_rows_with_their_row_steps_and_says_so_in_the_notes(tmp_path, monkeypatch):
    """main() hands run_all the re-stepped row, and results.json's notes give the steps that row ran."""
    import json

    import benchmark_training as bt

    ran = []

    def run_all(rows, num_gpus, args, on_result=lambda results: None):
        ran.extend(rows)
        return [{**r, "error": "not run here"} for r in rows]

    monkeypatch.setattr(bt, "run_all", run_all)
    monkeypatch.setattr(bt, "plot", lambda results, out: None)
    row = "long 512k 1 GPU offload"
    argv = ["--groups", "long", "--only", row, "--row-steps", f"{row}=1", "--gpus", "1", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", ["benchmark_training.py", *argv])
    bt.main()
    assert [(r["name"], r["steps"]) for r in ran] == [(row, 1)]
    notes = json.loads((tmp_path / "results.json").read_text())["notes"]
    assert f"{row}: 1, after step 0" in notes
