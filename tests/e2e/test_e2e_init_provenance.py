"""The documented DeiT/BERT start, then the files move away: one process per run through
megavl/train.py (ZeRO-0, tiny sizes). Pre-training starts from a timm ViT file and a Hugging Face
BERT directory, is exported, and the files are deleted. Then a resume loads the checkpoint, retrieval fine-tuning and continued pre-training start from the export, and only a fresh run
that would read the files stops, naming the key."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from init_files import bert_dir, timm_vit_file
from launch_helpers import BIN, run_child, synth_downstream
from megavl.config import load_config

pytestmark = pytest.mark.slow
TINY = "configs/tiny.yaml"
WORKER = Path(__file__).with_name("init_resume_worker.py")


def _train(config: str, out: Path, *sets: str, expect: int = 0) -> subprocess.CompletedProcess:
    return run_child([sys.executable, "megavl/train.py", "--ds_config", "ds_configs/zero0.json", "--config", config,
                      "--set", f"run.output_dir={out}", "data.batch_size=8", "run.log_every=1",
                      "run.eval_every=-1", *sets], expect=expect)


def _losses(out: Path) -> dict[int, float]:
    acc = EventAccumulator(str(out / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("loss/total")}


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> dict:
    """A 3-step pre-training run from init files (checkpoints at steps 2 and 3), its step-2 export,
    then the init files deleted (BERT's dropout 0.1 lives only in its config.json and the run's). Returns the paths and the overrides naming the (gone) files."""
    root = tmp_path_factory.mktemp("provenance")
    shards = root / "shapes"
    subprocess.run([sys.executable, "-m", "megavl.tools.synth_shapes", "--out", str(shards), "--num-train", "48",
                    "--num-val", "8", "--seed", "0", "--image-size", "64", "--samples-per-shard", "24"],
                   check=True, capture_output=True)
    model = load_config(TINY).model
    vit = timm_vit_file(root / "deit_tiny.pth", model.vision)
    bert = bert_dir(root / "bert", model.text, dropout=0.1)
    init = [f"model.vision.init={vit}", f"model.text.hf_path={bert}"]
    data = [f"data.train_shards={shards}/train-{{000000..000001}}.tar", "data.val_shards=[]", "data.num_workers=1"]
    run = root / "run"
    proc = _train(TINY, run, *init, *data, "run.max_steps=3", "run.checkpoint_every=2")
    assert "vision tower initialised from" in proc.stderr
    export = root / "export"
    run_child([str(BIN / "megavl-export"), str(run / "checkpoints" / "step_00000002"), str(export)])
    Path(vit).unlink()
    shutil.rmtree(bert)
    return {"root": root, "run": run, "export": export, "init": init, "data": data}


def test_resume_after_the_init_files_are_gone_loads_the_checkpoint(pretrained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained["run"], run)
    result = tmp_path / "result.json"
    run_child([sys.executable, str(WORKER), str(result), TINY, f"run.output_dir={run}", "data.batch_size=8",
               *pretrained["init"], *pretrained["data"], "run.max_steps=3"])
    resumed = json.loads(result.read_text())
    assert resumed["step"] == 3 and resumed["compared"] > 100 and resumed["max_abs_diff"] == 0.0
    # BERT's dropout as the checkpoint recorded it, not the recipe's default: config.json is gone
    assert resumed["module_text_dropout"] == resumed["config_text_dropout"] == 0.1


def test_retrieval_finetuning_from_the_export_after_the_init_files_are_gone(pretrained, tmp_path):
    synth = tmp_path / "downstream"
    synth_downstream(synth, 16, 4)
    out = tmp_path / "retrieval"
    # the fine-tuning recipe still names the files its model first came from, as a copied recipe would
    _train("configs/finetune_retrieval_tiny.yaml", out, *pretrained["init"], f"task.init_from={pretrained['export']}",
           f"task.image_root={synth}", f"task.train=[{synth}/retrieval_train.json]", "task.val=", "task.test=",
           "run.max_steps=2")
    assert sorted(_losses(out)) == [1, 2]


def test_continued_pretraining_from_the_export_after_the_init_files_are_gone(pretrained, tmp_path):
    out = tmp_path / "continued"
    proc = _train(TINY, out, *pretrained["init"], *pretrained["data"], f"task.init_from={pretrained['export']}",
                  "run.max_steps=1")
    assert "pretrain starts from" in proc.stderr and sorted(_losses(out)) == [1]


def test_a_fresh_run_whose_init_file_is_gone_stops_naming_the_key(pretrained, tmp_path):
    proc = _train(TINY, tmp_path / "fresh", *pretrained["init"], *pretrained["data"], "run.max_steps=1", expect=2)
    assert "megavl: bad configuration: model.vision.init: expected an existing local checkpoint file" in proc.stderr
