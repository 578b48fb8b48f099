"""EMA (momentum) teacher that works on plain modules and on DeepSpeed ZeRO-3 partitions.

Used by ALBEF's momentum encoder (constant momentum 0.995), DINO/iBOT and
SemMIM (0.996 -> 1, cosine: `teacher_momentum`). A teacher may copy only some top-level parts of
its student (`make_teacher(student, parts)`: ALBEF's ITC needs the towers and projections only);
the EMA then pairs exactly those parts.

ZeRO-3: a partitioned parameter's `.data` is an empty placeholder outside forward; this rank's flat
shard (padded at the end of the last rank) lives in `param.ds_tensor`. When student and teacher are
submodules of ONE engine module, DeepSpeed partitions same-shaped parameters identically, so the EMA
is element-wise on shards: `t.ds_tensor.mul_(m).add_(s.ds_tensor, alpha=1-m)` with no communication.
Small "persistent" parameters (numel <= stage3_param_persistence_threshold) also keep their full
`.data` between steps; both copies are updated so the next forward sees the new values.
Not supported: parameters offloaded to NVMe (their shard is not in memory), which raises.
"""
from __future__ import annotations

import copy
import math
import weakref
from typing import Literal

import torch
from torch import nn

BufferMode = Literal["ema", "copy", "skip"]


def teacher_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine momentum schedule (DINO): m = final - (final - base) * (cos(pi * step / total) + 1) / 2.

    m = base at step 0, final at step >= total_steps (clamped there).
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0; got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0; got {step}")
    progress = min(step, total_steps) / total_steps
    return final - (final - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def distill_alpha(alpha: float, step: int, steps_per_epoch: int, warmup: bool) -> float:
    """ALBEF's momentum-distillation weight (Pretrain.py, Retrieval.py): alpha * min(1, i / len(data_loader))
    in epoch 0 with warm_up, alpha after; without warm-up, alpha from the first step."""
    if not warmup:
        return alpha
    return alpha * min(1.0, step / max(1, steps_per_epoch))


def make_teacher(student: nn.Module, parts: tuple[str, ...] | None = None) -> nn.Module:
    """A deep copy of `student` with every parameter frozen (requires_grad=False).

    parts: the top-level children to keep (e.g. ("vision", "text", "vision_proj", "text_proj"));
    the others become None in the copy, hold no memory and are not updated by `ema_update_`.
    None keeps every child. Call it BEFORE deepspeed.initialize / zero.Init (a partitioned module
    cannot be deep-copied) and put both into one wrapper module so DeepSpeed partitions them alike.
    """
    if any(hasattr(p, "ds_id") for p in student.parameters()):
        raise RuntimeError("make_teacher got a ZeRO-3 partitioned module; build the teacher before deepspeed.initialize")
    children = dict(student.named_children())
    if parts is not None and set(parts) - set(children):
        raise ValueError(f"make_teacher: {sorted(set(parts) - set(children))} are not children of the student")
    dropped = {} if parts is None else {name: child for name, child in children.items() if name not in parts}
    for name in dropped:  # not deep-copied at all: a ViT-L decoder copy would cost memory for nothing
        setattr(student, name, None)
    try:
        teacher = copy.deepcopy(student)
    finally:
        for name, child in dropped.items():
            setattr(student, name, child)
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.ema_parts = None if parts is None else tuple(parts)
    return teacher


def _full_shape(p: torch.Tensor) -> torch.Size:
    return p.ds_shape if hasattr(p, "ds_shape") else p.shape


def _is_partitioned(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_tensor")


def _has_full_data(p: torch.Tensor) -> bool:
    """A ZeRO-3 parameter whose full tensor is currently gathered (persistent, or inside forward)."""
    return p.data.numel() == p.ds_numel and p.ds_numel > 0


def _full_is_shard(name: str, t: torch.Tensor) -> bool:
    """True when the gathered full `.data` IS the shard: with one rank in the partition group DeepSpeed
    "gathers" by viewing `ds_tensor` (NoGatherHandle), so a persistent parameter's full copy and its
    shard are one memory. Updating both would apply the EMA twice (momentum m**2 on a 1-rank ZeRO-3
    run). A partial overlap is not a layout DeepSpeed makes; it raises rather than guessing."""
    full, shard = t.data, t.ds_tensor.data
    if full.untyped_storage().data_ptr() != shard.untyped_storage().data_ptr():
        return False
    if full.data_ptr() == shard.data_ptr() and full.numel() <= shard.numel():
        return True
    raise RuntimeError(f"{name}: the gathered teacher parameter overlaps its ZeRO-3 shard only in part")


def _check_not_nvme(name: str, p: torch.Tensor) -> None:
    location = getattr(p.ds_tensor, "final_location", None)
    # An enum (str, Enum): compare its value, not str(), whose text includes the class name.
    if getattr(location, "value", location) == "nvme":
        raise NotImplementedError(f"{name}: EMA of NVMe-offloaded ZeRO-3 parameters is not supported")


def _paired(teacher_items: dict[str, torch.Tensor], student_items: dict[str, torch.Tensor],
            kind: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    missing = sorted(set(student_items) - set(teacher_items))
    extra = sorted(set(teacher_items) - set(student_items))
    if missing or extra:
        raise ValueError(f"teacher does not mirror student {kind}: missing in teacher {missing[:5]}, "
                         f"extra in teacher {extra[:5]}")
    pairs = []
    for name, s in student_items.items():
        t = teacher_items[name]
        if _full_shape(t) != _full_shape(s):
            raise ValueError(f"{kind} {name}: teacher shape {tuple(_full_shape(t))} != student {tuple(_full_shape(s))}")
        pairs.append((name, t, s))
    return pairs


def _check_pair_shards(name: str, t: torch.Tensor, s: torch.Tensor) -> None:
    if _is_partitioned(t) != _is_partitioned(s):
        raise ValueError(f"{name}: one of teacher/student is ZeRO-3 partitioned and the other is not; "
                         f"wrap both in one module before deepspeed.initialize")
    if not _is_partitioned(t):
        return
    _check_not_nvme(name, t)
    _check_not_nvme(name, s)
    if t.ds_tensor.shape != s.ds_tensor.shape:
        raise ValueError(f"{name}: teacher and student shards differ ({tuple(t.ds_tensor.shape)} vs "
                         f"{tuple(s.ds_tensor.shape)}); they must be partitioned by the same engine")


class _EmaPlan:
    """The validated (name, teacher, student) pairs of one teacher/student couple, built once.

    Parameter objects stay the same for a module's life (DeepSpeed partitions them in place), so the
    name dicts and checks are not redone every step; only the tensors to update (`.data`, the ZeRO-3
    shard, a gathered full copy) are read at each call, as they can change between steps."""

    def __init__(self, teacher: nn.Module, student: nn.Module) -> None:
        self.student_ref = weakref.ref(student)
        parts = getattr(teacher, "ema_parts", None)  # set by make_teacher; None: the whole student

        def kept(items):
            return {n: t for n, t in items if parts is None or n.split(".", 1)[0] in parts}

        self.params = _paired(dict(teacher.named_parameters()), kept(student.named_parameters()), "parameters")
        for name, t, s in self.params:
            _check_pair_shards(name, t, s)
        self.buffers = _paired(dict(teacher.named_buffers()), kept(student.named_buffers()), "buffers")

    def targets(self) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """(master key, teacher tensor, student tensor) to update this step, for every parameter."""
        out = []
        self.full_is_shard = []  # names whose full copy is their shard this step (updated once, as the shard)
        for name, t, s in self.params:
            if not _is_partitioned(t):
                out.append((name, t.data, s.data))
                continue
            out.append((name, t.ds_tensor.data, s.ds_tensor.data))
            if _has_full_data(t) and _full_is_shard(name, t):
                self.full_is_shard.append(name)
            elif _has_full_data(t):
                if not _has_full_data(s):
                    raise RuntimeError(f"{name}: teacher is gathered but student is not; cannot update the "
                                       f"teacher's full copy (are their persistence thresholds different?)")
                out.append((f"{name}/full", t.data, s.data))
            # ZeRO++ hpZ keeps a secondary shard copy; drop it so the next gather reads the updated primary.
            if getattr(t, "ds_secondary_tensor", None) is not None:
                t.ds_secondary_tensor = None
        return out


_PLANS: "weakref.WeakKeyDictionary[nn.Module, _EmaPlan]" = weakref.WeakKeyDictionary()


def _plan_for(teacher: nn.Module, student: nn.Module) -> _EmaPlan:
    plan = _PLANS.get(teacher)
    if plan is None or plan.student_ref() is not student:
        plan = _PLANS[teacher] = _EmaPlan(teacher, student)
    return plan


def forget_ema_plan(teacher: nn.Module) -> None:
    """Drop the cached pairs of `teacher` (call after replacing its or its student's parameter objects)."""
    _PLANS.pop(teacher, None)


@torch.no_grad()
def _foreach_ema_(targets: list[tuple[str, torch.Tensor, torch.Tensor]], momentum: float,
                  master: dict | None) -> None:
    """t <- momentum * t + (1 - momentum) * s for every (key, t, s), grouped into foreach calls.

    Same arithmetic as one `t.mul_(m).add_(s, alpha=1-m)` per tensor (the CPU results are bitwise
    equal). Low-precision tensors (bf16/fp16) are updated in float32: with `master` (a dict kept by the
    caller), on fp32 copies stored under `key` that the tensor only receives the rounding of (the
    teacher's fp32 master weights; a bf16 EMA at momentum >= 0.996 loses most updates to rounding);
    without it, on a temporary fp32 copy.
    """
    full_t, full_s, low_t, low_exact, low_s = [], [], [], [], []
    for key, t, s in targets:
        if t.numel() == 0:
            continue
        if t.dtype not in (torch.float16, torch.bfloat16):
            full_t.append(t)
            full_s.append(s if s.dtype == t.dtype else s.to(t.dtype))
            continue
        exact = master.get(key) if master is not None else None
        if exact is None or exact.shape != t.shape:
            exact = t.float()
            if master is not None:
                master[key] = exact
        low_t.append(t)
        low_exact.append(exact)
        low_s.append(s)
    for group_t, group_s in ((full_t, full_s), (low_exact, low_s)):
        if group_t:
            torch._foreach_mul_(group_t, momentum)
            torch._foreach_add_(group_t, group_s, alpha=1.0 - momentum)  # promotes bf16 s to fp32
    if low_t:
        torch._foreach_copy_(low_t, low_exact)


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float,
                buffers: BufferMode = "ema", master: dict | None = None, master_prefix: str = "") -> None:
    """In place: teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter (by name).

    Works unsharded and under ZeRO-3 (updates this rank's shards, no gather; see the module docstring).
    buffers: "ema" applies the same EMA to floating-point buffers and copies the others (timm ModelEma);
    "copy" copies every buffer; "skip" leaves teacher buffers alone (DINO). Buffers are never partitioned.
    master: a dict the caller keeps across calls; bf16/fp16 teacher tensors then follow fp32 master
    copies (this rank's shards only) instead of losing small updates to rounding; master_prefix
    goes before each key (two teachers sharing one master dict, as the checkpoint stores it).
    The pairs are matched and checked once per (teacher, student) and cached (`forget_ema_plan`);
    the update runs as a few grouped torch._foreach_* calls, not 3-4 kernels per tensor from Python.
    Raises ValueError if the teacher does not mirror the student (names or shapes).
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1]; got {momentum}")
    if buffers not in ("ema", "copy", "skip"):
        raise ValueError(f"buffers must be 'ema', 'copy' or 'skip'; got {buffers!r}")
    plan = _plan_for(teacher, student)
    targets = [(master_prefix + key, t, s) for key, t, s in plan.targets()]
    _foreach_ema_(targets, momentum, master)
    if master is not None:  # one fp32 master serves both: a checkpoint holds both keys on any world size
        for name in plan.full_is_shard:
            if master_prefix + name in master:
                master[f"{master_prefix}{name}/full"] = master[master_prefix + name]
    if buffers == "skip":
        return
    floating = [(name, t, s) for name, t, s in plan.buffers if buffers == "ema" and t.dtype.is_floating_point]
    _foreach_ema_(floating, momentum, None)
    for _, t, s in plan.buffers:
        if not (buffers == "ema" and t.dtype.is_floating_point):
            t.copy_(s)
