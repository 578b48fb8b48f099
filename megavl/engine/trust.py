"""Which checkpoints megavl may unpickle, and reading a foreign one once for every rank.

DeepSpeed writes its model and optimizer states as pickles, and every DeepSpeed loader opens them
with `torch.load(weights_only=False)`: loading a pickle runs whatever code it names. megavl's own
files (megavl/*.safetensors, *.json, config.yaml, exports) load without unpickling. So the line is
drawn by who wrote the directory:

- own: a checkpoint under this run's `<run.output_dir>/checkpoints` (symlinks resolved) was written
  by this run or the run it continues there, and loads without asking;
- foreign: any other checkpoint directory (`task.init_from`, `--resume <dir>` elsewhere,
  `megavl-evaluate --weights <tag dir>`) is refused before any of its files is unpickled, unless
  the user passes `--trust-checkpoint`. An export (`model.safetensors` + `config.yaml`) never needs
  trust.

The run ids that megavl records in a checkpoint are not secrets (they are in every tag's JSON and
in the logs), so they cannot tell an own checkpoint from a copy of it: the directory can.
"""
from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from megavl.config import ConfigError

from .checkpoint import _barrier, broadcast_from_rank0

log = logging.getLogger(__name__)
FLAG = "--trust-checkpoint"


class UntrustedCheckpoint(ConfigError):
    """A checkpoint this run did not write, asked for without --trust-checkpoint (exit code 2)."""


def is_own(ckpt_dir: Path, own_checkpoints: Path | None) -> bool:
    """True when `ckpt_dir` (a checkpoints directory) is this run's own."""
    return own_checkpoints is not None and Path(ckpt_dir).resolve() == Path(own_checkpoints).resolve()


def _pickles(tag_dir: Path) -> str:
    files = sorted(p.name for p in Path(tag_dir).glob("*.pt"))
    if not files:
        return "DeepSpeed's files are pickles"
    if len(files) == 1:
        return f"{files[0]} is a pickle"
    return f"{files[0]} and {len(files) - 1} more .pt files are pickles"


def refusal(what: str, tag_dir: Path, own_checkpoints: Path | None) -> str | None:
    """Why `tag_dir` may not be unpickled without --trust-checkpoint; None when it is this run's.
    `what` says where the path came from (`task.init_from=`, or "" for --resume)."""
    tag_dir = Path(tag_dir)
    if is_own(tag_dir.resolve().parent, own_checkpoints):  # a symlink to elsewhere is not own
        return None
    return (f"{what}{tag_dir}: a checkpoint this run did not write; its {_pickles(tag_dir)}, "
            f"and unpickling can run any code: pass {FLAG} if you trust where it came from, or start "
            f"from an export (model.safetensors + config.yaml, which megavl-export writes from a "
            f"checkpoint you trust)")


def _without_shared_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): a copy for every alias."""
    seen, out = set(), {}
    for name, tensor in state.items():
        tensor = tensor.detach().contiguous()
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        out[name] = tensor.clone() if key in seen else tensor
        seen.add(key)
    return out


def read_once(what: str, tag_dir: Path, consolidate: Callable[[], dict[str, torch.Tensor]], trusted: bool,
              own_checkpoints: Path | None, scratch: Path | None) -> dict[str, torch.Tensor]:
    """Every rank's copy of the weights that `consolidate()` merges from the checkpoint `tag_dir`,
    which rank 0 alone runs (a collective; every rank calls it).

    Rank 0 first refuses a foreign checkpoint without --trust-checkpoint (nothing unpickled),
    then consolidates it and, in a world of more than one, writes the result as safetensors to
    `scratch` (on the shared filesystem, as the checkpoints are) for the other ranks to read; the
    folder is removed once every rank has read it. Every rank raises rank 0's refusal or failure
    alike."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if world > 1 and scratch is None:
        raise ValueError("read_once on several ranks needs a scratch folder on the shared filesystem")
    state, outcome = None, None
    if rank == 0:
        outcome = None if trusted else refusal(what, tag_dir, own_checkpoints)
        if outcome is not None:
            outcome = ("untrusted", outcome)
        else:
            try:
                state = consolidate()
                if world > 1:
                    shutil.rmtree(scratch, ignore_errors=True)
                    scratch.mkdir(parents=True)
                    tmp = scratch / ".model.safetensors.tmp"
                    save_file(_without_shared_storage(state), str(tmp))
                    os.replace(tmp, scratch / "model.safetensors")
            except Exception as err:  # noqa: BLE001 - a bad file: every rank stops with its reason
                outcome = ("failed", f"{what}{tag_dir}: cannot read its weights ({type(err).__name__}: {err})")
    outcome = broadcast_from_rank0(outcome)  # also: rank 0's file is complete
    if outcome is not None:
        raise (UntrustedCheckpoint if outcome[0] == "untrusted" else ConfigError)(outcome[1])
    if world > 1:
        shared = scratch / "model.safetensors"
        blind = [None] * world
        torch.distributed.all_gather_object(blind, rank if rank != 0 and not shared.is_file() else None)
        blind = [r for r in blind if r is not None]
        if blind:  # a node-local output_dir: a clear error rather than a rank stuck in the barrier below
            if rank == 0:
                shutil.rmtree(scratch, ignore_errors=True)
            raise ConfigError(f"{what}{tag_dir}: rank(s) {blind} cannot see {shared}, which rank 0 wrote: "
                              f"run.output_dir must be on a filesystem that every rank reads")
        if rank != 0:
            state = load_file(str(shared))
        _barrier()  # every rank has read it
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
    log.info("%s%s: consolidated once on rank 0%s", what, tag_dir, " and shared" if world > 1 else "")
    return state
