"""FP8 primary weights (`config_kwargs.use_quantized_model_init=true`) against BF16 weights: memory and speed.

    python scripts/benchmark_quantized_init.py [--config-name L1_genomic_1b] [--steps 20] [--repeats 1]

Trains `train_fsdp2.py` with the tier's FP8 recipe for `--steps` steps, once with BF16 weights and once with
FP8 weights (rows interleaved, each in a fresh process), and prints per row the peak GPU memory of the
training steps (`peak_memory_gib` of the last log window: weights, AdamW state, activations, workspace),
tokens/s and the last loss; then FP8 / BF16 ratios. Needs a GPU with TE.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RECIPE_DIR = Path(__file__).resolve().parents[1]


def run_row(config_name: str, steps: int, quantized: bool, run_dir: Path) -> dict:
    """One training run in a fresh process; its last log window's memory, speed and loss."""
    command = [sys.executable, "train_fsdp2.py", "--config-name", config_name, f"num_train_steps={steps}",
               f"logger.frequency={steps // 2}", f"run_dir={run_dir}", "fp8_config.enabled=true",
               f"config_kwargs.use_quantized_model_init={str(quantized).lower()}"]  # fmt: skip
    subprocess.run(command, cwd=RECIPE_DIR, check=True)
    last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    return {"weights": "FP8" if quantized else "BF16", "peak_memory_gib": last["peak_memory_gib"],
            "tokens_per_s": last["tokens_per_s_per_gpu"], "loss": last["loss"]}  # fmt: skip


def main():
    """Interleaved BF16-weight and FP8-weight rows, a table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="L1_genomic_1b")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for quantized in (False, True):
                row = run_row(args.config_name, args.steps, quantized, Path(tmp) / f"{repeat}_{quantized}")
                rows.append(row)
                print(json.dumps(row), flush=True)
    bf16 = [r for r in rows if r["weights"] == "BF16"]
    fp8 = [r for r in rows if r["weights"] == "FP8"]
    print(f"| weights | peak memory (GiB) | tokens/s | loss at step {args.steps} |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['peak_memory_gib']:.2f} | {r['tokens_per_s']:,.0f} | {r['loss']:.3f} |")
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in (("bf16", bf16), ("fp8", fp8))}
    print(f"FP8 / BF16 weights: peak memory {fp8[0]['peak_memory_gib'] / bf16[0]['peak_memory_gib']:.3f}, "
          f"best tokens/s {best['fp8'] / best['bf16']:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
