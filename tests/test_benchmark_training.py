"""scripts/benchmark_training.py: what each row launches (nothing runs here)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))


@pytest.mark.parametrize("profile", [False, True])
def test_profile_steps_reach_recipe_and_bare_rows(tmp_path, monkeypatch, profile):
    """`--profile-steps 12 14` profiles the same steps of a recipe row (profiler.*) and of a bare row."""
    import benchmark_training as bt

    launched = []
    monkeypatch.setattr(bt.subprocess, "Popen", lambda command, **kwargs: launched.append(command))
    monkeypatch.setattr(bt, "long_dna_parquet", lambda work: tmp_path / "long.parquet")
    monkeypatch.setattr(bt, "mixed_dna_parquet", lambda work: tmp_path / "mixed.parquet")
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
