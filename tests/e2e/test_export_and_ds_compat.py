"""megavl-export of bf16 runs gives the fp32 master weights, and the start-up check of
DeepSpeed's private hooks passes on a real engine and names what is missing otherwise.

Real DeepSpeed engines on CPU (a world of one, gloo) in a subprocess: tests/e2e/ds_engine_worker.py.
"""
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import deepspeed
import pytest
import torch
from safetensors.torch import load_file

from megavl.engine import ds_compat

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("ds_engine_worker.py")


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds_engines")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(WORKER), str(out)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["zero0", "zero1"])
def test_bf16_export_is_the_fp32_master(worker_out, stage):
    result = json.loads((worker_out / "result.json").read_text())[stage]
    if stage == "zero1":  # ZeRO-1/2 bf16 name their files bf16_zero_pp_rank_*: the export must find them
        assert any(f.startswith("bf16_zero_pp_rank_0") for f in result["files"]), result
    exported = load_file(str(worker_out / stage / "export" / "model.safetensors"))
    master = torch.load(worker_out / stage / "master.pt")
    module = torch.load(worker_out / stage / "module.pt")
    students = {n: m for n, m in master.items() if n.startswith("student.")}
    assert len(students) > 100
    rounded_away = 0
    for name, fp32 in students.items():
        ours = exported[name[len("student."):]]
        assert ours.dtype == torch.float32
        assert torch.equal(ours, fp32), name
        assert module[name].dtype == torch.bfloat16
        rounded_away += not torch.equal(fp32, module[name].float())
    assert rounded_away > len(students) // 2  # the bf16 module copy really is a different answer
    # Tied weights (the MLM decoder is the word embedding) got the same fp32 master.
    tied = [k for k in exported if k.startswith("mlm_head.") and exported[k].shape == exported["text.word_embeddings.weight"].shape]
    assert all(torch.equal(exported[k], exported["text.word_embeddings.weight"]) for k in tied)


@pytest.mark.slow
def test_hook_check_passes_on_the_real_engine_and_names_a_missing_hook(worker_out):
    result = json.loads((worker_out / "result.json").read_text())
    assert result["zero3_ok"]
    error = result["zero3_missing_error"]
    assert error and "grad_partitions_flat_buffer" in error and deepspeed.__version__ in error
    assert ds_compat.TESTED_RANGE in error


def test_missing_engine_and_launch_hooks_are_errors(monkeypatch):
    engine = types.SimpleNamespace(optimizer=object(), module=torch.nn.Linear(2, 2))
    with pytest.raises(ds_compat.DeepSpeedCompatError, match=rf"deepspeed {deepspeed.__version__}.*enable_backward_allreduce"):
        ds_compat.check_engine(engine, zero_stage=0)
    engine.enable_backward_allreduce = True
    ds_compat.check_engine(engine, zero_stage=0)
    with pytest.raises(ds_compat.DeepSpeedCompatError, match="grad_partitions_flat_buffer.*ds_tensor"):
        ds_compat.check_engine(engine, zero_stage=3)  # an unpartitioned Linear has no ds_* attributes
    import importlib

    comm_torch = importlib.import_module("deepspeed.comm.torch")
    assert ds_compat.require_shm_op_hook() is comm_torch
    monkeypatch.delattr(comm_torch, "build_shm_op")
    with pytest.raises(ds_compat.DeepSpeedCompatError, match="build_shm_op"):
        ds_compat.require_shm_op_hook()


def test_setup_pins_the_tested_deepspeed_range():
    setup = (REPO / "setup.py").read_text()
    assert f'"deepspeed{ds_compat.TESTED_RANGE}"' in setup
    assert deepspeed.__version__.startswith("0.19.")
