"""Held-out likelihood of a trained model on FASTA or parquet records: bits per base, per record and overall.

    python evaluate.py --model ckpt/final_model --data held_out.fa.gz --out held_out.tsv
    python evaluate.py --model ckpt/step_500 --data test_genomic_sequences.parquet --window 1024 --context 0
    python evaluate.py --model markov:5 --train-data train.fa.gz --data held_out.fa.gz   # a k-mer baseline

`--model`: `final_model`, `best_model`, any HF Llama directory, a `step_N` checkpoint, or `markov:K` (an
order-K Markov model fitted on `--train-data`, `baselines.py`; same windows, same code path). Each record is
read in sliding windows of `--window` tokens (`<BOS>` and `window - 1` bases; by default the window the model
trained on, from its run record): the first window scores its bases, each later one overlaps the bases
before it by `--context` and scores only the bases after those, so every base is scored once and every base
after the first window is predicted from at least `--context` bases (`--context 0`: consecutive windows,
each base after a window boundary predicted from `<BOS>` alone, as `val_bits_per_base` during training).
Bits per base = natural-log loss / ln 2 over scored A, C, G or T; other characters (N, IUPAC codes) are
excluded and counted. Soft-masked (lowercase) bases are read as uppercase unless `--keep-case`. On a GPU
with TE the windows run packed (THD); elsewhere HF runs them one by one. Output by extension: .tsv, .csv or
.json, per record (scored and excluded bases) and overall.
"""

import argparse
import csv
import json
import logging
import math
import time
from pathlib import Path

from tqdm import tqdm

from config.command_line import ToolHelp, run_tool
from data.dna import is_base
from data.sources import read_records
from use.baselines import load_baseline
from use.inference import encode, load_model, token_log_probs, training_window

logger = logging.getLogger(__name__)
DEFAULT_WINDOW = 8192  # where the model's run record does not say


def parse_args(argv=None):
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=ToolHelp)
    p.add_argument("--model", required=True, help="final_model, best_model, an HF directory or a step_N checkpoint")
    p.add_argument("--data", required=True, help="a FASTA/FASTQ (.gz) or parquet file, or a folder of them")
    p.add_argument("--text-column", default="sequence", help="parquet: the column holding the sequences")
    p.add_argument("--train-data", default=None, help="markov:K only: the records to count k-mers in")
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help=f"tokens per window, <BOS> included (default: the model's training window, else {DEFAULT_WINDOW})",
    )
    p.add_argument(
        "--context",
        type=int,
        default=None,
        help="bases each window after the first overlaps the one before (default: half the window)",
    )
    p.add_argument("--keep-case", action="store_true", help="score lowercase (soft-masked) bases as lowercase tokens")
    p.add_argument("--max-records", type=int, default=None, help="only the first N records")
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens scored per call (packed on TE)")
    p.add_argument("--use-te", choices=["auto", "true", "false"], default="auto", help="auto: TE on a GPU with TE")
    p.add_argument("--fp8", action="store_true", help="TE on a GPU: FP8 block scaling (use/inference.py)")
    p.add_argument("--out", default=None, help="per-record results: .tsv, .csv or .json")
    return p.parse_args(argv)


def sliding_windows(length: int, window: int, context: int):
    """(start, end, first_scored) per window of a record of `length` bases.

    Bases [start, end) are fed after `<BOS>`, those from `first_scored` on are scored. Every base is scored
    once; a base of a later window has at least `context` bases before it in its window.
    """
    span, scored_to = window - 1, 0
    while scored_to < length:
        start = max(0, scored_to - context)
        end = min(length, start + span)
        yield start, end, scored_to
        scored_to = end


def evaluate(
    model, tokenizer, records, window: int, context: int, batch_tokens: int, keep_case: bool = False, progress=None
) -> list[dict]:
    """Per record: name, length, scored bases (A/C/G/T), excluded characters, summed natural-log loss, bits/base."""
    rows, pending, pending_tokens = [], [], 0  # pending: (row, ids, bases to skip) not yet scored

    def flush():
        logps = iter(token_log_probs(model, [ids for _, ids, _ in pending]))
        for row, ids, skip in pending:
            targets, logp = ids[1 + skip :], next(logps)[skip:]
            bases = is_base(targets)
            row["bases"] += int(bases.sum())
            row["excluded"] += int((~bases).sum())
            row["nll_nats"] -= float(logp[bases].sum())
            if progress is not None:
                progress.update(len(targets))
        pending.clear()

    for name, sequence in records:
        sequence = sequence if keep_case else sequence.upper()
        row = {"name": name, "length": len(sequence), "bases": 0, "excluded": 0, "nll_nats": 0.0}
        rows.append(row)
        for start, end, first_scored in sliding_windows(len(sequence), window, context):
            pending.append((row, encode(tokenizer, sequence[start:end]), first_scored - start))
            pending_tokens += end - start + 1
            if pending_tokens >= batch_tokens:
                flush()
                pending_tokens = 0
    flush()
    for row in rows:
        row["bits_per_base"] = row["nll_nats"] / max(row["bases"], 1) / math.log(2)
    return rows


def write_rows(rows: list[dict], out: Path, summary: dict) -> None:
    """Per-record rows as TSV/CSV (the summary as a last row named `ALL`) or JSON ({records, overall})."""
    if out.suffix == ".json":
        out.write_text(json.dumps({"records": rows, "overall": summary}, indent=1))
        return
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(
            f, fieldnames=list(rows[0]), delimiter="," if out.suffix == ".csv" else "\t", extrasaction="ignore"
        )  # the summary's timing is not a column
        writer.writeheader()
        writer.writerows([*rows, {"name": "ALL", **summary}])


def window_and_context(args) -> tuple[int, int]:
    """`--window` (else the model's training window) and `--context` (else half the window), checked."""
    window = args.window or (None if args.model.startswith("markov:") else training_window(args.model))
    if window is None:
        window = DEFAULT_WINDOW
        if (Path(args.model) / "config.json").exists():  # an export without a run record
            logger.warning("%s has no run record with its training window: --window %d.", args.model, window)
    context = (window - 1) // 2 if args.context is None else args.context
    if window < 2 or not 0 <= context < window - 1:
        raise ValueError(
            f"--window {window} --context {context}: need window >= 2 and 0 <= context < window - 1 "
            "(context is how many bases of a window only give context; the rest are scored)."
        )
    return window, context


def limited(records, max_records: int | None):
    """The first `max_records` records (all when None)."""
    return records if not max_records else (r for r, _ in zip(records, range(max_records)))


def main(argv=None) -> dict:
    """Evaluate, write `--out`, print a one-line summary; returns the overall figures."""
    args = parse_args(argv)
    use_te = None if args.use_te == "auto" else args.use_te == "true"
    total = sum(len(seq) for _, seq in limited(read_records(args.data, args.text_column), args.max_records))
    if total == 0:
        raise ValueError(f"--data {args.data} holds no bases: point it at FASTA/FASTQ or parquet with sequences.")
    window, context = window_and_context(args)
    model, tokenizer = (
        load_baseline(args.model, args.train_data, args.text_column)
        if args.model.startswith("markov:")
        else load_model(args.model, use_te=use_te, fp8=args.fp8)
    )
    records = limited(read_records(args.data, args.text_column), args.max_records)
    start = time.perf_counter()
    with tqdm(total=total, unit=" bases", unit_scale=True, desc="scored") as progress:
        rows = evaluate(model, tokenizer, records, window, context, args.batch_tokens, args.keep_case, progress)
    seconds = time.perf_counter() - start
    bases, nll = sum(r["bases"] for r in rows), sum(r["nll_nats"] for r in rows)
    summary = {
        "length": sum(r["length"] for r in rows),
        "bases": bases,
        "excluded": sum(r["excluded"] for r in rows),
        "nll_nats": nll,
        "bits_per_base": nll / max(bases, 1) / math.log(2),
        # OpenGenome2's evaluate_fasta_lm_loss.py figures, in nats: each record's mean over its A/C/G/T bases,
        # averaged over records ("per-seq avg CE loss"), and the mean over all bases ("token-weighted CE loss")
        "per_record_nll_nats": sum(r["nll_nats"] / r["bases"] for r in rows if r["bases"])
        / max(sum(1 for r in rows if r["bases"]), 1),
        "token_weighted_nll_nats": nll / max(bases, 1),
        "window": window,
        "context": context,
        "seconds": seconds,
    }
    if args.out:
        write_rows(rows, Path(args.out), summary)
    print(
        f"{len(rows)} records, {bases:,} bases scored, {summary['excluded']:,} excluded (not A/C/G/T): "
        f"{summary['bits_per_base']:.4f} bits per base; per-record mean NLL {summary['per_record_nll_nats']:.4f} nats "
        f"(token-weighted {summary['token_weighted_nll_nats']:.4f}) (window {window}, context {context}; "
        f"{bases / seconds:,.0f} bases/s; model {args.model}, data {args.data})"
    )
    return summary


if __name__ == "__main__":
    run_tool(main)
