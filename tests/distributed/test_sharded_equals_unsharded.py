"""ZeRO-3 on 2 CPU ranks and one unsharded process, fed the same global batch, give the same per-step
losses for several steps with every objective on and the curriculum alternating (1e-4).

This holds because each loss is a function of the global batch: contrastive losses gather features,
ITM draws negatives from the gathered batch, MLM averages over the global count of masked tokens, and
mask noise is drawn for the global batch and sliced by rank."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("sharded_step_worker.py")
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}:{os.environ['PATH']}")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]


def test_zero3_two_ranks_equals_one_process(tmp_path):
    single, sharded = tmp_path / "single.json", tmp_path / "sharded.json"
    _run([sys.executable, str(WORKER), str(single), "ds_configs/zero0.json"])
    _run([str(BIN / "deepspeed"), "--master_port", str(_free_port()), "--num_gpus", "2", str(WORKER),
          str(sharded), "ds_configs/zero3.json"])
    a, b = json.loads(single.read_text()), json.loads(sharded.read_text())
    assert len(a) == len(b) == 4
    assert set(a[0]) == {"total", "itc", "itm", "mlm", "mim_pixel", "mim_sem", "scl"}
    for step, (x, y) in enumerate(zip(a, b)):
        for name in x:
            assert y[name] == pytest.approx(x[name], rel=1e-4, abs=1e-4), (step, name, x[name], y[name])
    assert a[-1]["total"] != pytest.approx(a[0]["total"], abs=1e-3)  # the steps really changed the model
