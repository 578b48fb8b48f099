"""The fine-tuning tasks' training order (data/task_data.py): a function of (seed, epoch, global
position) alone, each rank taking its rows of every global batch, so a resume on another world size
or micro-batch with the same global batch reads the same samples; and their DataLoader workers
ignore the stop signals as pre-training's do."""
from __future__ import annotations

import itertools
import signal

import torch

from megavl.data.task_data import TaskCollator, TaskDataset, TaskLoader, TaskTrainStream

NUM_ITEMS = 23


class _Indices:
    """A collator that keeps the item indices and what the worker saw of the stop signals."""

    def __call__(self, items: list[dict]) -> dict:
        return {"index": torch.tensor([it["index"] for it in items]), "skipped": [],
                "ignores_stop": torch.tensor([it["ignores_stop"] for it in items])}


def _fields(item):
    ignored = all(signal.getsignal(s) == signal.SIG_IGN for s in (signal.SIGTERM, signal.SIGUSR1))
    return [], {"ignores_stop": int(ignored)}


def _stream(rank: int, world: int, batch: int, global_batch: int = 8, workers: int = 0) -> TaskTrainStream:
    dataset = TaskDataset(list(range(NUM_ITEMS)), _fields)
    return TaskTrainStream(TaskLoader(dataset, _Indices(), batch_size=batch, rank=rank, world=world, train=True,
                                      seed=3, num_workers=workers, global_batch_size=global_batch))


def _steps(world: int, batch: int, accum: int, steps: int, state: dict | None = None) -> list[list[int]]:
    """Per optimizer step, the global batch's indices in rank order (each rank's micro-batches)."""
    streams = [_stream(r, world, batch) for r in range(world)]
    if state is not None:
        for s in streams:
            s.load_state_dict(state)
    iters = [iter(s) for s in streams]
    out = []
    for _ in range(steps):
        rows = []
        for _ in range(accum):
            rows += [i for it in iters for i in next(it)["index"].tolist()]
        out.append(sorted(rows))
    return out


def test_each_optimizer_step_reads_the_same_samples_at_any_world_size():
    reference = _steps(2, 4, 1, 7)  # 2 epochs of 2 steps (23 items -> 16 per epoch) and more
    assert _steps(1, 8, 1, 7) == reference
    assert _steps(1, 4, 2, 7) == reference  # the same global batch by accumulation
    assert _steps(4, 2, 1, 7) == reference
    epoch = [i for step in reference[:2] for i in step]
    assert len(set(epoch)) == 16 and reference[2] != reference[0]  # an epoch, then a new order


def test_a_resume_on_another_world_continues_at_the_global_position():
    two = [_stream(r, 2, 4) for r in range(2)]
    iters = [iter(s) for s in two]
    for _ in range(3):
        for it in iters:
            next(it)
    state = two[0].state_dict()
    assert state == two[1].state_dict()  # world-independent: the same on every rank
    assert (state["epoch"], state["position"]) == (1, 8)  # 2 steps per epoch of 16, then one more
    assert _steps(1, 8, 1, 3, state) == _steps(2, 4, 1, 6)[3:6]
    # the per-rank state older checkpoints saved: (epoch, batch) of a known world and micro-batch
    legacy = _stream(0, 2, 4)
    legacy.load_state_dict({"epoch": 1, "batch": 1, "world_size": 2})
    assert legacy.state_dict()["position"] == 8


def test_task_loader_workers_ignore_stop_signals():
    """Slurm signals every process of a job step; the trainer decides to checkpoint and stop."""
    stream = _stream(0, 1, 8, workers=1)
    batches = list(itertools.islice(iter(stream), 2))
    assert all(int(b["ignores_stop"].min()) == 1 for b in batches)
