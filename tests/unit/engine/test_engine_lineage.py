"""Which checkpoint a run continues (engine/lineage.py), on checkpoint directories laid out on disk
as `checkpoint.save` writes them (tiny files): a rollback with `--resume <tag>` survives a crash
before its first save, abandoned tags are kept, a corrupt newest checkpoint falls back along the
line, a missing tag is named."""
import json
import logging

import torch
from safetensors.torch import save_file

from megavl.engine import checkpoint, lineage


def _tag(root, step, run_id, lineage_=(), saved_at=None, plain=True):
    """A complete tag of `run_id` at `step`: marker, meta.json with its lineage, a safetensors file."""
    tag = root / (checkpoint.tag_for(step) if plain else checkpoint.tag_for(step, run_id))
    (tag / "megavl").mkdir(parents=True)
    (tag / "megavl" / "meta.json").write_text(json.dumps({"step": step, "run_id": run_id,
                                                          "lineage": list(lineage_)}))
    save_file({"buffer/queue_ptr": torch.tensor(step)}, str(tag / "megavl" / "state.safetensors"))
    files = {str(p.relative_to(tag)): p.stat().st_size for p in tag.rglob("*") if p.is_file()}
    (tag / checkpoint.MARKER).write_text(json.dumps({"run_id": run_id, "step": step, "files": files,
                                                     "saved_at": saved_at if saved_at is not None else step}))
    return tag


def _start(root, choice):
    """What the trainer does with a choice on rank 0: the line it saves on, recorded before step 1."""
    line = choice["line"] if choice else lineage.new_line()
    lineage.write_line(root, line, choice["tag_dir"] if choice else None)
    return line


def test_rollback_survives_a_crash_before_its_first_save(tmp_path, caplog):
    for step in (2, 4, 6):
        _tag(tmp_path, step, "aaa")
    assert lineage.choose(tmp_path, "auto")["tag_dir"].endswith("step_00000006")  # no record: newest marker

    # --resume step_2 (a bare tag name): a new branch; step 4 and 6 are abandoned, kept
    choice = lineage.choose(tmp_path, "step_00000002")
    line = _start(tmp_path, choice)
    assert line["run_id"] != "aaa" and line["lineage"] == [{"run_id": "aaa", "step": 2, "tag": "step_00000002"}]
    assert choice["off_line"] == ["step_00000004", "step_00000006"]

    # killed before it saved: auto continues the branch from step 2, and names what it leaves
    again = lineage.choose(tmp_path, "auto")
    assert again["tag_dir"] == str(tmp_path / "step_00000002") and again["line"] == line
    assert again["off_line"] == ["step_00000004", "step_00000006"]

    # the branch saved step 4 beside the abandoned one (checkpoint_save._choose_save_tag): auto takes it
    mine = _tag(tmp_path, 4, line["run_id"], line["lineage"], saved_at=100, plain=False)
    assert lineage.choose(tmp_path, "auto")["tag_dir"] == str(mine)
    # ... unless it is truncated: a log line, then the previous checkpoint on the line (not step 6)
    state = mine / "megavl" / "state.safetensors"
    state.write_bytes(state.read_bytes()[:-3])
    with caplog.at_level(logging.WARNING, logger="megavl.engine.lineage"):
        fallback = lineage.choose(tmp_path, "auto")
    assert fallback["tag_dir"] == str(tmp_path / "step_00000002")
    assert any(mine.name in r.message and "truncated" in r.message for r in caplog.records)
    assert all((tmp_path / checkpoint.tag_for(s)).is_dir() for s in (2, 4, 6))


def test_resuming_the_newest_tag_continues_its_run(tmp_path):
    for step in (2, 4):
        _tag(tmp_path, step, "aaa", lineage_=[{"run_id": "zzz", "step": 1, "tag": "step_00000001"}])
    choice = lineage.choose(tmp_path, str(tmp_path / "step_00000004"))
    assert choice["line"] == {"run_id": "aaa", "lineage": [{"run_id": "zzz", "step": 1, "tag": "step_00000001"}]}
    assert choice["off_line"] == []


def test_fresh_line_without_a_save_starts_fresh_and_a_lost_line_is_an_error(tmp_path):
    _tag(tmp_path, 6, "aaa")
    _start(tmp_path, None)  # --fresh (or --resume none): a new line, killed before its first save
    assert lineage.choose(tmp_path, "auto") is None
    lineage.write_line(tmp_path, {"run_id": "bbb", "lineage": [{"run_id": "ccc", "step": 2, "tag": "x"}]}, None)
    message = lineage.choose(tmp_path, "auto")
    assert isinstance(message, str) and "run bbb" in message and "--resume" in message
    (tmp_path / lineage.BRANCH_FILE).write_text("{not json")
    assert "unreadable" in lineage.choose(tmp_path, "auto")


def test_a_missing_resume_tag_is_named_with_what_the_directory_holds(tmp_path):
    _tag(tmp_path, 2, "aaa")
    message = lineage.choose(tmp_path, str(tmp_path / "step_00000007"))
    assert message.startswith(f"--resume {tmp_path}/step_00000007: no such checkpoint directory")
    assert "step_00000002" in message
    assert "holds no checkpoint" in lineage.choose(tmp_path / "empty", "step_00000007")
