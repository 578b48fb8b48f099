"""`checkpoint_save.save` as megavl wrote a tag before its files were written beside DeepSpeed's (kept
for the "before" side of bench_checkpoint.py only): a barrier after the tag directory's broadcast,
DeepSpeed's files, then each rank's megavl files (rank 0's state file last, after DeepSpeed's save,
from a copy of every tensor), no fsync, a barrier, rank 0's marker and its pruning of older tags, a
barrier. Same files and bytes as today; `timeline` gets this rank's (phase, start, end)."""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from megavl.engine.checkpoint import (FORMAT, MARKER, MEGAVL, WRITING, CheckpointError, _barrier, _owner,
                                      broadcast_from_rank0, prune, rng_state)
from megavl.engine.checkpoint_save import SaveInfo, _choose_save_tag, _module_tensors


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().clone().cpu() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)


def save_before(engine, module: torch.nn.Module, ckpt_dir: Path, step: int, rank: int, meta: dict,
                info: SaveInfo, timeline: list | None = None) -> Path:
    marks = [("", time.perf_counter())]

    def done(name: str) -> None:
        marks.append((name, time.perf_counter()))

    ckpt_dir = Path(ckpt_dir)
    tag_dir = None
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        tag_dir = _choose_save_tag(ckpt_dir, step, info.run_id)
        if tag_dir.exists():
            if _owner(tag_dir) != info.run_id:
                raise CheckpointError(f"{tag_dir} exists and was not written by this run ({info.run_id})")
            shutil.rmtree(tag_dir)
        (tag_dir / MEGAVL).mkdir(parents=True)
        _write_json(tag_dir / WRITING, {"run_id": info.run_id, "step": step})
    tag_dir = Path(broadcast_from_rank0(str(tag_dir) if tag_dir else None))
    done("tag directory")
    _barrier()
    done("barrier: start")
    engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    done("DeepSpeed's files")
    shared, shards = _module_tensors(module, rank, info.zero_stage == 3)
    if shards is not None:
        _save_tensors(tag_dir / MEGAVL / f"teacher_rank{rank}.safetensors", shards)
    _write_json(tag_dir / MEGAVL / f"rng_rank{rank}.json", rng_state())
    if rank == 0:
        _save_tensors(tag_dir / MEGAVL / "state.safetensors", shared)
        _write_json(tag_dir / MEGAVL / "meta.json", {
            **meta, "format": FORMAT, "step": step, "run_id": info.run_id, "world_size": info.world_size,
            "zero_stage": info.zero_stage})
        (tag_dir / "config.yaml").write_text(info.config_yaml)
    done("megavl's files, after DeepSpeed's")
    _barrier()
    done("barrier: every rank's files")
    if rank == 0:
        files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
                 if p.is_file() and p.name != WRITING and not p.name.startswith(".")}
        _write_json(tag_dir / MARKER, {"run_id": info.run_id, "step": step, "world_size": info.world_size,
                                       "zero_stage": info.zero_stage, "format": FORMAT,
                                       "saved_at": time.time(), "files": files})
        (tag_dir / WRITING).unlink()
        tmp = ckpt_dir / ".latest.tmp"
        tmp.write_text(tag_dir.name)
        os.replace(tmp, ckpt_dir / "latest")
        prune(ckpt_dir, info.keep, info.run_id, current=tag_dir.name)
        done("marker, prune")
    _barrier()
    done("barrier: complete")
    if timeline is not None:
        timeline.extend((name, start, end) for (_, start), (name, end) in zip(marks, marks[1:]))
    return tag_dir
