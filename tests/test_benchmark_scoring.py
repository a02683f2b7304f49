"""scripts/benchmark_scoring.py end to end on a CPU (the HF path): every code's figures, ratios and score agreement."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

RECIPE_DIR = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_scoring_benchmark_writes_each_code_and_the_ratios(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "scripts/benchmark_scoring.py", "--config-name", "L0_sanity", "--overrides",
               "use_te=false", "--train-steps", "3", "--warmup", "1", "--eval-records", "2", "--snvs", "12",
               "--variant-window", "96", "--work", str(tmp_path / "work"), "--out", str(out),
               "--before", str(RECIPE_DIR)]  # fmt: skip
    proc = subprocess.run(command, cwd=RECIPE_DIR, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert proc.stdout.count("| complete | False |") == 2  # a partial report after "now", then after "before"
    summary = json.loads((out / "scoring.json").read_text())
    assert summary["complete"] is True and summary["snvs"] == 12
    for tag in ("now", "before", "now_shared"):
        assert summary[f"{tag}_variants_per_s"] > 0
    # "before" is this code too: the same scores; the shared-prefix scores equal the full-window ones.
    assert summary["variant_scores_max_abs_difference"] == 0
    assert summary["shared_prefix_scores_max_abs_difference"] < 1e-4
    assert summary["sequence_scoring_over_training"] > 0 and summary["now_bits_per_base"] > 0
    assert (out / "scoring.md").read_text().count("\n| ") >= 15
