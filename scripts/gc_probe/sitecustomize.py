"""Diagnostic: Python GC passes inside training steps, for any entrypoint or benchmark row (not part of the recipe).

Put this folder first on PYTHONPATH; every Python process that starts then (torchrun workers, the bare
benchmark rows with GC_PROBE=1) prints one line at exit: the GC passes per generation (count, total ms,
longest ms) between its 16th and last optimizer step, and the loop's wall time over those steps (from an
optimizer-step hook, so it also shows what a step really took). How the README's GC figures were measured:

    export PYTHONPATH=$PWD/scripts/gc_probe:$PYTHONPATH GC_PROBE=1
    python3 scripts/benchmark_training.py --groups bare --only "..." --steps 40 --warmup 15 --work-dir /tmp/w
    grep -r GCSTATS /tmp/w
"""

import atexit
import gc
import os
import sys
import time

FIRST_STEP = 16

if os.environ.get("LOCAL_RANK") is not None or os.environ.get("GC_PROBE"):
    passes, steps, state = [], [], {}

    def _on_gc(phase, info):
        if phase == "start":
            state["start"] = time.perf_counter()
            return
        passes.append((state["start"], info["generation"], time.perf_counter() - state["start"]))
        if not state.get("hooked") and "torch.optim.optimizer" in sys.modules:  # torch is loaded by now
            state["hooked"] = True
            from torch.optim.optimizer import register_optimizer_step_post_hook

            register_optimizer_step_post_hook(lambda *args: steps.append(time.perf_counter()))

    def _report():
        if len(steps) <= FIRST_STEP:
            return
        start, end = steps[FIRST_STEP - 1], steps[-1]
        per_generation = {}
        for at, generation, seconds in passes:
            if start <= at <= end:
                count, total, longest = per_generation.get(generation, (0, 0.0, 0.0))
                per_generation[generation] = (count + 1, total + seconds, max(longest, seconds))
        table = {g: (n, round(1e3 * t, 1), round(1e3 * m, 1)) for g, (n, t, m) in sorted(per_generation.items())}
        sys.stderr.write(f"GCSTATS steps {FIRST_STEP}-{len(steps)}: loop {1e3 * (end - start):.0f} ms; "
                         f"per generation (count, total ms, longest ms) {table}\n")  # fmt: skip

    gc.callbacks.append(_on_gc)
    atexit.register(_report)
