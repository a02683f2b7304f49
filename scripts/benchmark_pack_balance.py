"""How evenly packed micro-batches load data-parallel ranks, with and without `dataset.packing_lookahead`.

    python scripts/benchmark_pack_balance.py [--config-name L1_genomic_1b] [--steps 60] [--ranks 2 4]

Builds each rank's real THD loader (CPU, the tier's data, `DistributedConfig(rank, world)`), takes
`--steps` packs per rank and prices each with a step-cost model: cost = 0.57 + 0.43 x sum(len^2) /
(2 x 8192^2), i.e. a pack of two full 8k windows costs 1 and attention is 43% of it (the share of an
L1 FP8 step measured by `scripts/benchmark_model.py --profile` on an H200). A step lasts as long as
its costliest rank, so data-parallel efficiency = sum over steps of the mean rank cost / sum of the
maximum. Printed per (ranks, lookahead): efficiency, mean pack cost, and the predicted step time
relative to packing in stream order. A model, not a GPU measurement: it leaves out communication.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

RECIPE_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(RECIPE_DIR))
sys.path.insert(0, str(RECIPE_DIR / "tests"))

from conftest import build_loader, make_cfg  # noqa: E402

from runtime.distributed import DistributedConfig  # noqa: E402

ATTENTION_SHARE, FULL_PACK = 0.43, 2 * 8192**2


def pack_costs(config_name: str, world: int, lookahead: int, steps: int) -> np.ndarray:
    """[steps, world] modelled costs of each rank's first `steps` packs."""
    costs = np.zeros((steps, world))
    for rank in range(world):
        cfg = make_cfg(RECIPE_DIR / "outputs" / "pack_balance", "dataset.num_workers=0",
                       f"dataset.packing_lookahead={lookahead}", name=config_name, base=[])  # fmt: skip
        loader, _ = build_loader(cfg, DistributedConfig(rank, rank, world))
        for step, batch in zip(range(steps), loader):
            lengths = np.diff(batch["cu_seq_lens_q"].numpy()).astype(np.float64)
            costs[step, rank] = 1 - ATTENTION_SHARE + ATTENTION_SHARE * (lengths**2).sum() / FULL_PACK
    return costs


def main():
    """A table of modelled efficiency per number of ranks and lookahead."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-name", default="L1_genomic_1b")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--lookaheads", type=int, nargs="+", default=[0, 16, 64])
    args = parser.parse_args()
    print("| ranks | packing_lookahead | efficiency (mean/max) | mean pack cost | step time vs in order |")
    print("|---|---|---|---|---|")
    for world in args.ranks:
        in_order_time = None
        for lookahead in args.lookaheads:
            costs = pack_costs(args.config_name, world, lookahead, args.steps)
            step_time = costs.max(axis=1).mean()
            in_order_time = in_order_time or step_time
            print(f"| {world} | {lookahead} | {costs.mean() / step_time:.3f} | {costs.mean():.3f} | "
                  f"{step_time / in_order_time:.3f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
