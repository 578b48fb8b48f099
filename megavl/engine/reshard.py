"""Load DeepSpeed's model/optimizer state saved on W ranks (or another ZeRO stage) into this engine.

How: every rank reads, straight from the saved ranks' files, only its own new partition of each
trained parameter's fp32 master and Adam moments (`ds_partitions.py`: exact byte ranges, each saved file
opened at most once, only the ranges needed paged in), and writes it into the fresh engine:
  ZeRO-3      this rank's padded partition of the fp32 master and moments, through the partition
              DeepSpeed exposes (`_set_zero3_partition`: its own setter ignores the padding), and the
              module's shard; small persistent parameters then gather their full copy from the shards;
  ZeRO-1/2    the fragment of each parameter this rank's partition holds (`param._hp_mapping`, the
              mapping DeepSpeed's `safe_set_full_*` write through), then the model weights from the
              new fp32 partitions (`update_lp_params`);
  ZeRO-0      full tensors (every rank holds the whole optimizer).
Nothing is converted, written or deleted, so there is no conversion for a collective to wait on,
and an interrupted resume leaves nothing half-done behind: it reads the same files again. Each rank
reads about 12 B x P / W' bytes, in about the time a same-world load takes.

Why not DeepSpeed's `ds_to_universal` + `load_universal`: the conversion is one process's work
(rank 0, ~10^5 small files for a 64-rank ZeRO-3 checkpoint) while the other ranks wait in a
collective, and its output is full per-parameter tensors that every rank then reads whole; its
ZeRO-3 loader also copies param_groups[0]'s lr and weight decay to every group (megavl's differ).
This path is the same for every stage and leaves hyper-parameters to the trainer (from the recipe,
see `Trainer._apply_schedule`). A ZeRO-0 fp32 checkpoint (one world-independent file) needs no
resharding when resumed under ZeRO-0; into ZeRO >= 1 it is read by name from that file.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Iterable

import torch

from .checkpoint import CheckpointError, _barrier
from .ds_partitions import KEYS, ReadStats, SavedOptimizer, open_saved
from .zero3_shards import padded, regather_persistent, zero3_range

log = logging.getLogger(__name__)
MOMENTS = ("exp_avg", "exp_avg_sq")


def is_partitioned(tag_dir: Path) -> bool:
    """True when the optimizer state is split by rank (ZeRO >= 1, or DeepSpeed's bf16 optimizer)."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


def needs_reshard(tag_dir: Path, old_world: int, old_stage: int, world: int, stage: int) -> bool:
    if is_partitioned(tag_dir):
        return (old_world, old_stage) != (world, stage)
    return stage != 0  # ZeRO-0 fp32: one file, world-independent; another stage reads it by name


def _flat_partitions(opt) -> list[torch.Tensor] | None:
    """The fp32 flat partitions the base optimizer steps (None: a plain torch optimizer, ZeRO-0 fp32)."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return None


def _set_zero3_partition(opt, p, part_values: torch.Tensor, key: str | None) -> None:
    """Fill this rank's ZeRO-3 partition of `p`'s fp32 master (key None) or Adam moment `key`, padding
    included, from `part_values` (already padded to the partition's size).

    DeepSpeed's own `safe_set_full_*` (stage3.set_full_hp_param) slices the full value without the
    padding of the last ranks' partitions: it fails for a parameter whose numel is not a multiple of
    the world size (the ITC temperature, numel 1, on 2 ranks)."""
    part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    part.data.copy_(part_values.to(part.device, part.dtype))
    if opt._swappable_optimizer_subgroup(group):  # NVMe: write the sub-group back, as DeepSpeed does
        opt._optimizer_states_and_gradient_swap_out(group)


def _check_numel(saved: SavedOptimizer, name: str, numel: int) -> None:
    if saved.has(name) and saved.numel(name) != numel:
        raise CheckpointError(f"{saved.tag_dir.name}: {name} has {saved.numel(name)} elements saved, "
                              f"{numel} in this model")


def _inject_plain(base, saved: SavedOptimizer, step_t: torch.Tensor) -> None:
    """ZeRO-0: the torch optimizer steps full parameters; every rank holds all of them."""
    for group in base.param_groups:
        for p, name in zip(group["params"], group["names"]):
            n = p.numel()
            _check_numel(saved, name, n)
            v = {k: saved.read(name, k, 0, n).view_as(p) for k in KEYS}
            p.data.copy_(v["fp32"])
            base.state[p] = {"step": step_t.clone(), **{k: v[k].to(p).clone() for k in MOMENTS}}


def _inject_zero3(opt, named, saved: SavedOptimizer, rank: int) -> None:
    written = []
    for name, p in named:
        if not p.requires_grad:
            continue
        _check_numel(saved, name, p.ds_numel)
        start, stop, size = zero3_range(p, rank)
        values = {k: padded(saved.read(name, k, start, stop), size) for k in KEYS}
        for key in (None, *MOMENTS):
            _set_zero3_partition(opt, p, values[key or "fp32"], key)
        p.ds_tensor.data.copy_(values["fp32"].to(p.ds_tensor.dtype))  # the module's own shard
        written.append(p)
    regather_persistent(written)


def _inject_zero12(opt, named, saved: SavedOptimizer) -> None:
    for name, p in named:
        mapping = getattr(p, "_hp_mapping", None)
        if not p.requires_grad or mapping is None:  # None: no element of p is in this rank's partition
            continue
        start = mapping.lp_fragment_address.start
        stop = start + mapping.lp_fragment_address.numel
        _check_numel(saved, name, p.numel())
        for key in (None, *MOMENTS):
            fragment = mapping.get_hp_fragment(key)
            fragment.data.copy_(saved.read(name, key or "fp32", start, stop).to(fragment.device, fragment.dtype))
    opt.update_lp_params()  # a collective: model weights from the fp32 partitions


@torch.no_grad()
def inject(engine, named: Iterable[tuple[str, torch.nn.Parameter]], saved: SavedOptimizer, rank: int) -> None:
    """Write this rank's part of each parameter's fp32 master, Adam moments and step into this engine's
    partitions; `named`: the trained parameters by their checkpoint names (Task.params.named)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    flats = _flat_partitions(opt)
    step_t = torch.tensor(float(saved.step))
    if flats is None:
        _inject_plain(base, saved, step_t)
        return
    for flat in flats:  # ZeRO-1/2 create Adam's state lazily at the first step: create it now
        state = base.state[flat]
        for key in MOMENTS:
            state.setdefault(key, torch.zeros_like(flat))
        state["step"] = step_t.clone()
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()  # link each parameter's fragment of the new state
    if hasattr(opt, "fp32_partitioned_groups_flat"):
        _inject_zero3(opt, named, saved, rank)
    else:
        _inject_zero12(opt, named, saved)


def load(engine, named: Iterable[tuple[str, torch.nn.Parameter]], tag_dir: Path, rank: int,
         zero_stage: int) -> tuple[int, ReadStats]:
    """Reshard `tag_dir` into this engine (a collective); `named`: the trained parameters by name.
    Returns the restored Adam step and what this rank read."""
    started = time.monotonic()
    leftover = Path(tag_dir).parent / ".reshard"
    if rank == 0 and leftover.is_dir():
        log.warning("%s: converted copies written by an older megavl; nothing reads them, delete the folder", leftover)
    with open_saved(Path(tag_dir)) as saved:
        inject(engine, named, saved, rank)
        step, stats = saved.step, saved.stats
    _barrier()
    if rank == 0:
        log.info("resharded %s onto this world (ZeRO-%d): rank %d opened %d files, read %.1f MB in %.1f s",
                 Path(tag_dir).name, zero_stage, rank, stats.opens, stats.bytes / 1e6, time.monotonic() - started)
    return step, stats
