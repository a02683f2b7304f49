"""Do the numbers mean something? Train on bacterial genomes, hold one species out, compare with k-mer baselines.

    apt-get download ragout-examples && dpkg -x ragout-examples_*_all.deb /tmp/ragout     # 16 real genomes
    python scripts/benchmark_evaluation.py --ragout /tmp/ragout --config-name L1_genomic_1b --steps 600

Training data: the E. coli, S. aureus and V. cholerae reference genomes; held out: every H. pylori genome
(a species the model never sees), also the validation set during training. Then, through `evaluate.py`
on the same windows (each genome cut to `--eval-bases` bases): bits per base of the model and of order-0
and order-k Markov models fitted on the training genomes, on the held-out species and on the trained ones
(in-sample for all models); the codon-position check (`scripts/codon_position_check.py`) and the zero-shot
variant-effect AUROCs (`scripts/variant_effect_benchmark.py`, the model and the Markov baselines) on one
held-out genome; and scoring throughput, TE packed vs HF one window at a time, on the same 8k windows.
Writes `evaluation.{md,json}` and `evaluation_*.png` to `--out`.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parents[1]
TRAIN_SPECIES, HELD_OUT_SPECIES = ("E.Coli", "S.Aureus", "V.Cholerae"), ("H.Pylori",)


def parse_args():
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ragout", type=Path, default=None, help="where ragout-examples was unpacked (required)")
    p.add_argument("--work", type=Path, default=Path("/tmp/benchmark_evaluation"))
    p.add_argument("--config-name", default="L1_genomic_1b")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--overrides", default="", help="extra training overrides")
    p.add_argument("--gpus", type=int, default=1)
    p.add_argument("--window", type=int, default=8192)
    p.add_argument("--context", type=int, default=4096, help="evaluate.py --context for the bits-per-base table")
    p.add_argument("--eval-bases", type=int, default=300_000, help="bases evaluated per genome")
    p.add_argument("--markov-orders", default="0,5,6,7,8")
    p.add_argument("--no-throughput", action="store_true", help="skip TE vs HF scoring speed (needs a GPU)")
    p.add_argument("--no-variant-effects", action="store_true", help="skip the zero-shot variant-effect AUROCs")
    p.add_argument("--vep-args", default="", help="extra variant_effect_benchmark.py options, e.g. '--max-orfs 100'")
    p.add_argument("--codon-args", default="", help="extra codon_position_check.py options, e.g. '--max-orfs 50'")
    p.add_argument("--out", type=Path, default=RECIPE_DIR / "benchmarks")
    p.add_argument("--plot-only", type=Path, default=None, help="re-plot an existing evaluation.json into --out")
    args = p.parse_args()
    if args.ragout is None and args.plot_only is None:
        p.error("--ragout is required: apt-get download ragout-examples && dpkg -x ragout-examples_*_all.deb DIR")
    return args


def genomes(ragout: Path, species) -> list[Path]:
    """The reference genomes of `species` (gzipped FASTA)."""
    root = next(ragout.rglob("examples"))
    return sorted(f for s in species for f in (root / s / "references").glob("*.fasta.gz"))


def link_folder(folder: Path, files: list[Path]) -> Path:
    """A folder of links to `files` (a data set path for training and evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = folder / f"{f.parent.parent.name}_{f.name}"
        if not link.exists():
            link.symlink_to(f.resolve())  # absolute: a relative --ragout would leave a dangling link
    return folder


def run(cmd: list[str], log: Path) -> float:
    """Run `cmd` in the recipe folder, output to `log`; fail loudly; returns seconds."""
    start = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(cmd, cwd=RECIPE_DIR, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed; see {log}:\n{log.read_text()[-3000:]}")
    return time.perf_counter() - start


def truncated(folder: Path, files: list[Path], bases: int) -> Path:
    """Each genome's first `bases` bases, as FASTA files in `folder`: the windows every model is scored on."""
    from data.fasta import fasta_records

    folder.mkdir(parents=True, exist_ok=True)
    for f in files:
        out = folder / f"{f.parent.parent.name}_{f.name.removesuffix('.gz')}"
        if not out.exists():
            record = next(fasta_records([str(f)]))
            out.write_text(f">{record['name']}\n{record['sequence'][:bases]}\n")
    return folder


def main():
    """Prepare, train, evaluate, check, time; then write the evidence table and plots."""
    args = parse_args()
    if args.plot_only:
        saved = json.loads(args.plot_only.read_text())
        table = {tuple(k.split(" | ")): v for k, v in saved["bits_per_base"].items()}
        return plot(args.out, table, saved["validation_curve"])
    sys.path.insert(0, str(RECIPE_DIR))
    work = args.work
    train_files, held_files = genomes(args.ragout, TRAIN_SPECIES), genomes(args.ragout, HELD_OUT_SPECIES)
    train, held_out = link_folder(work / "train", train_files), link_folder(work / "held_out", held_files)
    ckpt, run_dir = work / "ckpt", work / "run"
    launcher = (
        [sys.executable]
        if args.gpus == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    )
    train_seconds = run(
        [
            *launcher,
            "train_fsdp2.py",
            "--config-name",
            args.config_name,
            f"num_train_steps={args.steps}",
            f"dataset.load_dataset_kwargs.path={train}",
            "validation.enabled=true",
            f"+validation.load_dataset_kwargs.path={held_out}",
            f"validation.every_n_steps={max(args.steps // 10, 1)}",
            f"checkpoint.ckpt_dir={ckpt}",
            "checkpoint.save_final_model=true",
            "checkpoint.overwrite=true",
            "checkpoint.resume_from_checkpoint=false",
            f"checkpoint.save_every_n_steps={args.steps}",
            f"run_dir={run_dir}",
            *args.overrides.split(),
        ],
        work / "train.log",
    )
    sets = {
        "held-out species (H. pylori)": truncated(work / "eval_held_out", held_files, args.eval_bases),
        "trained species (in-sample)": truncated(work / "eval_train", train_files, args.eval_bases),
    }
    models = {
        "trained model": str(ckpt / "final_model"),
        **{f"Markov order {k}": f"markov:{k}" for k in args.markov_orders.split(",")},
    }
    jobs = {}  # (set, model) -> (command, log, out); the baselines run side by side on the CPU cores
    for set_name, data in sets.items():
        for model_name, model in models.items():
            out = work / f"eval_{len(jobs)}.json"
            jobs[set_name, model_name] = (
                [
                    sys.executable,
                    "evaluate.py",
                    "--model",
                    model,
                    "--data",
                    str(data),
                    "--window",
                    str(args.window),
                    "--context",
                    str(args.context),
                    "--train-data",
                    str(train),
                    "--out",
                    str(out),
                ],
                work / f"eval_{len(jobs)}.log",
                out,
            )
    with ThreadPoolExecutor(max(1, (os.cpu_count() or 2) // 2)) as pool:
        list(pool.map(lambda job: run(*job[:2]), jobs.values()))
    table = {key: json.loads(out.read_text())["overall"]["bits_per_base"] for key, (_, _, out) in jobs.items()}
    codon_out = work / "codon.json"
    run(
        [
            sys.executable,
            "scripts/codon_position_check.py",
            "--model",
            str(ckpt / "final_model"),
            "--genome",
            str(held_files[0]),
            "--out",
            str(codon_out),
            "--plot",
            str(args.out / "evaluation_codon.png"),
            *args.codon_args.split(),
        ],
        work / "codon.log",
    )
    vep_out = work / "variant_effects.json"
    if not args.no_variant_effects:
        run(
            [
                sys.executable,
                "scripts/variant_effect_benchmark.py",
                "--genome",
                str(held_files[0]),
                "--work",
                str(work / "variant_effects"),
                "--model",
                str(ckpt / "final_model"),
                *(f"--model=markov:{k}" for k in args.markov_orders.split(",") if k != "0"),
                "--train-data",
                str(train),
                "--out",
                str(vep_out),
                *args.vep_args.split(),
            ],
            work / "variant_effects.log",
        )
    throughput = {}
    for label, flag in (
        () if args.no_throughput else (("TE packed (THD)", "true"), ("HF, one window at a time", "false"))
    ):
        out = work / f"throughput_{flag}.json"
        run(
            [
                sys.executable,
                "evaluate.py",
                "--model",
                str(ckpt / "final_model"),
                "--data",
                str(sets["held-out species (H. pylori)"]),
                "--window",
                str(args.window),
                "--context",
                "0",
                "--use-te",
                flag,
                "--out",
                str(out),
            ],
            work / f"throughput_{flag}.log",
        )
        overall = json.loads(out.read_text())["overall"]
        windows = overall["bases"] / (args.window - 1)
        throughput[label] = {
            "bases_per_s": overall["bases"] / overall["seconds"],
            "windows_per_s": windows / overall["seconds"],
            "bits_per_base": overall["bits_per_base"],
        }
    effects = None if args.no_variant_effects else json.loads(vep_out.read_text())
    write_report(args, table, json.loads(codon_out.read_text()), effects, throughput, run_dir, train_seconds)


def write_report(args, table: dict, codon: dict, effects, throughput: dict, run_dir: Path, train_seconds: float):
    """evaluation.json, evaluation.md and the bits-per-base and validation plots."""
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    curve = [(e["step"], e["val_bits_per_base"]) for e in events if "val_bits_per_base" in e]
    sets = sorted({s for s, _ in table})
    models = list(dict.fromkeys(m for _, m in table))
    lines = [
        f"`{' '.join(sys.argv)}`: {args.steps} steps of {args.config_name} in {train_seconds / 60:.1f} min.",
        "",
        f"evaluate.py --window {args.window} --context {args.context}: every base after a genome's first window "
        f"predicted from at least {args.context} bases.",
        "",
        "| bits per base | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    lines += [f"| {m} | " + " | ".join(f"{table[s, m]:.4f}" for s in sets) + " |" for m in models]
    best_markov = min((table["held-out species (H. pylori)", m], m) for m in models if m.startswith("Markov"))
    gain = table["held-out species (H. pylori)", "trained model"] - best_markov[0]
    ratio, ci = codon["ratio_pos12_over_pos3"], codon["ratio_95ci"]
    lines += [
        "",
        f"Held-out species: model minus best baseline ({best_markov[1]}) = {gain:+.4f} bits per base "
        "(negative: the model is better)."
        + "".join(
            f" Without context (--context 0, consecutive windows, {label}): {v['bits_per_base']:.4f} bits per base "
            f"vs {table['held-out species (H. pylori)', 'trained model']:.4f} with --context {args.context}."
            for label, v in list(throughput.items())[:1]
        ),
        "",
        f"Codon positions (held-out {codon['genome']}, {codon['orfs']} ORFs, "
        f"{codon['substitutions']} substitutions): mean |score| at positions 1, 2 / position 3 = {ratio:.3f}, "
        f"95% CI [{ci[0]:.3f}, {ci[1]:.3f}].",
        "",
        f"| scoring, {args.window}-token windows, no overlap | windows/s | bases/s | bits per base |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['windows_per_s']:.1f} | {v['bases_per_s']:,.0f} | {v['bits_per_base']:.4f} |"
        for k, v in throughput.items()
    ]
    if effects:
        n = effects["substitutions"]
        lines += [
            "",
            f"Zero-shot variant effects (scripts/variant_effect_benchmark.py, held-out {effects['genome']}, "
            f"{n['synonymous']} synonymous, {n['missense']} missense, {n['nonsense']} stop-gained SNVs in long "
            f"ORFs, {effects['window']}-token windows): AUROC of the score, the more benign class higher "
            "(0.5 = chance), 95% bootstrap interval.",
            "",
            "| model | synonymous vs stop-gained | missense vs stop-gained | synonymous vs missense |",
            "|---|---|---|---|",
        ]
        pairs = ("synonymous_vs_nonsense", "missense_vs_nonsense", "synonymous_vs_missense")
        lines += [
            f"| {'trained model' if m.endswith('final_model') else m} | "
            + " | ".join(f"{r[k]['auroc']:.3f} [{r[k]['ci95'][0]:.3f}, {r[k]['ci95'][1]:.3f}]" for k in pairs)
            + " |"
            for m, r in effects["models"].items()
        ]
    (args.out / "evaluation.md").write_text("\n".join(lines) + "\n")
    (args.out / "evaluation.json").write_text(
        json.dumps(
            {
                "bits_per_base": {f"{s} | {m}": v for (s, m), v in table.items()},
                "validation_curve": curve,
                "codon": codon,
                "variant_effects": effects,
                "throughput": throughput,
                "command": " ".join(sys.argv),
            },
            indent=1,
        )
    )
    print("\n".join(lines))
    plot(args.out, table, curve)


def plot(out: Path, table: dict, curve: list) -> None:
    """evaluation_bits_per_base.png: the table as bars (y axis around the values) and the validation curve."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({s for s, _ in table})
    models = list(dict.fromkeys(m for _, m in table))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, s in enumerate(sets):
        axes[0].bar([x + 0.4 * i for x in range(len(models))], [table[s, m] for m in models], width=0.4, label=s)
    axes[0].set_ylim(min(table.values()) - 0.02, max(table.values()) + 0.02)  # differences are hundredths
    axes[0].set_xticks([x + 0.2 for x in range(len(models))], models, rotation=20)
    axes[0].set_ylabel("bits per base")
    axes[0].legend(fontsize=8)
    if curve:
        axes[1].plot(*zip(*curve), marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("val_bits_per_base (held-out species)")
    fig.tight_layout()
    fig.savefig(out / "evaluation_bits_per_base.png", dpi=80)


if __name__ == "__main__":
    main()
