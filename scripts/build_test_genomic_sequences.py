"""Build `test_genomic_sequences.parquet`, the small real-DNA data set every default command runs on.

Provenance (Debian packages, so the build needs no hub):
- `ragout-examples` 2.3-4 (BSD-3): E. coli MG1655-K12 and DH1, S. aureus COL and N315 complete genomes.
- `bowtie2-examples`: the 48,502 bp phage lambda genome (NC_001416.1).

Fetch and unpack them, then run this script:

    apt-get download ragout-examples bowtie2-examples
    for f in *.deb; do dpkg -x "$f" pkg; done
    python scripts/build_test_genomic_sequences.py --debian-root pkg

Records are cut at random positions with log-uniform lengths (300 bp to 30 kbp), so that a window of
1024 or 8192 tokens sees both short records (where padding wastes most of a batch) and long ones
(which are split into overlapping windows). The text is kept as the genomes have it (uppercase ACGT
plus the odd N or IUPAC code); `dataset.py` documents how such characters are treated.
"""

import argparse
import gzip
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

GENOMES = {  # name -> path under the unpacked Debian root
    "E.coli_MG1655": "usr/share/doc/ragout/examples/E.Coli/references/MG1655-K12.fasta.gz",
    "E.coli_DH1": "usr/share/doc/ragout/examples/E.Coli/references/DH1.fasta.gz",
    "S.aureus_COL": "usr/share/doc/ragout/examples/S.Aureus/references/COL.fasta.gz",
    "S.aureus_N315": "usr/share/doc/ragout/examples/S.Aureus/references/N315.fasta.gz",
    "phage_lambda": "usr/share/doc/bowtie2/examples/reference/lambda_virus.fa.gz",
}


def read_fasta(path: Path) -> str:
    """Concatenate every record of a gzipped FASTA file into one string."""
    with gzip.open(path, "rt") as f:
        return "".join(line.strip() for line in f if not line.startswith(">"))


def main():
    """Cut records from the unpacked genomes and write the parquet file."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debian-root", type=Path, required=True, help="folder the .deb files were unpacked into")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "test_genomic_sequences.parquet")
    parser.add_argument("--records-per-genome", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = {"sequence": [], "source": [], "start": []}
    for name, rel in GENOMES.items():
        genome = read_fasta(args.debian_root / rel)
        # Lambda is only 48 kbp: take fewer records from it so it is not sampled many times over.
        n_records = args.records_per_genome if len(genome) > 1_000_000 else args.records_per_genome // 8
        lengths = np.exp(rng.uniform(np.log(300), np.log(30_000), n_records)).astype(int)
        for length in lengths:
            start = int(rng.integers(0, len(genome) - length))
            rows["sequence"].append(genome[start : start + length])
            rows["source"].append(name)
            rows["start"].append(start)
    order = rng.permutation(len(rows["sequence"]))
    table = pa.table({k: [v[i] for i in order] for k, v in rows.items()})
    # Small row groups: streaming readers shard by row group, so 2 ranks x 2 workers all get data.
    pq.write_table(table, args.out, compression="zstd", row_group_size=16)
    total = sum(len(s) for s in rows["sequence"])
    print(f"wrote {args.out}: {table.num_rows} records, {total:,} bp, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
