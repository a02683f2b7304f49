"""A real SLURM (slurmctld + slurmd, munge) on this machine, for tests of the cluster launch scripts.

    with local_slurm(tmp_path) as env:            # env: os.environ plus SLURM_CONF
        subprocess.run(["sbatch", ...], env=env)

Needs Debian's `slurm-wlm` and `munge` and root (`.ci/run` installs them where it can); `slurm_missing()`
says why not, for a skip; daemons that do not come up skip the test too. One node (this host, all its
cores), one partition; the daemons stop at exit.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import pytest


def slurm_missing() -> str | None:
    """Why a local SLURM cannot start here, or None."""
    for binary in ("slurmctld", "slurmd", "sbatch", "munged"):
        if not (shutil.which(binary) or Path(f"/usr/sbin/{binary}").exists()):
            return f"{binary} is not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM test runs its daemons as root"
    return None


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _start_munge() -> None:
    if subprocess.run(["sh", "-c", "munge -n | unmunge"], capture_output=True).returncode == 0:
        return  # already running
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if not Path("/etc/munge/munge.key").exists():
        subprocess.run([_sbin("mungekey"), "--create"], check=True)
        shutil.chown("/etc/munge/munge.key", "munge", "munge")
    subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", _sbin("munged")], check=True)


@contextmanager
def local_slurm(folder: Path):
    """Start slurmctld and slurmd for this host, logging in `folder`; yields the clients' environment."""
    folder.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    conf = folder / "slurm.conf"
    conf.write_text(
        "\n".join([
            "ClusterName=recipe", f"SlurmctldHost={host}", "AuthType=auth/munge", "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none", "SlurmUser=root", "SlurmdUser=root", f"StateSaveLocation={folder / 'state'}",
            f"SlurmdSpoolDir={folder / 'spool'}", f"SlurmctldPidFile={folder / 'slurmctld.pid'}",
            f"SlurmdPidFile={folder / 'slurmd.pid'}", f"SlurmctldLogFile={folder / 'slurmctld.log'}",
            f"SlurmdLogFile={folder / 'slurmd.log'}", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", "SlurmctldPort=16817", "SlurmdPort=16818", "MinJobAge=3600",
            f"NodeName={host} CPUs={os.cpu_count()} State=UNKNOWN",
            f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP",
        ]) + "\n"
    )  # fmt: skip
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    env = {**os.environ, "SLURM_CONF": str(conf)}
    _start_munge()
    try:
        started = [subprocess.run([_sbin(d), "-f", str(conf)], env=env).returncode for d in ("slurmctld", "slurmd")]
        deadline, state = time.monotonic() + 60, ""
        while started == [0, 0] and time.monotonic() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env).stdout
            if state.strip() in ("idle", "mixed", "allocated"):
                break
            time.sleep(0.5)
        else:  # this machine's SLURM, not the recipe: skip, with where to look
            pytest.skip(f"the local SLURM did not come up (node state {state.strip()!r}); see {folder}/slurm*.log")
        yield env
    finally:
        for daemon in ("slurmd", "slurmctld"):
            pid_file = folder / f"{daemon}.pid"
            if pid_file.exists():
                with suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid_file.read_text()), signal.SIGTERM)


def job_field(env: dict, job_id: str, field: str) -> str:
    """A field of `scontrol show job` (e.g. JobState, Restarts)."""
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=env).stdout
    for token in out.split():
        if token.startswith(f"{field}="):
            return token.split("=", 1)[1]
    return ""
