"""`<output_dir>/best`: the weights of the best evaluation so far, as a megavl-export directory.

    model.safetensors       the bare VLPModel (megavl.load_pretrained reads it)
    task_head.safetensors   the task's own weights beside it (classifier, temperature), for megavl-evaluate
    config.yaml             the run's config
    task_state.json         Task.extra_state (VQA: the answer list)

The weights are the optimizer's fp32 master, not the module's working copy (bf16 under bf16
training), as `megavl-export` writes them from a checkpoint. They are gathered one parameter at a
time (`deepspeed.utils.safe_get_full_fp32_param`: an all-reduce of the fragments under ZeRO-1/2 and
bf16, an all-gather of the partitions under ZeRO-3), so no rank ever holds the whole model on the
device; rank 0 alone keeps each value, on the CPU, and writes the files. Buffers (identical on every
rank) and parameters the optimizer does not step come from the module itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
import yaml
from deepspeed.utils import safe_get_full_fp32_param
from safetensors.torch import save_file

STUDENT = "student."


@torch.no_grad()
def full_fp32_value(param: torch.nn.Parameter, zero_stage: int) -> torch.Tensor:
    """The full fp32 value of one parameter, on every rank (a collective under ZeRO-1/2/3 and bf16)."""
    master = safe_get_full_fp32_param(param) if param.requires_grad else None
    if master is not None:
        return master.detach().float()
    # fp32 ZeRO-0 (the parameter is what the optimizer steps) or a parameter no optimizer steps
    with deepspeed.zero.GatheredParameters([param], modifier_rank=None, enabled=zero_stage == 3):
        return param.detach().float().clone()


@torch.no_grad()
def master_state_dict(module: torch.nn.Module, zero_stage: int, is_main: bool,
                      skip: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The module's state dict, every tensor fp32, parameters from the fp32 master, names starting
    with `skip` left out: on rank 0 CPU tensors (tied names each get their own copy); {} on the
    other ranks. A collective: every rank walks the same names in the same order."""
    values: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        if name.startswith(skip):
            continue
        if isinstance(value, torch.nn.Parameter):
            if id(value) not in values:
                full = full_fp32_value(value, zero_stage)
                values[id(value)] = full.cpu() if is_main else full.new_empty(0)
                del full
            value = values[id(value)]
        if is_main:
            out[name] = value.detach().float().cpu().contiguous().clone()
    return out


def export_best(module: torch.nn.Module, out: Path, zero_stage: int, is_main: bool, config: dict,
                extra_state: dict, skip: tuple[str, ...] = ()) -> None:
    """Write `out` (see the module docstring); every rank calls it."""
    full = master_state_dict(module, zero_stage, is_main, skip)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k[len(STUDENT):]: v for k, v in full.items() if k.startswith(STUDENT)},
                  str(out / "model.safetensors"))
        save_file({k: v for k, v in full.items() if not k.startswith(STUDENT)}, str(out / "task_head.safetensors"))
        (out / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        (out / "task_state.json").write_text(json.dumps(extra_state))
    if dist.is_initialized():
        dist.barrier()
