"""Load DeepSpeed's model/optimizer state saved on W ranks (or another ZeRO stage) into this engine.

How: rank 0 consolidates the saved partitions per parameter with DeepSpeed's own converter
(`deepspeed.checkpoint.ds_to_universal`: full fp32 master, exp_avg, exp_avg_sq and the Adam step of
every parameter, by name) into `<checkpoints>/.reshard/<tag>`; then every rank writes its piece of
each full tensor into the fresh engine through DeepSpeed's public tensor-fragment API
(`safe_set_full_fp32_param`, `safe_set_full_optimizer_state`), which knows the new partitioning
of ZeRO-1/2, bf16 and CPU offload alike (under ZeRO-3 through the partition it exposes, as its setter
ignores the padding: `_set_zero3_partition`); the model weights are then refreshed from the new fp32
master. The folder is removed once every rank has loaded it (we wrote it).

Why not DeepSpeed's `load_universal`: it must be chosen before `deepspeed.initialize`, its ZeRO-3
loader copies param_groups[0]'s lr and weight decay to every group (megavl's groups differ) and
loads no module state (teacher, queues and centres are ours anyway); this path is the same for
every stage, and leaves hyper-parameters to the trainer (from the recipe, see
`Trainer._apply_schedule`). A ZeRO-0 fp32 checkpoint (one world-independent file) needs no
conversion when resumed under ZeRO-0; into ZeRO >= 1 it is read by name from that file.
"""
from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable

import torch
from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

from .checkpoint import CheckpointError, _barrier, _my_shard

log = logging.getLogger(__name__)
MOMENTS = ("exp_avg", "exp_avg_sq")
RESHARD_DIR = ".reshard"


def is_partitioned(tag_dir: Path) -> bool:
    """True when the optimizer state is split by rank (ZeRO >= 1, or DeepSpeed's bf16 optimizer)."""
    return any(Path(tag_dir).glob("*optim_states.pt"))


def needs_reshard(tag_dir: Path, old_world: int, old_stage: int, world: int, stage: int) -> bool:
    if is_partitioned(tag_dir):
        return (old_world, old_stage) != (world, stage)
    return stage != 0  # ZeRO-0 fp32: one file, world-independent; another stage reads it by name


def convert(tag_dir: Path, workers: int = 2) -> Path:
    """Rank 0: DeepSpeed's universal conversion of `tag_dir` into <checkpoints>/.reshard/<tag>."""
    tag_dir = Path(tag_dir)
    out = tag_dir.parent / RESHARD_DIR / tag_dir.name
    tmp = out.with_name(out.name + ".tmp")
    for stale in (out, tmp):  # our own leftovers from an interrupted resume
        shutil.rmtree(stale, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir),
           "--output_folder", str(tmp), "--num_extract_workers", str(workers), "--num_merge_workers",
           str(workers), "--inject_missing_state"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise CheckpointError(f"{tag_dir.name}: DeepSpeed's universal conversion failed:\n{proc.stderr[-3000:]}")
    tmp.rename(out)
    return out


def universal_values(folder: Path) -> tuple[Callable[[str], dict], int]:
    """(name -> {"fp32", "exp_avg", "exp_avg_sq"} full tensors, Adam step) from a converted folder."""
    zero = Path(folder) / "zero"

    def values(name: str) -> dict:
        out = {}
        for key in ("fp32", *MOMENTS):
            path = zero / name / f"{key}.pt"
            if not path.is_file():
                raise CheckpointError(f"{folder}: no {key} for parameter {name}")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            # ZeRO-1/2 folders hold {"param": tensor, "cat_dim": ...}, ZeRO-3 folders the bare tensor
            out[key] = (saved["param"] if isinstance(saved, dict) else saved).float()
        return out

    step_files = sorted(zero.glob("*/step.pt"))
    if step_files:  # ZeRO-1/2 and bf16: one per parameter
        step = torch.load(step_files[0], map_location="cpu", weights_only=True)
    else:  # ZeRO-3 keeps it in the common optimizer state (DeepSpeed's pickle, not a megavl file)
        common = torch.load(zero / "optimizer_state.pt", map_location="cpu", weights_only=False)
        states = common.get("optimizer_state_dict", {}).get("state", {})
        if not states:
            raise CheckpointError(f"{folder}: no Adam step in the converted checkpoint")
        step = next(iter(states.values()))["step"]
    return values, int(step.item() if torch.is_tensor(step) else step)


def zero0_values(tag_dir: Path) -> tuple[Callable[[str], dict], int]:
    """The same from a ZeRO-0 fp32 checkpoint: DeepSpeed's model-states file (module + torch AdamW)."""
    states = sorted(Path(tag_dir).glob("mp_rank_*_model_states.pt"))
    if not states:
        raise CheckpointError(f"{tag_dir}: no DeepSpeed model states")
    # DeepSpeed's own pickle (optimizer and scheduler objects' state): not a megavl file.
    sd = torch.load(states[0], map_location="cpu", weights_only=False)
    module, optim = sd["module"], sd["optimizer"]
    by_name, step = {}, 0
    for group in optim["param_groups"]:
        for index, name in zip(group["params"], group["names"]):
            state = optim["state"].get(index, {})
            by_name[name] = {"fp32": module[name].float(),
                             **{k: state[k].float() if k in state else torch.zeros_like(module[name].float())
                                for k in MOMENTS}}
            if "step" in state:
                step = int(state["step"])
    return (lambda name: by_name[name]), step


def _flat_partitions(opt) -> list[torch.Tensor] | None:
    """The fp32 flat partitions the base optimizer steps (None: a plain torch optimizer, ZeRO-0 fp32)."""
    for attr in ("fp32_partitioned_groups_flat", "single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(opt, attr):
            return list(getattr(opt, attr))
    return None


def _set_zero3_partition(opt, p, full: torch.Tensor, key: str | None, rank: int) -> None:
    """This rank's ZeRO-3 partition of `p`'s fp32 master (key None) or Adam moment `key`, padding included.

    DeepSpeed's own `safe_set_full_*` (stage3.set_full_hp_param) slices the full value without the
    padding of the last ranks' partitions: it fails for a parameter whose numel is not a multiple of
    the world size (the ITC temperature, numel 1, on 2 ranks). So the partition DeepSpeed exposes is
    filled here from the zero-padded full tensor, as DeepSpeed pads it (`_my_shard`)."""
    part, group = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False, optim_state_key=key)
    part.data.copy_(_my_shard(full.flatten(), part, rank).to(part.device, part.dtype))
    if opt._swappable_optimizer_subgroup(group):  # NVMe: write the sub-group back, as DeepSpeed does
        opt._optimizer_states_and_gradient_swap_out(group)


@torch.no_grad()
def inject(engine, named: Iterable[tuple[str, torch.nn.Parameter]], values: Callable[[str], dict], step: int,
           rank: int) -> None:
    """Write full per-parameter fp32 master, Adam moments and step into this engine's partitions;
    `named`: the trained parameters by their checkpoint names (Task.params.named)."""
    opt = engine.optimizer
    base = getattr(opt, "optimizer", opt)
    flats = _flat_partitions(opt)
    step_t = torch.tensor(float(step))
    if flats is None:
        for group in base.param_groups:
            for p, name in zip(group["params"], group["names"]):
                v = values(name)
                p.data.copy_(v["fp32"].view_as(p))
                base.state[p] = {"step": step_t.clone(), **{k: v[k].view_as(p).to(p).clone() for k in MOMENTS}}
        return
    for flat in flats:  # ZeRO-1/2 create Adam's state lazily at the first step: create it now
        state = base.state[flat]
        for key in MOMENTS:
            state.setdefault(key, torch.zeros_like(flat))
        state["step"] = step_t.clone()
    if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
        opt._lazy_init_hp_params_optimizer_state()  # link each parameter's fragment of the new state
    zero3 = hasattr(opt, "fp32_partitioned_groups_flat")
    for name, p in named:
        if not p.requires_grad:
            continue
        v = values(name)
        if zero3:
            for key in (None, *MOMENTS):
                _set_zero3_partition(opt, p, v[key or "fp32"], key, rank)
        else:
            safe_set_full_fp32_param(p, v["fp32"].to(flats[0].device))
            for key in MOMENTS:
                safe_set_full_optimizer_state(p, v[key].to(flats[0].device), key)
        if zero3:  # the module's own shard (and a persistent full copy) follow the new master
            p.ds_tensor.data.copy_(_my_shard(v["fp32"].flatten(), p.ds_tensor, rank).to(p.ds_tensor.dtype))
            if p.data.numel() == p.ds_numel:
                p.data.copy_(v["fp32"].view(p.ds_shape).to(p.dtype))
    if not zero3:
        opt.update_lp_params()  # a collective: model weights from the fp32 partitions


def load(engine, named: Iterable[tuple[str, torch.nn.Parameter]], tag_dir: Path, rank: int, zero_stage: int) -> int:
    """Reshard `tag_dir` into this engine (a collective); `named`: the trained parameters by name.
    Returns the restored Adam step."""
    tag_dir = Path(tag_dir)
    folder = None
    if is_partitioned(tag_dir):
        folder = Path(tag_dir.parent / RESHARD_DIR / tag_dir.name)
        error = None
        if rank == 0:
            try:
                convert(tag_dir)
            except CheckpointError as err:
                error = str(err)
        from .checkpoint import broadcast_from_rank0

        error = broadcast_from_rank0(error)
        if error:
            raise CheckpointError(error)
        values, step = universal_values(folder)
    else:
        values, step = zero0_values(tag_dir)
    inject(engine, named, values, step, rank)
    _barrier()
    if rank == 0 and folder is not None:
        shutil.rmtree(folder, ignore_errors=True)
    log.info("resharded %s (ZeRO-%d) onto this world", tag_dir.name, zero_stage)
    return step
