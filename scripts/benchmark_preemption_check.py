"""What the preemption check adds to a training step, on a GPU: step time with and without it.

    python scripts/benchmark_preemption_check.py

Per step the loop adds `Preemption.flag` (a fill kernel), a `torch.stack` with the loss sum, and
`agreed_to_stop` (a non-blocking copy of the reduced flag to pinned memory, an event record, and a wait on
the previous step's event). Here a "step" is a chain of 8192^3 bf16 matmuls queued ahead of those ops, as
the loop queues its forward and backward; the GPU stays busy, so any cost shows as longer steps. Also
printed: the time of the added ops alone on an idle GPU (an upper bound on their own cost). Compare with
the step time of your run (`step_time_s` in metrics.jsonl; about 170 ms for L1 FP8 on one H200).
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.distributed import all_reduce_sum  # noqa: E402
from runtime.preemption import Preemption  # noqa: E402


def main(steps: int = 20, trials: int = 3, matmuls: int = 50):
    """Print step times with and without the check, `trials` x `steps` steps each, alternating."""
    device = torch.device("cuda")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    preemption = Preemption()

    def added_ops(with_check: bool):
        if with_check:
            totals = all_reduce_sum(torch.stack([loss_sum, preemption.flag(device)]))
            preemption.agreed_to_stop(totals[1])
        else:
            all_reduce_sum(loss_sum.clone())

    step_ms = {True: [], False: []}
    for _ in range(trials):
        for with_check in (True, False):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(steps):
                for _ in range(matmuls):
                    a.matmul(a)
                added_ops(with_check)
            torch.cuda.synchronize()
            step_ms[with_check].append((time.perf_counter() - start) / steps * 1e3)
    alone_us = {}
    for with_check in (True, False):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(1000):
            added_ops(with_check)
        torch.cuda.synchronize()
        alone_us[with_check] = (time.perf_counter() - start) / 1000 * 1e6
    print(f"step time with the check:    {[round(x, 3) for x in step_ms[True]]} ms")
    print(f"step time without the check: {[round(x, 3) for x in step_ms[False]]} ms")
    print(f"ratio with / without (best of {trials}): {min(step_ms[True]) / min(step_ms[False]):.5f}")
    print(f"the added ops alone, idle GPU: {alone_us[True]:.1f} us per step with, {alone_us[False]:.1f} us without")


if __name__ == "__main__":
    main()
