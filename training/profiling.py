"""`profiler.*`: a torch profiler trace and NVTX ranges over the steps `start_step`..`end_step`.

    profiler = StepProfiler(cfg.profiler, run_dir, rank)  # does nothing unless profiler.enabled
    profiler.step_begins(step + 1); ...; step += 1; profiler.step_ends(step)

Steps count from 1, as in the log. The trace is `<run_dir>/profiler/rank<R>.json` (Chrome trace format:
open it in https://ui.perfetto.dev or chrome://tracing); `rank<R>_summary.txt` holds the ops that took the
most time and, on a GPU, the share of the profiled wall time during which any kernel ran ("GPU busy"):
well below 1, the GPU waited for the host (kernel launches, Python) or for data. Each profiled step is also
an NVTX range `step N`, and CUDA's profiler API is started and stopped around the steps, so Nsight Systems records
exactly these steps with `nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop ...`.
"""

import logging
import time
from pathlib import Path

import torch
from torch.autograd import DeviceType
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
            if self.cuda:
                torch.cuda.synchronize()  # the wall time starts when the GPU has no earlier step's work queued
            self._profile.__enter__()
            self._started = time.perf_counter()
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
        wall_us = (time.perf_counter() - self._started) * 1e6
        self._profile.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._profile.export_chrome_trace(str(self.path))
        busy = gpu_busy_fraction(self._profile.events(), wall_us)
        sort = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        table = self._profile.key_averages().table(sort_by=sort, row_limit=30)
        headline = f"steps {self.start}-{self.end}: wall {wall_us / 1e6:.3f} s" + (
            f", GPU busy {busy:.1%} of it" if busy is not None else ""
        )
        self.path.with_name(self.path.stem + "_summary.txt").write_text(f"{headline}\n\n{table}\n")
        self._profile = None
        logger.info("Profiler %s; trace %s (open in https://ui.perfetto.dev)", headline, self.path)


def gpu_busy_fraction(events, wall_us: float) -> float | None:
    """Share of `wall_us` during which at least one GPU kernel or copy ran (the union of their intervals)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    if not spans or wall_us <= 0:
        return None
    busy, (start, end) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > end:  # a gap: the GPU idled
            busy, start, end = busy + end - start, s, e
        else:
            end = max(end, e)
    return (busy + end - start) / wall_us
