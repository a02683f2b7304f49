r"""Sequence and variant scores from a trained model.

    python score.py sequences --model ckpt/final_model --input reads.fa.gz --out scores.tsv
    python score.py variants --model ckpt/final_model --reference genome.fa --vcf calls.vcf.gz \
        --window 1024 --out scored.vcf                      # or .tsv; --on-ref-mismatch skip|stop

`sequences`: per sequence, the log-likelihood (natural log) of its bases given the ones before, summed
and per base (sequences longer than `--window` are scored in consecutive windows, as in evaluate.py).

`variants`: for each SNV or indel of the VCF (each ALT of a multi-allelic site), a window of `--window - 1`
reference bases centred on it, and score = LL(alt window) - LL(ref window): the same span of the genome
with the ALT allele in place of REF (an indel changes the length; `--length-matched` scores windows of the
same length). Negative scores: the model finds the variant less likely. `--both-strands` averages the score
with that of the reverse-complement windows. Every record reaches the output: scored, or with the reason it
was not (`ref_mismatch`, `unknown_chrom`, `out_of_bounds`, `symbolic_alt`, `no_alt`; `--on-error stop` stops
at the first instead, `--on-ref-mismatch stop` at a REF mismatch). A .vcf/.vcf.gz/.bcf output is the input
with INFO `LLR` and `LLR_STATUS` per ALT; .tsv lists chrom, pos, id, ref, alt, window start, LL(ref), LL(alt),
score, status, note. The output is written to `<out>.partial` as it goes and renamed at the end
(`use/variants.py`). On a GPU with TE the windows run packed (THD); elsewhere HF runs them one by one.
`--model markov:K --train-data train.fa.gz` scores with an order-K Markov baseline through the same path.
"""

import argparse
import csv
import time
from contextlib import ExitStack
from pathlib import Path

from tqdm import tqdm

from config.command_line import ToolHelp, run_tool
from data.sources import read_records
from use.baselines import load_baseline
from use.inference import load_model, record_windows, token_log_probs
from use.variants import SKIP_REASONS, Reference, read_calls, score_calls, write_calls


def parse_args(argv=None):
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ToolHelp)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("sequences", "variants"):
        s = sub.add_parser(name, formatter_class=ToolHelp)
        s.add_argument("--model", required=True, help="final_model, best_model, an HF directory, a step_N, markov:K")
        s.add_argument("--train-data", default=None, help="markov:K only: the records to count k-mers in")
        s.add_argument("--out", required=True, help="results: .tsv (both), .csv (sequences) or .vcf (variants)")
        s.add_argument("--window", type=int, default=8192 if name == "sequences" else 1024, help="tokens per window")
        s.add_argument("--batch-windows", type=int, default=64, help="windows scored per call (packed on TE)")
        s.add_argument("--use-te", choices=["auto", "true", "false"], default="auto", help="auto: TE on a GPU with TE")
        s.add_argument("--fp8", action="store_true", help="TE on a GPU: FP8 block scaling (use/inference.py)")
    seqs = sub.choices["sequences"]
    seqs.add_argument("--input", required=True, help="FASTA/FASTQ (.gz) or parquet")
    seqs.add_argument("--text-column", default="sequence", help="parquet: the sequences' column")
    variants = sub.choices["variants"]
    variants.add_argument("--reference", required=True, help="reference FASTA: plain, gzip or bgzip (.fai/.gzi made)")
    variants.add_argument("--vcf", required=True, help="VCF or BCF, plain or bgzipped")
    variants.add_argument(
        "--on-error",
        choices=["skip", "stop"],
        default="skip",
        help="a record that cannot be scored: write it with its reason, or stop",
    )
    variants.add_argument("--on-ref-mismatch", choices=["skip", "stop"], default="skip", help="stop on REF mismatches")
    variants.add_argument("--both-strands", action="store_true", help="average with the reverse complement")
    variants.add_argument(
        "--share-prefix",
        action="store_true",
        help="run the bases a REF and an ALT window share once, through the KV cache (use/shared_prefix.py)",
    )
    variants.add_argument(
        "--length-matched", action="store_true", help="indels: the alt window cut or filled to the ref window's length"
    )
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


def stop_reasons(args) -> tuple[str, ...]:
    """The reasons an unscorable record stops `variants` (`--on-error`, `--on-ref-mismatch`)."""
    if args.on_error == "stop":
        return SKIP_REASONS
    return ("ref_mismatch",) if args.on_ref_mismatch == "stop" else ()


def main(argv=None) -> dict:
    """Score, write `--out`, print a one-line summary with throughput; returns the summary."""
    args = parse_args(argv)
    if args.command == "variants" and args.fp8 and args.share_prefix:
        raise ValueError(
            "--fp8 with --share-prefix: the KV-cache steps are not padded to FP8's token multiple yet; drop one."
        )
    with ExitStack() as stack:
        # The inputs first: a missing or malformed file is said before the model loads (minutes for a large one).
        if args.command == "sequences":
            records = read_records(args.input, args.text_column, option="--input")
        else:
            reference = stack.enter_context(Reference(args.reference))
            # reads every record once: a malformed VCF stops here
            calls = read_calls(reference, args.vcf, args.window - 1, args.length_matched, stop_reasons(args))
        if args.model.startswith("markov:"):
            model, tokenizer = load_baseline(args.model, args.train_data)
        else:
            use_te = None if args.use_te == "auto" else args.use_te == "true"
            model, tokenizer = load_model(args.model, use_te=use_te, fp8=args.fp8)
        start, out = time.perf_counter(), Path(args.out)
        if args.command == "sequences":
            scored = list(
                score_sequences(model, tokenizer, tqdm(records, unit=" seq"), args.window, args.batch_windows)
            )
            with out.open("w", newline="") as f:
                writer = csv.writer(f, delimiter="," if out.suffix == ".csv" else "\t")
                writer.writerow(["name", "bases", "log_likelihood", "log_likelihood_per_base"])
                writer.writerows([name, n, ll, ll / max(n, 1)] for name, n, ll in scored)
            seconds = time.perf_counter() - start
            summary = {"sequences": len(scored), "sequences_per_s": len(scored) / seconds}
        else:
            scored = score_calls(
                model, tokenizer, tqdm(calls, unit=" alt"), args.batch_windows, args.both_strands, args.share_prefix
            )
            counts = write_calls(scored, args.vcf, out)
            seconds = time.perf_counter() - start
            windows = counts["scored"] * 2 * (2 if args.both_strands else 1)
            summary = {**counts, "windows_per_s": windows / seconds, "variants_per_s": counts["scored"] / seconds}
    print(" ".join(f"{k}={v:,.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()), f"-> {out}")
    return summary


if __name__ == "__main__":
    run_tool(main)
