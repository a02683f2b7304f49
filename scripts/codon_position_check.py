"""Zero-shot biology check: does the model treat the third codon position as the most tolerant one?

    python scripts/codon_position_check.py --model ckpt/final_model --genome held_out.fa.gz \
        --out benchmarks/codon_check.json --plot benchmarks/codon_check.png

Long open reading frames (ATG ... stop, >= `--min-orf` bp, no stop in between, either strand) of the
genome are found; in each, `--codons` codons are drawn (seeded) and every single-base substitution at
codon positions 1, 2 and 3 is scored as score.py scores a variant: LL(alt window) - LL(ref window) with a
window of `--window - 1` bases centred on it, on the ORF's strand. Synonymous changes cluster at position
3, so a model that learned coding structure penalises changes there least: the ratio
mean |score| at positions 1 and 2 / mean |score| at position 3 is above 1. Its 95% confidence interval
comes from resampling ORFs (bootstrap).
"""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from variant_effect_benchmark import orf_spans  # noqa: E402  (scripts/, this script's folder)

from data.dna import reverse_complement  # noqa: E402
from data.sources import read_records  # noqa: E402
from use.inference import encode, load_model, token_log_probs  # noqa: E402
from use.variants import variant_windows  # noqa: E402


def long_orfs(sequence: str, min_length: int) -> list[str]:
    """ORFs (ATG to stop, stop included) of at least `min_length` bases on both strands, 5' to 3'."""
    strands = {"+": sequence.upper(), "-": reverse_complement(sequence.upper())}
    return [strands[strand][start:end] for strand, start, end in orf_spans(sequence, min_length)]


def orf_substitution_scores(model, tokenizer, orf: str, codons: int, bases: int, rng) -> dict[int, list[float]]:
    """|score| of every substitution at codon positions 1, 2, 3 of `codons` codons drawn from `orf`."""
    picks = rng.choice(np.arange(1, len(orf) // 3 - 1), size=min(codons, len(orf) // 3 - 2), replace=False)
    variants = []
    for c in picks:
        for position in range(3):
            pos0 = 3 * c + position
            for alt in "ACGT".replace(orf[pos0], ""):
                variants.append(
                    (position, *variant_windows(lambda a, b: orf[a:b], len(orf), pos0, orf[pos0], alt, bases))
                )
    windows = [encode(tokenizer, w) for _, _, ref_w, alt_w in variants for w in (ref_w, alt_w)]
    lls = [x.sum() for x in token_log_probs(model, windows)]
    scores = {1: [], 2: [], 3: []}
    for k, (position, *_) in enumerate(variants):
        scores[position + 1].append(abs(lls[2 * k + 1] - lls[2 * k]))
    return scores


def main():
    """Score substitutions in long ORFs, then print and write the ratio with its bootstrap interval."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--genome", required=True, help="FASTA/FASTQ (.gz) or parquet of a held-out genome")
    p.add_argument("--min-orf", type=int, default=900)
    p.add_argument("--max-orfs", type=int, default=200)
    p.add_argument("--codons", type=int, default=10, help="codons drawn per ORF")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    model, tokenizer = load_model(args.model)
    rng = np.random.default_rng(args.seed)
    orfs = [orf for _, seq in read_records(args.genome, "sequence") for orf in long_orfs(seq, args.min_orf)]
    orfs = [orfs[i] for i in sorted(rng.permutation(len(orfs))[: args.max_orfs])]
    per_orf = [
        orf_substitution_scores(model, tokenizer, o, args.codons, min(args.window - 1, len(o)), rng) for o in orfs
    ]
    means = np.array([[np.mean(s[k]) for k in (1, 2, 3)] for s in per_orf])  # [ORF, position]

    def ratio(rows):
        m = means[rows].mean(0)
        return (m[0] + m[1]) / 2 / m[2]

    boot = [ratio(rng.integers(0, len(means), len(means))) for _ in range(args.bootstrap)]
    result = {"orfs": len(orfs), "substitutions": int(sum(len(s[k]) for s in per_orf for k in (1, 2, 3))),
              "mean_abs_score": dict(zip(("pos1", "pos2", "pos3"), means.mean(0).tolist())),
              "ratio_pos12_over_pos3": ratio(np.arange(len(means))),
              "ratio_95ci": np.percentile(boot, [2.5, 97.5]).tolist(),
              "model": args.model, "genome": args.genome}  # fmt: skip
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
    elif args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 4))
        sem = means.std(0) / np.sqrt(len(means))
        ax.bar(["1", "2", "3"], means.mean(0), yerr=sem, color=["tab:blue", "tab:blue", "tab:orange"])
        ax.set_xlabel("codon position")
        ax.set_ylabel("mean |LL(alt) - LL(ref)| (nats)")
        ax.set_title(f"ratio 1,2 / 3 = {result['ratio_pos12_over_pos3']:.2f} "
                     f"[{result['ratio_95ci'][0]:.2f}, {result['ratio_95ci'][1]:.2f}]")  # fmt: skip
        fig.tight_layout()
        fig.savefig(args.plot, dpi=80)


if __name__ == "__main__":
    main()
