"""Preemption with real signals and real processes (CPU, gloo).

SIGTERM or SIGUSR1 to the main process, to its whole process group (loader workers included, as
schedulers send it) or to torchrun (which forwards it to both ranks' groups): every rank saves the
current step and exits 0, within two steps of the signal, and resuming gives the losses of a run that
never stopped, bit for bit.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import ENV, FAST, RECIPE_DIR, TORCHRUN_2, losses, run_command

from checkpointing.folders import complete_checkpoints

# One loader worker, so that a signal to the process group reaches a worker too.
PREEMPTIBLE = [*FAST, "dataset.num_workers=1", "checkpoint.save_every_n_steps=100000"]


# The product's path on the lent GPU: the TE model, FP8, packed THD, every rank under torchrun.
GPU_FP8_THD = [
    *(o for o in PREEMPTIBLE if o != "use_te=false"),
    "use_te=true",
    "use_sequence_packing=true",
    "fp8_config.enabled=true",
    "fp8_config.fp8_recipe=transformer_engine.common.recipe.DelayedScaling",
]


def command(run_dir, ranks: int, *overrides, torchrun=False, base=PREEMPTIBLE) -> list[str]:
    """train_fsdp2.py on L0_sanity, checkpoints in `<run_dir>/../ckpt`: one process, or torchrun with `ranks`."""
    launcher = [*TORCHRUN_2[:-1], f"--nproc_per_node={ranks}"] if torchrun or ranks > 1 else [sys.executable]
    return [*launcher, "train_fsdp2.py", "--config-name", "L0_sanity", *base, f"run_dir={run_dir}",
            f"checkpoint.ckpt_dir={run_dir.parent / 'ckpt'}", *overrides]  # fmt: skip


def logged_steps(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    return len(losses(run_dir)) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "sig", "ranks"),
    [
        ("main", signal.SIGTERM, 1),
        ("main", signal.SIGUSR1, 1),
        ("group", signal.SIGTERM, 1),
        ("torchrun", signal.SIGTERM, 2),
    ],  # fmt: skip
    ids=["SIGTERM-main", "SIGUSR1-main", "SIGTERM-process-group", "SIGTERM-torchrun-2-ranks"],
)
def test_preemption_saves_the_current_step_and_resumes_exactly(tmp_path, target, sig, ranks):
    check_preemption(tmp_path, target, sig, ranks)


@pytest.mark.gpu
def test_sigterm_to_torchrun_saves_and_resumes_fp8_thd_on_the_gpu(tmp_path):
    """Every GPU of the machine, up to two, one rank each; on one GPU, one rank under torchrun."""
    import torch

    # L0 steps take milliseconds on a GPU: more of them pass while torchrun forwards the signal.
    check_preemption(tmp_path, "torchrun", signal.SIGTERM, min(2, torch.cuda.device_count()), base=GPU_FP8_THD,
                     late_steps=20)  # fmt: skip


def check_preemption(tmp_path, target, sig, ranks, base=PREEMPTIBLE, late_steps=3):
    """Signal `target` after step 3: one checkpoint of the current step, exit 0 per rank, exact resume.

    `late_steps`: how many steps may be logged between sending the signal and the stop (it reaches the
    rank during step at_signal + 1 and is acted on one step later).
    """
    torchrun = target == "torchrun"
    run = tmp_path / "preempted" / "run"
    proc = subprocess.Popen(command(run, ranks, "num_train_steps=100000", torchrun=torchrun, base=base),
                            cwd=RECIPE_DIR, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 300
    while logged_steps(run) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    at_signal = logged_steps(run)
    sent = time.monotonic()
    if target == "group":
        os.killpg(proc.pid, sig)  # the main process and its loader worker
    else:
        proc.send_signal(sig)  # the main process, or torchrun (which forwards SIGTERM to each rank's group)
    output, _ = proc.communicate(timeout=300)
    latency = time.monotonic() - sent
    stopped = max(losses(run))
    # torchrun itself re-raises the signal it got (exit 1); its ranks exit 0, each after the save.
    assert proc.returncode == (1 if torchrun else 0), output[-3000:]
    message = f"Preempted ({signal.Signals(sig).name}): saved step {stopped}, exiting."
    assert output.count(message) == ranks, output[-3000:]
    assert "DataLoader worker" not in output and output.count("Traceback") == (1 if torchrun else 0)
    assert at_signal <= stopped <= at_signal + late_steps, (at_signal, stopped)
    assert latency < 30, latency  # torchrun's default --shutdown-timeout: it sends SIGKILL after 30 s
    ckpt = run.parent / "ckpt"
    assert [p.name for p in complete_checkpoints(ckpt)] == [f"step_{stopped}"]
    assert len(list((ckpt / f"step_{stopped}").glob("rank_*.pt"))) == ranks
    print(f"{target} {signal.Signals(sig).name}: signal after step {at_signal}, saved step {stopped}, "
          f"exited {latency:.1f} s after the signal")  # fmt: skip

    resumed = tmp_path / "preempted" / "resumed"
    run_command(command(resumed, ranks, f"num_train_steps={stopped + 2}", torchrun=torchrun, base=base))
    straight = tmp_path / "straight" / "run"
    run_command(command(straight, ranks, f"num_train_steps={stopped + 2}", torchrun=torchrun, base=base))
    steps = (stopped + 1, stopped + 2)
    assert [losses(resumed)[s] for s in steps] == [losses(straight)[s] for s in steps]  # bitwise
