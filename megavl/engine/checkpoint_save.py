"""Writing a checkpoint tag (checkpoint.py has the layout), and what a stop signal must wait for.

Every rank, at once: DeepSpeed's files, with this rank's megavl files written beside them by a
background thread from CPU copies taken first (rank 0's state file, mostly the ITC queues, included:
it adds nothing after DeepSpeed's save unless it takes longer); each rank fsyncs what it wrote, once
all of it is written (durable.py says why). Then
one barrier, rank 0's marker, and one barrier, after which the tag is complete and durable on every
rank. Rank 0 prunes older tags after that, while the other ranks go on. Nothing here waits on one
rank's work while the others idle except the marker: a few stats and one small file.
"""
from __future__ import annotations

import logging
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from . import durable
from .checkpoint import (FORMAT, MARKER, MEGAVL, WRITING, CheckpointError, _barrier, _owner, _partitioned,
                         _teacher_params, _write_json, broadcast_from_rank0, prune, rng_state, tag_for)

log = logging.getLogger(__name__)


def _module_tensors(module: torch.nn.Module, rank: int, zero3: bool) -> tuple[dict, dict | None]:
    """(rank 0's state.safetensors, this rank's teacher shard file or None)."""
    shared: dict[str, torch.Tensor] = {}
    shards: dict[str, torch.Tensor] = {}
    if rank == 0:
        shared.update({f"buffer/{n}": b for n, b in module.named_buffers()})
    teacher = _teacher_params(module)
    for name, p in teacher.items():
        if _partitioned(p):
            shards[f"teacher/{name}"] = p.ds_tensor.data
        elif rank == 0:
            shared[f"teacher/{name}"] = p.data
    for key, value in getattr(module, "teacher_master", {}).items():
        base = key.removesuffix("/full")
        shard = key == base and _partitioned(teacher[base])
        if shard:
            shards[f"master/{key}"] = value
        elif rank == 0:
            shared[f"master/{key}"] = value
    return shared, (shards if zero3 else None)


@dataclass
class SaveInfo:
    run_id: str
    world_size: int
    zero_stage: int
    keep: int
    config_yaml: str


def _choose_save_tag(ckpt_dir: Path, step: int, run_id: str) -> Path:
    """`step_N`, or `step_N_<run id>` when another run owns `step_N` (its files are never touched)."""
    plain = ckpt_dir / tag_for(step)
    if not plain.exists() or _owner(plain) == run_id:
        return plain
    return ckpt_dir / tag_for(step, run_id)


Timeline = list[tuple[str, float, float]]  # (phase, start, end) in time.perf_counter() seconds
_DP_RANK = re.compile(r"zero_pp_rank_(\d+)_")


class _Phases:
    """Where one rank's save spends its time, phase by phase (logged, and given to `save`'s caller)."""

    def __init__(self) -> None:
        self.rows: Timeline = []
        self.last = time.perf_counter()

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.rows.append((name, self.last, now))
        self.last = now

    def summary(self) -> str:
        return ", ".join(f"{name} {end - start:.2f} s" for name, start, end in self.rows)


def _start_tag(ckpt_dir: Path, step: int, run_id: str) -> Path:
    """Rank 0: the tag's directory, empty, with `.writing` naming this run."""
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tag_dir = _choose_save_tag(ckpt_dir, step, run_id)
    if tag_dir.exists():  # our own earlier attempt at this step (killed, or a rerun): replace it
        if _owner(tag_dir) != run_id:
            raise CheckpointError(f"{tag_dir} exists and was not written by this run ({run_id})")
        shutil.rmtree(tag_dir)
    (tag_dir / MEGAVL).mkdir(parents=True)
    _write_json(tag_dir / WRITING, {"run_id": run_id, "step": step})
    return tag_dir


def _own_files(module: torch.nn.Module, tag_dir: Path, rank: int, step: int, meta: dict,
               info: SaveInfo) -> list[tuple[Path, object, object]]:
    """(path, writer, content) of this rank's megavl files, tensors already copied to the CPU (a copy
    only on a GPU): what the background writer writes while DeepSpeed saves."""
    shared, shards = _module_tensors(module, rank, info.zero_stage == 3)
    files = [(tag_dir / MEGAVL / f"rng_rank{rank}.json", durable.write_json, rng_state())]
    if shards is not None:
        files.append((tag_dir / MEGAVL / f"teacher_rank{rank}.safetensors", durable.save_tensors,
                      {k: v.detach().cpu() for k, v in shards.items()}))
    if rank == 0:
        files += [(tag_dir / MEGAVL / "state.safetensors", durable.save_tensors,
                   {k: v.detach().cpu() for k, v in shared.items()}),
                  (tag_dir / MEGAVL / "meta.json", durable.write_json,
                   {**meta, "format": FORMAT, "step": step, "run_id": info.run_id, "world_size": info.world_size,
                    "zero_stage": info.zero_stage}),
                  (tag_dir / "config.yaml", durable.write_bytes, info.config_yaml.encode())]
    return files


def _write_files(files: list[tuple[Path, object, object]]) -> tuple[float, float]:
    """Write them, unsynced: the rank fsyncs them with DeepSpeed's once both are written."""
    started = time.perf_counter()
    for path, write, content in files:
        write(path, content, sync=False)
    return started, time.perf_counter()


def _deepspeed_files_of(tag_dir: Path, rank: int) -> list[Path]:
    """The files of DeepSpeed's save that this rank wrote: `*zero_pp_rank_{rank}_*` (its optimizer
    partition; under ZeRO-3 its model states too); rank 0 also those without a rank (ZeRO-0/1/2's
    model states)."""
    mine = []
    for path in sorted(tag_dir.iterdir()):
        if path.is_file() and path.suffix == ".pt":
            found = _DP_RANK.search(path.name)
            if (int(found.group(1)) if found else 0) == rank:
                mine.append(path)
    return mine


def _mark_complete(ckpt_dir: Path, tag_dir: Path, step: int, info: SaveInfo) -> None:
    """Rank 0, once every rank's files are durable: COMPLETE.json listing them with their sizes, then
    `latest`."""
    for directory in (tag_dir / MEGAVL, tag_dir):
        durable.fsync_dir(directory)  # the files' names, before a marker that vouches for them
    files = {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
             if p.is_file() and p.name != WRITING and not p.name.startswith(".")}
    _write_json(tag_dir / MARKER, {"run_id": info.run_id, "step": step, "world_size": info.world_size,
                                   "zero_stage": info.zero_stage, "format": FORMAT, "saved_at": time.time(),
                                   "files": files})
    (tag_dir / WRITING).unlink()
    durable.fsync_dir(tag_dir)
    durable.write_bytes(ckpt_dir / "latest", tag_dir.name.encode())
    durable.fsync_dir(ckpt_dir)


def save(engine, module: torch.nn.Module, ckpt_dir: Path, step: int, rank: int, meta: dict,
         info: SaveInfo, timeline: Timeline | None = None) -> Path:
    """Save a complete checkpoint for `step` (a collective: every rank calls it) in the order the module
    docstring gives; returns the tag's directory once it is complete and durable on every rank.
    `timeline`, when given, receives this rank's (phase, start, end)."""
    ckpt_dir = Path(ckpt_dir)
    phases = _Phases()
    tag_dir = _start_tag(ckpt_dir, step, info.run_id) if rank == 0 else None
    # Rank 0 made the directory before sending its name: no barrier is needed before writing into it.
    tag_dir = Path(broadcast_from_rank0(str(tag_dir) if tag_dir else None))
    phases.done("tag directory")
    files = _own_files(module, tag_dir, rank, step, meta, info)
    phases.done("megavl's CPU copies")
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="megavl-save") as writer:
        written = writer.submit(_write_files, files)
        engine.save_checkpoint(str(ckpt_dir), tag=tag_dir.name, client_state={"step": step}, save_latest=False,
                               exclude_frozen_parameters=True)  # the teacher: megavl writes it once
        phases.done("DeepSpeed's files")
        started, ended = written.result()
        phases.done("waiting for megavl's files")
    durable.fsync_files(_deepspeed_files_of(tag_dir, rank) + [path for path, _, _ in files])
    phases.done("fsync this rank's files")
    phases.rows.append(("megavl's files, beside DeepSpeed's", started, ended))
    _barrier()  # every rank's DeepSpeed and megavl files are durable
    phases.done("barrier: every rank's files")
    if rank == 0:
        _mark_complete(ckpt_dir, tag_dir, step, info)
        phases.done("marker")
    _barrier()  # no rank exits (SIGTERM path) before the marker is durable
    phases.done("barrier: complete")
    if rank == 0:
        log.info("checkpoint %s complete in %.2f s (rank 0: %s)", tag_dir.name,
                 phases.last - phases.rows[0][1], phases.summary())
        prune(ckpt_dir, info.keep, info.run_id, current=tag_dir.name)
        phases.done("prune, after complete")
    if timeline is not None:
        timeline.extend(phases.rows)
    return tag_dir
