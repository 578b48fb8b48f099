"""Which line of checkpoints a run continues: the branch the user chose, even after a crash before
its first save.

A line is the run id that saves next and its `lineage`: the checkpoints it branched from, oldest
first, each {"run_id", "step", "tag"}. A checkpoint of run r at step s is on the line when r is the
line's run, or when the line branched off run r at step s or later (an ancestor).

- Every training start (rank 0, before the first step) writes <checkpoints>/resume_branch.json
  atomically: the line this run saves on. Each checkpoint's meta.json records its lineage too.
- `--resume <tag>`: when the run that wrote the tag has newer checkpoints (in the tag's directory
  or this run's), they are abandoned: the run saves under a new run id whose lineage ends at the
  tag, so they are neither continued, overwritten nor pruned. Otherwise the run continues the tag's
  run id and lineage.
- `--resume auto`: the newest usable checkpoint on the line that resume_branch.json names (an
  unusable one is logged and the one before it on the line is used); a fresh line that has saved
  nothing yet starts a new run. A directory without the file (an older version wrote it, or tags
  were copied in by hand) gets the newest complete checkpoint (checkpoint.choose_tag).
- Checkpoints off the line are kept (prune removes only the saving run's own tags) and named in
  the log.

Rank 0 alone lists and reads the directory; the trainer broadcasts its choice.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import checkpoint

log = logging.getLogger(__name__)
BRANCH_FILE = "resume_branch.json"


def new_line() -> dict:
    return {"run_id": checkpoint.new_run_id(), "lineage": []}


def on_line(run_id: str, step: int, line: dict) -> bool:
    return run_id == line["run_id"] or any(p["run_id"] == run_id and step <= p["step"] for p in line["lineage"])


def describe(line: dict) -> str:
    branches = ", ".join(f"{p['tag']} of run {p['run_id']}" for p in line["lineage"])
    return f"run {line['run_id']}" + (f" (branched from {branches})" if branches else "")


def read_line(ckpt_dir: Path) -> dict | str | None:
    """The line resume_branch.json names, None without the file, or an error message."""
    path = Path(ckpt_dir) / BRANCH_FILE
    try:
        data = json.loads(path.read_text())
        line = {"run_id": str(data["run_id"]), "lineage": [
            {"run_id": str(p["run_id"]), "step": int(p["step"]), "tag": str(p["tag"])} for p in data["lineage"]]}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return (f"{path} is unreadable ({type(err).__name__}: {err}): pick the checkpoint with --resume "
                f"{Path(ckpt_dir)}/<tag>")
    return line


def write_line(ckpt_dir: Path, line: dict, resumed_from: str | None) -> None:
    """Rank 0, at the start of training: record the line this run saves on (atomic replace)."""
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    checkpoint._write_json(ckpt_dir / BRANCH_FILE, {**line, "resumed_from": resumed_from, "started_at": time.time()})


def _listing(ckpt_dir: Path) -> list[tuple[str | None, int, float, Path]]:
    """(run id, step, saved_at, tag dir) of every tag; run id None for a foreign or format-1 tag."""
    out = []
    for tag_dir in checkpoint.tag_dirs(ckpt_dir):
        marker = checkpoint._marker(tag_dir) or {}
        step = marker.get("step", int(checkpoint.TAG_PATTERN.match(tag_dir.name).group(1)))
        out.append((marker.get("run_id") or checkpoint._owner(tag_dir), step, marker.get("saved_at", -1.0), tag_dir))
    return out


def newest_on_line(ckpt_dir: Path, line: dict) -> tuple[str | None, list[str], int, list[str]]:
    """(newest usable tag on the line or None, why each newer one on it was skipped, how many tags
    are on it, the complete tags off the line that are newer than the choice)."""
    listing = _listing(ckpt_dir)
    on = sorted((t for t in listing if t[0] is not None and on_line(t[0], t[1], line)),
                key=lambda t: (t[1], t[2]), reverse=True)
    chosen, skipped = None, []
    for _, step, saved_at, tag_dir in on:
        try:
            checkpoint.check(tag_dir)
            chosen = (step, saved_at, tag_dir.name)
            break
        except checkpoint.CheckpointError as err:
            log.warning("checkpoint %s unusable, trying the one before it on this line: %s", tag_dir.name, err)
            skipped.append(str(err))
    on_names = {t[3].name for t in on}
    off = [t for t in listing if t[3].name not in on_names and checkpoint._marker(t[3]) is not None
           and (chosen is None or (t[1], t[2]) > chosen[:2])]
    return (chosen[2] if chosen else None), skipped, len(on), sorted(t[3].name for t in off)


def _newer_of_same_run(dirs: list[Path], run_id: str, step: int) -> list[str]:
    newer = set()
    for d in {p.resolve() for p in dirs}:
        newer |= {t[3].name for t in _listing(d) if t[0] == run_id and t[1] > step and checkpoint._marker(t[3])}
    return sorted(newer)


def choose(ckpt_dir: Path, resume: str) -> dict | str | None:
    """Rank 0, for `--resume auto|none|<tag>`: {"tag_dir", "meta", "line", "off_line"} to load (the
    line this run saves on; off_line: newer checkpoints it does not continue, kept), None for a new
    run, or an error message that every rank raises alike."""
    ckpt_dir = Path(ckpt_dir)
    line = read_line(ckpt_dir) if resume == "auto" else None
    if isinstance(line, str):
        return line
    if line is None:
        choice = checkpoint.choose_checkpoint(ckpt_dir, resume)
    else:
        tag, skipped, count, off = newest_on_line(ckpt_dir, line)
        if tag is None and count == 0 and not line["lineage"]:
            if off:
                log.info("--resume auto: %s has not saved yet: a new run; the checkpoints of other runs are "
                         "kept: %s", describe(line), ", ".join(off))
            return None
        if tag is None:
            why = "\n  ".join(skipped) if skipped else "none of its checkpoints is in the directory"
            return (f"--resume auto: {ckpt_dir}/{BRANCH_FILE} names {describe(line)}, and no checkpoint on that "
                    f"line can be used:\n  {why}\nNothing was deleted. Pick one with --resume {ckpt_dir}/<tag>, "
                    f"or start a new run beside them with --fresh")
        choice = {"tag_dir": str(ckpt_dir / tag), "off_line": off}
    if not isinstance(choice, dict):
        return choice
    tag_dir = Path(choice["tag_dir"])
    try:
        meta = checkpoint.read_meta(tag_dir)
    except (OSError, ValueError) as err:
        return f"{tag_dir}: unreadable meta.json ({err})"
    choice["meta"] = meta
    saved_line = {"run_id": meta["run_id"], "lineage": list(meta.get("lineage", []))}
    if line is not None:  # the line resume_branch.json names: the tag may be an ancestor's
        choice["line"] = line
    elif resume == "auto":
        choice["line"], choice["off_line"] = saved_line, []
    else:
        newer = _newer_of_same_run([ckpt_dir, tag_dir.parent], meta["run_id"], meta["step"])
        choice["line"] = saved_line if not newer else {
            "run_id": checkpoint.new_run_id(),
            "lineage": saved_line["lineage"] + [{"run_id": meta["run_id"], "step": meta["step"], "tag": tag_dir.name}]}
        choice["off_line"] = newer
    return choice
