"""Plot one or several runs from their metrics.jsonl: loss, validation bits per base, learning rate, speed, MFU.

    python scripts/plot_run.py outputs/2026-12-07/14-03-11                  # -> that folder's run.png
    python scripts/plot_run.py runs/lr3e-3 runs/lr1e-3 --out compare.png     # runs side by side

Each RUN_DIR is a run folder (`run_dir`, or Hydra's `outputs/<date>/<time>`) holding `metrics.jsonl`, or the
file itself. A resumed run logs some steps twice; the later record of a step wins (what the resumed run
did). A metric a run never logged (MFU off the GPU, validation when disabled) leaves its panel empty for
that run. With W&B on, the same metrics are live under `train/...` and `val/...`.
"""

import argparse
import json
from pathlib import Path

# (metrics.jsonl key, panel title, log-scale y)
PANELS = [
    ("loss", "training loss (nats per token)", False),
    ("val_bits_per_base", "validation bits per base", False),
    ("lr", "learning rate", True),
    ("real_tokens_per_s_per_gpu", "tokens/s per GPU (real, no padding)", False),
    ("mfu", "MFU (model FLOPs / peak BF16)", False),
    ("grad_norm", "gradient norm (before clipping)", True),
]


def read_metrics(path: Path) -> dict[str, dict[int, float]]:
    """{metric: {step: value}} from a run folder's metrics.jsonl (later records of a step replace earlier)."""
    file = path / "metrics.jsonl" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file} does not exist: give a run folder (run_dir) or its metrics.jsonl.")
    series = {}
    for line in file.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        for key, value in record.items():
            if key != "step" and "step" in record and isinstance(value, (int, float)) and value is not None:
                series.setdefault(key, {})[record["step"]] = float(value)
    if not series:
        raise ValueError(f"{file} holds no step records yet (the first is written after logger.frequency steps).")
    return series


def plot_runs(runs: dict[str, dict], out: Path) -> Path:
    """One PNG with a panel per metric and a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    for ax, (key, title, log_y) in zip(axes.flat, PANELS):
        for name, series in runs.items():
            points = sorted(series.get(key, {}).items())
            if points:
                ax.plot(*zip(*points), label=name, marker="o" if key.startswith("val_") else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if log_y and ax.lines:
            ax.set_yscale("log")
        if not ax.lines:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main(argv=None) -> Path:
    """Read each run, write the PNG, print its path."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (or metrics.jsonl files)")
    p.add_argument("--out", type=Path, default=None, help="the PNG (default: RUN_DIR/run.png for one run)")
    args = p.parse_args(argv)
    names = [r.name if r.is_dir() else r.parent.name for r in args.runs]
    runs = {name if names.count(name) == 1 else str(r): read_metrics(r) for name, r in zip(names, args.runs)}
    single = args.runs[0] if args.runs[0].is_dir() else args.runs[0].parent
    out = args.out or (single / "run.png" if len(args.runs) == 1 else Path("runs.png"))
    plot_runs(runs, out)
    print(f"{out} ({', '.join(runs)})")
    return out


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from config.command_line import run_tool

    run_tool(main)
