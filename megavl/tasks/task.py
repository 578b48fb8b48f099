"""What a task gives the engine: the one interface between `engine/trainer.py` and `tasks/`.

A task module (pretrain.py, retrieval.py, vqa.py, nlvr2.py) has a `build(cfg, env) -> Task`
function, registered in `tasks/__init__.py:TASKS` under its `task.name`. The engine calls it once
per run, after it has chosen the checkpoint to resume (`env.saved_state` is then that run's
`Task.extra_state`), and drives every task through the same loop:

    plan = task.before_step(step)                  # every rank; may update the module (teacher EMA)
    for each micro-batch:
        total, losses = module(batch, generator=g, **plan.forward_args)
        backward; optimizer step; task.after_optimizer_step()
    scalars = task.after_step(step)                # every rank (pre-training's teacher EMA)
    at log steps: loss/<name>, train/lr, train/grad_norm, perf/*, data/skipped/<reason>,
                  plan.log_scalars, scalars, task.log_scalars(plan, batch), MFU from task.step_flops
    task.visualize(...) every run.image_log_every steps
    every run.eval_every steps and at the end: task.evaluate("val") (best/ by task.best_metric);
    at the end task.evaluate("test") and task.write_results("test", dir)

Every hook that touches the module or reduces over ranks is a collective: every rank calls it at
the same step, in the same order, and nothing in it may depend on the rank's data.

The contract of each field:
  module          torch.nn.Module; forward(batch, generator=None, **forward_args) -> (total loss,
                  {name: detached loss}); `module.student` is the VLPModel that exports hold.
  params          what the optimizer trains (TrainedParameters); the engine groups it into AdamW
                  groups (engine/optim.py: no decay for biases/norms/embeddings, lr multipliers).
  train_loader    an endless iterator of this rank's host batches (dicts of CPU tensors), with
                  state_dict() / load_state_dict(state): the position in a sample order that is a
                  function of (seed, epoch, global position) only, so a resume on another world size
                  with the same global batch reads the same samples; data_resume="approx"
                  continues changed data at the same global sample count; skip_counts() -> {reason: n}.
  evaluate        evaluate(split) -> {metric: float} for split "val" | "test"; a collective returning
                  the same dict on every rank. None: the task has no evaluation.
  has_val, has_test  whether the "val" / "test" splits exist for this run.
  best_metric     the metric of "val" whose maximum is exported to <output_dir>/best (None: no best/).
  report          report(split, metrics, when) -> (TensorBoard scalars, console line), when = "start"
                  (evaluate_first) | "during" | "end"; None: every metric as <split>/<name> and one
                  line naming the task.
  write_results   write_results(split, out_dir) -> paths of the task's result files (rank 0 writes).
  extra_state     JSON-able state saved with every checkpoint and export (VQA: the answer list);
                  `build` receives it back as env.saved_state on a resume.
  training_only   state-dict name prefixes that only training needs (teacher, queues): kept out of
                  best/ exports.
  load_weights    load_weights(state, source_model_cfg, source_name): start from pre-trained
                  weights (task.init_from); the engine reads them, the task places them.
  before_step     before_step(step) -> StepPlan, step 0-based (curriculum mode, retrieval's teacher
                  EMA and distillation alpha).
  after_optimizer_step  after each optimizer step (DeepSpeed's engine.step()): keep constrained
                  parameters inside their bounds in the optimizer's fp32 master (the ITC temperature).
  after_step      after_step(step) -> scalars logged at the next log step (pre-training's teacher EMA).
  log_scalars     log_scalars(plan, last batch) -> extra scalars at log steps (temperature, samples).
  step_flops      step_flops(plan, last batch, global batch size) -> model FLOPs of one optimizer
                  step over all ranks, for perf/tflops and perf/mfu; None: not reported.
  visualize       visualize(step, plan, last batch, monitor), every run.image_log_every steps (a
                  collective under ZeRO-3; only rank 0's monitor writes).
  evaluate_first  evaluate "val" once before a new run's first step (pre-training's "before" figure).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol

import torch


class TrainBatches(Protocol):
    """What the engine needs of a task's training loader."""

    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict, data_resume: str = "exact") -> None: ...

    def skip_counts(self) -> dict[str, int]: ...


@dataclass
class TrainedParameters:
    """The parameters an optimizer trains, by the names DeepSpeed checkpoints them under."""

    named: list[tuple[str, torch.nn.Parameter]]
    no_decay: set[str]          # names without weight decay, beside every parameter of ndim <= 1
    fast: tuple[str, ...]       # name prefixes trained at optim.fusion_lr_mult (fusion and heads)
    # name -> (tower, layer id, layers in the tower) for optim.layer_decay (VLPModel.lr_layers);
    # names not in it train above every layer (scale 1)
    layers: dict[str, tuple[str, int, int]] = field(default_factory=dict)


@dataclass
class StepPlan:
    """What one optimizer step runs, fixed before its first micro-batch."""

    forward_args: dict[str, Any] = field(default_factory=dict)   # extra module.forward keywords
    every_step_scalars: dict[str, float] = field(default_factory=dict)  # logged at every step
    log_scalars: dict[str, float] = field(default_factory=dict)  # logged at log steps
    progress: dict[str, float] = field(default_factory=dict)     # beside the loss on the progress bar
    info: dict[str, Any] = field(default_factory=dict)            # for the task's own later hooks
    # steps that run the modules in the same order share a kind: each kind keeps its own ZeRO-3
    # prefetch trace (engine/zero3_traces.py)
    trace_kind: str = "train"


@dataclass
class TaskEnv:
    """What `build` may use beside the config."""

    device: torch.device
    dtype: torch.dtype          # compute dtype (bf16 or fp32)
    rank: int
    world_size: int
    saved_state: dict           # the resumed checkpoint's Task.extra_state, {} for a new run


@dataclass
class Task:
    """See the module docstring for every field's contract."""

    name: str
    module: torch.nn.Module
    params: TrainedParameters
    train_loader: TrainBatches
    load_weights: Callable[[dict, Any, str], None]
    evaluate: Callable[[str], dict] | None = None
    has_val: bool = False
    has_test: bool = False
    best_metric: str | None = None
    report: Callable[[str, dict, str], tuple[dict, str]] | None = None
    write_results: Callable[[str, str], list[str]] | None = None
    extra_state: dict = field(default_factory=dict)
    training_only: tuple[str, ...] = ()
    before_step: Callable[[int], StepPlan] | None = None
    after_optimizer_step: Callable[[], None] | None = None
    after_step: Callable[[int], dict] | None = None
    log_scalars: Callable[[StepPlan, dict], dict] | None = None
    step_flops: Callable[[StepPlan, dict, int], float] | None = None
    visualize: Callable[[int, StepPlan, dict, Any], None] | None = None
    evaluate_first: bool = False
