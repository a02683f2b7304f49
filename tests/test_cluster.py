"""Cluster launches on this machine (CPU, gloo).

Two torchrun launchers as two nodes, and a real SLURM job preempted, requeued and resumed.

    python -m pytest tests/test_cluster.py -m slow      # the SLURM test needs slurm-wlm and munge (root)
"""

import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import ENV, FAST, RECIPE_DIR, TORCHRUN_2, losses, run_command
from local_slurm import job_field, local_slurm, slurm_missing

from checkpointing.folders import complete_checkpoints
from runtime import distributed
from runtime.distributed import DistributedConfig

NODE = ["bash", str(RECIPE_DIR / "launch" / "torchrun_node.sh")]
TRAIN = ["train_fsdp2.py", "--config-name", "L0_sanity", *FAST]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(nodes: int, port: int) -> dict:
    """What torchrun_node.sh reads where SLURM does not set it."""
    return {**ENV, "NNODES": str(nodes), "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port), "PYTHON": sys.executable}  # fmt: skip


def logged_steps(run_dir) -> list[int]:
    return sorted(losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else []


def test_local_rank_not_rank_picks_the_gpu(monkeypatch):
    """Rank 5 of a job, the second process on its node: cuda:1, not cuda:5."""
    chosen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: chosen.update(device=device))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group", lambda *a, **k: chosen.update(group=k))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    device = distributed.init_distributed(DistributedConfig(rank=5, local_rank=1, world_size=8))
    assert device == torch.device("cuda", 1) == chosen["device"] == chosen["group"]["device_id"]
    assert chosen["group"]["rank"] == 5 and chosen["group"]["world_size"] == 8


@pytest.mark.slow
def test_two_launchers_as_two_nodes_train_checkpoint_resume_and_export(tmp_path):
    """`torchrun --nnodes=2` twice on one machine (c10d rendezvous): what one torchrun with 2 ranks does.

    Rank 0 alone writes the run folder and the export; both ranks write their checkpoint shards into the
    one shared folder; the resumed run continues it; every loss equals the single-launcher run's.
    """
    run, ckpt = tmp_path / "nodes" / "run", tmp_path / "nodes" / "ckpt"
    for steps in (4, 6):
        port = free_port()
        overrides = [f"run_dir={run}", f"checkpoint.ckpt_dir={ckpt}", f"num_train_steps={steps}",
                     "checkpoint.save_every_n_steps=4", "checkpoint.save_final_model=true"]  # fmt: skip
        nodes = [subprocess.Popen([*NODE, *TRAIN, *overrides], cwd=RECIPE_DIR, env=node_env(2, port), text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]  # fmt: skip
        outputs = [node.communicate(timeout=600)[0] for node in nodes]
        assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    straight = tmp_path / "one_launcher"
    run_command([*TORCHRUN_2, *TRAIN, f"run_dir={straight}", f"checkpoint.ckpt_dir={straight / 'ckpt'}",
                 "num_train_steps=6"])  # fmt: skip
    assert logged_steps(run) == [1, 2, 3, 4, 5, 6]  # one writer: each step logged once
    assert losses(run) == losses(straight)
    assert [p.name for p in complete_checkpoints(ckpt)] == ["step_4"]  # every 4 steps; step 6: the export
    assert sorted(p.name for p in (ckpt / "step_4").glob("rank_*.pt")) == ["rank_0.pt", "rank_1.pt"]
    assert (ckpt / "final_model" / "model.safetensors").exists() and (run / "run_info.yaml").exists()


@pytest.mark.slow
def test_slurm_job_preempted_requeued_and_resumed_exactly(tmp_path):
    """launch/slurm.sbatch under a real SLURM: the warning signal, one save, a requeue, an exact resume."""
    if reason := slurm_missing():
        pytest.skip(reason)
    lines = (RECIPE_DIR / "launch" / "slurm.sbatch").read_text().splitlines()
    script = tmp_path / "job.sbatch"  # this machine has one node and no GPUs
    script.write_text("\n".join(x for x in lines if not x.startswith(("#SBATCH --gpus", "#SBATCH --nodes"))) + "\n")
    run, ckpt = tmp_path / "job" / "run", tmp_path / "job" / "ckpt"
    common = [*TRAIN, "num_train_steps=30", "dataset.num_workers=1", "checkpoint.save_every_n_steps=100000"]
    with local_slurm(tmp_path / "slurm") as slurm_env:
        env = {**node_env(1, free_port()), "SLURM_CONF": slurm_env["SLURM_CONF"], "RECIPE_DIR": str(RECIPE_DIR)}
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--nodes=1", f"--output={tmp_path / 'job.out'}", str(script), *common,
             f"run_dir={run}", f"checkpoint.ckpt_dir={ckpt}"],
            env=env, capture_output=True, text=True, check=True, cwd=RECIPE_DIR,
        )  # fmt: skip
        job = submitted.stdout.strip().split(";")[0]
        wait_for(lambda: len(logged_steps(run)) >= 3, tmp_path, "3 logged steps")
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=env, check=True)
        wait_for(lambda: job_field(env, job, "Restarts") == "1", tmp_path, "the requeue")
        time.sleep(3)  # slurmd refuses a relaunch within the second it revoked the job's first credential
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True)
        wait_for(lambda: job_field(env, job, "JobState") in ("COMPLETED", "FAILED"), tmp_path, "the job's end")
        assert job_field(env, job, "JobState") == "COMPLETED", (tmp_path / "job.out").read_text()[-3000:]
    output = (tmp_path / "job.out").read_text()
    assert "preemption warning" in output and f"requeueing job {job}" in output and "(restart 1)" in output
    saved = [int(line.split("saved step ")[1].split(",")[0]) for line in output.splitlines() if "saved step" in line]
    assert len(saved) == 1 and 3 <= saved[0] < 30, output[-3000:]
    assert logged_steps(run) == list(range(1, 31))  # each step trained and logged once across the two jobs

    straight = tmp_path / "straight"
    run_command([*NODE, *common, f"run_dir={straight}", f"checkpoint.ckpt_dir={straight / 'ckpt'}"],
                env=node_env(1, free_port()))  # fmt: skip
    assert losses(run) == losses(straight)  # bitwise, the steps after the requeue included


def wait_for(condition, tmp_path, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            out = tmp_path / "job.out"
            raise AssertionError(f"no {what} after {timeout} s:\n{out.read_text()[-3000:] if out.exists() else ''}")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["train_ddp.py", "train_fsdp2.py"])
def test_resume_on_three_ranks_continues_the_six_data_streams_of_two(tmp_path, script):
    """Saved by 2 ranks (3 streams each), resumed by 3 (2 each): the streams are handed out and training goes on.

    (That each window is then trained once is checked batch by batch in tests/test_data_streams.py.)
    """
    ckpt = tmp_path / "ckpt"
    common = [
        script,
        "--config-name",
        "L0_sanity",
        *FAST,
        "dataset.data_streams=6",
        f"checkpoint.ckpt_dir={ckpt}",
        "checkpoint.save_every_n_steps=3",
        "checkpoint.save_final_model=true",
    ]
    run_command([*TORCHRUN_2, *common, "num_train_steps=3", f"run_dir={tmp_path / 'two'}"])
    three_ranks = [*TORCHRUN_2[:-1], "--nproc_per_node=3"]
    result = run_command([*three_ranks, *common, "num_train_steps=5", f"run_dir={tmp_path / 'three'}"])
    assert "was saved by 2 ranks and this run has 3" in result.stderr
    assert "its 6 data streams continue where they stood (2 to 2 per rank)" in result.stderr
    assert sorted(losses(tmp_path / "three")) == [4, 5]
    assert (ckpt / "final_model" / "model.safetensors").exists()
