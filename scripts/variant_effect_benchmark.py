"""Zero-shot variant effects on a held-out genome: do scores separate synonymous from stop-gained substitutions?

    python scripts/variant_effect_benchmark.py --genome held_out.fa.gz --work /tmp/vep \
        --model ckpt/final_model --model markov:5 --train-data train.fa.gz --out vep.json

No download, no labels from outside: in the long open reading frames of the genome (ATG ... stop, at least
`--min-orf` bases, either strand), codons are drawn (seeded) and every single-base substitution in them is
classed by the standard genetic code as synonymous (same amino acid), missense (another one) or nonsense
(stop-gained). All nonsense ones are kept, and as many synonymous and missense ones (at most), drawn. They
are written as a VCF on the genome (REF/ALT on the forward strand) and each model scores them with
`score.py variants` (LL(alt window) - LL(ref window), a window of `--window - 1` bases; `--both-strands`),
k-mer baselines (`markov:K`) through the same path. Stop-gained changes break the protein, synonymous ones
mostly do not, so a model that learned coding sequence gives the nonsense ones lower scores. The figure is
the AUROC of the score separating synonymous from nonsense (0.5: chance; 1: every synonymous change scores
above every nonsense one), with a 95% bootstrap interval, and the same for missense vs nonsense and
synonymous vs missense.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE_DIR))

from data.dna import reverse_complement  # noqa: E402
from data.sources import read_records  # noqa: E402

STOPS = ("TAA", "TAG", "TGA")
# The standard genetic code, codons in TCAG order (TTT, TTC, TTA, TTG, TCT, ...); '*' is a stop.
AMINO_ACIDS = "FFLLSSSSYY**CC*WLLLLPPPPHHQQRRRRIIIMTTTTNNKKSSRRVVVVAAAADDEEGGGG"
CODE = {
    a + b + c: AMINO_ACIDS[16 * i + 4 * j + k]
    for i, a in enumerate("TCAG")
    for j, b in enumerate("TCAG")
    for k, c in enumerate("TCAG")
}
CLASSES = ("synonymous", "missense", "nonsense")


def orf_spans(sequence: str, min_length: int):
    """(strand, start, end) of each ORF (ATG to stop, stop included) of at least `min_length` bases.

    `start`/`end` are 0-based, end-exclusive coordinates on the strand's own 5'->3' sequence (for "-", the
    reverse complement).
    """
    for strand, seq in (("+", sequence.upper()), ("-", reverse_complement(sequence.upper()))):
        for frame in range(3):
            start = None
            for i in range(frame, len(seq) - 2, 3):
                codon = seq[i : i + 3]
                if start is None and codon == "ATG":
                    start = i
                elif start is not None and codon in STOPS:
                    if i + 3 - start >= min_length:
                        yield strand, start, i + 3
                    start = None


def substitution_class(codon: str, position: int, alt: str) -> str:
    """synonymous, missense or nonsense: what `alt` at `position` (0-2) of a sense codon does."""
    changed = CODE[codon[:position] + alt + codon[position + 1 :]]
    return "nonsense" if changed == "*" else "synonymous" if changed == CODE[codon] else "missense"


def draw_substitutions(genome: dict[str, str], min_orf: int, max_orfs: int, codons: int, rng) -> list[tuple]:
    """(chrom, pos 1-based, REF, ALT, class) on the forward strand: all nonsense, as many of each other class."""
    spans = [(chrom, *span) for chrom, seq in genome.items() for span in orf_spans(seq, min_orf)]
    spans = [spans[i] for i in sorted(rng.permutation(len(spans))[:max_orfs])]
    by_class = {c: [] for c in CLASSES}
    for chrom, strand, start, end in spans:
        seq = genome[chrom].upper() if strand == "+" else reverse_complement(genome[chrom].upper())
        inner = np.arange(start + 3, end - 3, 3)  # not the start codon, not the stop
        for codon_start in rng.choice(inner, size=min(codons, len(inner)), replace=False):
            codon = seq[codon_start : codon_start + 3]
            for position in range(3):
                for alt in "ACGT".replace(codon[position], ""):
                    offset = codon_start + position  # on the strand's sequence
                    pos0 = offset if strand == "+" else len(seq) - 1 - offset
                    ref_fwd, alt_fwd = (
                        (codon[position], alt)
                        if strand == "+"
                        else (reverse_complement(codon[position]), reverse_complement(alt))
                    )
                    by_class[substitution_class(codon, position, alt)].append((chrom, pos0 + 1, ref_fwd, alt_fwd))
    keep = len(by_class["nonsense"])
    chosen = []
    for name, items in by_class.items():
        picks = sorted(rng.permutation(len(items))[:keep]) if name != "nonsense" else range(len(items))
        chosen += [(*items[i], name) for i in picks]
    return sorted(set(chosen), key=lambda v: (v[0], v[1], v[3]))


def write_inputs(genome: dict[str, str], substitutions: list[tuple], work: Path) -> tuple[Path, Path]:
    """ref.fa and calls.vcf in `work` (each record's ID is its class and a number)."""
    work.mkdir(parents=True, exist_ok=True)
    reference, vcf = work / "ref.fa", work / "calls.vcf"
    reference.write_text("".join(f">{name}\n{seq}\n" for name, seq in genome.items()))
    lines = [
        "##fileformat=VCFv4.2",
        *(f"##contig=<ID={c},length={len(s)}>" for c, s in genome.items()),
        "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO",
    ]
    lines += [f"{c}\t{p}\t{k}_{n}\t{r}\t{a}\t.\t.\t." for n, (c, p, r, a, k) in enumerate(substitutions)]
    vcf.write_text("\n".join(lines) + "\n")
    return reference, vcf


def auroc(higher: np.ndarray, lower: np.ndarray) -> float:
    """P(a score of `higher` > one of `lower`), ties counting half: the Mann-Whitney U statistic / (n m)."""
    values = np.concatenate([lower, higher])
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    mean_rank = np.cumsum(counts) - (counts - 1) / 2  # 1-based, tied values sharing their mean rank
    u = mean_rank[inverse][len(lower) :].sum() - len(higher) * (len(higher) + 1) / 2
    return float(u / (len(higher) * len(lower)))


def separation(scores: dict[str, np.ndarray], rng, bootstrap: int) -> dict:
    """AUROC (and 95% bootstrap interval) of each pair of classes, the more benign class expected higher."""
    out = {}
    for high, low in (("synonymous", "nonsense"), ("missense", "nonsense"), ("synonymous", "missense")):
        a, b = scores[high], scores[low]
        boot = [auroc(rng.choice(a, len(a)), rng.choice(b, len(b))) for _ in range(bootstrap)]
        out[f"{high}_vs_{low}"] = {"auroc": auroc(a, b), "ci95": np.percentile(boot, [2.5, 97.5]).tolist()}
    return out


def score_with(model: str, reference: Path, vcf: Path, out: Path, args) -> dict[str, np.ndarray]:
    """Run score.py variants with `model`; the scores by class."""
    command = [
        sys.executable,
        str(RECIPE_DIR / "score.py"),
        "variants",
        "--model",
        model,
        "--reference",
        str(reference),
        "--vcf",
        str(vcf),
        "--window",
        str(args.window),
        "--out",
        str(out),
        *(["--train-data", args.train_data] if model.startswith("markov:") else []),
        *(["--both-strands"] if args.both_strands else []),
    ]
    subprocess.run(command, check=True, cwd=RECIPE_DIR)
    rows = [line.split("\t") for line in out.read_text().splitlines()[1:]]
    scored = [(row[2].split("_")[0], float(row[8])) for row in rows if row[9] == "scored"]
    return {c: np.array([s for k, s in scored if k == c]) for c in CLASSES}


def main(argv=None) -> dict:
    """Draw the substitutions, score them with each model, print and write the AUROCs."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genome", required=True, help="a held-out genome: FASTA/FASTQ (.gz) or parquet")
    p.add_argument("--model", action="append", required=True, help="a trained model or markov:K (repeatable)")
    p.add_argument("--train-data", default=None, help="markov:K: the records to count k-mers in")
    p.add_argument("--work", type=Path, default=Path("/tmp/variant_effect_benchmark"))
    p.add_argument("--min-orf", type=int, default=900, help="bases (default: %(default)s)")
    p.add_argument("--max-orfs", type=int, default=300, help="ORFs drawn (default: %(default)s)")
    p.add_argument("--codons", type=int, default=20, help="codons drawn per ORF (default: %(default)s)")
    p.add_argument("--window", type=int, default=1024, help="score.py --window (default: %(default)s)")
    p.add_argument("--both-strands", action="store_true", help="score.py --both-strands")
    p.add_argument("--bootstrap", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="the results as JSON")
    args = p.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    genome = dict(read_records(args.genome, option="--genome"))
    substitutions = draw_substitutions(genome, args.min_orf, args.max_orfs, args.codons, rng)
    counts = {c: sum(s[4] == c for s in substitutions) for c in CLASSES}
    if counts["nonsense"] < 10:
        raise ValueError(
            f"--genome {args.genome}: only {counts['nonsense']} stop-gained substitutions in its ORFs "
            f"of >= {args.min_orf} bases; lower --min-orf or raise --max-orfs/--codons."
        )
    reference, vcf = write_inputs(genome, substitutions, args.work)
    result = {"genome": args.genome, "substitutions": counts, "window": args.window, "models": {}}

    def timed_scores(n_model):
        start = time.perf_counter()
        scores = score_with(n_model[1], reference, vcf, args.work / f"scored_{n_model[0]}.tsv", args)
        return scores, time.perf_counter() - start

    # Side by side: a trained model on the GPU, the k-mer baselines on the CPU cores.
    with ThreadPoolExecutor(max(1, min(len(args.model), (os.cpu_count() or 2) // 2))) as pool:
        scored = list(pool.map(timed_scores, enumerate(args.model)))
    for model, (scores, seconds) in zip(args.model, scored):  # in the order given: the bootstrap draws stay seeded
        result["models"][model] = {
            **separation(scores, rng, args.bootstrap),
            "seconds": seconds,
            "mean_score": {c: float(scores[c].mean()) for c in CLASSES},
        }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    from config.command_line import run_tool

    run_tool(main)
