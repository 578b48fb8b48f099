"""Keep the learnable ITC temperature inside [temp_min, temp_max] in every ZeRO stage and precision.

ALBEF clamps `self.temp` in place before each forward pass. Under DeepSpeed that is not enough: ZeRO-1/2/3
and bf16 keep an fp32 MASTER copy of every trained parameter inside the optimizer, step the master, and
copy it over the module's working copy after each step. A clamp of the working copy alone is undone by
the next step (a ZeRO-2 toy clamped to <= 0.5 reached 1.67 after 8 steps). A clamp inside the graph
(`temp.clamp(lo, hi)` in the loss) would not be undone, but it leaves the master outside the range with
zero gradient: once past a bound the temperature could never come back.

So after every optimizer step, `clamp_trained_temperature_` clamps, in place, the copy the optimizer
steps (the fp32 master, or this rank's partition of it) AND the working copy the next forward reads.
The master is then always inside the range, so a gradient pointing back inside moves it back at once,
exactly as ALBEF's in-place clamp on an unsharded parameter allows.

Uses DeepSpeed's public tensor-fragment API (`deepspeed.utils.safe_{get,set}_{full,local}_fp32_param`,
checked against DeepSpeed 0.19.8):
    ZeRO-3 (param.ds_id):        this rank's fp32 partition (local API, no communication) and the
                                 working shard `ds_tensor`, plus the full `.data` while it is gathered
                                 (a persistent small parameter keeps it between steps).
    ZeRO-1/2, bf16 ZeRO-0 (param._hp_mapping): the full fp32 master (get_full all-reduces one value;
                                 every rank must call this) and the working `.data`.
    fp32 ZeRO-0 / plain torch:   the parameter itself is what the optimizer steps.
"""
from __future__ import annotations

import torch


def _check_bounds(min_temp: float, max_temp: float) -> None:
    if min_temp <= 0 or min_temp > max_temp:
        raise ValueError(f"need 0 < min_temp <= max_temp; got {min_temp}, {max_temp}")


def _clamp_zero3_(param: torch.nn.Parameter, min_temp: float, max_temp: float) -> None:
    from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

    # Only this rank's real elements: the last rank's partition may end in padding, left untouched.
    import torch.distributed as dist

    part = param.ds_tensor.numel()
    rank = dist.get_rank(group=getattr(param, "ds_process_group", None)) if dist.is_initialized() else 0
    real = max(0, min(param.ds_numel - rank * part, part))
    master = safe_get_local_fp32_param(param)
    if master is not None and real > 0:
        value = master.detach().clone().flatten()
        value[:real].clamp_(min_temp, max_temp)
        safe_set_local_fp32_param(param, value)
    if real > 0:
        param.ds_tensor.data.flatten()[:real].clamp_(min_temp, max_temp)
    if param.data.numel() == param.ds_numel:  # gathered (persistent): the next forward reads this copy
        param.data.clamp_(min_temp, max_temp)


@torch.no_grad()
def clamp_trained_temperature_(param: torch.nn.Parameter, min_temp: float, max_temp: float) -> None:
    """Clamp a temperature parameter's optimizer master copy and working copy in place (see module doc).

    Call on every rank right after `engine.step()` (or `optimizer.step()`); a collective under ZeRO-1/2.
    """
    _check_bounds(min_temp, max_temp)
    if hasattr(param, "ds_id"):
        _clamp_zero3_(param, min_temp, max_temp)
        return
    if hasattr(param, "_hp_mapping"):  # None on a rank that owns no fragment; get_full still all-reduces
        from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

        master = safe_get_full_fp32_param(param)
        if master is not None:
            safe_set_full_fp32_param(param, master.clamp(min_temp, max_temp))
    param.data.clamp_(min_temp, max_temp)
