"""scripts/benchmark_evaluation.py's report: the evidence tables rebuilt from the JSON the runs wrote."""

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import benchmark_evaluation  # noqa: E402

BODY = "config_kwargs.num_hidden_layers=8"
SETUP = {
    "config_name": "L1_genomic_1b",
    "overrides": BODY,
    "steps": 500,
    "window": 8192,
    "context": 4096,
    "eval_bases": 300000,
}
CODON = {
    "genome": "ELS37",
    "orfs": 200,
    "substitutions": 18000,
    "ratio_pos12_over_pos3": 1.044,
    "ratio_95ci": [1.022, 1.065],
}


def vep(model: str, syn_vs_stop: float) -> dict:
    pair = {"auroc": syn_vs_stop, "ci95": [syn_vs_stop - 0.02, syn_vs_stop + 0.02]}
    pairs = ("synonymous_vs_nonsense", "missense_vs_nonsense", "synonymous_vs_missense")
    return {
        "genome": "ELS37",
        "window": 1024,
        "substitutions": {"synonymous": 10, "missense": 20, "nonsense": 5},
        "models": {model: dict.fromkeys(pairs, pair), "markov:5": dict.fromkeys(pairs, pair)},
    }


def test_report_has_the_baseline_table_and_one_row_per_arm(tmp_path):
    table = {
        ("held-out species (H. pylori)", "trained model"): 1.90,
        ("held-out species (H. pylori)", "Markov order 5"): 1.95,
        ("trained species (in-sample)", "trained model"): 1.93,
        ("trained species (in-sample)", "Markov order 5"): 1.94,
    }
    saved = {
        "bits_per_base": {f"{s} | {m}": v for (s, m), v in table.items()},
        "validation_curve": [[50, 2.0]],
        "codon": CODON,
        "variant_effects": vep("/w/default/ckpt/final_model", 0.71),
        "train_seconds": 180,
        "throughput": {"TE packed (THD)": {"bases_per_s": 1.5e5, "windows_per_s": 18.3, "bits_per_base": 1.92}},
        "command": "benchmark_evaluation.py --arm default=",
        "arm": "default",
        "parameters": 25_300_000,
        **SETUP,
    }
    (tmp_path / "evaluation.json").write_text(json.dumps(saved))
    (tmp_path / "evaluation_arms").mkdir()
    for name, bits, gap, auroc in (("default", 1.90, 0.05, 0.71), ("rc", 1.89, 0.01, 0.74)):
        arm = {
            "overrides": "" if name == "default" else "dataset.reverse_complement_prob=0.5",
            "held_out_bits_per_base": bits,
            "val_rc_gap": gap,
            "codon": CODON,
            "train_seconds": 180,
            "variant_effects": vep(f"/w/{name}/ckpt/final_model", auroc),
            "parameters": 25_300_000,
            "command": "run default and rc side by side",
            "setup": SETUP,
        }
        (tmp_path / "evaluation_arms" / f"{name}.json").write_text(json.dumps(arm))

    benchmark_evaluation.report(tmp_path)
    md = (tmp_path / "evaluation.md").read_text()
    assert "500 steps of L1_genomic_1b (25.3M parameters) in 3.0 min." in md
    assert "model minus best baseline (Markov order 5) = -0.0500 bits per base" in md
    assert "1.9200 bits per base vs 1.9000 with --context 4096" in md  # the no-context figure next to the context one
    assert "| trained model | 0.710 [0.690, 0.730] |" in md and "| markov:5 | 0.710" in md
    rows = [line for line in md.splitlines() if line.startswith(("| default |", "| rc |"))]
    assert rows == [
        "| default | `-` | 1.9000 | 0.0500 | 1.044 [1.022, 1.065] | 0.710 [0.690, 0.730] | 500 steps, 3.0 min |",
        "| rc | `dataset.reverse_complement_prob=0.5` | 1.8900 | 0.0100 | 1.044 [1.022, 1.065] | 0.740 [0.720, 0.760] "
        "| 500 steps, 3.0 min |",
    ]
    assert f"Every arm also: `{BODY}`." in md  # said once, not in every row
    assert "- default, rc: `run default and rc side by side`" in md  # one line per command


def test_each_arm_trains_a_schedule_that_spans_its_steps(tmp_path, monkeypatch):
    """A tier's own schedule (L1: 100 + 400 steps) would idle at its floor LR after step 500 of a longer arm."""
    commands = []
    monkeypatch.setattr(benchmark_evaluation, "run", lambda command, log: commands.append(command) or 1.0)
    args = SimpleNamespace(work=tmp_path, config_name="L1_genomic_1b", steps=1000, overrides=BODY)
    benchmark_evaluation.train_arm(args, "rc", "dataset.reverse_complement_prob=0.5", tmp_path, tmp_path, ["python"])
    command = commands[0]
    warmup = command.index("lr_scheduler_kwargs.num_warmup_steps=100")
    assert command[warmup + 1] == "lr_scheduler_kwargs.num_decay_steps=900"
    assert command.index(BODY) > warmup and command[-1] == "dataset.reverse_complement_prob=0.5"  # theirs win


def test_a_run_cut_by_its_time_limit_reports_the_stages_it_finished(tmp_path, monkeypatch):
    # The full arm writes evaluation.json after each stage: cut inside the variant effects, the report has the
    # bits per base, the no-context line and the codon check, and says what it did not reach.
    b = benchmark_evaluation
    monkeypatch.setattr(sys, "argv", ["benchmark_evaluation.py", "--ragout", str(tmp_path), "--out", str(tmp_path)])
    monkeypatch.setattr(b, "genomes", lambda ragout, species: [tmp_path / f"{species[0]}.fa"])
    monkeypatch.setattr(b, "link_folder", lambda folder, files: folder)
    monkeypatch.setattr(b, "truncated", lambda folder, files, bases: folder)
    monkeypatch.setattr(b, "train_arm", lambda *a: (tmp_path / "final_model", tmp_path, 180.0))
    monkeypatch.setattr(b, "parameter_count", lambda model: 25_300_000)
    monkeypatch.setattr(b, "validation_curve", lambda run_dir, key: [(50, 2.0)])
    bits = {"trained model": 1.90, "Markov order 5": 1.95}
    monkeypatch.setattr(
        b, "evaluate_jobs", lambda args, sets, models, *a: {(s, m): bits.get(m, 2.0) for s in sets for m in models}
    )
    throughput = {"TE packed (THD)": {"bases_per_s": 1.5e5, "windows_per_s": 18.3, "bits_per_base": 1.92}}
    monkeypatch.setattr(b, "scoring_throughput", lambda *a: throughput)
    monkeypatch.setattr(b, "codon_check", lambda *a, **k: CODON)

    def cut(*args, **kwargs):
        raise KeyboardInterrupt  # as `timeout` would end the run here

    monkeypatch.setattr(b, "variant_effects", cut)
    with pytest.raises(KeyboardInterrupt):
        b.main()
    b.report(tmp_path)
    md = (tmp_path / "evaluation.md").read_text()
    assert "**Cut before: variant_effects**" in md and "Zero-shot" not in md
    assert "1.9200 bits per base vs 1.9000 with --context 4096" in md and "= 1.044, 95% CI" in md
