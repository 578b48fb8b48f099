"""A stop signal to every process of a fine-tuning run, DataLoader workers included, as Slurm sends it
to every process of a job step: a 2-rank retrieval fine-tune (deepspeed launcher, ZeRO-2, 2 workers
per rank) gets SIGUSR1 on its whole process group mid-epoch, must save a checkpoint and exit 0, and
`--resume auto` then runs it to the end, with spawned DataLoader workers (data.worker_start_method):
a spawned worker, and spawn's resource tracker, start with the default action (death), so only
workers and helpers started with the signals blocked (data/loader.py: start_workers,
start_worker_helpers) keep the run alive and quiet. Forked workers inherit their rank's handler;
they get the same signal in test_slurm.py's fine-tuning job (Linux's default start method), and
tests/unit/data/test_data_worker_signals.py signals workers as they start under spawn and forkserver.

The launcher ignores SIGUSR1 here (as `srun` forwards it rather than dying of it); the ranks and
their workers receive it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launch_helpers import BIN, REPO, deepspeed_cmd, run_child, synth_downstream, train_env

pytestmark = pytest.mark.slow
STEPS = 6


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("downstream")
    synth_downstream(out, 48, 12)
    return out


def _cmd(synth: Path, out: Path, start_method: str) -> list[str]:
    # 144 captions, 8 per step: an epoch of 18 steps, so the signal lands while the workers run
    return deepspeed_cmd(2, "ds_configs/zero2.json", "configs/finetune_retrieval_tiny.yaml",
                         "--set", f"run.output_dir={out}", f"task.image_root={synth}",
                         f"task.train=[{synth}/retrieval_train.json]", "task.val=", "task.test=",
                         "data.batch_size=4", "data.num_workers=2", f"data.worker_start_method={start_method}",
                         f"run.max_steps={STEPS}", "run.checkpoint_every=2", "run.stop_check_every=1",
                         "run.log_every=1", "run.eval_every=-1", "run.keep_checkpoints=5")


def _ranks_with_workers(launcher: subprocess.Popen) -> list[psutil.Process]:
    ranks = [p for p in psutil.Process(launcher.pid).children(recursive=True)
             if any(a.startswith("--local_rank=") for a in p.cmdline())]
    return [r for r in ranks if len(r.children()) >= 2]


def test_sigusr1_to_every_process_checkpoints_exits_0_and_resumes(synth, tmp_path):
    out = tmp_path / "run"
    cmd = _cmd(synth, out, "spawn")
    log = tmp_path / "stopped.log"
    with open(log, "w") as sink:
        launcher = subprocess.Popen(["bash", "-c", 'trap "" USR1; exec "$@"', "launcher", *cmd], cwd=REPO,
                                    env=train_env(), stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
    try:
        marker = out / "checkpoints" / "step_00000002" / "COMPLETE.json"
        deadline = time.monotonic() + 300
        while not marker.is_file():
            assert launcher.poll() is None, log.read_text()[-5000:]
            assert time.monotonic() < deadline, "no step-2 checkpoint within 300 s"
            time.sleep(0.2)
        assert len(_ranks_with_workers(launcher)) == 2, "each rank should have its 2 DataLoader workers"
        os.killpg(launcher.pid, signal.SIGUSR1)  # launcher, ranks and workers alike
        assert launcher.wait(timeout=300) == 0, log.read_text()[-5000:]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    text = log.read_text()
    assert "stop signal: checkpoint saved at step" in text, text[-5000:]
    assert "Traceback" not in text and "terminate called" not in text, text[-5000:]
    stopped_at = int(text.split("stop signal: checkpoint saved at step")[1].split(";")[0])
    assert 2 <= stopped_at < STEPS, stopped_at
    assert (out / "checkpoints" / f"step_{stopped_at:08d}" / "COMPLETE.json").is_file()
    assert not (out / "checkpoints" / f"step_{STEPS:08d}").exists()

    resumed = run_child(cmd, timeout=600)  # --resume auto, train.py's default
    assert f"at step {stopped_at}" in resumed.stdout + resumed.stderr
    assert (out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE.json").is_file()
