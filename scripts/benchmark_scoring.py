"""Is scoring as fast as a forward pass allows? Training, sequence and variant scoring of one model, side by side.

    git archive <old commit> | (mkdir -p /tmp/before && tar -x -C /tmp/before)    # the code to compare with
    python scripts/benchmark_scoring.py --config-name L1_genomic_1b --before /tmp/before --out /tmp/scoring

One run on one GPU, in this order: `--train-steps` steps of the config in BF16 on the bundled records (its
tokens/s, the mean over the steps after `--warmup`, and its exported model); the bundled records as a
reference genome; `evaluate.py --context 0` over it (consecutive `--window`-token windows: the training
window, so the same model and window as the training row); `score.py variants` on `--snvs` random SNVs
in `--variant-window`-token windows, with and without `--share-prefix`. Both scoring commands run with this
tree's code (BF16; with `--fp8` also FP8) and, with `--before`, with an older copy's, on the same model and
data; the variants' scores are compared with this tree's full-window BF16 ones.
Ratios: sequence scoring tokens/s / training tokens/s (the forward pass is about a third of a training
step's work), variants/s now / before. Writes `scoring.{json,md}` to `--out`.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import yaml
from benchmark_evaluation import RECIPE_DIR, run  # scripts/ is on the path when run as a script


def parse_args():
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-name", default="L1_genomic_1b")
    p.add_argument("--overrides", default="", help="extra training overrides (e.g. use_te=false on a CPU)")
    p.add_argument("--train-steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10, help="training steps left out of the tokens/s mean")
    p.add_argument("--window", type=int, default=None, help="evaluate.py --window (default: the training window)")
    p.add_argument("--eval-records", type=int, default=None, help="evaluate.py --max-records (default: all 330)")
    p.add_argument("--snvs", type=int, default=10_000)
    p.add_argument("--variant-window", type=int, default=1024)
    p.add_argument("--fp8", action="store_true", help="also score with --fp8 (block-scaled FP8; TE on a GPU)")
    p.add_argument("--before", type=Path, default=None, help="an older copy of the recipe to compare with")
    p.add_argument("--work", type=Path, default=Path("/tmp/benchmark_scoring"))
    p.add_argument("--out", type=Path, default=RECIPE_DIR / "benchmarks")
    return p.parse_args()


def train(args) -> tuple[Path, float, int]:
    """Train in BF16; returns the exported model, the mean tokens/s per GPU after warm-up, and the window."""
    work = args.work / "train"
    run(
        [
            sys.executable,
            "train_fsdp2.py",
            "--config-name",
            args.config_name,
            f"num_train_steps={args.train_steps}",
            "fp8_config.enabled=false",
            f"checkpoint.ckpt_dir={work / 'ckpt'}",
            "checkpoint.save_final_model=true",
            "checkpoint.overwrite=true",
            "checkpoint.resume_from_checkpoint=false",
            f"checkpoint.save_every_n_steps={args.train_steps}",
            f"run_dir={work / 'run'}",
            *args.overrides.split(),
        ],
        args.work / "train.log",
    )
    events = [json.loads(x) for x in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    rates = [e["tokens_per_s_per_gpu"] for e in events if "tokens_per_s_per_gpu" in e and e["step"] > args.warmup]
    window = args.window or yaml.safe_load((work / "run" / "config.yaml").read_text())["dataset"]["max_seq_length"]
    return work / "ckpt" / "final_model", float(np.mean(rates)), window


def reference_and_snvs(args) -> tuple[Path, Path]:
    """The bundled records as chromosomes (ref.fa) and `--snvs` random A/C/G/T SNVs on them (snvs.vcf)."""
    records = pq.read_table(RECIPE_DIR / "test_genomic_sequences.parquet").column("sequence").to_pylist()
    chroms = {f"chr{i + 1}": s.upper() for i, s in enumerate(records)}
    reference, vcf = args.work / "ref.fa", args.work / "snvs.vcf"
    reference.write_text("".join(f">{name}\n{seq}\n" for name, seq in chroms.items()))
    rng = np.random.default_rng(0)
    names = list(chroms)
    offsets = np.cumsum([0] + [len(chroms[n]) for n in names])
    picked = set()
    while len(picked) < args.snvs:  # uniform over the genome, A/C/G/T reference bases only
        g = int(rng.integers(offsets[-1]))
        i = int(np.searchsorted(offsets, g, side="right") - 1)
        if chroms[names[i]][g - offsets[i]] in "ACGT":
            picked.add((i, g - offsets[i]))
    lines = ["##fileformat=VCFv4.2", *(f"##contig=<ID={n},length={len(s)}>" for n, s in chroms.items())]
    lines.append("#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO")
    for i, pos0 in sorted(picked):
        ref = chroms[names[i]][pos0]
        alt = "ACGT"[("ACGT".index(ref) + 1 + int(rng.integers(3))) % 4]
        lines.append(f"{names[i]}\t{pos0 + 1}\t.\t{ref}\t{alt}\t.\t.\t.")
    vcf.write_text("\n".join(lines) + "\n")
    return reference, vcf


def sequence_scoring(args, model, reference, window: int, code: Path, tag: str, extra: tuple) -> dict:
    """evaluate.py --context 0 with the recipe at `code` (and `extra` options): throughput, bits per base."""
    out = args.work / f"evaluate_{tag}.json"
    limit = ["--max-records", str(args.eval_records)] if args.eval_records else []
    command = ["evaluate.py", "--model", model, "--data", reference, "--window", window, "--context", 0, *limit]
    run([sys.executable, *map(str, command), *extra, "--out", str(out)], args.work / f"evaluate_{tag}.log", cwd=code)
    overall = json.loads(out.read_text())["overall"]
    tokens = overall["bases"] + overall["excluded"] + overall["length"] / (window - 1)  # + about one <BOS> a window
    return {
        "sequence_tokens_per_s": tokens / overall["seconds"],
        "sequence_bases_per_s": overall["bases"] / overall["seconds"],
        "bits_per_base": overall["bits_per_base"],
    }


def variant_scoring(args, model, reference, vcf, code: Path, tag: str, extra: tuple) -> dict:
    """score.py variants with the recipe at `code` (and `extra` options): variants/s and the scores."""
    scored = args.work / f"variants_{tag}.tsv"
    command = ["score.py", "variants", "--model", model, "--reference", reference, "--vcf", vcf]
    command += ["--window", args.variant_window, "--out", scored, *extra]
    start = time.perf_counter()
    run([sys.executable, *map(str, command)], args.work / f"variants_{tag}.log", cwd=code)
    seconds = time.perf_counter() - start
    summary = (args.work / f"variants_{tag}.log").read_text().strip().splitlines()[-1]
    rows = [line.split("\t") for line in scored.read_text().splitlines()[1:]]
    return {
        "variants_per_s": float(summary.split("variants_per_s=")[1].split()[0].replace(",", "")),
        "variants_command_seconds": seconds,
        "scores": [float(r[8]) for r in rows if r[9] == "scored"],
    }


def main():
    """Train, score with each code, write the ratios (after each code: a cut run keeps what it measured)."""
    args = parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    model, train_tokens_per_s, window = train(args)
    reference, vcf = reference_and_snvs(args)
    # tag -> (code, evaluate.py options or None to skip, score.py variants options or None to skip);
    # "before" second: the reference of the variants/s target.
    runs = {"now": (RECIPE_DIR, (), ())}
    runs |= {"before": (args.before.resolve(), (), ())} if args.before else {}
    runs |= {"now_fp8": (RECIPE_DIR, ("--fp8",), ("--fp8",))} if args.fp8 else {}
    runs |= {"now_shared": (RECIPE_DIR, None, ("--share-prefix",))}
    results = {}
    for tag, (code, sequence_options, variant_options) in runs.items():
        results[tag] = {}
        if sequence_options is not None:
            results[tag] |= sequence_scoring(args, model, reference, window, code, tag, sequence_options)
        if variant_options is not None:
            results[tag] |= variant_scoring(args, model, reference, vcf, code, tag, variant_options)
        write_report(args, summarize(args, results, train_tokens_per_s, window), complete=len(results) == len(runs))


def summarize(args, results: dict, train_tokens_per_s: float, window: int) -> dict:
    """The figures and the ratios of the codes measured so far."""
    now = results["now"]
    summary = {
        "command": " ".join(sys.argv),
        "train_tokens_per_s_per_gpu_bf16": train_tokens_per_s,
        "window": window,
        "variant_window": args.variant_window,
        "snvs": args.snvs,
        "sequence_scoring_over_training": now["sequence_tokens_per_s"] / train_tokens_per_s,
        **{f"{tag}_{k}": v for tag, r in results.items() for k, v in r.items() if k != "scores"},
    }
    a = np.array(now["scores"])
    if "before" in results:
        before = results["before"]
        summary |= {
            "variants_per_s_now_over_before": now["variants_per_s"] / before["variants_per_s"],
            "sequence_tokens_per_s_now_over_before": now["sequence_tokens_per_s"] / before["sequence_tokens_per_s"],
            "variant_scores_max_abs_difference": float(np.abs(a - np.array(before["scores"])).max()),
            "variant_scores_correlation": float(np.corrcoef(a, before["scores"])[0, 1]),
        }
    if "now_fp8" in results:
        fp8 = results["now_fp8"]
        summary |= {
            "fp8_over_bf16_sequence_tokens_per_s": fp8["sequence_tokens_per_s"] / now["sequence_tokens_per_s"],
            "fp8_over_bf16_variants_per_s": fp8["variants_per_s"] / now["variants_per_s"],
            "fp8_variant_scores_correlation_with_bf16": float(np.corrcoef(fp8["scores"], a)[0, 1]),
        }
        if "before" in results:
            summary["variants_per_s_fp8_over_before"] = fp8["variants_per_s"] / results["before"]["variants_per_s"]
    if "now_shared" in results:
        shared = results["now_shared"]
        summary |= {
            "shared_prefix_over_full_windows_variants_per_s": shared["variants_per_s"] / now["variants_per_s"],
            "shared_prefix_scores_max_abs_difference": float(np.abs(np.array(shared["scores"]) - a).max()),
            "shared_prefix_scores_correlation": float(np.corrcoef(shared["scores"], a)[0, 1]),
        }
        if "before" in results:
            summary["variants_per_s_shared_prefix_over_before"] = (
                shared["variants_per_s"] / results["before"]["variants_per_s"]
            )
    return summary


def write_report(args, summary: dict, complete: bool) -> None:
    """scoring.json and scoring.md in --out (marked partial until every code has run)."""
    summary = {**summary, "complete": complete}
    (args.out / "scoring.json").write_text(json.dumps(summary, indent=1))
    lines = [f"`{summary['command']}`", "", "| figure | value |", "|---|---|"]
    figures = {k: v for k, v in summary.items() if k != "command"}
    lines += [f"| {k} | {v:,.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in figures.items()]
    (args.out / "scoring.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
