"""One ZeRO-3 prefetch trace per kind of step.

ZeRO-3 gathers a module's parameters just before it runs. Its coordinator records the order in which
one forward + backward used the modules, then replays it: it prefetches the next modules' parameters
and keeps a parameter gathered while it will be reused soon (the text encoder serves ITC, ITM and
MLM in one step). A step that runs the modules in another order (SemVLP's single- vs two-stream
fusion, an image vs a video step, an evaluation) throws the recording away, and the next step
records again with neither prefetch nor reuse. With the curriculum alternating every step no step
ever replays, and every reuse gathers again.

`TracePerKind.use(kind)` before a step's first forward gives each kind of step a coordinator of its
own, so each replays its own order. The switch is safe between optimizer steps: ZeRO-3's optimizer
step releases every gathered parameter (`partition_all_parameters`), whichever coordinator gathered it.
"""
from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_PRIVATE = "_PartitionedParameterCoordinator__"
# the coordinator's constructor arguments, as it stores them
_STORED_ARGS = {
    "prefetch_bucket_sz": "prefetch_bucket_sz",
    "max_reuse_distance_in_numel": "max_reuse_dist_in_numel",
    "max_available_parameters_in_numel": "max_n_available_params",
    "allgather_stream": "allgather_stream",
    "inflight_param_registry": "inflight_param_registry",
    "prefetch_nvme": "prefetch_nvme",
    "log_trace_cache_warnings": "log_trace_cache_warnings",
}
_PUBLIC_ARGS = ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "fast_sharding_for_leaf_module")


def _offload(engine):
    """ZeRO-3's parameter offload object (it owns the coordinator), or None below stage 3."""
    optimizer = getattr(engine, "optimizer", None)
    return getattr(optimizer, "parameter_offload", None)


def _sibling(coordinator, timers):
    """A fresh coordinator built with `coordinator`'s settings, sharing its gather stream and its
    registry of in-flight gathers (one per module, as DeepSpeed keeps it)."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    kwargs = {arg: getattr(coordinator, _PRIVATE + stored) for arg, stored in _STORED_ARGS.items()}
    kwargs.update({arg: getattr(coordinator, arg) for arg in _PUBLIC_ARGS})
    return PartitionedParameterCoordinator(timers=timers, **kwargs)


def required_attributes(engine) -> list[str]:
    """The private attributes `TracePerKind` reads that this DeepSpeed's ZeRO-3 engine lacks
    (ds_compat.py checks them at start-up)."""
    offload = _offload(engine)
    if offload is None:
        return []
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is None:
        return ["parameter_offload.param_coordinator"]
    missing = [f"coordinator.{_PRIVATE}{s}" for s in _STORED_ARGS.values() if not hasattr(coordinator, _PRIVATE + s)]
    missing += [f"coordinator.{a}" for a in _PUBLIC_ARGS if not hasattr(coordinator, a)]
    return missing + ([] if hasattr(offload, "timers") else ["parameter_offload.timers"])


class TracePerKind:
    """Switches a ZeRO-3 engine's parameter coordinator by the kind of the coming step; a no-op
    below stage 3."""

    def __init__(self, engine) -> None:
        self._offload = _offload(engine)
        self._by_kind: dict[str, object] = {}
        self._current: str | None = None

    @property
    def kinds(self) -> list[str]:
        return list(self._by_kind)

    def use(self, kind: str) -> None:
        """Call between optimizer steps (or before an evaluation), never inside a step."""
        if self._offload is None or kind == self._current:
            return
        if kind not in self._by_kind:
            if not self._by_kind:  # the engine's own coordinator serves the first kind
                self._by_kind[kind] = self._offload.param_coordinator
            else:
                self._by_kind[kind] = _sibling(self._offload.param_coordinator, self._offload.timers)
                log.debug("ZeRO-3: a prefetch trace of its own for %r steps", kind)
        self._offload.param_coordinator = self._by_kind[kind]
        self._current = kind
