"""optim.skip_unused: a parameter that an optimizer step did not use keeps its value and its Adam
moments, as torch AdamW leaves a parameter whose `.grad` is None (ALBEF, BLIP train with it).

Why it needs doing here: DeepSpeed's ZeRO-1/2/3 keep one flat gradient per partition, so a parameter
that took no part in the step (cross-attention in a single-stream step) gets a zero gradient, and
AdamW applies momentum and weight decay to it; with the curriculum alternating every step that is
about twice the reference's updates on cross-attention.

How:
  * which parameters a step used: a post-accumulate-grad hook on every trained parameter marks it
    when autograd delivers its gradient, before DeepSpeed reduces it (every rank alike: the forward's
    control flow depends only on the config and the curriculum's mode);
  * where each parameter's optimizer state lives on this rank: a (flat fp32 tensor, offset, numel)
    segment, read once from the engine (ZeRO-3: `grad_position` into the sub-group's fp32 partition;
    ZeRO-1/2 and bf16: the parameter's `_hp_mapping` fragment);
  * ZeRO-0 in fp32, where torch's AdamW steps the parameters themselves: the unused ones get their
    `.grad` set back to None before the step (DeepSpeed's all-reduce filled zeros in), and torch skips
    them with its own per-parameter counts: no work at all for a module no enabled objective uses;
  * the optimizer's step (`optim.AdamW.step`, which DeepSpeed calls on the flat partitions) saves the
    unused segments' fp32 master and moments before torch's update and puts them back after it;
  * bias correction: torch counts steps per parameter, so a parameter that sat out k steps is at
    count t - k. The group's flat tensor has one count (t), so the used segments of a parameter with
    k > 0 are recomputed from their saved value with their own count:
        p = p0 * (1 - lr * wd) - lr / (1 - b1^(t-k)) * m / (sqrt(v) / sqrt(1 - b2^(t-k)) + eps)
    (m, v: the moments after this step, which do not depend on the count). The counts k are saved in
    the checkpoint's meta.json (`optim_skipped`); a checkpoint without them never skipped.
DeepSpeed then copies the fp32 partitions into the working weights, as after any step.
Not supported: optimizer state swapped to NVMe (its partitions are not in memory), which raises.
"""
from __future__ import annotations

import math
from collections import defaultdict

import torch

Segment = tuple[str, int, int]  # (parameter name, offset in the flat tensor, numel)


def _segments(engine, named: list[tuple[str, torch.nn.Parameter]], zero_stage: int,
              base: torch.optim.Optimizer) -> tuple[dict[int, list[Segment]], dict[int, torch.Tensor]]:
    """({id(flat tensor the optimizer steps): this rank's segments of the trained parameters},
    {id: that flat tensor})."""
    out: dict[int, list[Segment]] = defaultdict(list)
    tensors: dict[int, torch.Tensor] = {}
    if zero_stage == 3:
        opt = engine.optimizer
        if getattr(opt, "swap_optimizer", False):
            raise NotImplementedError("optim.skip_unused with optimizer state on NVMe is not supported; "
                                      "set optim.skip_unused=false")
        for name, p in named:
            group, offset, numel = opt.grad_position[opt.get_param_id(p)]
            flat = opt.fp32_partitioned_groups_flat[group]
            out[id(flat)].append((name, int(offset), int(numel)))
            tensors[id(flat)] = flat
        return out, tensors
    flats = [t for g in base.param_groups for t in g["params"]]
    stepped_directly = {id(t) for t in flats}
    for name, p in named:
        if id(p) in stepped_directly:  # ZeRO-0 fp32: torch skips it itself when its grad is None
            continue
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is None:  # no fragment of it on this rank
            continue
        fragment = mapping.hp_fragment
        storage = fragment.untyped_storage().data_ptr()
        flat = next((t for t in flats if t.untyped_storage().data_ptr() == storage), None)
        if flat is None:
            raise RuntimeError(f"optim.skip_unused: no optimizer partition holds {name}'s fp32 fragment")
        offset = (fragment.data_ptr() - flat.data_ptr()) // fragment.element_size()
        out[id(flat)].append((name, offset, fragment.numel()))
        tensors[id(flat)] = flat
    return out, tensors


class UnusedParameters:
    """Tracks which trained parameters each optimizer step used and has the optimizer skip the rest.

    Call `before_step(step)` before the `engine.step()` that steps the optimizer (the last
    micro-batch's) and `after_step()` after it; `skipped` (name -> steps sat out) is the state a
    checkpoint keeps (`state_dict` / `load_state_dict`)."""

    def __init__(self, named: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                 segments: dict[int, list[Segment]], flats: dict[int, torch.Tensor]) -> None:
        """named: the trained parameters; segments, flats: where their optimizer state lives (see
        `for_engine`); parameters the optimizer steps directly need neither."""
        self.named = [(n, p) for n, p in named if p.requires_grad]
        self.used: set[str] = set()
        self.skipped: dict[str, int] = {}
        self.unused_now: set[str] = set()
        self.count = 0  # optimizer steps taken, this one included, while it runs
        self.optimizer = optimizer
        self.segments, self._flats = segments, flats
        direct = {id(t) for g in optimizer.param_groups for t in g["params"]}
        self.direct = {n: p for n, p in self.named if id(p) in direct}  # ZeRO-0 fp32
        self._hooks = [p.register_post_accumulate_grad_hook(lambda _p, n=name: self.used.add(n))
                       for name, p in self.named]
        optimizer.skip_plan = self

    @classmethod
    def for_engine(cls, named: list[tuple[str, torch.nn.Parameter]], engine, zero_stage: int,
                   optimizer: torch.optim.Optimizer) -> "UnusedParameters":
        """For a DeepSpeed engine at `zero_stage` whose client optimizer is `optimizer` (optim.AdamW)."""
        trained = [(n, p) for n, p in named if p.requires_grad]
        return cls(trained, optimizer, *_segments(engine, trained, zero_stage, optimizer))

    def before_step(self, step: int) -> None:
        """step: the 0-based optimizer step about to be taken (AdamW's count becomes step + 1)."""
        self.unused_now = {n for n, _ in self.named if n not in self.used}
        self.count = step + 1
        for name in self.unused_now:
            if name in self.direct:
                self.direct[name].grad = None

    def after_step(self) -> None:
        for name in self.unused_now:
            self.skipped[name] = self.skipped.get(name, 0) + 1
        self.used.clear()
        self.unused_now = set()

    def local_state(self, name: str, key: str) -> torch.Tensor | None:
        """This rank's part of parameter `name`'s fp32 master (key "param") or Adam moment ("exp_avg",
        "exp_avg_sq"), flat; None when this rank holds none of it (or before the first step)."""
        if name in self.direct:
            p = self.direct[name]
            source = p if key == "param" else self.optimizer.state.get(p, {}).get(key)
            return None if source is None else source.detach().view(-1)
        for flat_id, segments in self.segments.items():
            for seg_name, offset, numel in segments:
                if seg_name == name:
                    flat = self._flats[flat_id]
                    source = flat if key == "param" else self.optimizer.state.get(flat, {}).get(key)
                    return None if source is None else source.detach().view(-1)[offset:offset + numel]
        return None

    def state_dict(self) -> dict[str, int]:
        return dict(sorted(self.skipped.items()))

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.skipped = {str(k): int(v) for k, v in state.items()}

    # -- called by optim.AdamW.step around torch's update of one flat tensor
    @torch.no_grad()
    def save(self, flat: torch.Tensor, state: dict) -> list:
        """The pre-step values of `flat`'s segments that this step must not change or must recompute."""
        saved = []
        for name, offset, numel in self.segments.get(id(flat), ()):
            if name in self.unused_now:
                view = slice(offset, offset + numel)
                moments = {k: state[k].view(-1)[view].clone() for k in ("exp_avg", "exp_avg_sq") if k in state}
                saved.append(("skip", name, view, flat.view(-1)[view].clone(), moments))
            elif self.skipped.get(name, 0):
                view = slice(offset, offset + numel)
                saved.append(("recount", name, view, flat.view(-1)[view].clone(), None))
        return saved

    @torch.no_grad()
    def restore(self, flat: torch.Tensor, state: dict, group: dict, saved: list) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for kind, name, view, value, moments in saved:
            if kind == "skip":
                flat.view(-1)[view].copy_(value)
                for key in ("exp_avg", "exp_avg_sq"):  # absent before the first step: they were zero
                    before = moments.get(key)
                    target = state[key].view(-1)[view]
                    target.copy_(before) if before is not None else target.zero_()
                continue
            own = self.count - self.skipped[name]  # torch's per-parameter count for this step
            m, v = state["exp_avg"].view(-1)[view], state["exp_avg_sq"].view(-1)[view]
            denom = (v.sqrt() / math.sqrt(1 - beta2 ** own)).add_(eps)
            flat.view(-1)[view].copy_(value.mul(1 - lr * wd).addcdiv_(m, denom, value=-lr / (1 - beta1 ** own)))
