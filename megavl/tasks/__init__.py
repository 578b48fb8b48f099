"""What a run optimises, one file per task (engine -> tasks -> objectives, models, data).

`TASKS` maps `task.name` to the task's `build(cfg, env) -> Task` (task.py documents the interface
the engine drives). Adding a task is one new file here with a `build` function, one line below
and a recipe under configs/.

Beside the tasks: `base.py` what the fine-tuning tasks share (initial weights, loaders, pooled
pairs); `metrics.py` the metric functions; `retrieval_eval.py` the sharded, batched ITC + ITM
retrieval scoring that pre-training's evaluation (`pretrain_eval.py`) and the retrieval task share;
`curriculum.py`, `pretrain_flops.py`, `pretrain_visuals.py` pre-training's mode schedule, step
FLOPs and mask pictures.
"""
from megavl.tasks import nlvr2, pretrain, retrieval, vqa

TASKS = {"pretrain": pretrain.build, "retrieval": retrieval.build, "vqa": vqa.build, "nlvr2": nlvr2.build}

__all__ = ["TASKS"]
