"""`profiler.*`: a torch profiler trace and NVTX ranges over the steps `start_step`..`end_step`.

    profiler = StepProfiler(cfg.profiler, run_dir, rank)  # does nothing unless profiler.enabled
    profiler.step_begins(step + 1); ...; step += 1; profiler.step_ends(step)

Steps count from 1, as in the log. The trace is `<run_dir>/profiler/rank<R>.json` (Chrome trace format:
open it in https://ui.perfetto.dev or chrome://tracing). Each profiled step is also an NVTX range
`step N`, and CUDA's profiler API is started and stopped around the steps, so Nsight Systems records
exactly these steps with `nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop ...`.
"""

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

logger = logging.getLogger(__name__)


class StepProfiler:
    """Profiles steps `start_step`..`end_step` (inclusive) when `profiler_cfg.enabled`."""

    def __init__(self, profiler_cfg, run_dir: Path, rank: int):
        self.enabled = bool(profiler_cfg.enabled)
        self.start, self.end = profiler_cfg.start_step, profiler_cfg.end_step
        self.path = Path(run_dir) / "profiler" / f"rank{rank}.json"
        self.cuda = torch.cuda.is_available()
        self._profile = None

    def step_begins(self, step: int) -> None:
        """Call before step `step` runs."""
        if not self.enabled or not self.start <= step <= self.end:
            return
        if self._profile is None:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self._profile = profile(activities=activities)
            self._profile.__enter__()
            if self.cuda:
                torch.cuda.profiler.start()
        if self.cuda:
            torch.cuda.nvtx.range_push(f"step {step}")

    def step_ends(self, step: int) -> None:
        """Call after step `step` finished; after `end_step` the trace is written."""
        if self._profile is None:
            return
        if self.cuda:
            torch.cuda.nvtx.range_pop()
        if step >= self.end:
            self.close()

    def close(self) -> None:
        """Stop and write the trace (also when the run ends before `end_step`)."""
        if self._profile is None:
            return
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.profiler.stop()
        self._profile.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profile.export_chrome_trace(str(self.path))
        self._profile = None
        logger.info("Profiler trace of steps %d-%d: %s (open in https://ui.perfetto.dev)", self.start, self.end,
                    self.path)  # fmt: skip
