"""Preemption: SIGTERM or SIGUSR1 ends the run with a checkpoint of the current step and exit code 0.

    preemption = cleanup.enter_context(Preemption())            # installs the handlers (restored at exit)
    totals = all_reduce_sum(torch.stack([loss_sum, preemption.flag(device)]))
    if preemption.agreed_to_stop(totals[1]):                    # the same on every rank
        save(step)

The signal may reach the main process alone, its whole process group (what schedulers send; loader
workers included) or `torchrun`, which forwards it to every rank's group. The handler only records it.
Each step, this rank's flag rides on the loss reduction the loop already does, and the reduced value is
read back one step later, when it is long computed, through a pinned copy and a CUDA event: no per-step
host sync. All ranks therefore stop at the same step, at most two steps after the signal. Loader
workers ignore the signals (`ignore_preemption_signals` is their `worker_init_fn`): PyTorch's own
worker handler would otherwise die of SIGTERM and take the run down before it can save.
"""

import atexit
import logging
import multiprocessing
import signal
import time

import torch

logger = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


def ignore_preemption_signals(worker_id: int | None = None) -> None:
    """A DataLoader `worker_init_fn`: the main process handles preemption; workers end with the loader."""
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def loader_worker_init():
    """`ignore_preemption_signals`, and an exit hook for workers a failed run leaves behind.

    Workers that ignore SIGTERM would otherwise hang the exit of a run that stops on an error before its
    loader shut them down: Python's multiprocessing ends daemon children with SIGTERM, then waits for them.
    """
    global _exit_hook_registered
    if not _exit_hook_registered:
        atexit.register(_kill_leftover_workers)  # runs before multiprocessing's own exit hook (registered earlier)
        _exit_hook_registered = True
    return ignore_preemption_signals


def _kill_leftover_workers() -> None:
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the loader's handler would report these deaths as a crash
    for child in multiprocessing.active_children():
        if child.daemon:  # DataLoader workers are daemon processes
            child.kill()


_exit_hook_registered = False


class Preemption:
    """Records SIGTERM/SIGUSR1 and turns it into one stop decision shared by all ranks."""

    def __init__(self):
        self.received = None  # the signal's name, on the ranks that got one
        self.received_at = None  # time.monotonic() of its arrival
        self._pending = None  # (reduced flag on the host, CUDA event or None) of the previous step
        self._previous_handlers = {sig: signal.signal(sig, self._record) for sig in SIGNALS}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """Put back the handlers that were there before (a later run in this process installs its own)."""
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)

    def _record(self, signum, frame) -> None:
        if self.received is None:
            self.received, self.received_at = signal.Signals(signum).name, time.monotonic()

    def flag(self, device: torch.device) -> torch.Tensor:
        """1.0 on the device if this rank was signalled, else 0.0 (a fill kernel: no copy from the host)."""
        return torch.full((), float(self.received is not None), device=device, dtype=torch.float64)

    def agreed_to_stop(self, reduced_flag: torch.Tensor) -> bool:
        """Whether any rank had been signalled by the previous step; `reduced_flag` (this step's) is read next."""
        previous, event = self._pending or (None, None)
        values = reduced_flag.detach()
        event_now = None
        if values.is_cuda:  # a pinned copy that arrives when the GPU gets there, and an event to wait on it
            values = values.to("cpu", non_blocking=True)
            event_now = torch.cuda.Event()
            event_now.record()
        self._pending = (values, event_now)
        if previous is None:
            return False
        if event is not None:
            event.synchronize()  # the previous step's reduction: finished long ago
        return bool(previous.item() > 0)
