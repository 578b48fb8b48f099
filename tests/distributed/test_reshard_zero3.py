"""ZeRO-3 resume on another world size, checked state by state: a 2-rank run writes its
step-2 checkpoint (the buffers megavl saves itself in no rank's DeepSpeed model file), a 1-rank run resumes it through megavl's resharding (reshard.py). Right after the
resume every trained parameter's fp32 master, exp_avg and exp_avg_sq (DeepSpeed's own consolidated
view), the Adam step, the gathered student and teacher weights and the buffers must equal the 2-rank
run's (1e-6 relative). After steps 3 and 4 the teacher's EMA increments must too (to 5%: an EMA
applied twice doubles them) and the losses (1e-5 relative, fp32: the two worlds differ by reduction
order). On 1 rank a persistent ZeRO-3 parameter's full copy is its shard, so updating both would
apply the EMA twice (objectives/teacher.py). The launcher-level ZeRO-3 chain (2 -> 1 -> 4, through
`deepspeed --hostfile`) is in tests/e2e/test_resume_world.py; its 1 -> 4 leg checks the partitions'
padding (DeepSpeed's ZeRO-3 setter ignores it, reshard.py).
Run with ds_configs/zero3.json and zero3_offload.json (CPU offload of optimizer and params): the
latter checks that the offloaded fp32 gradient buffers hold no stale gradient (an unused parameter
would re-apply its last gradient in the uninterrupted run only, step.clear_zero3_grad_partitions;
step 4's teacher EMA step and losses would differ).
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from launch_helpers import REPO, run_ranks

WORKER = Path(__file__).with_name("reshard_zero3_worker.py")
pytestmark = pytest.mark.slow


def _launch(phase: str, world: int, shards: Path, run: Path, out: Path, ds_config: str) -> dict:
    run_ranks(world, [WORKER, phase, shards, run, out, ds_config], timeout=600, what=phase)
    return torch.load(out / f"{phase}{world}.pt", weights_only=False)


def _assert_close(want: dict, got: dict, what: str, rel: float) -> None:
    assert want.keys() == got.keys(), what
    for name, w in want.items():
        g = got[name]
        if not w.is_floating_point():
            assert torch.equal(w, g), (what, name)
            continue
        scale = max(w.abs().max().item(), 1e-8)
        diff = (w.double() - g.double()).abs().max().item()
        assert diff <= rel * scale, f"{what} {name}: off by {diff:.3e} (scale {scale:.3e})"


def _assert_buffers_written_once(tag_dir: Path, world: int) -> None:
    """The queues, their ids and pointer and the SemMIM centres are in megavl's state file, written
    once, and in none of DeepSpeed's per-rank model files (a full copy per rank under ZeRO-3)."""
    once = {"image_queue", "text_queue", "queue_image_ids", "queue_ptr", "center_global", "center_patch"}
    with safe_open(str(tag_dir / "megavl" / "state.safetensors"), framework="pt") as f:
        assert once <= {k.removeprefix("buffer/") for k in f.keys()}
    model_files = sorted(tag_dir.glob("zero_pp_rank_*_model_states.pt"))
    assert len(model_files) == world, model_files
    for path in model_files:
        states = torch.load(path, map_location="cpu", weights_only=False)  # DeepSpeed's pickle, written here
        in_file = set(states["module"]) | set(states.get("buffer_names") or ())
        assert not {k for k in in_file if k.rsplit(".", 1)[-1] in once}, f"{path.name}: {sorted(in_file)}"


@pytest.mark.parametrize("ds_config", ["ds_configs/zero3.json", "ds_configs/zero3_offload.json"])
def test_zero3_two_ranks_resumed_on_one_restores_every_state(tmp_path, ds_config):
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(shards), "--num-train", "64",
                    "--num-val", "8", "--seed", "0", "--image-size", "64", "--samples-per-shard", "32"],
                   check=True, capture_output=True, cwd=REPO)
    ref = _launch("save", 2, shards, tmp_path / "run2", tmp_path, ds_config)
    tag = "step_00000002"
    _assert_buffers_written_once(tmp_path / "run2" / "checkpoints" / tag, world=2)
    (tmp_path / "run1" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "run2" / "checkpoints" / tag, tmp_path / "run1" / "checkpoints" / tag)
    got = _launch("load", 1, shards, tmp_path / "run1", tmp_path, ds_config)

    want, now = ref["states"][2], got["states"][2]
    assert now["adam_steps"] == [2.0] * len(now["adam_steps"]) and want["adam_steps"][0] == 2.0
    for name, w in want["optim"].items():  # the optimizer state, parameter by parameter
        _assert_close(w, now["optim"][name], f"restored optimizer state of {name}:", rel=1e-6)
    _assert_close(want["module"], now["module"], "restored module", rel=1e-6)
    _assert_close(want["buffers"], now["buffers"], "restored buffer", rel=1e-6)
    for step in (3, 4):
        # The teacher's EMA increment of each step (an EMA applied twice doubles it; fp32 rounding of the weights is
        # ~1% of it), then the losses.
        worst = scale = 0.0
        for name in (n for n in want["module"] if n.startswith("teacher.")):
            want_inc, got_inc = (run["states"][step]["module"][name].double()
                                 - run["states"][step - 1]["module"][name].double() for run in (ref, got))
            worst = max(worst, (got_inc - want_inc).abs().max().item())
            scale = max(scale, want_inc.abs().max().item())
        assert scale > 0 and worst <= 5e-2 * scale, f"step {step}: teacher EMA step off by {worst:.3e} of {scale:.3e}"
        for key, value in ref["losses"][step].items():
            assert got["losses"][step][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
