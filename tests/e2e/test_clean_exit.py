"""Every refusal at start, through the real `deepspeed` launcher on 2 CPU ranks: the launcher returns
train.py's documented code (2 bad configuration or data, 3 cannot start from the checkpoints), the
reason is ONE line on stderr, and no rank prints a traceback or aborts ("terminate called without an
active exception", which the launcher used to report as 250).

Each refusal is one launch (~15 s); the refusal with checkpoints in the way (`--resume none`) is
launched three more times, because whether a rank aborted depended on how the two ranks' exits
interleaved. Nothing here trains: every case stops before the first step.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launch_helpers import deepspeed_cmd, run_child

pytestmark = pytest.mark.slow


def _bad_config(tmp: Path) -> tuple[str, list[str], list[str]]:
    return "configs/tiny.yaml", ["data.batch_size=0"], []


def _resume_none_with_checkpoints(tmp: Path) -> tuple[str, list[str], list[str]]:
    (tmp / "out" / "checkpoints" / "step_00000002").mkdir(parents=True)
    return "configs/tiny.yaml", [], ["--resume", "none"]


def _missing_resume_tag(tmp: Path) -> tuple[str, list[str], list[str]]:
    return "configs/tiny.yaml", [], ["--resume", str(tmp / "out" / "checkpoints" / "step_00000007")]


def _shards_match_nothing(tmp: Path) -> tuple[str, list[str], list[str]]:
    return "configs/tiny.yaml", [f"data.train_shards=[{tmp}/nowhere-{{000000..000003}}.tar]"], []


def _broken_vqa_annotations(tmp: Path) -> tuple[str, list[str], list[str]]:
    entries = [{"question_id": i, "question": "what shape?", "answer": ["circle"] * 10, "image": "a.png"}
               for i in range(3)]
    text = json.dumps(entries, indent=1).replace("},\n {", "}\n {", 1)  # the comma missing before line 19
    (tmp / "vqa_train.json").write_text(text)
    return "configs/finetune_vqa_tiny.yaml", [f"task.train=[{tmp}/vqa_train.json]", f"task.image_root={tmp}",
                                              "task.val=", "task.test="], []


# name: (arguments, exit code, the one line on stderr)
CASES = {
    "bad_config": (_bad_config, 2, r"megavl: bad configuration: data\.batch_size: expected > 0, got 0"),
    "resume_none_with_checkpoints": (_resume_none_with_checkpoints, 3,
                                     r"megavl: cannot start: \S+/checkpoints holds 1 checkpoint\(s\) "
                                     r"\(step_00000002, \.\.\.\) and --resume none was asked: .*--fresh"),
    "missing_resume_tag": (_missing_resume_tag, 3,
                           r"megavl: cannot start: --resume \S+/step_00000007: no such checkpoint directory"),
    "shards_match_nothing": (_shards_match_nothing, 2,
                             r"megavl: bad data: data\.train_shards: 4 of 4 shards are missing: "
                             r"\S+/nowhere-000000\.tar, .*nowhere-000003\.tar"),
    "broken_vqa_annotations": (_broken_vqa_annotations, 2,
                               r"megavl: bad data: \S+/vqa_train\.json line 19 column 2: not valid JSON: "
                               r"Expecting ',' delimiter"),
}


def _refuse(case: str, tmp: Path) -> None:
    arguments, code, line = CASES[case]
    config, sets, flags = arguments(tmp)
    cmd = deepspeed_cmd(2, "ds_configs/zero2.json", config, *flags, "--set", f"run.output_dir={tmp / 'out'}",
                        "data.num_workers=0", *sets)
    proc = run_child(cmd, timeout=300, expect=code)
    both = proc.stdout + proc.stderr
    assert "Traceback" not in both and "terminate called" not in both, both[-5000:]
    reasons = [text for text in proc.stderr.splitlines() if text.startswith("megavl: ")]
    assert len(reasons) == 1, f"expected one line from one rank, got {reasons}"
    assert re.match(line, reasons[0]), reasons[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_refusal_is_one_line_and_its_exit_code_through_the_launcher(case, tmp_path):
    _refuse(case, tmp_path)


@pytest.mark.parametrize("attempt", range(3))
def test_refusal_with_checkpoints_in_the_way_never_aborts_a_rank(attempt, tmp_path):
    _refuse("resume_none_with_checkpoints", tmp_path)
