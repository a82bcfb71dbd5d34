"""A real single-node Slurm cluster for the tests: munged, slurmctld and slurmd started as root on 127.0.0.1.

Everything lives in a temporary directory (key, slurm.conf, state, spool, logs, the job completion log) and
the clients find it through SLURM_CONF; the daemons run in the foreground as children of the test session and
are stopped at its end. Needs root and Debian's `slurm-wlm munge` (scripts/setup.sh test installs them).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
NODE_CPUS = 4  # more than the 2 cores of CI on purpose: the jobs are small, most of their time is imports


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    jobcomp: Path
    env: dict[str, str]
    processes: list[subprocess.Popen] = field(default_factory=list)

    def run(self, *cmd: str, check: bool = True) -> str:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        if check and out.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip()}")
        return out.stdout

    def completed_jobs(self) -> list[dict[str, str]]:
        """Slurm's own record of every finished job (jobcomp/filetxt: one `Key=Value ...` line per job)."""
        if not self.jobcomp.exists():
            return []
        jobs = []
        for line in self.jobcomp.read_text().splitlines():
            jobs.append(dict(kv.split("=", 1) for kv in line.split() if "=" in kv))
        return jobs

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.root.glob("*.log")) if p.name != self.jobcomp.name)


def _missing() -> str | None:
    if os.name != "posix" or os.geteuid() != 0:
        return "the Slurm test cluster runs its daemons as root"
    absent = [d for d in (*DAEMONS, "sbatch", "sinfo", "mungekey") if shutil.which(d) is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install slurm-wlm munge, see scripts/setup.sh test)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_conf(root: Path, host: str, munge_socket: Path, memory_mb: int) -> str:
    ctld, slurmd = _free_port(), _free_port()
    return f"""\
ClusterName=surfdifftest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
# Fast, deterministic ends for the cancel/time-limit tests; finished jobs stay visible to scontrol.
KillWait=2
OverTimeLimit=0
MinJobAge=900
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={NODE_CPUS} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _start(cluster: SlurmCluster, name: str, *args: str) -> None:
    log = open(cluster.root / f"{name}.stdout.log", "w")  # noqa: SIM115 - closed with the process
    cluster.processes.append(subprocess.Popen([shutil.which(name) or name, *args], env=cluster.env, stdout=log,
                                              stderr=subprocess.STDOUT, start_new_session=True))


def _wait(cluster: SlurmCluster, what: str, ok, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ok():
            return
        for p in cluster.processes:
            if p.poll() is not None:
                raise RuntimeError(f"{p.args[0]} exited ({p.returncode}) while waiting for {what}\n{cluster.logs()}")
        time.sleep(0.3)
    raise RuntimeError(f"timed out waiting for {what}\n{cluster.logs()}")


def start_cluster(root: Path) -> SlurmCluster:
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged refuses keys and sockets in group/world-writable directories
    for sub in ("state", "spool", "munge"):
        (root / sub).mkdir(exist_ok=True)
    key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
    subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
    host = socket.gethostname().split(".")[0]
    memory_mb = max(1000, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 / 2))
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, sock, memory_mb))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = SlurmCluster(root=root, conf=conf, jobcomp=root / "jobcomp.txt", env=env)
    try:
        _start(cluster, "munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
               f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
               f"--log-file={root}/munged.log")
        _wait(cluster, "munged", sock.exists)
        _start(cluster, "slurmctld", "-D", "-c", "-i", "-f", str(conf))
        _wait(cluster, "slurmctld", lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True,
                                                             text=True).stdout.count("UP") > 0)
        _start(cluster, "slurmd", "-D", "-N", host, "-f", str(conf))
        _wait(cluster, "the node to be idle",
              lambda: "idle" in cluster.run("sinfo", "-h", "-N", "-o", "%T", check=False))
    except BaseException:
        stop_cluster(cluster)
        raise
    return cluster


def stop_cluster(cluster: SlurmCluster) -> None:
    subprocess.run(["scancel", "--full", "--user=root"], env=cluster.env, capture_output=True, timeout=30)
    for p in reversed(cluster.processes):  # slurmd, slurmctld, then munged
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=10)
        if p.stdout:
            p.stdout.close()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """The cluster for the whole session; the clients of this process (sbatch, submitit) find it via SLURM_CONF."""
    if reason := _missing():
        pytest.skip(reason)
    # A short root path: Unix socket paths are limited to 108 bytes.
    cluster = start_cluster(Path(tmp_path_factory.mktemp("slurm", numbered=True)))
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        stop_cluster(cluster)
