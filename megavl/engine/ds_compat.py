"""Every private DeepSpeed hook megavl relies on, checked once at start-up against the installed version.

DeepSpeed's internals change between releases; a missing attribute read with `getattr(..., None)`
would silently turn a correctness fix into a no-op. So each hook is listed here with what needs
it, and `check_engine` (from `build_engine`) / `require_shm_op_hook` (from `init_distributed`) raise
`DeepSpeedCompatError` naming the installed version and every missing hook. setup.py pins the range
these were tested with; a new DeepSpeed means re-running the tests and updating this table.

    hook                                          used by
    engine.enable_backward_allreduce              step.deepspeed_engine: skip the world-of-one all-reduce
    ZeRO-3 optimizer.grad_partitions_flat_buffer  step.clear_zero3_grad_partitions (stale gradients)
    ZeRO-3 param.ds_tensor/ds_id/ds_shape/ds_numel objectives/teacher.py EMA on shards, engine/checkpoint.py
    ZeRO-3 param.partition/all_gather             zero3_shards.regather_persistent (full copies after a resume)
    ZeRO-1/2 param._hp_mapping                    reshard._inject_zero12 (each rank's fragment on a resume)
    ZeRO-3 optimizer._get_fp32_opt_state_partition, reshard._set_zero3_partition (padded partitions on
      _swappable_optimizer_subgroup, _optimizer_states_and_gradient_swap_out   resume to another world)
    deepspeed.comm.torch.build_shm_op             launch._skip_shm_op_build (no CPU op JIT under gloo)
    ZeRO-3 parameter_offload.param_coordinator    zero3_traces.TracePerKind (one prefetch trace per kind
      and the coordinator's stored settings         of step)
"""
from __future__ import annotations

import importlib

import torch

TESTED_RANGE = ">=0.19.8,<0.20"  # setup.py's pin; the tests ran on 0.19.8

ZERO3_PARAM_ATTRS = ("ds_tensor", "ds_id", "ds_shape", "ds_numel", "partition", "all_gather")


class DeepSpeedCompatError(RuntimeError):
    """The installed DeepSpeed lacks an internal attribute megavl needs."""


def _version() -> str:
    import deepspeed

    return getattr(deepspeed, "__version__", "unknown")


def _fail(missing: list[str]) -> None:
    raise DeepSpeedCompatError(
        f"deepspeed {_version()} lacks internals megavl relies on: {'; '.join(missing)}. megavl is tested "
        f"with deepspeed{TESTED_RANGE} (setup.py): install that range, or port the code named above "
        f"and megavl/engine/ds_compat.py to this version")


def missing_engine_hooks(engine, zero_stage: int) -> list[str]:
    """Descriptions of the hooks this engine lacks (empty when all are there)."""
    missing = []
    if not isinstance(getattr(engine, "enable_backward_allreduce", None), bool):
        missing.append("engine.enable_backward_allreduce (a bool; step.deepspeed_engine turns off the "
                       "world-of-one gradient all-reduce with it)")
    if zero_stage == 3:
        buffer = getattr(engine.optimizer, "grad_partitions_flat_buffer", None)
        if not torch.is_tensor(buffer):
            missing.append(f"{type(engine.optimizer).__name__}.grad_partitions_flat_buffer (a tensor; "
                           "step.clear_zero3_grad_partitions zeroes it so unused parameters get no stale gradient)")
        hooks = ("_get_fp32_opt_state_partition", "_swappable_optimizer_subgroup",
                 "_optimizer_states_and_gradient_swap_out")
        for hook in (h for h in hooks if not callable(getattr(engine.optimizer, h, None))):
            missing.append(f"{type(engine.optimizer).__name__}.{hook} (reshard._set_zero3_partition writes "
                           "each rank's padded fp32/Adam partition through it on a resume to another world)")
        param = next(iter(engine.module.parameters()), None)
        absent = [a for a in ZERO3_PARAM_ATTRS if param is not None and not hasattr(param, a)]
        if absent:
            missing.append(f"ZeRO-3 parameter attributes {absent} (the EMA teacher and the checkpoint read "
                           "each rank's shard through them)")
        from .zero3_traces import required_attributes

        absent = required_attributes(engine)
        if absent:
            missing.append(f"ZeRO-3 coordinator attributes {absent} (zero3_traces.TracePerKind builds one "
                           "prefetch coordinator per kind of step with the engine's settings)")
    if zero_stage in (1, 2):
        param = next((p for p in engine.module.parameters() if p.requires_grad), None)
        if param is not None and not hasattr(param, "_hp_mapping"):
            missing.append("ZeRO-1/2 parameter attribute _hp_mapping (reshard writes each rank's fragment of a "
                           "resumed checkpoint through it)")
    return missing


def check_engine(engine, zero_stage: int) -> None:
    """Raise DeepSpeedCompatError if the engine lacks a hook megavl uses at this ZeRO stage."""
    missing = missing_engine_hooks(engine, zero_stage)
    if missing:
        _fail(missing)


def require_shm_op_hook():
    """The module whose `build_shm_op` megavl replaces under gloo; raises if it is not there."""
    # import_module: `deepspeed.comm.torch` as an attribute is the torch package, not this module.
    comm_torch = importlib.import_module("deepspeed.comm.torch")
    if not callable(getattr(comm_torch, "build_shm_op", None)):
        _fail(["deepspeed.comm.torch.build_shm_op (launch._skip_shm_op_build replaces it so a CPU run does "
               "not JIT-compile a shared-memory op gloo never uses)"])
    return comm_torch
