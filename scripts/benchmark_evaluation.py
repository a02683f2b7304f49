"""Do the numbers mean something? Train on bacterial genomes, hold one species out, compare with k-mer baselines.

    apt-get download ragout-examples && dpkg -x ragout-examples_*_all.deb /tmp/ragout     # 16 real genomes
    python scripts/benchmark_evaluation.py --ragout /tmp/ragout --config-name L1_genomic_1b --steps 600

Each arm trains `--steps` steps, its LR schedule fitted to them (a tenth warm-up, cosine decay to the last
step). Training data: the E. coli, S. aureus and V. cholerae reference genomes; held out: every H. pylori genome
(a species the model never sees), also the validation set during training. Then, through `evaluate.py`
on the same windows (each genome cut to `--eval-bases` bases): bits per base of the model and of order-0
and order-k Markov models fitted on the training genomes, on the held-out species and on the trained ones
(in-sample for all models); the codon-position check (`scripts/codon_position_check.py`) and the zero-shot
variant-effect AUROCs (`scripts/variant_effect_benchmark.py`, the model and the Markov baselines) on one
held-out genome; and scoring throughput, TE packed vs HF one window at a time, on the same 8k windows.
Writes `evaluation.{md,json}` and `evaluation_*.png` to `--out`; the JSON after each stage, the cheap ones first
(bits per base, no-context scoring, codon check, variant effects), so a run cut by a time limit still reports
what it finished and names what it did not reach.
"""

import argparse
import functools
import json
import math
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
    p.add_argument(
        "--throughput-paths",
        default="te,hf",
        help="which scoring paths the throughput rows (and the no-context bits per base) run: te, hf or both",
    )
    p.add_argument("--no-variant-effects", action="store_true", help="skip the zero-shot variant-effect AUROCs")
    p.add_argument("--vep-args", default="", help="extra variant_effect_benchmark.py options, e.g. '--max-orfs 100'")
    p.add_argument("--codon-args", default="", help="extra codon_position_check.py options, e.g. '--max-orfs 50'")
    p.add_argument("--out", type=Path, default=RECIPE_DIR / "benchmarks")
    p.add_argument(
        "--arm",
        action="append",
        default=[],
        metavar="NAME=OVERRIDES",
        help="a training variant at the same budget, e.g. 'rc=dataset.reverse_complement_prob=0.5' "
        "(repeatable; the first is reported in full, every arm in the arms table)",
    )
    p.add_argument("--arms-only", action="store_true", help="train and check only the --arm variants (no baselines)")
    p.add_argument("--report-only", action="store_true", help="rewrite evaluation.md and plots from --out's JSON")
    args = p.parse_args()
    if args.ragout is None and not args.report_only:
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


def run(cmd: list[str], log: Path, cwd: Path = RECIPE_DIR) -> float:
    """Run `cmd` in `cwd` (the recipe folder), output to `log`; fail loudly; returns seconds."""
    start = time.perf_counter()
    with log.open("w") as f:
        result = subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT)
    if result.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed; see {log}:\n{log.read_text()[-3000:]}")
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


def train_arm(args, name: str, overrides: str, train: Path, held_out: Path, launcher: list[str]):
    """Train one arm for `--steps`; returns its final model, run folder and seconds."""
    work = args.work / name
    seconds = run(
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
            f"checkpoint.ckpt_dir={work / 'ckpt'}",
            "checkpoint.save_final_model=true",
            "checkpoint.overwrite=true",
            "checkpoint.resume_from_checkpoint=false",
            f"checkpoint.save_every_n_steps={args.steps}",
            f"run_dir={work / 'run'}",
            # The schedule spans the budget (a tier's own, e.g. L1's 100 + 400 steps, would idle at its floor LR
            # after step 500 of a longer arm): a tenth warm-up, then the cosine decay to the last step.
            f"lr_scheduler_kwargs.num_warmup_steps={max(args.steps // 10, 1)}",
            f"lr_scheduler_kwargs.num_decay_steps={max(args.steps - args.steps // 10, 1)}",
            *args.overrides.split(),
            *overrides.split(),
        ],
        args.work / f"train_{name}.log",
    )
    return work / "ckpt" / "final_model", work / "run", seconds


def evaluate_jobs(args, sets: dict, models: dict, train: Path, tag: str) -> dict:
    """Bits per base of every (set, model) through evaluate.py; the Markov baselines run side by side on the CPU."""
    jobs = {}  # (set, model) -> (command, log, out)
    for set_name, data in sets.items():
        for model_name, model in models.items():
            out = args.work / f"eval_{tag}_{len(jobs)}.json"
            command = [
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
            ]
            jobs[set_name, model_name] = (command, out.with_suffix(".log"), out)
    with ThreadPoolExecutor(max(1, (os.cpu_count() or 2) // 2)) as pool:
        list(pool.map(lambda job: run(*job[:2]), jobs.values()))
    return {key: json.loads(out.read_text())["overall"]["bits_per_base"] for key, (_, _, out) in jobs.items()}


def codon_check(args, model: Path, genome: Path, name: str, plot: bool) -> dict:
    """scripts/codon_position_check.py on the held-out genome."""
    out = args.work / f"codon_{name}.json"
    plot_args = ["--plot", str(args.out / "evaluation_codon.png")] if plot else []
    run(
        [
            sys.executable,
            "scripts/codon_position_check.py",
            "--model",
            str(model),
            "--genome",
            str(genome),
            "--out",
            str(out),
            *plot_args,
            *args.codon_args.split(),
        ],
        args.work / f"codon_{name}.log",
    )
    return json.loads(out.read_text())


def variant_effects(args, model: Path, genome: Path, train: Path, name: str, baselines: bool) -> dict | None:
    """scripts/variant_effect_benchmark.py on the held-out genome (with the Markov baselines when `baselines`)."""
    if args.no_variant_effects:
        return None
    out = args.work / f"variant_effects_{name}.json"
    markov = [f"--model=markov:{k}" for k in args.markov_orders.split(",") if k != "0"] if baselines else []
    run(
        [
            sys.executable,
            "scripts/variant_effect_benchmark.py",
            "--genome",
            str(genome),
            "--work",
            str(args.work / f"variant_effects_{name}"),
            "--model",
            str(model),
            *markov,
            "--train-data",
            str(train),
            "--out",
            str(out),
            *args.vep_args.split(),
        ],
        args.work / f"variant_effects_{name}.log",
    )
    return json.loads(out.read_text())


def scoring_throughput(args, model: Path, data: Path) -> dict:
    """TE packed vs HF one window at a time, consecutive windows (--context 0) of the held-out set."""
    throughput = {}
    paths = {"te": ("TE packed (THD)", "true"), "hf": ("HF, one window at a time", "false")}
    for label, flag in (paths[p] for p in args.throughput_paths.split(",")):
        out = args.work / f"throughput_{flag}.json"
        run(
            [
                sys.executable,
                "evaluate.py",
                "--model",
                str(model),
                "--data",
                str(data),
                "--window",
                str(args.window),
                "--context",
                "0",
                "--use-te",
                flag,
                "--out",
                str(out),
            ],
            args.work / f"throughput_{flag}.log",
        )
        overall = json.loads(out.read_text())["overall"]
        throughput[label] = {
            "bases_per_s": overall["bases"] / overall["seconds"],
            "windows_per_s": overall["bases"] / (args.window - 1) / overall["seconds"],
            "bits_per_base": overall["bits_per_base"],
        }
    return throughput


def parameter_count(model: Path) -> int:
    """Parameters of an exported model, from its safetensors header (no weights read)."""
    from safetensors import safe_open

    total = 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 (safe_open has keys(), no iteration)
                total += math.prod(weights.get_slice(key).get_shape())
    return total


def validation_curve(run_dir: Path, key: str) -> list:
    """(step, value) of a validation metric from the run's metrics.jsonl."""
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(e["step"], e[key]) for e in events if key in e]


def main():
    """Prepare; train and check each arm (the first in full, unless --arms-only); then write the report."""
    args = parse_args()
    if args.report_only:
        return report(args.out)
    sys.path.insert(0, str(RECIPE_DIR))
    train_files, held_files = genomes(args.ragout, TRAIN_SPECIES), genomes(args.ragout, HELD_OUT_SPECIES)
    train, held_out = link_folder(args.work / "train", train_files), link_folder(args.work / "held_out", held_files)
    sets = {
        "held-out species (H. pylori)": truncated(args.work / "eval_held_out", held_files, args.eval_bases),
        "trained species (in-sample)": truncated(args.work / "eval_train", train_files, args.eval_bases),
    }
    launcher = [sys.executable]
    if args.gpus > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.gpus}"]
    arms = [arm.partition("=")[::2] for arm in args.arm] or [("default", "")]
    (args.out / "evaluation_arms").mkdir(parents=True, exist_ok=True)
    for i, (name, overrides) in enumerate(arms):
        model, run_dir, seconds = train_arm(args, name, overrides, train, held_out, launcher)
        full = i == 0 and not args.arms_only
        models = {"trained model": str(model)}
        if full:
            models |= {f"Markov order {k}": f"markov:{k}" for k in args.markov_orders.split(",")}
        setup = {k: getattr(args, k) for k in ("config_name", "overrides", "steps", "window", "context", "eval_bases")}
        # Written after each stage, the cheap ones first, with what is not reached yet as None: a run cut short
        # by a time limit keeps what finished (an arm's partial_<arm>.json; the full arm's report says what is
        # missing).
        result = {
            "overrides": overrides.strip(),  # this arm's own; --overrides (every arm's) under setup
            "parameters": parameter_count(model),
            "train_seconds": seconds,
            "command": " ".join(sys.argv),
            "setup": setup,
            "codon": None,
            "variant_effects": None,
            "throughput": None,
        }
        progress = args.out / ("evaluation.json" if full else f"partial_{name}.json")
        save = functools.partial(save_stage, progress, result, {**setup, "arm": name} if full else None)
        table = evaluate_jobs(args, sets if full else dict(list(sets.items())[:1]), models, train, name)
        save(
            bits_per_base={f"{s} | {m}": v for (s, m), v in table.items()},
            held_out_bits_per_base=table["held-out species (H. pylori)", "trained model"],
            validation_curve=validation_curve(run_dir, "val_bits_per_base"),
            val_rc_gap=(validation_curve(run_dir, "val_rc_gap") or [(None, None)])[-1][1],
        )
        if full:
            held = sets["held-out species (H. pylori)"]
            save(throughput={} if args.no_throughput else scoring_throughput(args, model, held))
        save(codon=codon_check(args, model, held_files[0], name, plot=full))
        save(variant_effects=variant_effects(args, model, held_files[0], train, name, baselines=full))
        arm = {k: result[k] for k in ARM_KEYS}
        (args.out / "evaluation_arms" / f"{name}.json").write_text(json.dumps(arm, indent=1))
        if not full:
            progress.unlink()
    if (args.out / "evaluation.json").exists():
        report(args.out)
    else:  # --arms-only into a new folder: the report needs a full run's results
        print(f"Arms written to {args.out / 'evaluation_arms'}: copy them into a full run's --out and --report-only.")


def save_stage(path: Path, result: dict, flat: dict | None, **stage) -> None:
    """Add a stage's results to `result` and write it; the full arm's flattened with `flat` (as the report reads)."""
    result.update(stage)
    path.write_text(json.dumps(result if flat is None else {**result, **flat}, indent=1))


ARM_KEYS = ("overrides", "parameters", "held_out_bits_per_base", "val_rc_gap", "codon", "variant_effects",
            "train_seconds", "command", "setup")  # fmt: skip


def report(out: Path) -> None:
    """evaluation.md from evaluation.json and evaluation_arms/*.json; the bits-per-base and validation plots."""
    saved = json.loads((out / "evaluation.json").read_text())
    table = {tuple(k.split(" | ")): v for k, v in saved["bits_per_base"].items()}
    held = "held-out species (H. pylori)"
    sets = sorted({s for s, _ in table})
    models = list(dict.fromkeys(m for _, m in table))
    lines = [
        f"`{saved['command']}`: {saved['steps']} steps of {saved['config_name']}"
        + (f" ({saved['parameters'] / 1e6:.1f}M parameters)" if "parameters" in saved else "")
        + f" in {saved['train_seconds'] / 60:.1f} min.",
        "",
        f"evaluate.py --window {saved['window']} --context {saved['context']}: every base after a genome's first "
        f"window predicted from at least {saved['context']} bases.",
        "",
        "| bits per base | " + " | ".join(sets) + " |",
        "|---|" + "---|" * len(sets),
    ]
    lines += [f"| {m} | " + " | ".join(f"{table[s, m]:.4f}" for s in sets) + " |" for m in models]
    missing = [stage for stage in ("throughput", "codon", "variant_effects") if saved.get(stage) is None]
    if missing:  # the run was cut by a time limit after these stages' predecessors
        lines[0] += f" **Cut before: {', '.join(missing)}** (not reached in the time the run had)."
    best_markov = min((table[held, m], m) for m in models if m.startswith("Markov"))
    lines += [
        "",
        f"Held-out species: model minus best baseline ({best_markov[1]}) = "
        f"{table[held, 'trained model'] - best_markov[0]:+.4f} bits per base (negative: the model is better)."
        + "".join(
            f" Without context (--context 0, consecutive windows, {label}): {v['bits_per_base']:.4f} bits per base "
            f"vs {table[held, 'trained model']:.4f} with --context {saved['context']}."
            for label, v in list((saved["throughput"] or {}).items())[:1]
        ),
    ]
    codon = saved["codon"]
    if codon:
        ratio, ci = codon["ratio_pos12_over_pos3"], codon["ratio_95ci"]
        lines += [
            "",
            f"Codon positions (held-out {codon['genome']}, {codon['orfs']} ORFs, {codon['substitutions']} "
            f"substitutions): mean |score| at positions 1, 2 / position 3 = {ratio:.3f}, 95% CI [{ci[0]:.3f}, "
            f"{ci[1]:.3f}].",
        ]
    if saved["throughput"]:
        lines += [
            "",
            f"| scoring, {saved['window']}-token windows, no overlap | windows/s | bases/s | bits per base |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {k} | {v['windows_per_s']:.1f} | {v['bases_per_s']:,.0f} | {v['bits_per_base']:.4f} |"
            for k, v in saved["throughput"].items()
        ]
    effects = saved["variant_effects"]
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
        lines += [
            f"| {'trained model' if m.endswith('final_model') else m} | {aurocs(r, PAIRS)} |"
            for m, r in effects["models"].items()
        ]
    arms = {p.stem: json.loads(p.read_text()) for p in sorted((out / "evaluation_arms").glob("*.json"))}
    if len(arms) > 1:
        common = {a["setup"].get("overrides", "") for a in arms.values()}
        lines += [
            "",
            "Training variants at the same budget (each arm its own run; the command that trained it below the "
            "table). Held-out H. pylori bits per base with --context as above; val_rc_gap: the last validation's mean "
            "|bits per base of a window - of its reverse complement|; codon ratio and AUROC as above."
            + (f" Every arm also: `{common.pop()}`." if len(common) == 1 and "" not in common else ""),
            "",
            "| arm | overrides | held-out bits per base | val_rc_gap | codon pos 1,2 / 3 | synonymous vs stop-gained "
            "AUROC | training |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, a in arms.items():
            vep = next(
                (
                    r
                    for m, r in (a["variant_effects"] or {"models": {}})["models"].items()
                    if not m.startswith("markov")
                ),
                None,
            )
            codon_ci = a["codon"]["ratio_95ci"]
            lines.append(
                f"| {name} | `{a['overrides'] or '-'}` | {a['held_out_bits_per_base']:.4f} | "
                f"{a['val_rc_gap'] if a['val_rc_gap'] is None else format(a['val_rc_gap'], '.4f')} | "
                f"{a['codon']['ratio_pos12_over_pos3']:.3f} [{codon_ci[0]:.3f}, {codon_ci[1]:.3f}] | "
                f"{aurocs(vep, PAIRS[:1]) if vep else '-'} | {a['setup']['steps']} steps, "
                f"{a['train_seconds'] / 60:.1f} min |"
            )
        by_command = {}  # arms trained side by side by one command share its line
        for name, a in arms.items():
            by_command.setdefault(a["command"], []).append(name)
        lines += ["", *(f"- {', '.join(names)}: `{command}`" for command, names in by_command.items())]
    (out / "evaluation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(out, table, saved["validation_curve"])


PAIRS = ("synonymous_vs_nonsense", "missense_vs_nonsense", "synonymous_vs_missense")


def aurocs(result: dict, pairs) -> str:
    """'AUROC [low, high]' cells of one model's variant-effect result."""
    return " | ".join(
        f"{result[k]['auroc']:.3f} [{result[k]['ci95'][0]:.3f}, {result[k]['ci95'][1]:.3f}]" for k in pairs
    )


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
