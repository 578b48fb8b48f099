"""The real slurm/pretrain_14m.sh through a real sbatch on a local two-node Slurm (tests/e2e/slurm_cluster.py).

The job runs the tiny recipe on CPU: 2 nodes x 1 rank, gloo, ZeRO-3, the shards this module
generates. Only sbatch flags and the script's documented MEGAVL_* variables differ from a GPU
cluster submission. One pre-training job lives through what a long job meets: it trains on two
nodes, gets the time-limit signal (USR1 to the batch shell, as `--signal=B:USR1@600` does),
checkpoints and requeues itself, and is given ONE node while held between runs (`scontrol update
NumNodes=1`): the script recomputes micro-batch and grad_accum for the global batch, and the run
continues from its 2-rank checkpoint on 1 rank (resharded) to the end. A second job submits the real
slurm/finetune.sh (retrieval, 2 DataLoader workers per rank, so Slurm's USR1 reaches the workers as
well): it checkpoints, requeues itself on the same nodes and finishes from that checkpoint.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import LocalSlurm, SlurmError, missing_binaries

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "slurm" / "pretrain_14m.sh"
FINETUNE_SCRIPT = REPO / "slurm" / "finetune.sh"

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(bool(missing_binaries()),
                       reason=f"Slurm is not installed ({', '.join(missing_binaries())} not on PATH); "
                              "apt-get install slurmctld slurmd slurm-client (.ci/run does)"),
]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # The context manager stops both daemons and every process of the cluster, also on failure.
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
        yield slurm


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    tool = Path(sys.executable).with_name("megavl-synth-shapes")
    # The console script when installed; the same module otherwise (an editable install not re-run).
    launcher = [str(tool)] if tool.exists() else [sys.executable, "-m", "megavl.tools.synth_shapes"]
    cmd = [*launcher, "--out", str(out), "--num-train", "256", "--num-val", "32", "--seed", "0",
           "--image-size", "64", "--samples-per-shard", "64"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return out


@pytest.fixture(scope="module")
def downstream(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("downstream")
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_downstream", "--out", str(out), "--seed", "0",
                    "--num-train", "48", "--num-eval", "12", "--image-size", "64"], check=True, capture_output=True)
    return out


def preempt_once_training(cluster: LocalSlurm, job: int, out: Path, run_dir: Path) -> None:
    """Once training is under way (a few steps logged), well before the end, do what
    --signal=B:USR1@600 does ahead of the time limit (USR1 to the batch shell only), and wait
    for the job to requeue itself."""
    deadline = time.monotonic() + 300
    while not any(s >= 2 for s in scalar_steps(event_files(out))):
        state = cluster.job_info(job).get("JobState")
        if time.monotonic() > deadline or state not in ("PENDING", "RUNNING"):
            pytest.fail(f"job {job} is {state}, no training steps seen\n{job_log(run_dir, job)}")
        time.sleep(1)
    cluster.scancel("--signal=USR1", "--batch", str(job))
    try:
        cluster.wait_state(job, {"PENDING"}, timeout=90, context=job_log(run_dir, job))
    except SlurmError as err:
        pytest.fail(f"the job did not requeue itself after USR1: {err}")


def submit(cluster: LocalSlurm, shards: Path, run_dir: Path, sets: str, **extra_env: str) -> int:
    """sbatch the real script: CPU overrides as sbatch flags, the rest as documented MEGAVL_* variables."""
    train, val = sorted(shards.glob("train*.tar")), sorted(shards.glob("val*.tar"))
    assert train and val, f"no train/val shards in {shards}: {sorted(shards.iterdir())}"
    # Only the settings below: nothing inherited from a developer's shell (MEGAVL_*) or an outer job.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGAVL_", "SLURM_", "SBATCH_"))}
    env.update(MEGAVL_ROOT=str(REPO), MEGAVL_PYTHON=sys.executable, MEGAVL_GPU_TYPE="cpu",
               MEGAVL_RECIPE="configs/tiny.yaml", MEGAVL_DS_CONFIG="ds_configs/zero3.json",
               MEGAVL_OUTPUT_DIR=str(run_dir / "out"),
               MEGAVL_TRAIN_SHARDS=f"[{', '.join(map(str, train))}]",
               MEGAVL_VAL_SHARDS=f"[{', '.join(map(str, val))}]",
               MEGAVL_EXTRA_SETS=f"data.num_workers=0 run.eval_every=0 run.image_log_every=0 {sets}",
               MEGAVL_MASTER_ADDR="127.0.0.1",   # n1/n2 are not resolvable host names here
               **extra_env)
    # --time above the 10 minutes of --signal=B:USR1@600, or the warning would come at once.
    flags = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30",
             f"--output={run_dir}/job-%j.out"]
    return cluster.sbatch([*flags, str(SCRIPT)], env=env, cwd=run_dir)


def submit_finetune(cluster: LocalSlurm, data: Path, run_dir: Path, sets: str) -> int:
    """sbatch the real slurm/finetune.sh for retrieval on 2 nodes x 1 rank, CPU, ZeRO-2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGAVL_", "SLURM_", "SBATCH_"))}
    env.update(MEGAVL_ROOT=str(REPO), MEGAVL_PYTHON=sys.executable, MEGAVL_GPU_TYPE="cpu", MEGAVL_TASK="retrieval",
               MEGAVL_RECIPE="configs/finetune_retrieval_tiny.yaml", MEGAVL_DS_CONFIG="ds_configs/zero2.json",
               MEGAVL_OUTPUT_DIR=str(run_dir / "out"), MEGAVL_MASTER_ADDR="127.0.0.1",
               MEGAVL_EXTRA_SETS=(f"task.image_root={data} task.train=[{data}/retrieval_train.json] task.val= "
                                  f"task.test= run.eval_every=-1 {sets}"))
    flags = ["--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1", "--gpus-per-node=0", "--time=30",
             f"--output={run_dir}/job-%j.out"]
    return cluster.sbatch([*flags, str(FINETUNE_SCRIPT)], env=env, cwd=run_dir)


def job_log(run_dir: Path, job_id: int) -> str:
    path = run_dir / f"job-{job_id}.out"
    return f"--- job output {path}\n" + (path.read_text(errors="replace") if path.exists() else "(none)")


def scalar_steps(files: list[Path]) -> list[int]:
    """Steps of every scalar in these TensorBoard event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for path in files:
        for event in EventFileLoader(str(path)).Load():
            if event.HasField("summary") and event.summary.value:
                steps.append(event.step)
    return steps


def event_files(out: Path) -> list[Path]:
    return sorted((out / "tb").rglob("events.out.tfevents*"))


def latest_step(out: Path) -> int:
    """Step of the checkpoint named in checkpoints/latest (DeepSpeed tags end with the step)."""
    latest = out / "checkpoints" / "latest"
    assert latest.is_file(), f"no {latest}"
    tag = latest.read_text().strip()
    assert (out / "checkpoints" / tag).is_dir(), f"latest names {tag!r}, which is not a directory"
    match = re.search(r"(\d+)$", tag)
    assert match, f"checkpoint tag {tag!r} does not end with its step"
    return int(match.group(1))


def test_pretrain_job_trains_on_two_nodes_then_is_preempted_and_requeued_onto_one(cluster, shards, tmp_path):
    """One job through its whole life: it trains on 2 nodes, the time-limit signal makes it
    checkpoint (both ranks write their ZeRO shards) and requeue itself; held between runs, it is
    given ONE node, and the next run recomputes micro-batch and grad_accum for the global batch,
    reshards the 2-rank checkpoint and continues from it (no step before the saved one is logged
    again) to the end."""
    steps = 12
    # checkpoint_every=steps: a checkpoint before the end can only be the preemption save.
    job = submit(cluster, shards, tmp_path, f"run.max_steps={steps} run.checkpoint_every={steps} run.log_every=1",
                 MEGAVL_MICRO_BATCH="8", MEGAVL_GLOBAL_BATCH="16")  # 2 ranks x 8, then 1 rank x 8 x 2
    out = tmp_path / "out"
    preempt_once_training(cluster, job, out, tmp_path)
    cluster.scontrol("hold", str(job))  # between runs: give the next run one node instead of two
    cluster.scontrol("update", f"JobId={job}", "NumNodes=1", "NumTasks=1")
    cluster.scontrol("release", str(job))
    saved = latest_step(out)
    assert 0 < saved < steps, f"preemption checkpoint at step {saved}\n{job_log(tmp_path, job)}"
    # ZeRO writes one optimizer-state shard per data-parallel rank: both nodes took part.
    shards_written = sorted(p.name for p in (out / "checkpoints" / f"step_{saved:08d}").glob("*optim_states.pt"))
    assert len(shards_written) == 2, f"{shards_written}\n{job_log(tmp_path, job)}"
    first_run_files = set(event_files(out))

    info = cluster.wait_state(job, {"COMPLETED"}, timeout=400, context=job_log(tmp_path, job))
    log = job_log(tmp_path, job)
    assert info["ExitCode"] == "0:0", log
    assert info.get("Restarts") == "1", info
    assert "2 ranks" in log and "n[1-2]" in log, log
    assert "restart 1" in log and "1 ranks" in log and "resharding" in log, log
    second = scalar_steps([p for p in event_files(out) if p not in first_run_files])
    assert second, f"the second run logged nothing\n{log}"
    # Resumed, not restarted: the second run logs nothing before the saved step, and ends at the last.
    assert min(second) >= saved and max(second) == steps, f"steps {sorted(set(second))}, saved {saved}\n{log}"
    assert latest_step(out) == steps, log


def test_preempted_finetuning_job_with_workers_checkpoints_requeues_and_finishes(cluster, downstream, tmp_path):
    steps = 12
    # 144 captions, 8 per step: one epoch of 18 steps, so the signal finds the workers running
    job = submit_finetune(cluster, downstream, tmp_path,
                          f"data.batch_size=4 data.num_workers=2 run.max_steps={steps} "
                          f"run.checkpoint_every={steps} run.stop_check_every=1 run.log_every=1")
    out = tmp_path / "out"
    preempt_once_training(cluster, job, out, tmp_path)
    saved = latest_step(out)
    assert 0 < saved < steps, f"preemption checkpoint at step {saved}\n{job_log(tmp_path, job)}"
    first_run_files = set(event_files(out))

    info = cluster.wait_state(job, {"COMPLETED"}, timeout=300, context=job_log(tmp_path, job))
    log = job_log(tmp_path, job)
    assert info["ExitCode"] == "0:0", log
    assert info.get("Restarts") == "1" and "restart 1" in log, log
    assert "stop signal: checkpoint saved at step" in log and "Traceback" not in log, log
    second = scalar_steps([p for p in event_files(out) if p not in first_run_files])
    assert second and min(second) >= saved and max(second) == steps, f"steps {sorted(set(second))}, saved {saved}\n{log}"
    assert latest_step(out) == steps, log
