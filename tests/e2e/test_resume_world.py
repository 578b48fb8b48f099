"""Resume on another number of ranks with the real launchers (`torchrun --nproc_per_node N`, and
`deepspeed --hostfile` over ssh), gloo on CPU.

ONE uninterrupted ZeRO-2 2-rank reference run (4 steps, a checkpoint every 2, all kept) is shared
by every check, ZeRO-3's too: the step does not depend on the ZeRO stage (fp32; the 2-rank ZeRO-2
and ZeRO-3 losses of these 4 steps agree to 3e-7). A checkpoint is copied into a fresh run
directory (as another allocation sees it) and continued on 1, 2 or 4 ranks; the losses of every
step after the resume must equal the uninterrupted run's to 1e-5 (relative, fp32). The global batch
stays 8 and so does the micro-step's gathered batch (2 x 4 = 1 x 8 = 4 x 2, grad_accum 1): the
contrastive losses see the micro-step's gathered batch, so only the same batch_size x world per
micro-step gives the same losses.

ZeRO-2: 2 -> 1 at step 2 (steps 3, 4 against the reference).
ZeRO-3, as users launch it: `deepspeed --hostfile` with DeepSpeed's pdsh runner, the hosts being
this machine twice (`localhost`, `127.0.0.1`) through a private sshd on the loopback (ssh_hosts.py).
A 2-host x 1-slot run is SIGKILLed on one host (its rank) once step 2 is saved; the rank saw the
variables docs/multinode.md lists and none other of the launcher's. Its step 2 continues on a
hostfile of ONE host with one slot (2 -> 1, steps 3-4 against the reference), and that run's step 3
on 2 hosts x 2 slots (1 -> 4: the world changes a second time and grows, step 4 against the 1-rank
run). engine/reshard.py sets every stage through the same code, which ZeRO-3 takes in both directions.
Comparisons after a change of world are against the run on the world that wrote the checkpoint:
two different worlds differ by reduction order (~1e-6), which later steps amplify.
Also: SIGKILL in the middle of a save then `--resume auto`; `--resume none` in a directory
with checkpoints refused; `--fresh` there keeps every old checkpoint; `--resume <older tag>`, SIGKILL
before its first save, then `--resume auto` continues the older tag's line.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_helpers import BIN, REPO, deepspeed_cmd, kill_launch, run_child, torchrun_cmd, train_env
from ssh_hosts import INSTALL, LocalSshHosts, missing_programs
from test_train import _scalars

pytestmark = pytest.mark.slow
STEPS = 4
MICRO = {1: 8, 2: 4, 4: 2}  # batch_size per rank: 8 samples per micro-step at every world size
# What the ranks need that DeepSpeed's pdsh runner does not pass by itself (it passes PYTHON*, and
# NCCL* from a CUDA machine): written to the file DS_ENV_FILE names (.deepspeed_env by default).
RANK_ENV = {"PATH": f"{BIN}:$PATH", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}
NOT_PASSED = "MEGAVL_TEST_NOT_PASSED"  # in the launcher's environment only: no pdsh-started rank sees it


def _cmd(world: int, stage: int, shards: Path, out: Path, *extra: str, launcher=torchrun_cmd) -> list[str]:
    return launcher(
        world, f"ds_configs/zero{stage}.json", "configs/tiny.yaml",
        # The pattern is quoted for the remote shell pdsh runs the command in (which would expand it
        # into four words); megavl strips the quotes where the argument reaches it as it is.
        "--set", f"run.output_dir={out}", f"data.train_shards='{shards}/train-{{000000..000003}}.tar'",
        f"data.val_shards={shards}/val-000000.tar", f"data.batch_size={MICRO[world]}", "run.grad_accum=1",
        "run.global_batch_size=8", "data.num_workers=0", "run.log_every=1", f"run.max_steps={STEPS}",
        "run.checkpoint_every=2", "run.eval_every=-1", "run.keep_checkpoints=5", *extra)


def _run(world, stage, shards, out, *extra, flags=(), expect=0, launcher=torchrun_cmd) -> subprocess.CompletedProcess:
    """A launch to its end; `launcher(world, ds_config, config, *args)` makes the command."""
    cmd = _cmd(world, stage, shards, out, *extra, launcher=launcher)
    cmd[cmd.index("--set"):cmd.index("--set")] = list(flags)
    return run_child(cmd, timeout=900, expect=expect)


def _continue_from(ref: Path, tag: str, out: Path) -> Path:
    """A new run directory holding only `tag` of the reference run (copied, as another allocation sees it)."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(ref / "checkpoints" / tag, out / "checkpoints" / tag)
    return out


def _assert_losses_match(ref: Path, out: Path, steps) -> None:
    want, _ = _scalars(ref)
    got, _ = _scalars(out)
    for tag in [t for t in want if t.startswith("loss/")]:
        for step in steps:
            assert got[tag][step] == pytest.approx(want[tag][step], rel=1e-5, abs=1e-6), (tag, step)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(out), "--num-train", "256",
                    "--num-val", "32", "--seed", "0", "--image-size", "64", "--samples-per-shard", "64"],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def ssh_hosts(tmp_path_factory):
    # The context manager kills every process started over ssh and stops sshd, also on failure.
    with LocalSshHosts(tmp_path_factory.mktemp("ssh")) as hosts:
        yield hosts


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> tuple[int, Path]:
    stage = 2
    out = tmp_path_factory.mktemp(f"ref_zero{stage}") / "run"
    _run(2, stage, shards, out)
    return stage, out


def test_world_size_shrinks(reference, shards, tmp_path):
    stage, ref = reference
    chain = _continue_from(ref, "step_00000002", tmp_path / "chain")
    proc = _run(1, stage, shards, chain, "run.checkpoint_every=1")  # 2 -> 1
    assert "resharding" in proc.stdout + proc.stderr
    _assert_losses_match(ref, chain, range(3, STEPS + 1))


@pytest.mark.skipif(bool(missing_programs()),
                    reason=f"sshd/pdsh are not installed ({', '.join(missing_programs())} missing); {INSTALL}")
def test_zero3_hostfile_killed_on_one_host_resumes_on_one_host_and_on_two_by_two(reference, shards, ssh_hosts,
                                                                                   tmp_path, monkeypatch):
    # Before test_sigkill_..., which runs fresh steps 1-2 in the reference's directory.
    _, ref = reference
    (tmp_path / "deepspeed_env").write_text("".join(f"{k}={v}\n" for k, v in RANK_ENV.items()))
    monkeypatch.setenv("DS_ENV_FILE", str(tmp_path / "deepspeed_env"))
    monkeypatch.setenv(NOT_PASSED, "1")
    monkeypatch.setenv("PATH", ssh_hosts.env()["PATH"])  # `ssh` reaches the private sshd

    def on(hostfile):
        return lambda world, *args: ssh_hosts.deepspeed_cmd(hostfile, *args)

    two_by_one = ssh_hosts.hostfile(tmp_path / "hosts_2x1", slots=1)
    killed = tmp_path / "killed"
    seen = ssh_hosts.kill_rank_after_checkpoint(_cmd(2, 3, shards, killed, launcher=on(two_by_one)), train_env(),
                                                killed / "checkpoints", "step_00000002", rank=1,
                                                log=tmp_path / "killed.log")
    assert not (killed / "checkpoints" / f"step_{STEPS:08d}").exists(), "the run finished before the kill"
    for key, value in RANK_ENV.items():
        assert seen.get(key, "").startswith(value.replace("$PATH", "")), (key, seen.get(key))
    assert seen["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)  # the runner's directory, put first
    assert seen["PYTHONUNBUFFERED"] == "1"  # PYTHON* passes by its prefix
    assert NOT_PASSED not in seen
    assert (seen["CROSS_RANK"], seen["CROSS_SIZE"], seen["WORLD_SIZE"]) == ("1", "2", "2")

    one_host = ssh_hosts.hostfile(tmp_path / "hosts_1x1", slots=1, hosts=("localhost",))
    one = _continue_from(killed, "step_00000002", tmp_path / "one")
    proc = _run(1, 3, shards, one, "run.checkpoint_every=1", launcher=on(one_host))  # 2 -> 1
    assert "resharding" in proc.stdout + proc.stderr
    _assert_losses_match(ref, one, range(3, STEPS + 1))

    two_by_two = ssh_hosts.hostfile(tmp_path / "hosts_2x2", slots=2)
    four = _continue_from(one, "step_00000003", tmp_path / "four")
    proc = _run(4, 3, shards, four, launcher=on(two_by_two))  # 1 -> 4: the second change, and it grows
    assert "localhost: " in proc.stdout + proc.stderr and "127.0.0.1: " in proc.stdout + proc.stderr  # pdsh's
    _assert_losses_match(one, four, range(4, STEPS + 1))


def test_sigkill_during_save_then_resume_and_mistaken_fresh_runs(reference, shards, tmp_path):
    stage, ref = reference
    old = sorted(p.name for p in (ref / "checkpoints").iterdir())
    # A fresh run by mistake in the old directory is refused, and --fresh keeps every old checkpoint.
    proc = _run(2, stage, shards, ref, "run.max_steps=2", flags=["--resume", "none"], expect=3,
                launcher=deepspeed_cmd)  # torchrun reports any rank's failure as 1; deepspeed passes the code
    assert "holds" in proc.stderr and "--fresh" in proc.stderr
    _run(2, stage, shards, ref, "run.max_steps=2", flags=["--fresh"])
    now = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert set(old) <= set(now), f"old checkpoints lost: {sorted(set(old) - set(now))}"
    for name in old:
        if name.startswith("step_"):
            assert (ref / "checkpoints" / name / "COMPLETE.json").is_file()
    assert any(n.startswith("step_00000002_") for n in now), now  # the fresh run's own tag

    # SIGKILL while a save is being written: the half-written tag is ignored, then replaced.
    out = tmp_path / "killed"
    cmd = _cmd(2, stage, shards, out, "run.checkpoint_every=1")
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            writing = [p for p in (out / "checkpoints").glob("step_0000000[2-3]/.writing")]
            if writing:
                break
            time.sleep(0.01)
    finally:
        kill_launch(proc)
    assert writing, "no save was caught in progress"
    half = writing[0].parent
    complete = sorted(p.parent.name for p in (out / "checkpoints").glob("step_*/COMPLETE.json"))
    assert half.name not in complete or not (half / ".writing").exists()
    _run(2, stage, shards, out)
    assert (half / "COMPLETE.json").is_file()  # re-saved by the resumed run (the same run id)
    marker = json.loads((out / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE.json").read_text())
    assert marker["step"] == STEPS
    _assert_losses_match(ref, out, range(int(complete[-1][5:13]) + 1 if complete else 1, STEPS + 1))

    # A rollback survives a crash before its first save: --resume <step 2>, SIGKILL once the run has
    # started on its new line (resume_branch.json names it), then --resume auto continues step 2's
    # line; the abandoned steps 3-4 are kept and named in the log.
    ckpts = out / "checkpoints"
    abandoned = sorted(p.name for p in ckpts.glob("step_*") if p.name > "step_00000002")
    cmd = _cmd(2, stage, shards, out, "run.max_steps=1000", "run.checkpoint_every=1000")
    cmd[cmd.index("--set"):cmd.index("--set")] = ["--resume", "step_00000002"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=train_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    branch = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and branch.get("run_id") in (None, marker["run_id"]):
            try:
                branch = json.loads((ckpts / "resume_branch.json").read_text())
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
    finally:
        kill_launch(proc)
    assert branch.get("resumed_from", "").endswith("step_00000002"), branch
    assert branch["lineage"][-1]["step"] == 2 and branch["run_id"] != marker["run_id"]

    # The requeue (--resume auto) also changes the schedule: it applies in full, the base lr AND
    # max_steps of the recipe at the resumed step, not DeepSpeed's restored base rates next to a new
    # teacher momentum.
    from megavl.config import load_config
    from megavl.engine.optim import lr_factor
    from megavl.objectives.teacher import teacher_momentum

    proc = _run(2, stage, shards, out, "run.max_steps=5", "optim.lr=1e-3")
    log = proc.stdout + proc.stderr
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in log, log[-3000:]
    assert "does not continue" in log and abandoned[-1] in log
    now = {p.name for p in ckpts.glob("step_*")}
    assert set(abandoned) <= now and f"step_00000004_{branch['run_id']}" in now, sorted(now)
    meta = json.loads((ckpts / f"step_00000004_{branch['run_id']}" / "megavl" / "meta.json").read_text())
    assert meta["lineage"] == branch["lineage"]
    logged, _ = _scalars(out)
    cfg = load_config(REPO / "configs/tiny.yaml", ["run.max_steps=5 optim.lr=1e-3"])
    o, t = cfg.optim, cfg.objectives.teacher
    assert logged["train/lr"][5] == pytest.approx(
        1e-3 * lr_factor(5, o.warmup_steps, 5, o.schedule, o.min_lr_ratio), rel=1e-6)
    assert logged["train/teacher_momentum"][5] == pytest.approx(
        teacher_momentum(4, 5, t.momentum, t.momentum_end), rel=1e-6)
