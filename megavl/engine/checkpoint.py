"""Checkpoints: DeepSpeed's own (model, optimizer, scheduler) plus megavl's per-rank state.

Layout under <output_dir>/checkpoints/:
    step_00000100/                 one DeepSpeed tag
        megavl_rank{r}.pt          teacher shards, objective buffers, data position, RNG, step
        ... DeepSpeed's files ...
    latest                         written by DeepSpeed LAST, so it never names a half-written tag

The teacher is saved here rather than trusted to DeepSpeed: under ZeRO-3 its frozen parameters are
not in the optimizer, so we store this rank's shard (`ds_tensor`) of each, and restore it in place.
"""
from __future__ import annotations

import logging
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

log = logging.getLogger(__name__)
TAG_PATTERN = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a parameter: its ZeRO-3 shard, or the whole tensor when unsharded."""
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, module: torch.nn.Module, ckpt_dir: Path, step: int, rank: int, extra: dict,
         keep: int) -> Path:
    """Save a complete checkpoint for `step` (a collective: every rank calls it)."""
    tag = tag_for(step)
    tag_dir = Path(ckpt_dir) / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "teacher": {n: _local_tensor(p).detach().clone() for n, p in module.teacher.named_parameters()},
        "buffers": {n: b.detach().clone() for n, b in module.named_buffers() if not n.startswith(("student.", "teacher."))},
        "teacher_master": {k: v.clone() for k, v in module.teacher_master.items()},
        "rng": rng_state(),
        **extra,
    }
    tmp = tag_dir / f".megavl_rank{rank}.pt.tmp"
    torch.save(state, tmp)
    tmp.replace(tag_dir / f"megavl_rank{rank}.pt")
    # DeepSpeed writes `latest` after its own files; our files are complete before it starts.
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=True)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        prune(ckpt_dir, keep)
    return tag_dir


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags up to and including the one `latest` names, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    latest = ckpt_dir / "latest"
    if not latest.is_file():
        return []
    newest = latest.read_text().strip()
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    return [t for t in tags if t <= newest]


def prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and any tag newer than `latest`
    (left by a save that was killed half-way)."""
    ckpt_dir = Path(ckpt_dir)
    complete = complete_tags(ckpt_dir)
    all_tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.match(p.name))
    doomed = complete[:-keep] + [t for t in all_tags if complete and t > complete[-1]]
    for tag in doomed:
        shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        log.info("removed checkpoint %s", tag)


def latest_tag(ckpt_dir: Path, world_size: int) -> str | None:
    """The newest complete checkpoint: named by `latest`, with every rank's megavl state present."""
    ckpt_dir = Path(ckpt_dir)
    for tag in reversed(complete_tags(ckpt_dir)):
        if all((ckpt_dir / tag / f"megavl_rank{r}.pt").is_file() for r in range(world_size)):
            return tag
        log.warning("checkpoint %s is incomplete; trying an older one", tag)
    return None


def load(engine, module: torch.nn.Module, ckpt_dir: Path, tag: str, rank: int) -> dict:
    """Restore everything `save` wrote; returns megavl's per-rank state (step, data position, ...)."""
    path, _ = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=False,
                                     load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
    state = torch.load(Path(ckpt_dir) / tag / f"megavl_rank{rank}.pt", map_location="cpu", weights_only=False)
    with torch.no_grad():
        for name, p in module.teacher.named_parameters():
            _local_tensor(p).copy_(state["teacher"][name])
        buffers = dict(module.named_buffers())
        for name, value in state["buffers"].items():
            buffers[name].copy_(value)
        device = next(module.teacher.parameters()).device
        module.teacher_master.clear()
        module.teacher_master.update({k: v.to(device) for k, v in state.get("teacher_master", {}).items()})
    set_rng_state(state["rng"])
    return state
