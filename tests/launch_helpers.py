"""Plumbing for the tests that start child processes, in one place: the environment and launcher
commands (deepspeed or torchrun) of a child `megavl/train.py` run, a free port, a child run to its
end, a launch SIGKILLed with all its ranks (once it has written a checkpoint), and the processes of
a gloo world on this machine (one per rank).

Test files import it as `launch_helpers`: pytest's default import mode puts tests/ on sys.path when
it loads tests/conftest.py, as it puts each test file's folder there (test_video_mixed.py imports
test_train.py that way)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megavl.engine.launch import child_env

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: deepspeed, megavl-export, ...


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_env() -> dict[str, str]:
    """Environment of a child run: one OpenMP thread per process (the ranks share the cores), output
    unbuffered (a log read while the run goes, or after a kill, is up to date), this venv's scripts
    first on PATH (a child that starts a tool by name gets this checkout's)."""
    return child_env(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}")


def deepspeed_cmd(world: int, ds_config: str, config: str, *args: str) -> list[str]:
    """`deepspeed megavl/train.py` on `world` CPU ranks of this machine, on a free port."""
    return [str(BIN / "deepspeed"), "--master_port", str(free_port()), "--num_gpus", str(world),
            "megavl/train.py", "--ds_config", ds_config, "--config", config, *args]


def torchrun_cmd(world: int, ds_config: str, config: str, *args: str) -> list[str]:
    """`torchrun megavl/train.py` on `world` CPU ranks of this machine, on a free port: PyTorch's own
    launcher, one process that imports torch once (the deepspeed launcher is two that import torch
    and DeepSpeed, ~5 s more per launch here). For the tests whose subject is not the launcher; the
    deepspeed launcher itself is exercised by test_clean_exit.py, test_finetune_signals.py and the
    manual's commands (tests/docs)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
            "--master_port", str(free_port()), "megavl/train.py", "--ds_config", ds_config, "--config", config,
            *args]


def run_child(cmd: list[str], timeout: float = 600, expect: int = 0) -> subprocess.CompletedProcess:
    """Run `cmd` from the repo root to its end; its exit status must be `expect`."""
    proc = subprocess.run(cmd, cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == expect, (f"exit {proc.returncode}, expected {expect}\n"
                                       + proc.stdout[-3000:] + proc.stderr[-5000:])
    return proc


def wait_for_checkpoint(proc: subprocess.Popen, ckpt_dir: Path, tag: str, timeout: float) -> None:
    """Until `latest` in ckpt_dir names `tag` or a later one (tags sort by step)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = ckpt_dir / "latest"
        if latest.is_file() and latest.read_text().strip() >= tag:
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended (rc {proc.returncode}) before checkpoint {tag}")
        time.sleep(0.2)
    pytest.fail(f"no checkpoint {tag} within {timeout} s")


def kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL a launch started in a session of its own, its ranks and their workers, all at once (no
    chance to save), and reap the launcher. torchrun starts every rank in a session of its own, so
    killing the launcher's process group alone would leave its ranks training as orphans; the
    deepspeed launcher's ranks are in its group. Both are covered: every descendant by pid, then the
    group."""
    import psutil

    try:
        descendants = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        descendants = []
    for child in descendants:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    psutil.wait_procs(descendants, timeout=30)


def sigkill_after_checkpoint(cmd: list[str], ckpt_dir: Path, tag: str, final_tag: str,
                             timeout: float = 600) -> None:
    """Start the launch `cmd` in a session of its own and SIGKILL the launcher and every rank, with
    no chance to save, once checkpoint `tag` is written; the run must not have reached `final_tag`
    (the resume would have nothing to do). Running `cmd` again resumes it (`--resume auto`)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_checkpoint(proc, ckpt_dir, tag, timeout)
    finally:
        kill_launch(proc)
    assert not (ckpt_dir / final_tag).exists(), "the run finished before the kill"


def start_ranks(world: int, argv: list) -> list[subprocess.Popen]:
    """`python *argv` once per rank of a one-machine gloo world on a free port, with the variables
    torchrun would set; each rank's output piped (read by wait_ranks)."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = child_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                        LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                        OMP_NUM_THREADS="1",
                        PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        procs.append(subprocess.Popen([sys.executable, *map(str, argv)], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_ranks(procs: list[subprocess.Popen], timeout: float, what: str = "") -> None:
    """Every rank must exit 0 within `timeout` seconds (each); one still running afterwards is
    killed, so a failed test leaves no rank waiting on its peers."""
    name = f"{what} ranks".strip()
    try:
        logs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} did not finish in {timeout:.0f} s (machine overloaded or a rank hung)")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"{what} rank {rank} exited {p.returncode}:\n{log[-5000:]}".lstrip()


def run_ranks(world: int, argv: list, timeout: float, what: str = "") -> None:
    """start_ranks then wait_ranks: the workers write their results for the test to read."""
    wait_ranks(start_ranks(world, argv), timeout, what)


def synth_downstream(out: Path, num_train: int, num_eval: int) -> Path:
    """Write megavl-synth-downstream's retrieval/VQA/NLVR2 files (64 px, seed 0) to `out`."""
    subprocess.run([str(BIN / "megavl-synth-downstream"), "--out", str(out), "--seed", "0",
                    "--num-train", str(num_train), "--num-eval", str(num_eval), "--image-size", "64"],
                   check=True, capture_output=True)
    return out
