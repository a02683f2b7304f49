"""scripts/variant_effect_benchmark.py: substitution classes by the genetic code, VCF on the genome, AUROC."""

import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import PARQUET

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import variant_effect_benchmark as vep  # noqa: E402

from data.dna import reverse_complement  # noqa: E402


def test_classes_follow_the_genetic_code():
    assert vep.CODE["ATG"] == "M" and vep.CODE["TGG"] == "W" and {vep.CODE[s] for s in vep.STOPS} == {"*"}
    assert vep.substitution_class("TGG", 2, "A") == "nonsense"  # TGG (W) -> TGA (stop)
    assert vep.substitution_class("CTG", 0, "T") == "synonymous"  # CTG -> TTG, both L
    assert vep.substitution_class("GCT", 2, "G") == "synonymous"  # fourfold degenerate A
    assert vep.substitution_class("AAA", 0, "C") == "missense"  # K -> Q


def test_substitutions_sit_on_the_genome_on_both_strands():
    orf = "ATG" + "TGGCTGAAATACGCT" * 30 + "TAA"  # W L K Y A repeated: every class occurs
    genome = {"plus": "CC" + orf + "GG", "minus": "TT" + reverse_complement(orf) + "AA"}
    substitutions = vep.draw_substitutions(genome, min_orf=300, max_orfs=10, codons=40, rng=np.random.default_rng(0))
    counts = {c: sum(s[4] == c for s in substitutions) for c in vep.CLASSES}
    assert counts["nonsense"] > 10 and counts["synonymous"] == counts["missense"] == counts["nonsense"]
    for chrom, pos, ref, alt, kind in substitutions:
        assert genome[chrom][pos - 1] == ref != alt  # REF is the genome's base, on the forward strand
        offset = pos - 1 - 2 if chrom == "plus" else (len(orf) - 1) - (pos - 1 - 2)  # in the ORF, 5'->3'
        codon = orf[offset - offset % 3 : offset - offset % 3 + 3]
        alt_on_strand = alt if chrom == "plus" else reverse_complement(alt)
        assert vep.substitution_class(codon, offset % 3, alt_on_strand) == kind


def test_auroc_is_the_mann_whitney_statistic():
    rng = np.random.default_rng(0)
    high, low = rng.integers(0, 5, 40).astype(float), rng.integers(0, 4, 30).astype(float)  # many ties
    pairs = high[:, None] - low[None, :]
    assert vep.auroc(high, low) == pytest.approx(((pairs > 0) + 0.5 * (pairs == 0)).mean())
    assert vep.auroc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == 1.0


@pytest.mark.slow
def test_end_to_end_with_a_markov_baseline(tmp_path):
    genome = tmp_path / "genome.fa"
    records = pq.read_table(PARQUET).column("sequence").to_pylist()[:40]
    genome.write_text("".join(f">r{i}\n{s}\n" for i, s in enumerate(records)))
    result = vep.main(["--genome", str(genome), "--model", "markov:3", "--train-data", str(genome), "--work",
                       str(tmp_path / "work"), "--min-orf", "300", "--max-orfs", "8", "--codons", "10",
                       "--window", "101", "--bootstrap", "50", "--out", str(tmp_path / "vep.json")])  # fmt: skip
    figures = result["models"]["markov:3"]
    assert result["substitutions"]["nonsense"] >= 10
    assert 0 <= figures["synonymous_vs_nonsense"]["auroc"] <= 1
    low, high = figures["synonymous_vs_nonsense"]["ci95"]
    assert low <= figures["synonymous_vs_nonsense"]["auroc"] <= high
    scored = (tmp_path / "work" / "scored_0.tsv").read_text().splitlines()[1:]
    assert len(scored) == sum(result["substitutions"].values()) and all("\tscored\t" in r for r in scored)
