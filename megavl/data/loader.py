"""The pre-training loaders: this rank's batches out of DataLoader workers, with a resumable state.
build.py builds them from the data config.

Train: `TrainLoader` is an endless iterator of this rank's batches (collate.py) that advances epochs
itself. The sample stream is a function of (seed, epoch, ONE global position) only (order.py): the
micro-step's global batch k is positions [k*G, (k+1)*G), G = batch_size * world_size, rank r takes
the contiguous rows [r*B, (r+1)*B). The epoch is cut to a multiple of the optimizer-step global
batch (`global_batch_size`), so its length and every rank's batch count are the same at any world.

State (`state_dict`), identical on every rank except the skip counts:
  epoch, position   global samples consumed in the epoch (a multiple of the micro global batch)
  seed, global_batch_size, shuffle_buffer, resampled
                    what fixes the order: must match on resume, else a clear error
  samples_per_epoch, sources, order_digest, order
                    the data (fingerprint.py: shards by name relative to their source's directory,
                    sample counts, weights, quotas) and the version of order.py's algorithm: must
                    match on an exact resume (the default; the shards may have moved);
                    `data_resume="approx"` continues a changed data set or order at the same global
                    sample count and logs what changed
  world_size, batch_size, num_workers
                    informative only: a resume may change them (the same global batch kept)
  counts            skip counts of the saving rank (logging only; restored on rank 0 only, so
                    the all-rank sum the trainer logs is not multiplied by the world; a saver
                    may store the all-rank sum here instead)
A resumed run on any world / micro-batch / workers continues at the same global position and reads
exactly the samples the uninterrupted run would have, in the same order, with the same crops/masks.

Image AND video sources: `MixedTrainLoader` (mixed.py), one TrainLoader as above per modality and a
per-optimizer-step modality schedule (modality.py); its state holds each stream's state.

Eval: every val sample is seen once across ranks (contiguous shares); shares and hence batch
counts may differ by one sample between ranks, so gather variable-length features or run eval on
rank 0 with world_size=1 (what the trainer does by default is its choice).
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import signal
from collections import Counter
from multiprocessing import forkserver, resource_tracker
from typing import Iterator

import torch
from torch.utils.data import DataLoader

from megavl.data.batch import PretrainBatch
from megavl.data.collate import Collator
from megavl.data.fingerprint import check_data_resume, data_changes, describe_sources, order_digest
from megavl.data.order import ORDER_VERSION
from megavl.data.skips import REPEATED, SKIP_REASONS
from megavl.data.stream import EvalPlan, EvalStream, TrainPlan, TrainStream
from megavl.errors import DataError, DataResumeError

# Forked workers + the Rust tokenizer's thread pool can deadlock; our workers tokenise serially.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

logger = logging.getLogger(__name__)

_STATE_CHECKED = ("seed", "global_batch_size", "shuffle_buffer", "resampled")  # + the data: fingerprint.py


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # the trainer's (engine/stop.py)


def _ignore_stop_signals(worker_id: int) -> None:
    """Slurm signals every process of a job step; the trainer (not its data workers) decides to
    checkpoint and stop, and a worker killed by SIGTERM mid-fetch would fail the step before the save.
    The worker started with the signals blocked (start_workers): one that came meanwhile is dropped."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_workers(loader: DataLoader) -> Iterator:
    """`iter(loader)`, with its workers, and the helper processes of spawn and forkserver
    (start_worker_helpers), started with the stop signals blocked: a spawned worker imports for
    seconds before _ignore_stop_signals runs, a helper never runs it, and the signal's default action
    would kill them. A blocked mask survives fork and exec. A signal that reaches this process
    meanwhile is handled afterwards."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        if loader.num_workers > 0:
            _start_helpers(loader.multiprocessing_context)
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def start_worker_helpers() -> None:
    """Start the helpers of the process's start method now, with the stop signals blocked: under
    spawn and forkserver, multiprocessing's resource tracker, and the fork server that forks every
    forkserver worker (nothing under fork; nothing that already runs). Call it before anything else
    can start them: the first multiprocessing lock of the process (tqdm makes one) starts the
    tracker, with the signals' default action."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        _start_helpers(None)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def _start_helpers(context) -> None:
    method = context.get_start_method() if context is not None else multiprocessing.get_start_method()
    if method == "fork":
        return
    resource_tracker.ensure_running()
    # The stdlib unblocks SIGTERM once its tracker has started: block it again before the rest starts.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    if method == "forkserver":
        forkserver.ensure_running()


def _make_loader(dataset, num_workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=None, num_workers=num_workers,
                      worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
                      pin_memory=torch.cuda.is_available(),
                      prefetch_factor=2 if num_workers > 0 else None)


def _next_batch(iterator: Iterator[dict]) -> dict:
    """next(iterator), where a DataError raised in a worker (a shard that disagrees with its stats)
    keeps its own one-line message: DataLoader re-raises it with the worker's traceback as text,
    and train.py prints the message as the run's one line."""
    try:
        return next(iterator)
    except DataError as err:
        prefix = f"{DataError.__module__}.{DataError.__name__}: "
        lines = [line for line in str(err).splitlines() if line.startswith(prefix)]
        if not lines:
            raise
        raise DataError(lines[-1][len(prefix):]) from None


def _sum_counts(base: Counter, per_worker: dict[int, dict]) -> Counter:
    total = Counter(base)
    for counts in per_worker.values():
        total.update(counts)
    return total


class TrainLoader:
    """Endless iterator over this rank's training batches; see the module docstring."""

    def __init__(self, plan: TrainPlan, collator: Collator, num_workers: int, global_batch_size: int,
                 sizing_counts: Counter | None = None):
        self.plan, self.collator, self.num_workers = plan, collator, num_workers
        self.global_batch_size = global_batch_size
        self.data_sources = describe_sources(plan.sources, plan.quotas)  # what the order reads
        self.epoch = 0
        self.batches_in_epoch = 0
        self.batches_per_epoch = plan.batches_per_epoch  # the same on every rank
        # shards found truncated while counting their samples (no stats.json), counted once
        self._base_counts: Counter = Counter(sizing_counts or {})
        self._worker_counts: dict[int, dict] = {}
        self._iterator: Iterator[dict] | None = None

    @property
    def position(self) -> int:
        """Global samples of the epoch consumed (by all ranks together) before the next batch."""
        return self.batches_in_epoch * self.plan.micro_global_batch

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the run's batches hold: this loader's one modality."""
        return (self.plan.modality,)

    def modality_at(self, step: int) -> str:
        """What optimizer step `step` reads: this loader's one modality."""
        return self.plan.modality

    def samples_consumed(self) -> dict[str, int]:
        """Global samples (all ranks, all epochs) handed out so far, by modality."""
        return {self.plan.modality: self.epoch * self.plan.epoch_length + self.position}

    def __iter__(self) -> "TrainLoader":
        return self

    def __next__(self) -> PretrainBatch:
        expected = self.epoch * self.batches_per_epoch + self.batches_in_epoch
        if self._iterator is None:
            stream = TrainStream(self.plan, self.collator, expected)
            self._iterator = start_workers(_make_loader(stream, self.num_workers))
        batch = _next_batch(self._iterator)
        meta = batch.pop("_meta")
        if meta["batch"] != expected:
            raise RuntimeError(f"rank batch {meta['batch']} arrived, expected {expected}: "
                               f"worker order broke")
        self._worker_counts[meta["worker"]] = meta["counts"]
        self.batches_in_epoch += 1
        if self.batches_in_epoch == self.batches_per_epoch:
            self.epoch, self.batches_in_epoch = self.epoch + 1, 0
        return batch

    def _settings(self) -> dict:
        return {"seed": self.plan.seed, "samples_per_epoch": self.plan.epoch_length,
                "global_batch_size": self.global_batch_size,
                "shuffle_buffer": self.plan.shuffle_buffer, "resampled": self.plan.resampled,
                "sources": self.data_sources, "order_digest": order_digest(self.data_sources),
                "order": ORDER_VERSION}

    def state_dict(self) -> dict:
        """Global position after the last batch handed out, what fixes the order, skip counts."""
        counts = _sum_counts(self._base_counts, self._worker_counts)
        return {"epoch": self.epoch, "position": self.position, **self._settings(),
                "world_size": self.plan.world_size, "batch_size": self.plan.batch_size,
                "num_workers": self.num_workers, "counts": dict(counts)}

    def load_state_dict(self, state: dict, data_resume: str = "exact") -> None:
        """Continue at a saved global position. What fixes the order must be unchanged; the world
        size, micro-batch and workers may differ, and the shards may lie elsewhere.
        `data_resume="approx"`: a changed data set (shards added, removed or resized, weights,
        epoch length) continues at the same global sample count, with a warning naming the changes."""
        check_data_resume(data_resume)
        if "streams" in state:
            raise DataResumeError("the data state was saved by a mixed image+video run (one position "
                                  "per modality), but the train sources are now of one modality: the "
                                  "sample order cannot be continued")
        if "position" not in state:
            raise DataResumeError("the data state has no global 'position' (saved by a loader whose "
                                  "order depended on the world size): it cannot be continued exactly; "
                                  "start a fresh run or resume without the data state")
        settings = self._settings()
        wrong = [f"{k}: saved {state.get(k)!r}, now {settings[k]!r}"
                 for k in _STATE_CHECKED if state.get(k) != settings[k]]
        changes = data_changes(state, self.plan.sources, self.plan.quotas, self.plan.epoch_length)
        if state.get("order") != ORDER_VERSION:  # the same data in another order (order.py's algorithm)
            changes.append(f"order: saved {state.get('order')!r}, now {ORDER_VERSION!r} (order.py's algorithm)")
        if wrong or (changes and data_resume == "exact"):
            hint = ("" if wrong else " (--data-resume approx continues the changed data at the same "
                    "global sample count)")
            raise DataResumeError(f"cannot resume the {self.plan.modality} data stream exactly, what "
                                  f"fixes the sample order changed: " + "; ".join(wrong + changes) + hint)
        epoch, position = int(state["epoch"]), int(state["position"])
        if changes:
            consumed = epoch * int(state["samples_per_epoch"]) + position
            epoch, position = divmod(consumed, self.plan.epoch_length)
        if changes and self.plan.rank == 0:  # once per run, not once per rank
            logger.warning("--data-resume approx: the %s data changed since the checkpoint, so the "
                           "order from here is not the one the run had:\n  %s\ncontinuing at global "
                           "sample %d (saved: epoch %d position %d; now: epoch %d position %d of %d); "
                           "samples of the saved epoch not yet read are not guaranteed to be read, "
                           "and some already read may come again", self.plan.modality,
                           "\n  ".join(changes), consumed, int(state["epoch"]), int(state["position"]),
                           epoch, position, self.plan.epoch_length)
        micro = self.plan.micro_global_batch
        if not 0 <= position < self.plan.epoch_length or position % micro:
            raise DataResumeError(f"data position {position} is not a multiple of the micro-step "
                                  f"global batch {micro} (batch_size x world) inside the epoch's "
                                  f"{self.plan.epoch_length}: keep run.global_batch_size and resume "
                                  f"at an optimizer step")
        self.close()
        self.epoch, self.batches_in_epoch = epoch, position // micro
        # counts are logged as the sum over ranks: carry them on one rank only, so a resume does not
        # multiply them by the world (the saver may store the all-rank sum in state["counts"])
        self._base_counts = Counter(state.get("counts", {}) if self.plan.rank == 0 else {})
        self._worker_counts = {}

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason (every reason present, 0 if none)."""
        counts = _sum_counts(self._base_counts, self._worker_counts)
        return {reason: counts.get(reason, 0) for reason in SKIP_REASONS}

    def repeat_count(self) -> int:
        """Slots filled with a repeat of a good sample of the same share (bad or missing ones)."""
        return _sum_counts(self._base_counts, self._worker_counts).get(REPEATED, 0)

    def close(self) -> None:
        """Stop the worker processes (a later `next` restarts them at the current position)."""
        if self._iterator is not None:
            self._base_counts = _sum_counts(self._base_counts, self._worker_counts)
            self._worker_counts = {}
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None


class EvalLoader:
    """Iterable (re-iterable) over this rank's share of the val set; see the module docstring."""

    def __init__(self, plan: EvalPlan, collator: Collator, num_workers: int,
                 sizing_counts: Counter | None = None):
        self.plan, self.collator, self.num_workers = plan, collator, num_workers
        self.num_samples = plan.end - plan.begin  # before skips
        self._sizing_counts = Counter(sizing_counts or {})
        self._counts: Counter = Counter()

    def __iter__(self) -> Iterator[PretrainBatch]:
        per_worker: dict[int, dict] = {}
        try:
            workers = start_workers(_make_loader(EvalStream(self.plan, self.collator), self.num_workers))
            while True:
                try:
                    batch = _next_batch(workers)
                except StopIteration:
                    break
                meta = batch.pop("_meta")
                per_worker[meta["worker"]] = meta["counts"]
                yield batch
        finally:
            self._counts = _sum_counts(self._sizing_counts, per_worker)

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped in the last pass over the val set (+ truncation found while sizing)."""
        return {reason: self._counts.get(reason, 0) for reason in SKIP_REASONS}
