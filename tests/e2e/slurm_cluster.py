"""A real Slurm 22.05 "cluster" on this host: one slurmctld and two slurmd nodes (n1, n2).

    with LocalSlurm(tmp_path / "slurm") as cluster:
        job_id = cluster.sbatch(["--nodes=2", "job.sh"], env=os.environ)
        cluster.wait_state(job_id, {"COMPLETED"}, timeout=60)

Everything (config, state, spool, logs, pid files) lives in one private directory and the daemons
listen on free ports, so several clusters (parallel test runs, CI) can run side by side. The setup:
auth/none (no munge daemon), no cgroups (linuxproc tracks the jobs), one host named twice through
MULTIPLE_SLURMD. Clients find this cluster through SLURM_CONF, which `env()` adds.

`stop()` cancels every job, waits for the queue to drain, stops both daemons by the pids in their
pid files, and finally kills (by pid) any process still carrying this cluster's SLURM_CONF in its
environment (a slurmstepd or training rank orphaned by a crash), so a failing test leaves nothing.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping

from launch_helpers import free_port

NODES = ("n1", "n2")
CRED_EXPIRE_S = 10
DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "sinfo", "scontrol", "scancel")


def missing_binaries() -> list[str]:
    """The Slurm programs this helper needs that are not on PATH (tests skip when non-empty)."""
    return [name for name in DAEMONS if shutil.which(name) is None]


def _total_mem_mib() -> int:
    with open("/proc/meminfo") as f:
        kib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    return kib // 1024


class SlurmError(RuntimeError):
    """A daemon that would not start or a job that did not reach the expected state; the message
    carries the relevant log tail."""


class LocalSlurm:
    def __init__(self, root: Path, cpus_per_node: int | None = None) -> None:
        self.root = Path(root)
        self.conf = self.root / "slurm.conf"
        self.cpus = cpus_per_node or os.cpu_count() or 1
        self.host = socket.gethostname().split(".")[0]
        self._started: list[str] = []

    # ------------------------------------------------------------------------------ configuration
    def write_conf(self) -> None:
        d = self.root
        for sub in ["state", *[f"spool/{n}" for n in NODES]]:
            (d / sub).mkdir(parents=True, exist_ok=True)
        mem = max(1024, _total_mem_mib() - 1024)
        ctld_port = free_port()
        lines = [
            "ClusterName=megavlci",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/none", "CredType=cred/none",
            # A requeued job may start again only once its old credential has expired (default 120 s);
            # starting it earlier by hand races slurmd ("Job credential revoked").
            f"AuthInfo=cred_expire={CRED_EXPIRE_S}",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log",
            "MailProg=/bin/true",
            # cgroup plugins do not work in the sandbox; linuxproc tracks jobs by parent pid.
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "MpiDefault=none", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "ReturnToService=2", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "KillWait=30",          # time between SIGTERM and SIGKILL: room for a checkpoint save
            "MinJobAge=600",        # keep finished jobs visible to `scontrol show job`
            "SlurmdTimeout=60", "SlurmctldTimeout=60",
        ]
        for node in NODES:
            lines.append(f"NodeName={node} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={free_port()} "
                         f"CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 "
                         f"RealMemory={mem} State=UNKNOWN")
        lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
        self.conf.write_text("\n".join(lines) + "\n")

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 30.0) -> "LocalSlurm":
        self.write_conf()
        self._run(["slurmctld", "-f", str(self.conf)])
        self._started.append("slurmctld")
        for node in NODES:
            self._run(["slurmd", "-f", str(self.conf), "-N", node])
            self._started.append(node)
        return self.wait_nodes_idle(timeout)

    def wait_nodes_idle(self, timeout: float = 60.0) -> "LocalSlurm":
        """Until every node is idle: also after a job ends, while its steps are still being cleaned up
        (a requeued job released too early is refused by slurmd: "Job N already killed")."""
        deadline = time.monotonic() + timeout
        states: list[str] = []
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=self.env(),
                                 capture_output=True, text=True)
            states = out.stdout.split("\n") if out.returncode == 0 else [out.stderr]
            if out.returncode == 0 and sorted(out.stdout.split()) == sorted([*NODES, "idle", "idle"]):
                return self
            time.sleep(0.3)
        raise SlurmError(f"nodes not idle after {timeout:.0f} s: {states}\n{self.logs()}")

    def _run(self, cmd: list[str]) -> None:
        res = subprocess.run(cmd, env=self.env(), capture_output=True, text=True)
        if res.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} exited {res.returncode}: {res.stderr}\n{self.logs()}")

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons, then kill any orphan of this cluster; never raises."""
        if self.conf.exists() and "slurmctld" in self._started:
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env(), capture_output=True)
            self._wait_queue_empty(timeout=45.0)
        pid_files = [self.root / "slurmctld.pid", *[self.root / f"slurmd-{n}.pid" for n in NODES]]
        pids = [int(p.read_text().split()[0]) for p in pid_files if p.exists() and p.read_text().strip()]
        self._terminate(pids)
        self._terminate(self._orphans(), sig=signal.SIGKILL)
        self._started.clear()

    def _wait_queue_empty(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["squeue", "-h", "-o", "%i"], env=self.env(), capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    @staticmethod
    def _terminate(pids: Iterable[int], sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            alive = [pid for pid in alive if Path(f"/proc/{pid}").exists() and not _is_zombie(pid)]
            time.sleep(0.1)
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _orphans(self) -> list[int]:
        """Pids (not ours) whose environment names this cluster's slurm.conf."""
        marker = f"SLURM_CONF={self.conf}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes()
            except OSError:
                continue
            if marker in environ.split(b"\0"):
                found.append(int(entry.name))
        return found

    def __enter__(self) -> "LocalSlurm":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------- jobs
    def sbatch(self, args: list[str], env: Mapping[str, str] | None = None, cwd: Path | None = None) -> int:
        res = subprocess.run(["sbatch", "--parsable", *args], env=self.env(env), cwd=cwd,
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return int(res.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, BatchHost, ...)."""
        res = subprocess.run(["scontrol", "-o", "show", "job", str(job_id)], env=self.env(),
                             capture_output=True, text=True)
        if res.returncode != 0:
            return {}
        return dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)

    def scontrol(self, *args: str) -> str:
        res = subprocess.run(["scontrol", *args], env=self.env(), capture_output=True, text=True)
        if res.returncode != 0:
            raise SlurmError(f"scontrol {' '.join(args)} exited {res.returncode}: {res.stderr}")
        return res.stdout

    def scancel(self, *args: str) -> None:
        res = subprocess.run(["scancel", *args], env=self.env(), capture_output=True, text=True)
        if res.returncode != 0:
            raise SlurmError(f"scancel {' '.join(args)} exited {res.returncode}: {res.stderr}")

    def wait_state(self, job_id: int, states: set[str], timeout: float, context: str = "") -> dict[str, str]:
        """Poll until the job's JobState is one of `states`; a terminal state that is not wanted,
        or the timeout, raises with the job record, `context` (e.g. the job's output) and daemon logs."""
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED"}
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            state = info.get("JobState", "")
            if state in states:
                return info
            if state in terminal:
                break
            time.sleep(0.5)
        raise SlurmError(f"job {job_id} is {info.get('JobState')!r}, wanted {sorted(states)}; "
                         f"record: {info}\n{context}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        parts = []
        for name in ["slurmctld.log", *[f"slurmd-{n}.log" for n in NODES]]:
            path = self.root / name
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {name} (last {tail} lines)\n" + "\n".join(lines))
        return "\n".join(parts)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True
