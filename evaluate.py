"""Held-out likelihood of a trained model on FASTA or parquet records: bits per base, per record and overall.

    python evaluate.py --model ckpt/final_model --data held_out.fa.gz --out held_out.tsv
    python evaluate.py --model ckpt/step_500 --data test_genomic_sequences.parquet --window 1024 --out eval.json
    python evaluate.py --model markov:5 --train-data train.fa.gz --data held_out.fa.gz   # a k-mer baseline

`--model`: `final_model`, `best_model`, any HF Llama directory, a `step_N` checkpoint, or `markov:K` (an
order-K Markov model fitted on `--train-data`, `baselines.py`; same windows, same code path). Each record is cut
into consecutive windows of `--window` tokens (`<BOS>` and `window - 1` bases, no overlap, so every base
is predicted once; the first base of a window only from `<BOS>`). Bits per base = natural-log loss / ln 2
over predicted A, C, G or T (either case), as `val_bits_per_base` during training. On a GPU with TE the
windows run packed (THD); elsewhere HF runs them one by one. Output by extension: .tsv, .csv or .json.
"""

import argparse
import csv
import json
import math
import time
from pathlib import Path

from tqdm import tqdm

from data.dna import is_base
from data.sources import load_tokenizer, read_records
from use.baselines import MarkovModel
from use.inference import load_model, record_windows, token_log_probs


def parse_args(argv=None):
    """Command-line options (see --help)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="final_model, best_model, an HF directory or a step_N checkpoint")
    p.add_argument("--data", required=True, help="a FASTA/FASTQ (.gz) or parquet file, or a folder of them")
    p.add_argument("--text-column", default="sequence", help="parquet: the column holding the sequences")
    p.add_argument("--train-data", default=None, help="markov:K only: the records to count k-mers in")
    p.add_argument("--window", type=int, default=8192, help="tokens per window, <BOS> included")
    p.add_argument("--max-records", type=int, default=None)
    p.add_argument("--batch-tokens", type=int, default=65536, help="tokens scored per call (packed on TE)")
    p.add_argument("--use-te", choices=["auto", "true", "false"], default="auto")
    p.add_argument("--out", default=None, help="per-record results: .tsv, .csv or .json")
    return p.parse_args(argv)


def evaluate(model, tokenizer, records, window: int, batch_tokens: int) -> list[dict]:
    """Per record: name, predicted bases, their summed natural-log loss and bits per base."""
    rows, pending, pending_tokens = [], [], 0  # pending: (row, windows) not yet scored

    def flush():
        windows = [w for _, ws in pending for w in ws]
        logps = iter(
            [model.log_probs(w) for w in windows]
            if isinstance(model, MarkovModel)
            else token_log_probs(model, windows)
        )
        for row, ws in pending:
            for w in ws:
                bases = is_base(w[1:])
                row["bases"] += int(bases.sum())
                row["nll_nats"] -= float(next(logps)[bases].sum())
        pending.clear()

    for name, sequence in records:
        row = {"name": name, "length": len(sequence), "bases": 0, "nll_nats": 0.0}
        rows.append(row)
        pending.append((row, record_windows(tokenizer, sequence, window)))
        pending_tokens += len(sequence) + len(pending[-1][1])  # bases and one <BOS> per window
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


def load_baseline(args):
    """`markov:K` fitted on `--train-data`, and the nucleotide tokenizer."""
    if not args.train_data:
        raise ValueError(f"--model {args.model} needs --train-data (the records to count k-mers in).")
    order = int(args.model.split(":", 1)[1])
    model = MarkovModel(order).fit(
        seq
        for _, seq in tqdm(read_records(args.train_data, args.text_column), desc=f"counting {order}-mers", unit=" rec")
    )
    return model, load_tokenizer("./tokenizers/nucleotide_fast_tokenizer")


def main(argv=None) -> dict:
    """Evaluate, write `--out`, print a one-line summary; returns the overall figures."""
    args = parse_args(argv)
    use_te = None if args.use_te == "auto" else args.use_te == "true"
    model, tokenizer = (
        load_baseline(args) if args.model.startswith("markov:") else load_model(args.model, use_te=use_te)
    )
    records = read_records(args.data, args.text_column)
    if args.max_records:
        records = (r for r, _ in zip(records, range(args.max_records)))
    start = time.perf_counter()
    rows = evaluate(model, tokenizer, tqdm(records, desc="records", unit=" rec"), args.window, args.batch_tokens)
    seconds = time.perf_counter() - start
    bases, nll = sum(r["bases"] for r in rows), sum(r["nll_nats"] for r in rows)
    summary = {
        "length": sum(r["length"] for r in rows),
        "bases": bases,
        "nll_nats": nll,
        "bits_per_base": nll / max(bases, 1) / math.log(2),
        "seconds": seconds,
    }
    if args.out:
        write_rows(rows, Path(args.out), summary)
    print(
        f"{len(rows)} records, {bases:,} bases: {summary['bits_per_base']:.4f} bits per base "
        f"({bases / seconds:,.0f} bases/s; model {args.model}, data {args.data})"
    )
    return summary


if __name__ == "__main__":
    main()
