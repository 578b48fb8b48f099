"""What a run optimises, one file per task (engine -> tasks -> objectives, models, data).

`TASKS` maps `task.name` to the module whose `build(cfg, env) -> Task` makes the task (task.py
documents the interface the engine drives); `task_builder(name)` imports it. Names, not modules:
the config checks `task.name` against this registry without importing torch and every task.
Adding a task is one new file here with a `build` function, one line below and a recipe under
configs/.

Beside the tasks: `base.py` what the fine-tuning tasks share (initial weights, loaders, pooled
pairs); `metrics.py` the metric functions; `retrieval_eval.py` the sharded, batched ITC + ITM
retrieval scoring that pre-training's evaluation (`pretrain_eval.py`) and the retrieval task share;
`curriculum.py`, `pretrain_flops.py`, `pretrain_visuals.py` pre-training's mode schedule, step
FLOPs and mask pictures.
"""
from __future__ import annotations

import importlib
from typing import Callable

TASKS = {"pretrain": "megavl.tasks.pretrain", "retrieval": "megavl.tasks.retrieval",
         "vqa": "megavl.tasks.vqa", "nlvr2": "megavl.tasks.nlvr2"}


def task_builder(name: str) -> Callable:
    """The `build(cfg, env) -> Task` function of task `name` (a key of TASKS)."""
    return importlib.import_module(TASKS[name]).build


__all__ = ["TASKS", "task_builder"]
