"""The EMA update written the plain way: one Python iteration per tensor, name dicts rebuilt every
call. The obviously-correct reference that `teacher.ema_update_` is tested against (test_teacher.py,
next to this file) and timed against (bench/bench_ema.py); training never uses it.
"""
from __future__ import annotations

import torch
from torch import nn

from megavl.objectives.teacher import BufferMode, _check_not_nvme, _has_full_data, _is_partitioned, _paired


@torch.no_grad()
def _lerp_(t: torch.Tensor, s: torch.Tensor, momentum: float, master: dict | None = None, key: str = "") -> None:
    """t <- momentum * t + (1 - momentum) * s, in place, computed in at least float32.

    A bf16 teacher at momentum >= 0.996 would lose most of each update to rounding (8-bit mantissa).
    With `master` (a dict kept by the caller), a bf16/fp16 tensor's EMA runs on an fp32 copy stored
    under `key`, and the tensor only receives its rounding: the fp32 master weights of the teacher.
    """
    if t.dtype not in (torch.float16, torch.bfloat16):
        t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
        return
    exact = master.get(key) if master is not None else None
    if exact is None or exact.shape != t.shape:
        exact = t.float()
        if master is not None:
            master[key] = exact
    exact.mul_(momentum).add_(s.float(), alpha=1.0 - momentum)
    t.copy_(exact)


@torch.no_grad()
def _ema_param(name: str, t: nn.Parameter, s: nn.Parameter, momentum: float, master: dict | None) -> None:
    if _is_partitioned(t) != _is_partitioned(s):
        raise ValueError(f"{name}: one of teacher/student is ZeRO-3 partitioned and the other is not; "
                         f"wrap both in one module before deepspeed.initialize")
    if not _is_partitioned(t):
        _lerp_(t.data, s.data, momentum, master, name)
        return
    _check_not_nvme(name, t)
    _check_not_nvme(name, s)
    if t.ds_tensor.shape != s.ds_tensor.shape:
        raise ValueError(f"{name}: teacher and student shards differ ({tuple(t.ds_tensor.shape)} vs "
                         f"{tuple(s.ds_tensor.shape)}); they must be partitioned by the same engine")
    _lerp_(t.ds_tensor.data, s.ds_tensor.data, momentum, master, name)
    if _has_full_data(t):
        if not _has_full_data(s):
            raise RuntimeError(f"{name}: teacher is gathered but student is not; cannot update the teacher's "
                               f"full copy (are their persistence thresholds different?)")
        _lerp_(t.data, s.data, momentum, master, f"{name}/full")
    # ZeRO++ hpZ keeps a secondary shard copy; drop it so the next gather reads the updated primary.
    if getattr(t, "ds_secondary_tensor", None) is not None:
        t.ds_secondary_tensor = None


@torch.no_grad()
def ema_update_loop_(teacher: nn.Module, student: nn.Module, momentum: float,
                buffers: BufferMode = "ema", master: dict | None = None) -> None:
    """In place: teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (by name).

    Works unsharded and under ZeRO-3 (updates this rank's shards, no gather; see the module docstring).
    buffers: "ema" applies the same EMA to floating-point buffers and copies the others (timm ModelEma);
    "copy" copies every buffer; "skip" leaves teacher buffers alone (DINO). Buffers are never partitioned.
    master: a dict the caller keeps across calls; bf16/fp16 teacher tensors then follow fp32 master
    copies (this rank's shards only) instead of losing small updates to rounding.
    Raises ValueError if the teacher does not mirror the student (names or shapes).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {momentum}")
    if buffers not in ("ema", "copy", "skip"):
        raise ValueError(f"buffers must be 'ema', 'copy' or 'skip'; got {buffers!r}")
    for name, t, s in _paired(dict(teacher.named_parameters()), dict(student.named_parameters()), "parameters"):
        _ema_param(name, t, s, momentum, master)
    if buffers == "skip":
        return
    for name, t, s in _paired(dict(teacher.named_buffers()), dict(student.named_buffers()), "buffers"):
        if buffers == "ema" and t.dtype.is_floating_point:
            _lerp_(t, s, momentum)
        else:
            t.copy_(s)
