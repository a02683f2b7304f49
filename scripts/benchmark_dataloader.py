"""Loader throughput on this machine: packed (THD) and padded (BSHD) tokens/s per worker process.

    python scripts/benchmark_dataloader.py                 # seq 8192, the bundled parquet
    python scripts/benchmark_dataloader.py --seq 1024 --batches 2000

Runs the real streaming pipeline, tokenization included (parquet -> windows -> block shuffle ->
packing -> collation) in the main process (num_workers=0), so the number is what one DataLoader
worker delivers. One H200 trains a 1B model at ~80k tokens/s in FP8: one worker at 1M tokens/s
would keep ten such GPUs fed.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.loader import create_bshd_dataloader, create_thd_dataloader  # noqa: E402
from runtime.distributed import DistributedConfig  # noqa: E402


def main():
    """Time the loader alone and print tokens/s."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="test_genomic_sequences.parquet")
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--batches", type=int, default=500)
    args = p.parse_args()
    common = dict(
        tokenizer_name_or_path="tokenizers/nucleotide_fast_tokenizer",
        load_dataset_kwargs={"path": args.data, "streaming": True},
        micro_batch_size=args.micro_batch, max_seq_length=args.seq, stride=200, num_workers=0, pad_to_multiple_of=16,
    )  # fmt: skip
    for name, make in (("THD packed", create_thd_dataloader), ("BSHD padded", create_bshd_dataloader)):
        loader, _ = make(DistributedConfig(), **common)
        batches = iter(loader)
        next(batches)  # opens the files
        start, tokens, real = time.perf_counter(), 0, 0
        for _ in range(args.batches):
            batch = next(batches)
            tokens += batch["input_ids"].numel()
            real += int((batch["labels"] != -100).sum())
        seconds = time.perf_counter() - start
        print(f"{name:12s}: {tokens / seconds / 1e6:6.2f}M tokens/s per worker ({real / seconds / 1e6:.2f}M real), "
              f"{args.batches} batches of {tokens // args.batches} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
