"""A reference FASTA and a VCF of random SNVs and indels on it, from the bundled records, for score.py.

    python scripts/make_example_variants.py --out /tmp/example     # writes ref.fa and calls.vcf there

The reference is the first `--records` records of test_genomic_sequences.parquet (as chr1, chr2, ...);
the variants are drawn with a fixed seed: SNVs, short insertions and deletions, and one site whose REF
does not match the reference (score.py skips and counts it).
"""

import argparse
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

PARQUET = Path(__file__).resolve().parents[1] / "test_genomic_sequences.parquet"


def main():
    """Write ref.fa and calls.vcf into --out."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--records", type=int, default=3)
    p.add_argument("--variants", type=int, default=30, help="per chromosome")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    chroms = {
        f"chr{i + 1}": s for i, s in enumerate(pq.read_table(PARQUET).column("sequence").to_pylist()[: args.records])
    }
    (args.out / "ref.fa").write_text("".join(f">{name}\n{seq}\n" for name, seq in chroms.items()))
    rng = np.random.default_rng(args.seed)
    lines = ["##fileformat=VCFv4.2", *(f"##contig=<ID={c},length={len(s)}>" for c, s in chroms.items()),
             "#CHROM\tPOS\tID\tREF\tALT\tQUAL\tFILTER\tINFO"]  # fmt: skip
    for chrom, seq in chroms.items():
        for pos in sorted(rng.choice(np.arange(2, len(seq) - 10), size=args.variants, replace=False)):
            ref, kind = seq[pos - 1], rng.choice(["snv", "snv", "ins", "del"])
            if kind == "snv":
                alt = rng.choice([b for b in "ACGT" if b != ref.upper()])
            elif kind == "ins":
                alt = ref + "".join(rng.choice(list("ACGT"), size=rng.integers(1, 6)))
            else:
                ref, alt = seq[pos - 1 : pos - 1 + int(rng.integers(2, 7))], ref
            lines.append(f"{chrom}\t{pos}\t{chrom}_{pos}_{kind}\t{ref}\t{alt}\t.\t.\t.")
    lines.append(f"chr1\t5\tref_mismatch\t{'A' if chroms['chr1'][4] != 'A' else 'C'}\tG\t.\t.\t.")
    header, body = (
        lines[: len(chroms) + 2],
        sorted(lines[len(chroms) + 2 :], key=lambda x: (x.split("\t")[0], int(x.split("\t")[1]))),
    )
    (args.out / "calls.vcf").write_text("\n".join(header + body) + "\n")
    print(f"{args.out / 'ref.fa'} ({len(chroms)} sequences), {args.out / 'calls.vcf'} ({len(body)} variants)")


if __name__ == "__main__":
    main()
