"""Re-state the MFU of benchmark rows measured before MFU counted causal, per-sequence attention.

    python scripts/restate_mfu.py benchmarks/before_bc4df1c/results.json   # rewrites the old rows in place

Such a row logged tokens/s/GPU x (6N + 12 L H D S) / peak, S the window length. Its data are known (the
row's overrides on `L1_genomic_1b`, same seed), so this replays the micro-batches its rank 0 trained on in
the measured steps (after `--warmup`) on the CPU, counts their FLOPs as the training loop now does
(`perf_logger.ModelFlops`) per input token, and multiplies by the row's measured tokens/s/GPU. Context-
parallel rows read full windows, so their count per token is 6N + 6 L H D S in closed form. Rows get
`"mfu_convention": "causal"` and keep the old figure as `mfu_full_attention_window`.
"""

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE_DIR))

from config.command_line import normalize_command_line  # noqa: E402
from config.options import batch_options, model_options  # noqa: E402
from data.batches import create_dataloader  # noqa: E402
from model.build import build_model_config  # noqa: E402
from perf_logger import PEAK_BF16_FLOPS, ModelFlops  # noqa: E402
from runtime.distributed import DistributedConfig  # noqa: E402


def l1_config(overrides: list[str]):
    """`L1_genomic_1b` with `overrides`, normalized as the entrypoints do (same keys, same loader workers)."""
    with initialize_config_dir(config_dir=str(RECIPE_DIR / "hydra_config"), version_base="1.2"):
        return compose(config_name="L1_genomic_1b", overrides=normalize_command_line(["", *overrides])[1:])


def flops_per_token(overrides: list[str], gpus: int, first: int, last: int) -> float:
    """FLOPs per input token of rank 0's micro-batches `first`..`last` (1-based) for a row's overrides."""
    cfg = l1_config(overrides)
    counter = ModelFlops(build_model_config(model_options(cfg, use_te=False)))
    ranks = DistributedConfig(rank=0, local_rank=0, world_size=gpus)
    loader, _ = create_dataloader(ranks, cfg.dataset, batch_options(cfg, use_te=False))
    flops = tokens = 0.0
    for batch in itertools.islice(loader, first - 1, last):
        flops += counter.of_batch(batch)
        tokens += batch["input_ids"].numel()
    return flops / tokens


def main():
    """Rewrite the old rows' MFU in place."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=50)
    args = p.parse_args()
    path = Path(args.results).resolve()
    results = json.loads(path.read_text())
    os.chdir(RECIPE_DIR)  # the tier files name data and configs relative to the recipe
    peak = PEAK_BF16_FLOPS["H200"]
    full_windows = ModelFlops(build_model_config(model_options(l1_config([]), use_te=False)))
    cache = {}
    for row in results["rows"]:
        if "error" in row or row.get("mfu_convention") == "causal":
            continue
        if row["group"] == "cp":  # full windows of one long record
            words = dict(w.split("=", 1) for w in row["overrides"].split() if "=" in w)
            per_token = full_windows.per_token + full_windows.per_pair * int(words["dataset.max_seq_length"])
        else:
            overrides = [w for w in row["overrides"].split() if not w.startswith("use_torch_compile")]
            key = (tuple(overrides), row["gpus"])
            if key not in cache:
                cache[key] = flops_per_token(overrides, row["gpus"], args.warmup + 1, row.get("steps") or args.steps)
            per_token = cache[key]
        row["mfu_full_attention_window"] = row["mfu"]
        row["mfu"] = row["tokens_per_s_per_gpu"] * per_token / peak
        row["mfu_convention"] = "causal"
        print(f"{row['name']}: {row['mfu_full_attention_window']:.3f} -> {row['mfu']:.3f}")
    path.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
