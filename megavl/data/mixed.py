"""Mixed image + video training: one stream per modality, one modality per optimizer step.

`MixedTrainLoader` holds a TrainLoader per modality (each its own global order over its sources,
epochs and position; loader.py) and a ModalitySchedule (modality.py). Micro-batch m of the run
belongs to optimizer step s = m // grad_accum and comes from the stream of `schedule.at(s)`, so all
micro-steps of a step, and all ranks, read the same modality, and each stream advances only on its
own steps. Nothing depends on the world size: stream k's consumed samples after step s are
(its steps among [0, s)) x global_batch_size, on any world.

State (`state_dict`):
  step               optimizer steps done (grad_accum may change on resume; the global batch not)
  modality_schedule  video_share, modality_block, seed: must match on resume
  streams            {modality: TrainLoader.state_dict()}: each stream's epoch and position
On load every stream's consumed samples are checked against the schedule's count for the step.
"""
from __future__ import annotations

import logging

from megavl.data.batch import PretrainBatch
from megavl.data.fingerprint import check_data_resume
from megavl.data.loader import TrainLoader
from megavl.data.modality import ModalitySchedule
from megavl.errors import DataResumeError

logger = logging.getLogger(__name__)


class MixedTrainLoader:
    """Endless iterator over this rank's batches, one modality per optimizer step (see above)."""

    def __init__(self, streams: dict[str, TrainLoader], schedule: ModalitySchedule,
                 global_batch_size: int):
        micro = {s.plan.micro_global_batch for s in streams.values()}
        if len(micro) != 1:
            raise ValueError(f"streams with different micro global batches {sorted(micro)}")
        self.streams, self.schedule = streams, schedule
        self.global_batch_size = global_batch_size
        self.grad_accum = global_batch_size // micro.pop()
        self.micro_batches = 0  # handed out since step 0 (all modalities)

    @property
    def step(self) -> int:
        """The optimizer step the next batch belongs to."""
        return self.micro_batches // self.grad_accum

    @property
    def epoch(self) -> int:
        """Epoch of the stream that the next step reads (what the curriculum's epoch_modes see)."""
        return self.streams[self.schedule.at(self.step)].epoch

    def modality_at(self, step: int) -> str:
        return self.schedule.at(step)

    @property
    def modalities(self) -> tuple[str, ...]:
        """What the run's batches hold: both modalities, in MODALITIES order."""
        return tuple(self.streams)

    def samples_consumed(self) -> dict[str, int]:
        """Global samples (all ranks, all epochs) handed out so far, by modality."""
        return {kind: stream.samples_consumed()[kind] for kind, stream in self.streams.items()}

    def __iter__(self) -> "MixedTrainLoader":
        return self

    def __next__(self) -> PretrainBatch:
        batch = next(self.streams[self.schedule.at(self.step)])
        self.micro_batches += 1
        return batch

    def state_dict(self) -> dict:
        if self.micro_batches % self.grad_accum:
            raise RuntimeError(f"data state asked for in the middle of step {self.step} (micro-batch "
                               f"{self.micro_batches % self.grad_accum} of {self.grad_accum})")
        return {"step": self.step, "modality_schedule": self.schedule.settings(),
                "streams": {kind: stream.state_dict() for kind, stream in self.streams.items()}}

    def load_state_dict(self, state: dict, data_resume: str = "exact") -> None:
        """Continue both streams at their saved positions (any world size / micro-batch / workers).
        `data_resume="approx"`: changed data continues each stream at its global sample count
        (loader.py); a video share that moved with the data (data.video_share auto) is taken as it
        is now, so the streams' counts no longer follow the schedule's past steps."""
        check_data_resume(data_resume)
        if "streams" not in state:
            raise DataResumeError("the data state was saved by a single-modality run (one position), "
                                  "but the train sources now mix images and videos: the sample order "
                                  "cannot be continued; start a fresh run (--fresh) for the mixed recipe")
        if sorted(state["streams"]) != sorted(self.streams):
            raise DataResumeError(f"the data state holds streams {sorted(state['streams'])}, the train "
                                  f"sources give {sorted(self.streams)}")
        saved, now = state["modality_schedule"], self.schedule.settings()
        share_moved = data_resume == "approx" and {**saved, "video_share": now["video_share"]} == now
        if saved != now and not share_moved:
            raise DataResumeError(f"cannot resume the data stream exactly, the modality schedule "
                                  f"changed: saved {saved}, now {now}")
        step = int(state["step"])
        for kind, stream in self.streams.items():
            stream.load_state_dict(state["streams"][kind], data_resume)
        expected = {k: n * self.global_batch_size for k, n in self.schedule.steps_before(step).items()}
        got = self.samples_consumed()
        if saved != now:
            logger.warning("--data-resume approx: data.video_share %s -> %s; the streams continue at "
                           "%s samples", saved["video_share"], now["video_share"], got)
        elif any(got[k] != expected[k] for k in got):
            raise DataResumeError(f"data state inconsistent at step {step}: streams consumed {got} "
                                  f"samples, the modality schedule says {expected}")
        self.micro_batches = step * self.grad_accum

    def skip_counts(self) -> dict[str, int]:
        """Samples skipped so far on this rank, by reason, over both streams."""
        per_stream = [s.skip_counts() for s in self.streams.values()]
        return {reason: sum(c[reason] for c in per_stream) for reason in per_stream[0]}

    def close(self) -> None:
        for stream in self.streams.values():
            stream.close()
