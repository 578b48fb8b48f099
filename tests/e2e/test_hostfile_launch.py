"""`deepspeed --hostfile hosts megavl/train.py --ds_config ds_configs/zero3.json` as users run it:
DeepSpeed's pdsh runner logs into every host of the hostfile over ssh and starts a per-node launcher
there. The "hosts" are this machine twice (`localhost` and `127.0.0.1`) through a private sshd on
the loopback (tests/e2e/ssh_hosts.py); the ranks talk gloo on CPU.

One ZeRO-3 job goes through what a multi-node job meets, and its losses must equal an uninterrupted
2-rank reference's (torchrun, 4 steps) to 1e-5 (relative, fp32):
- 2 nodes x 1 slot: killed on one node (SIGKILL of node 1's rank) once step 2 is saved; the ranks see
  the variables the docs list (docs/multinode.md#what-reaches-the-ranks) and no others of the
  launcher's;
- the saved step 2, copied as another allocation sees it, continues on a hostfile of ONE node with
  one slot (2 -> 1; steps 3-4 against the reference);
- that run's step 3 continues on 2 nodes x 2 slots (1 -> 4: the world changes a second time and
  grows; step 4 against the 1-rank run, the run on the world that wrote the checkpoint).
The global batch stays 8 with the same gathered micro-batch per step at every world (as in
test_resume_world.py, whose helpers this file uses).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from launch_helpers import (BIN, REPO, free_port, kill_launch, run_child, torchrun_cmd, train_env,
                            wait_for_checkpoint)
from ssh_hosts import INSTALL, LocalSshHosts, missing_programs
from test_resume_world import MICRO, STEPS, _assert_losses_match, _continue_from

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_programs()),
                       reason=f"sshd/pdsh are not installed ({', '.join(missing_programs())} missing); {INSTALL}"),
]
# What the ranks need that DeepSpeed's pdsh runner does not pass on its own (it passes PYTHON*,
# plus NCCL* on CUDA machines): the file it reads is named by DS_ENV_FILE.
DEEPSPEED_ENV = {"PATH": f"{BIN}:$PATH", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                 "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
NOT_PASSED = "MEGAVL_TEST_NOT_PASSED"  # set for the launcher only: must not reach a pdsh-started rank


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    # The context manager kills every process started over ssh and stops sshd, also on failure.
    with LocalSshHosts(tmp_path_factory.mktemp("ssh")) as local:
        yield local


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(out), "--num-train", "256",
                    "--num-val", "32", "--seed", "0", "--image-size", "64", "--samples-per-shard", "64"],
                   check=True, capture_output=True)
    return out


def _sets(world: int, shards: Path, out: Path, *extra: str) -> list[str]:
    # The brace pattern is quoted for the remote shell that pdsh runs the command in (it would
    # expand it into four words); megavl strips the quotes when the argument reaches it unquoted.
    return ["--set", f"run.output_dir={out}", f"data.train_shards='{shards}/train-{{000000..000003}}.tar'",
            f"data.val_shards={shards}/val-000000.tar", f"data.batch_size={MICRO[world]}", "run.grad_accum=1",
            "run.global_batch_size=8", "data.num_workers=0", "run.log_every=1", f"run.max_steps={STEPS}",
            "run.checkpoint_every=2", "run.eval_every=-1", "run.keep_checkpoints=5", *extra]


def _hostfile_cmd(hosts: LocalSshHosts, hostfile: Path, world: int, shards: Path, out: Path, *extra: str) -> list[str]:
    return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--launcher", "pdsh", "--ssh_port", str(hosts.port),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
            "megavl/train.py", "--ds_config", "ds_configs/zero3.json", "--config", "configs/tiny.yaml",
            *_sets(world, shards, out, *extra)]


def _launch_env(hosts: LocalSshHosts, tmp: Path) -> dict[str, str]:
    ds_env = tmp / "deepspeed_env"
    ds_env.write_text("".join(f"{k}={v}\n" for k, v in DEEPSPEED_ENV.items()))
    return hosts.env({**train_env(), "DS_ENV_FILE": str(ds_env), NOT_PASSED: "1"})


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run (its losses only: no checkpoint but the final one)."""
    out = tmp_path_factory.mktemp("ref_zero3") / "run"
    run_child(torchrun_cmd(2, "ds_configs/zero3.json", "configs/tiny.yaml",
                           *_sets(2, shards, out, f"run.checkpoint_every={STEPS}")), timeout=900)
    return out


def _rank_process(hosts: LocalSshHosts, rank: int, timeout: float = 60) -> psutil.Process:
    """The training process of global rank `rank` among the processes started over ssh."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in hosts.sessions():
            try:
                if "megavl/train.py" in proc.cmdline() and proc.environ().get("RANK") == str(rank):
                    return proc
            except psutil.NoSuchProcess:
                continue
        time.sleep(0.2)
    pytest.fail(f"no rank {rank} process under sshd within {timeout} s")


def _kill_one_node_after_checkpoint(hosts: LocalSshHosts, cmd: list[str], env: dict[str, str], ckpts: Path) -> None:
    """Run `cmd`, SIGKILL rank 1 (node 127.0.0.1's only rank) once step 2 is saved; the job must fail."""
    log = ckpts.parent.with_name(ckpts.parent.name + ".log")
    with open(log, "w") as sink:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_checkpoint(proc, ckpts, "step_00000002", timeout=600)
        victim = _rank_process(hosts, rank=1)
        seen = victim.environ()
        victim.send_signal(signal.SIGKILL)
        # DeepSpeed's launcher on that node ends the node's part and pdsh reports it; the other
        # node's rank fails its next collective and leaves after megavl's exit wait (a minute):
        # not waited for here.
        _wait_for_line(proc, log, "127.0.0.1: ssh exited with exit code", timeout=60)
    finally:
        kill_launch(proc)
        hosts.kill_sessions()
    assert not (ckpts / f"step_{STEPS:08d}").exists(), "the run finished before the kill"
    for key, value in DEEPSPEED_ENV.items():
        want = value.replace("$PATH", "")
        assert seen.get(key, "").startswith(want), (key, seen.get(key))
    assert seen["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)  # the runner's cwd, put first
    assert seen["PYTHONUNBUFFERED"] == "1"  # PYTHON* passes by its prefix
    assert NOT_PASSED not in seen
    assert (seen["CROSS_RANK"], seen["CROSS_SIZE"], seen["WORLD_SIZE"]) == ("1", "2", "2")


def _wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text(errors="replace"):
            return
        if proc.poll() is not None:
            break
        time.sleep(0.2)
    pytest.fail(f"no {text!r} in the launcher's output\n{log.read_text(errors='replace')[-3000:]}")


def test_hostfile_zero3_killed_on_one_node_resumes_on_one_and_on_four(hosts, shards, reference, tmp_path):
    env = _launch_env(hosts, tmp_path)
    two_by_one = hosts.hostfile(tmp_path / "hosts_2x1", slots=1)
    killed = tmp_path / "killed"
    _kill_one_node_after_checkpoint(hosts, _hostfile_cmd(hosts, two_by_one, 2, shards, killed), env,
                                    killed / "checkpoints")

    one_node = hosts.hostfile(tmp_path / "hosts_1x1", slots=1, hosts=("localhost",))
    one = _continue_from(killed, "step_00000002", tmp_path / "one")
    proc = _run(_hostfile_cmd(hosts, one_node, 1, shards, one, "run.checkpoint_every=1"), env)  # 2 -> 1
    assert "resharding" in proc.stdout + proc.stderr
    _assert_losses_match(reference, one, range(3, STEPS + 1))

    two_by_two = hosts.hostfile(tmp_path / "hosts_2x2", slots=2)
    four = _continue_from(one, "step_00000003", tmp_path / "four")
    proc = _run(_hostfile_cmd(hosts, two_by_two, 4, shards, four), env)  # 1 -> 4: the second change, and it grows
    out = proc.stdout + proc.stderr
    assert "localhost: " in out and "127.0.0.1: " in out  # pdsh's per-host prefixes
    _assert_losses_match(one, four, range(4, STEPS + 1))


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}{proc.stderr[-5000:]}"
    return proc
