"""The training loop's per-step services behind one hook: FP8 statistics, the profiler, the GC schedule.

    hooks = cleanup.enter_context(StepHooks(cfg.profiler, cfg.gc_collect_every_n_steps, cfg.fp8_stats_config,
                                            run_dir, rank))   # before the model: TE's debug tools must be up
    hooks.name_layers(model)      # FP8 statistics name TE layers by module path
    hooks.step_begins(step + 1)   # before a step: a profiled window opens; before the first, the GC schedule
    hooks.step_ends(step)         # after the optimizer step: FP8 statistics, profiler, GC

Leaving the `with` (or the run's `ExitStack`), normally or by an error, writes the profiler's trace, puts
Python's automatic garbage collection back and stops TE's debug tools.
"""

from pathlib import Path

from training.fp8_stats import FP8Stats
from training.gc_schedule import ScheduledGC
from training.profiling import StepProfiler


class StepHooks:
    """`fp8_stats_config.*`, `profiler.*` and `gc_collect_every_n_steps`, called at the edges of every step."""

    def __init__(self, profiler_cfg, gc_collect_every_n_steps: int | None, fp8_stats_cfg, run_dir: Path, rank: int):
        self.fp8_stats = FP8Stats(fp8_stats_cfg, run_dir, rank)
        self.profiler = StepProfiler(profiler_cfg, run_dir, rank)
        self.gc = ScheduledGC(gc_collect_every_n_steps)

    def name_layers(self, model) -> None:
        """Call once the model is built (FP8 statistics select and report layers by their module names)."""
        self.fp8_stats.name_layers(model)

    def step_begins(self, step: int) -> None:
        """Call before step `step` (counted from 1) runs."""
        self.gc.start()  # the first time: after everything the loop needs exists, so its freeze covers it
        self.profiler.step_begins(step)

    def step_ends(self, step: int) -> None:
        """Call after step `step`'s optimizer update."""
        self.fp8_stats.step()
        self.profiler.step_ends(step)
        self.gc.step(step)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.gc.close()
        self.profiler.close()
        self.fp8_stats.close()
