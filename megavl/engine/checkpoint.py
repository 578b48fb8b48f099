"""Checkpoints that are never lost: DeepSpeed's own files plus megavl's state, a completion marker last.

Layout under <output_dir>/checkpoints/:
    step_00000100/                  one tag (`step_00000100_<run id>` if another run owns that name)
        .writing                    {"run_id"}: a save by that run started here (removed when complete)
        ... DeepSpeed's files ...   model, optimizer partitions, scheduler
        megavl/meta.json            rank 0: step, data position, run id, world size, ZeRO stage, schedule
        megavl/state.safetensors    rank 0: every module buffer (ITC queues + pointer, SemMIM centres,
                                    towers' buffers), the teacher (full tensors) and its fp32 master
                                    (ZeRO-0/1/2: identical on every rank, so written once)
        megavl/teacher_rank{r}.safetensors   ZeRO-3 only: rank r's teacher shards (+ fp32 master shards)
        megavl/rng_rank{r}.json     every rank: python / numpy / torch RNG states as plain lists
        config.yaml
        COMPLETE.json               rank 0, LAST, after a barrier: run id, step, world, every file + size
    latest                          rank 0, after COMPLETE.json: the newest complete tag (for export)

`checkpoint_save.save` writes a tag; every file is fsynced before the marker that lists it (durable.py).
A tag without COMPLETE.json is half-written. Nothing here deletes a tag that the current run did not
write: `prune` removes only complete tags whose marker names this run's id, and half-written tags
whose `.writing` names it. megavl's files are safetensors + JSON, loaded without unpickling.
The teacher is stored world-independently (full tensors, or ZeRO-3 shards reassembled at load), so a
checkpoint resumes on any world size; DeepSpeed's partitions are resharded by `reshard.py`.
"""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load as load_safetensors

from megavl.errors import DataResumeError

from . import durable

if TYPE_CHECKING:  # ds_partitions imports this module
    from .ds_partitions import ReadStats

log = logging.getLogger(__name__)
TAG_PATTERN = re.compile(r"^step_(\d{8})(?:_([0-9a-f]+))?$")
MARKER, WRITING, MEGAVL = "COMPLETE.json", ".writing", "megavl"
FORMAT = 2  # format 1 wrote megavl_rank{r}.pt pickles and no marker


class CheckpointError(RuntimeError):
    """A checkpoint directory cannot be used as asked; the message says why and what to do."""


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def tag_for(step: int, run_id: str | None = None) -> str:
    return f"step_{step:08d}" + (f"_{run_id}" if run_id else "")


# ------------------------------------------------------------------------------------ collectives
def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (a listing on a network filesystem can differ between ranks)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read_on_rank0(path: Path, chunk_bytes: int = 256 * 2 ** 20) -> bytes:
    """The bytes of `path`, read by rank 0 alone and broadcast to every rank (a collective): one read
    of the shared filesystem instead of one per rank, all of the same file. Broadcast in chunks, so
    NCCL needs at most `chunk_bytes` of device memory; a file rank 0 cannot read is a
    CheckpointError on every rank."""
    path = Path(path)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return path.read_bytes()
    data, size = None, None
    if dist.get_rank() == 0:
        try:
            data = path.read_bytes()
            size = len(data)
        except OSError as err:
            size = f"{path.parent.parent.name}: {path.name} is unreadable ({err})"
    size = broadcast_from_rank0(size)
    if isinstance(size, str):
        raise CheckpointError(size)
    buffer = bytearray(data if data is not None else size)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    for start in range(0, size, chunk_bytes):
        piece = torch.frombuffer(buffer, dtype=torch.uint8, offset=start, count=min(chunk_bytes, size - start))
        moved = piece.to(device)  # the same memory on the CPU
        dist.broadcast(moved, src=0)
        if moved.data_ptr() != piece.data_ptr():
            piece.copy_(moved)
    return bytes(buffer)


# --------------------------------------------------------------------------------- file helpers
_write_json = durable.write_json


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _owner(tag_dir: Path) -> str | None:
    """Run id that wrote (or is writing) this tag; None for a foreign or format-1 directory."""
    for name in (MARKER, WRITING):
        try:
            return _read_json(tag_dir / name)["run_id"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def tag_dirs(ckpt_dir: Path) -> list[Path]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))


# ------------------------------------------------------------------------------------ RNG as lists
def rng_state() -> dict:
    py = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [py[0], list(py[1]), py[2]],
             "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ----------------------------------------------------------------------------------- the teacher
def _partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def _teachers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """{name prefix: EMA teacher}: a module with several says so by `ema_teachers()` (pre-training:
    SemMIM's teacher and ITC's momentum model, each only when built); otherwise its `teacher`, if any."""
    if hasattr(module, "ema_teachers"):
        return module.ema_teachers()
    teacher = getattr(module, "teacher", None)
    return {"": teacher} if teacher is not None else {}


def _teacher_params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The EMA teachers' parameters by (prefixed) name; {} for modules without one (fine-tuning tasks)."""
    return {prefix + name: p for prefix, teacher in _teachers(module).items()
            for name, p in teacher.named_parameters()}


def prune(ckpt_dir: Path, keep: int, run_id: str, current: str | None = None) -> list[str]:
    """Delete this run's complete tags but the newest `keep`, and this run's half-written tags.

    Tags written by any other run (another run id, format-1 checkpoints, foreign directories) are
    never touched, whatever their age or state."""
    mine_complete, mine_partial = [], []
    for tag_dir in tag_dirs(ckpt_dir):
        if tag_dir.name == current:
            mine_complete.append(tag_dir)
            continue
        marker = _marker(tag_dir)
        if marker is not None and marker.get("run_id") == run_id:
            mine_complete.append(tag_dir)
        elif marker is None and _owner(tag_dir) == run_id:
            mine_partial.append(tag_dir)
    mine_complete.sort(key=lambda p: _marker(p)["step"] if _marker(p) else -1)
    doomed = mine_complete[:-keep] + mine_partial
    for tag_dir in doomed:
        shutil.rmtree(tag_dir, ignore_errors=True)
        log.info("removed checkpoint %s (written by this run, %s)", tag_dir.name, run_id)
    return [p.name for p in doomed]


# ---------------------------------------------------------------------------------- choosing a tag
def _marker(tag_dir: Path) -> dict | None:
    try:
        marker = _read_json(tag_dir / MARKER)
        return marker if isinstance(marker, dict) and "files" in marker else None
    except (OSError, ValueError):
        return None


def check(tag_dir: Path) -> dict:
    """The marker of a complete, readable checkpoint; raises CheckpointError saying what is wrong."""
    tag_dir = Path(tag_dir)
    if not (tag_dir / MARKER).is_file():
        if any(tag_dir.glob("megavl_rank*.pt")):
            raise CheckpointError(f"{tag_dir.name}: a format-1 checkpoint (megavl_rank*.pt pickles, no "
                                  f"{MARKER}); this version cannot resume it")
        raise CheckpointError(f"{tag_dir.name}: no {MARKER} (a save that did not finish)")
    marker = _marker(tag_dir)
    if marker is None:
        raise CheckpointError(f"{tag_dir.name}: {MARKER} is unreadable")
    for rel, size in marker["files"].items():
        path = tag_dir / rel
        if not path.is_file():
            raise CheckpointError(f"{tag_dir.name}: {rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{tag_dir.name}: {rel} has {path.stat().st_size} bytes, "
                                  f"{size} when saved (truncated or overwritten)")
    for rel in marker["files"]:
        path = tag_dir / rel
        try:
            if rel.endswith(".safetensors"):
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        f.get_slice(key)
            elif rel.endswith(".json"):
                _read_json(path)
        except Exception as err:  # noqa: BLE001 - any parse failure means "corrupt"
            raise CheckpointError(f"{tag_dir.name}: {rel} is corrupt ({type(err).__name__}: {err})") from None
    return marker


def choose_tag(ckpt_dir: Path) -> tuple[str | None, list[str]]:
    """(newest usable tag or None, why each newer one was skipped). Run on rank 0 only.

    Newest = the marker written last (its step breaks ties), so after a fresh run started beside old
    checkpoints, `--resume auto` continues that fresh run."""
    candidates = []
    for tag_dir in tag_dirs(ckpt_dir):
        marker = _marker(tag_dir)
        candidates.append(((marker or {}).get("saved_at", -1.0), (marker or {}).get("step", -1), tag_dir))
    skipped = []
    for _, _, tag_dir in sorted(candidates, key=lambda c: (c[0], c[1]), reverse=True):
        try:
            check(tag_dir)
            return tag_dir.name, skipped
        except CheckpointError as err:
            log.warning("checkpoint %s unusable, trying an older one: %s", tag_dir.name, err)
            skipped.append(str(err))
    return None, skipped


def choose_checkpoint(ckpt_dir: Path, resume: str) -> dict | str | None:
    """Rank 0, for `--resume auto|none|<tag dir or tag name>`: {"tag_dir"} to load, None to start
    fresh, or an error message that every rank raises alike (broadcast it with broadcast_from_rank0).
    `auto` here is the newest complete checkpoint; engine/lineage.py narrows it to the run's line."""
    ckpt_dir = Path(ckpt_dir)
    existing = tag_dirs(ckpt_dir)
    how = (f"continue with --resume auto, pick one with --resume {ckpt_dir}/<tag>, start a new run "
           f"beside them with --fresh (they are kept), or set another run.output_dir")
    if resume == "none":
        if existing:
            return (f"{ckpt_dir} holds {len(existing)} checkpoint(s) ({existing[-1].name}, ...) and "
                    f"--resume none was asked: {how}")
        return None
    if resume == "auto":
        if not existing:
            return None
        tag, skipped = choose_tag(ckpt_dir)
        if tag is None:
            return (f"--resume auto: none of the {len(existing)} checkpoint(s) in {ckpt_dir} can be "
                    f"used:\n  " + "\n  ".join(skipped) + f"\nNothing was deleted. To proceed: {how}")
        return {"tag_dir": str(ckpt_dir / tag)}
    if not Path(resume).is_dir() and TAG_PATTERN.match(resume) and (ckpt_dir / resume).is_dir():
        resume = str(ckpt_dir / resume)  # a bare tag name: this run's checkpoints directory
    if not Path(resume).is_dir():
        holds = (f"{ckpt_dir} holds " + ", ".join(p.name for p in existing[-5:]) if existing
                 else f"{ckpt_dir} holds no checkpoint")
        return (f"--resume {resume}: no such checkpoint directory ({holds}; give auto, none, a tag "
                f"directory such as {ckpt_dir}/{tag_for(100)} or a tag name)")
    try:
        check(Path(resume))
    except CheckpointError as err:
        return f"--resume {resume}: {err}"
    return {"tag_dir": str(Path(resume))}


# ---------------------------------------------------------------------------------------- loading
def read_meta(tag_dir: Path) -> dict:
    return _read_json(Path(tag_dir) / MEGAVL / "meta.json")


@torch.no_grad()
def load_module_state(module: torch.nn.Module, tag_dir: Path, rank: int, old_world: int) -> ReadStats:
    """Restore buffers, the teacher and its fp32 master, on any world size and ZeRO stage (a
    collective). Rank 0 reads the state file and broadcasts it; the teacher's shard files are read by
    range (zero3_shards.load_teacher: each opened at most once, only this rank's ranges read).
    Returns what this rank read from the filesystem."""
    from .zero3_shards import load_teacher

    tag_dir = Path(tag_dir)
    state_file = tag_dir / MEGAVL / "state.safetensors"
    data = read_on_rank0(state_file)
    try:
        shared = load_safetensors(data)
    except Exception as err:  # noqa: BLE001 - any parse failure means "corrupt"; alike on every rank
        raise CheckpointError(f"{tag_dir.name}: {state_file.name} is corrupt ({type(err).__name__}: {err})") from None
    shard_files = sorted(tag_dir.glob(f"{MEGAVL}/teacher_rank*.safetensors"),
                         key=lambda p: int(re.search(r"(\d+)\.safetensors$", p.name).group(1)))
    if shard_files and len(shard_files) != old_world:
        raise CheckpointError(f"{tag_dir.name}: {len(shard_files)} teacher shard files for {old_world} ranks")
    buffers = dict(module.named_buffers())
    for key, value in shared.items():
        if key.startswith("buffer/"):
            buffers[key[len("buffer/"):]].copy_(value)
    stats = load_teacher(module, tag_dir, rank, shared, shard_files)
    if rank == 0:
        stats.opens += 1
        stats.bytes += len(data)
        stats.files.append(state_file.name)
    return stats


def load_data_state(loader, meta: dict, data_resume: str, tag: str) -> None:
    """Continue the train loader at the data position of a checkpoint's meta.json (`data`; older
    fine-tuning checkpoints hold epoch and batch at the top level). data_resume: exact | approx
    (the loader's load_state_dict). A position this run's data cannot continue is a CheckpointError
    naming the tag (exit code 3, one line), not a traceback."""
    try:
        loader.load_state_dict(meta["data"] if "data" in meta else meta, data_resume)
    except DataResumeError as err:
        raise CheckpointError(f"{tag}: {err}") from None


def load_rng(tag_dir: Path, rank: int) -> bool:
    """This rank's RNG state if the saving run had this rank; False (left as seeded) otherwise."""
    path = Path(tag_dir) / MEGAVL / f"rng_rank{rank}.json"
    if not path.is_file():
        return False
    set_rng_state(_read_json(path))
    return True
