"""Resume on another number of ranks with a real launcher (`torchrun --nproc_per_node N`, gloo on CPU).

ONE uninterrupted ZeRO-2 2-rank reference run (4 steps, a checkpoint every 2, all kept) is shared
by every check. Its checkpoints are copied into fresh run directories and
continued on 1, 2 or 4 ranks; the losses of every step after the resume must equal the
reference's to 1e-5 (relative, fp32). The global batch stays 8 and so does the micro-step's
gathered batch (2 x 4 = 1 x 8 = 4 x 2, grad_accum 1): the contrastive losses see the micro-step's
gathered batch, so only the same batch_size x world per micro-step gives the same losses. The
step itself is world-size invariant (tests/distributed), so the 2-rank reference also stands for
the uninterrupted 1-rank run in the 1 -> 2 case.

2 -> 1 at step 2 (steps 3, 4 against the reference). ZeRO-2 shrinks only: engine/reshard.py
converts and sets every stage through the same code, which ZeRO-3 takes in both directions through
`deepspeed --hostfile` in test_hostfile_launch.py (2 -> 1 -> 4, with the helpers of this file).
Comparisons are always against the run on the world that wrote the checkpoint: two different
worlds differ by reduction order (~1e-6), which later steps amplify.
Also: SIGKILL in the middle of a save then `--resume auto`; `--resume none` in a directory
with checkpoints refused; `--fresh` there keeps every old checkpoint; `--resume <older tag>`, SIGKILL
before its first save, then `--resume auto` continues the older tag's line.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from launch_helpers import REPO, deepspeed_cmd, kill_launch, run_child, torchrun_cmd, train_env
from test_train import _scalars

pytestmark = pytest.mark.slow
STEPS = 4
MICRO = {1: 8, 2: 4, 4: 2}  # batch_size per rank: 8 samples per micro-step at every world size


def _cmd(world: int, stage: int, shards: Path, out: Path, *extra: str, launcher=torchrun_cmd) -> list[str]:
    return launcher(
        world, f"ds_configs/zero{stage}.json", "configs/tiny.yaml",
        "--set", f"run.output_dir={out}", f"data.train_shards={shards}/train-{{000000..000003}}.tar",
        f"data.val_shards={shards}/val-000000.tar", f"data.batch_size={MICRO[world]}", "run.grad_accum=1",
        "run.global_batch_size=8", "data.num_workers=0", "run.log_every=1", f"run.max_steps={STEPS}",
        "run.checkpoint_every=2", "run.eval_every=-1", "run.keep_checkpoints=5", *extra)


def _run(world, stage, shards, out, *extra, flags=(), expect=0, launcher=torchrun_cmd) -> subprocess.CompletedProcess:
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
