r"""Sequence and variant scores from a trained model.

    python score.py sequences --model ckpt/final_model --input reads.fa.gz --out scores.tsv
    python score.py variants --model ckpt/final_model --reference genome.fa --vcf calls.vcf.gz \
        --window 1024 --out scored.vcf                      # or .tsv; --on-ref-mismatch skip|stop

`sequences`: per sequence, the log-likelihood (natural log) of its bases given the ones before, summed
and per base (sequences longer than `--window` are scored in consecutive windows, as in evaluate.py).

`variants`: for each SNV or indel of the VCF (each ALT of a multi-allelic site), a window of `--window - 1`
reference bases centred on it, and score = LL(alt window) - LL(ref window): the same span of the genome
with the ALT allele in place of REF (an indel changes the length). Negative scores: the model finds the
variant less likely. `--both-strands` averages the score with that of the reverse-complement windows.
A REF that does not match the reference is skipped and counted (or stops the run with
`--on-ref-mismatch stop`); symbolic ALTs (<DEL>, *) are skipped and counted. A .vcf output is the input
with an INFO field `LLR`; .tsv lists chrom, pos, id, ref, alt, window start, LL(ref), LL(alt), score.
On a GPU with TE the windows run packed (THD); elsewhere HF runs them one by one.
"""

import argparse
import csv
import math
import time
from pathlib import Path

from tqdm import tqdm

from data.dna import reverse_complement
from data.sources import read_records
from use.inference import encode, load_model, record_windows, token_log_probs


def parse_args(argv=None):
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sequences", "variants"):
        s = sub.add_parser(name)
        s.add_argument("--model", required=True, help="final_model, best_model, an HF directory or a step_N")
        s.add_argument("--out", required=True, help="results: .tsv (both), .csv (sequences) or .vcf (variants)")
        s.add_argument("--window", type=int, default=8192 if name == "sequences" else 1024)
        s.add_argument("--batch-windows", type=int, default=64, help="windows scored per call (packed on TE)")
        s.add_argument("--use-te", choices=["auto", "true", "false"], default="auto")
    seqs = sub.choices["sequences"]
    seqs.add_argument("--input", required=True, help="FASTA/FASTQ (.gz) or parquet")
    seqs.add_argument("--text-column", default="sequence")
    variants = sub.choices["variants"]
    variants.add_argument("--reference", required=True, help="the reference FASTA (indexed with pyfaidx)")
    variants.add_argument("--vcf", required=True, help="VCF or BCF, plain or bgzipped")
    variants.add_argument("--on-ref-mismatch", choices=["skip", "stop"], default="skip")
    variants.add_argument("--both-strands", action="store_true", help="average with the reverse complement")
    return p.parse_args(argv)


def log_likelihood(logps) -> float:
    """Summed log-likelihood of the scored tokens (every position after `<BOS>`)."""
    return float(logps.sum())


def score_sequences(model, tokenizer, records, window: int, batch_windows: int):
    """Yield (name, bases, summed log-likelihood) per record."""
    batch, windows = [], 0

    def flush():
        flat = [w for _, _, ws in batch for w in ws]
        logps = iter(token_log_probs(model, flat))
        for name, length, ws in batch:
            yield name, length, sum(log_likelihood(next(logps)) for _ in ws)
        batch.clear()

    for name, sequence in records:
        batch.append((name, len(sequence), record_windows(tokenizer, sequence, window)))
        windows += len(batch[-1][2])
        if windows >= batch_windows:
            yield from flush()
            windows = 0
    yield from flush()


def variant_windows(fetch, length: int, pos0: int, ref: str, alt: str, bases: int) -> tuple[int, str, str]:
    """(start, ref window, alt window) for a variant at 0-based `pos0` of a sequence of `length` bases.

    The ref window is `bases` reference bases (`fetch(start, end)`) centred on REF; the alt window is the
    same span with ALT in place of REF. REF always lies inside the window.
    """
    start = max(0, min(pos0 - (bases - len(ref)) // 2, length - bases))
    ref_window = fetch(start, start + bases)
    offset = pos0 - start
    return start, ref_window, ref_window[:offset] + alt + ref_window[offset + len(ref) :]


def read_variants(reference, vcf_path: str, bases: int, on_mismatch: str, counts: dict):
    """Yield (record, alt, start, ref window, alt window) for each scorable ALT; count what is skipped."""
    import pysam

    with pysam.VariantFile(vcf_path) as vcf:
        for record in vcf:
            if record.chrom not in reference:
                known = list(reference.keys())[:5]
                raise ValueError(
                    f"{vcf_path}: chromosome {record.chrom!r} is not in the reference (it has {known}); "
                    "use the reference the VCF was called on."
                )
            chrom = reference[record.chrom]  # sliced on demand: never a whole chromosome in memory
            genome_ref = chrom[record.pos - 1 : record.pos - 1 + len(record.ref)]
            if genome_ref.upper() != record.ref.upper():
                if on_mismatch == "stop":
                    raise ValueError(
                        f"{vcf_path}: {record.chrom}:{record.pos} has REF {record.ref} but the reference reads "
                        f"{genome_ref}; check the reference build, or pass --on-ref-mismatch skip."
                    )
                counts["ref_mismatch"] += 1
                continue
            for alt in record.alts or ():
                if alt.startswith("<") or alt == "*" or not alt.isalpha():
                    counts["symbolic"] += 1
                    continue
                fetch = lambda a, b, chrom=chrom: chrom[a:b]  # noqa: E731
                yield (record, alt, *variant_windows(fetch, len(chrom), record.pos - 1, record.ref, alt, bases))


def score_variants(model, tokenizer, variants, batch_windows: int, both_strands: bool):
    """Yield (record, alt, start, LL(ref), LL(alt), score) for each variant."""
    batch = []

    def flush():
        strands = (lambda s: s, reverse_complement) if both_strands else (lambda s: s,)
        windows = [encode(tokenizer, f(w)) for _, _, _, ref_w, alt_w in batch for f in strands for w in (ref_w, alt_w)]
        lls = iter(log_likelihood(x) for x in token_log_probs(model, windows))
        for record, alt, start, _, _ in batch:
            pairs = [(next(lls), next(lls)) for _ in strands]  # (LL ref, LL alt) per strand
            ll_ref, ll_alt = (sum(p[i] for p in pairs) / len(pairs) for i in (0, 1))
            yield record, alt, start, ll_ref, ll_alt, ll_alt - ll_ref
        batch.clear()

    for variant in variants:
        batch.append(variant)
        if len(batch) >= batch_windows:
            yield from flush()
    yield from flush()


def write_variants(scored, vcf_path: str, out: Path) -> int:
    """Write the scores as TSV, or as the input VCF with INFO/LLR (one value per ALT); returns the count."""
    import pysam

    rows = list(scored)
    if out.suffix in (".vcf", ".gz", ".bcf"):
        llr = {}
        for record, alt, _, _, _, score in rows:
            llr.setdefault((record.chrom, record.pos, record.ref, record.alts), {})[alt] = score
        with pysam.VariantFile(vcf_path) as vcf:
            vcf.header.info.add("LLR", "A", "Float", "log-likelihood ratio LL(alt window) - LL(ref window)")
            with pysam.VariantFile(str(out), "w", header=vcf.header) as writer:
                for record in vcf:
                    scores = llr.get((record.chrom, record.pos, record.ref, record.alts))
                    if scores:
                        record.info["LLR"] = tuple(scores.get(a, math.nan) for a in record.alts)
                    writer.write(record)
        return len(rows)
    with out.open("w", newline="") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(["chrom", "pos", "id", "ref", "alt", "window_start", "ll_ref", "ll_alt", "score"])
        for record, alt, start, ll_ref, ll_alt, score in rows:
            writer.writerow(
                [record.chrom, record.pos, record.id or ".", record.ref, alt, start, ll_ref, ll_alt, score]
            )
    return len(rows)


def main(argv=None) -> dict:
    """Score, write `--out`, print a one-line summary with throughput; returns the summary."""
    args = parse_args(argv)
    model, tokenizer = load_model(args.model, use_te=None if args.use_te == "auto" else args.use_te == "true")
    start, out = time.perf_counter(), Path(args.out)
    if args.command == "sequences":
        records = read_records(args.input, args.text_column)
        scored = list(score_sequences(model, tokenizer, tqdm(records, unit=" seq"), args.window, args.batch_windows))
        with out.open("w", newline="") as f:
            writer = csv.writer(f, delimiter="," if out.suffix == ".csv" else "\t")
            writer.writerow(["name", "bases", "log_likelihood", "log_likelihood_per_base"])
            writer.writerows([name, n, ll, ll / max(n, 1)] for name, n, ll in scored)
        seconds = time.perf_counter() - start
        summary = {"sequences": len(scored), "sequences_per_s": len(scored) / seconds}
    else:
        from pyfaidx import Fasta

        counts = {"ref_mismatch": 0, "symbolic": 0}
        with Fasta(args.reference, as_raw=True, sequence_always_upper=False) as reference:
            variants = read_variants(reference, args.vcf, args.window - 1, args.on_ref_mismatch, counts)
            scored = score_variants(
                model, tokenizer, tqdm(variants, unit=" var"), args.batch_windows, args.both_strands
            )
            n = write_variants(scored, args.vcf, out)
        seconds = time.perf_counter() - start
        windows = n * 2 * (2 if args.both_strands else 1)
        summary = {"variants": n, **counts, "windows_per_s": windows / seconds, "variants_per_s": n / seconds}
    print(" ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()), f"-> {out}")
    return summary


if __name__ == "__main__":
    main()
