"""Two ssh "nodes" on this host for `deepspeed --hostfile`: an sshd on the loopback, reachable as
`localhost` and as `127.0.0.1`, with a key pair made for it.

    with LocalSshHosts(tmp_path / "ssh") as hosts:
        hostfile = hosts.hostfile(tmp_path / "hosts", slots=1)   # localhost slots=1 / 127.0.0.1 slots=1
        cmd = hosts.deepspeed_cmd(hostfile, "ds_configs/zero3.json", "configs/tiny.yaml", "--set", ...)
        subprocess.run(cmd, env=hosts.env(base_env))               # `ssh` on PATH goes to this sshd

Nothing outside the private directory is written but `/run/sshd`, the privilege-separation
directory sshd insists on (created empty when missing, as Debian's service does); the sessions log
in as the current user with that user's shell and its startup files. The machine's ~/.ssh stays
untouched: ssh reads ~/.ssh from the password database, not from $HOME, so the client
side is a `ssh` wrapper first on PATH that adds `-F <private ssh_config>` (this host key only, this
user key, batch mode). DeepSpeed's runner and pdsh both start `ssh` by name, so both go through it.
The server's processes (sshd, its sessions and everything they started: DeepSpeed's per-node
launchers and their ranks) are not descendants of the test's launcher; `kill_sessions()` and
`stop()` find them by parentage from this sshd.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Mapping

import psutil
import pytest

from launch_helpers import BIN, REPO, free_port, kill_launch, wait_for_checkpoint

HOSTS = ("localhost", "127.0.0.1")
PROGRAMS = ("sshd", "ssh", "ssh-keygen", "pdsh")
INSTALL = "apt-get install -y --no-install-recommends openssh-server pdsh (.ci/run does)"
PRIVSEP_DIR = Path("/run/sshd")


def _which(name: str) -> str | None:
    # Debian puts sshd in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def missing_programs() -> list[str]:
    """The programs this helper needs that are not installed (the tests skip when non-empty)."""
    return [name for name in PROGRAMS if _which(name) is None]


class SshHostsError(RuntimeError):
    """An sshd that would not start or accept the key; the message carries its log."""


class LocalSshHosts:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = 0
        self.bin = self.root / "bin"
        self._sshd: subprocess.Popen | None = None

    # ------------------------------------------------------------------------------ configuration
    def _write_files(self) -> None:
        d = self.root
        self.bin.mkdir(parents=True, exist_ok=True)
        for key in ("host_key", "user_key"):
            subprocess.run([_which("ssh-keygen"), "-q", "-t", "ed25519", "-N", "", "-C", f"megavl-test-{key}",
                            "-f", str(d / key)], check=True, capture_output=True)
        shutil.copy(d / "user_key.pub", d / "authorized_keys")
        host_pub = (d / "host_key.pub").read_text().split()[:2]
        self.port = free_port()
        (d / "known_hosts").write_text("".join(f"[{h}]:{self.port} {' '.join(host_pub)}\n" for h in HOSTS))
        (d / "sshd_config").write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", "AddressFamily inet",
            f"HostKey {d / 'host_key'}", f"PidFile {d / 'sshd.pid'}",
            f"AuthorizedKeysFile {d / 'authorized_keys'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password", "UsePAM no",
            "StrictModes no",           # the private directory lives under a world-writable /tmp
            "MaxStartups 64", "MaxSessions 64", "LogLevel VERBOSE",
        ]) + "\n")
        (d / "ssh_config").write_text("\n".join([
            f"Host {' '.join(HOSTS)}", f"  Port {self.port}", f"  IdentityFile {d / 'user_key'}",
            "  IdentitiesOnly yes", f"  UserKnownHostsFile {d / 'known_hosts'}", "  StrictHostKeyChecking yes",
            "  BatchMode yes", "  LogLevel ERROR",
        ]) + "\n")
        wrapper = self.bin / "ssh"
        wrapper.write_text(f'#!/bin/sh\nexec {_which("ssh")} -F {d / "ssh_config"} "$@"\n')
        wrapper.chmod(0o755)

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """`base` (default os.environ) with this helper's `ssh` first on PATH."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return env

    def hostfile(self, path: Path, slots: int, hosts: tuple[str, ...] = HOSTS) -> Path:
        """An MPI-style hostfile: one `HOST slots=N` line per node."""
        path.write_text("".join(f"{h} slots={slots}\n" for h in hosts))
        return path

    def deepspeed_cmd(self, hostfile: Path, ds_config: str, config: str, *args: str) -> list[str]:
        """`deepspeed --hostfile` with DeepSpeed's pdsh runner on this sshd, rank 0 on 127.0.0.1."""
        return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "pdsh",
                "--ssh_port", str(self.port), "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
                "megavl/train.py", "--ds_config", ds_config, "--config", config, *args]

    def rank_process(self, rank: int, timeout: float = 60) -> psutil.Process:
        """The training process of global rank `rank` among the processes started over ssh."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for proc in self.sessions():
                try:
                    if "megavl/train.py" in proc.cmdline() and proc.environ().get("RANK") == str(rank):
                        return proc
                except psutil.NoSuchProcess:
                    continue
            time.sleep(0.2)
        pytest.fail(f"no rank {rank} process under sshd within {timeout} s")

    def kill_rank_after_checkpoint(self, cmd: list[str], env: Mapping[str, str], ckpt_dir: Path, tag: str,
                                   rank: int, log: Path) -> dict[str, str]:
        """Start the hostfile launch `cmd` (output to `log`), SIGKILL the process of global rank
        `rank` once checkpoint `tag` is written, and wait until pdsh reports that rank's host gone.
        The ranks left on the other hosts fail their next collective and leave after megavl's exit
        wait (a minute): they are killed instead, with the launcher. Returns the killed rank's
        environment."""
        with open(log, "w") as sink:
            proc = subprocess.Popen(cmd, cwd=REPO, env=dict(env), stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_for_checkpoint(proc, ckpt_dir, tag, timeout=600)
            victim = self.rank_process(rank)
            seen = victim.environ()
            victim.kill()
            _wait_for_text(proc, log, "ssh exited with exit code", timeout=60)
        finally:
            kill_launch(proc)
            self.kill_sessions()
        return seen

    # ---------------------------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 20.0) -> "LocalSshHosts":
        self._write_files()
        if not PRIVSEP_DIR.is_dir():
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
        log = self.root / "sshd.log"
        # -D: stays in the foreground, so the pid is ours; -E: its log in the private directory.
        self._sshd = subprocess.Popen([_which("sshd"), "-D", "-f", str(self.root / "sshd_config"), "-E", str(log)],
                                      stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._sshd.poll() is not None:
                raise SshHostsError(f"sshd exited {self._sshd.returncode}\n{self.logs()}")
            res = subprocess.run(["ssh", "127.0.0.1", "true"], env=self.env(), capture_output=True, text=True)
            if res.returncode == 0:
                return self
            time.sleep(0.2)
        raise SshHostsError(f"no ssh login within {timeout:.0f} s: {res.stderr}\n{self.logs()}")

    def sessions(self) -> list[psutil.Process]:
        """Every process started through this sshd (its per-connection children and their trees)."""
        if self._sshd is None:
            return []
        try:
            return psutil.Process(self._sshd.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def kill_sessions(self, timeout: float = 30.0) -> None:
        """SIGKILL every process started through this sshd (a launch's ranks on every node)."""
        procs = self.sessions()
        for proc in procs:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=timeout)

    def stop(self) -> None:
        """Kill every session, then sshd; never raises."""
        self.kill_sessions()
        if self._sshd is not None and self._sshd.poll() is None:
            self._sshd.send_signal(signal.SIGTERM)
            try:
                self._sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._sshd.kill()
                self._sshd.wait()
        self._sshd = None

    def __enter__(self) -> "LocalSshHosts":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self, tail: int = 30) -> str:
        path = self.root / "sshd.log"
        if not path.exists():
            return ""
        return f"--- sshd.log (last {tail} lines)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-tail:])


def _wait_for_text(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"no {text!r} in the launcher's output\n{log.read_text(errors='replace')[-3000:]}")
