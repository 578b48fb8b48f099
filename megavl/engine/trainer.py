"""The one training loop, for every task: build, resume, step, log, evaluate, checkpoint, stop cleanly
on a signal, keep the best weights.

What a run optimises comes from `megavl.tasks.task_builder(cfg.task.name)` as a `Task` (tasks/task.py
documents the interface: module, trained parameters, train loader, per-step hooks, evaluation,
best-checkpoint rule). This file knows no task by name.

Every rank runs the same sequence of collectives (forward passes under ZeRO-3, metric reductions,
evaluation, checkpoints, best/ exports) at the same steps; decisions that could differ between ranks
are taken by rank 0 and broadcast (which checkpoint to resume) or agreed by an all-reduce (a signal
that reached one rank only).

Resume: on any world size and ZeRO stage (engine/reshard.py) with the same global batch; the data
continues at its global position (each task's loader state is world-independent), the schedule is
the recipe's at the resumed step. A resumed run, or one started from task.init_from, builds its
model without the init files (model.vision.init, model.text.hf_path): its weights come from the
checkpoint or the export.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import yaml

from megavl.config import Config, to_dict
from megavl.models.pretrained import without_init_files
from megavl.tasks import task_builder
from megavl.tasks.task import StepPlan, Task, TaskEnv

from . import checkpoint, checkpoint_save, lineage, reshard, trust
from .best import export_best
from .ds_config import resolve_precision
from .launch import DistInfo, init_distributed
from .layer_decay import regrouped_since
from .metrics import DevicePeak, Monitor, StepTimer, device_peak, mfu, peak_memory_gb
from .optim import predates_temporal_group
from .step import (clear_zero3_grad_partitions, deepspeed_engine, mean_over_ranks, share_cpu_threads, step_generator,
                   sum_skips, to_device, zero_fill_unused_grads)
from .stop import StopFlag
from .task_init import config_for_weights, read_init
from .zero3_traces import TracePerKind
from .unused import UnusedParameters

log = logging.getLogger("megavl")


class Trainer:
    def __init__(self, cfg: Config, ds_config_path: str, resume: str = "auto", stop: StopFlag | None = None,
                 fresh: bool = False, task_state: dict | None = None, weights_only: bool = False,
                 trust_checkpoint: bool = False, data_resume: str = "exact") -> None:
        """task_state: the Task.extra_state of weights loaded from elsewhere (megavl-evaluate);
        by default a resumed checkpoint's, or none. weights_only: a checkpoint given as `resume`
        gives its weights only (evaluation), not its data position or schedule, so another batch
        size or world size than its training run's is fine. trust_checkpoint: --trust-checkpoint,
        a checkpoint outside this run's checkpoints directory may be unpickled (engine/trust.py).
        data_resume: exact | approx, how the train loader continues its saved position (approx: in
        changed data, by global sample count)."""
        self.cfg = cfg
        self.trust_checkpoint = trust_checkpoint
        self.data_resume = data_resume
        self.weights_only = weights_only
        self.dist: DistInfo = init_distributed()
        self.device = self.dist.device
        share_cpu_threads(self.device)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
        self.output_dir = Path(cfg.run.output_dir)
        self.ckpt_dir = self.output_dir / "checkpoints"
        self.precision = resolve_precision(cfg, self.device)
        self.dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32

        choice = self._choose_checkpoint(resume, fresh)
        saved_state = task_state if task_state is not None else (choice or {}).get("meta", {}).get("task_state", {})
        build_cfg = cfg
        if choice is not None or cfg.task.init_from:  # the weights come from a checkpoint or an export
            # the text tower's fields as the weights were trained (the init files may be gone), and
            # a model built without reading those files
            cfg = self.cfg = config_for_weights(cfg, choice["tag_dir"] if choice else cfg.task.init_from)
            build_cfg = dataclasses.replace(cfg, model=without_init_files(cfg.model))
        self.task: Task = task_builder(cfg.task.name)(build_cfg, TaskEnv(self.device, self.dtype, self.dist.rank,
                                                                  self.dist.world_size, saved_state))
        if choice is None and cfg.task.init_from:  # a new run only: a resumed one has its checkpoint
            state, source_cfg = read_init(cfg.task.init_from, self.trust_checkpoint, self.ckpt_dir,
                                          self.output_dir / ".init_from")
            self.task.load_weights(state, source_cfg, f"task.init_from={cfg.task.init_from}")
            log.info("%s starts from %s", self.task.name, cfg.task.init_from)
        self.engine, self.scheduler, self.zero_stage = deepspeed_engine(
            self.task.module, self.task.params, cfg, ds_config_path, self.dist.world_size, self.device)
        self.module = self.engine.module
        self.traces = TracePerKind(self.engine)
        # optim.skip_unused: AdamW leaves what a step did not use untouched (engine/unused.py)
        self.unused = (UnusedParameters.for_engine(self.task.params.named, self.engine, self.zero_stage,
                                                   self.scheduler.optimizer) if cfg.optim.skip_unused else None)
        self._skipped_counts: dict[str, int] = {}  # kept as saved while optim.skip_unused is off
        self.loader = self.task.train_loader
        self.step = 0
        self.best: dict = {}
        self._grad_norm_fallback: float | None = None
        self._resume(choice, fresh)
        if self.dist.is_main and not weights_only:  # before the first step: a crash must not undo the choice
            lineage.write_line(self.ckpt_dir, self.line, choice["tag_dir"] if choice else None)
        self.stop = stop or StopFlag()
        self.monitor = Monitor(self.output_dir, self.dist.is_main, cfg.run.max_steps, self.step, self.task.name)
        self.peak = self._device_peak()
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))

    def _device_peak(self) -> DevicePeak | None:
        """The MFU denominator, on rank 0 (the one that logs); the other ranks wait at a barrier so a
        first run's matmul probe has the machine to itself."""
        if self.task.step_flops is None:
            return None
        peak = device_peak(self.device, self.dtype) if self.dist.is_main else None
        if self.dist.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()
        if peak is not None:
            log.info("perf/mfu is measured against %s: %.4g TFLOP/s per device", peak.detail, peak.flops / 1e12)
        return peak

    # ------------------------------------------------------------------------------ resume
    def _choose_checkpoint(self, resume: str, fresh: bool) -> dict | None:
        """The checkpoint to resume from ({"tag_dir", "meta", "line", "off_line"}, engine/lineage.py),
        or None for a new run. Rank 0 alone lists the directory, picks the tag and reads its
        meta.json (JSON only: a checkpoint this run did not write is refused here without
        --trust-checkpoint, before any pickle is opened); every rank gets its choice (or its error)."""
        if fresh and resume not in ("auto", "none"):
            raise checkpoint.CheckpointError(f"--fresh starts a new run; it cannot be combined with --resume {resume}")
        choice = None
        if self.dist.is_main and not fresh:
            choice = lineage.choose(self.ckpt_dir, resume)
            if isinstance(choice, dict) and not self.trust_checkpoint:
                untrusted = trust.refusal("", Path(choice["tag_dir"]), self.ckpt_dir)
                choice = {"untrusted": untrusted} if untrusted else choice
        choice = checkpoint.broadcast_from_rank0(choice)
        if isinstance(choice, dict) and "untrusted" in choice:
            raise trust.UntrustedCheckpoint(choice["untrusted"])
        if isinstance(choice, str):  # rank 0's error, raised on every rank alike
            raise checkpoint.CheckpointError(choice)
        return choice

    def _resume(self, choice: dict | None, fresh: bool) -> None:
        """Continue from the chosen checkpoint (any world size, any ZeRO stage), or start a new run."""
        self.line = checkpoint.broadcast_from_rank0(lineage.new_line() if self.dist.is_main else None)
        self.run_id = self.line["run_id"]
        # The recipe's (lr, weight decay) per group, read from the fresh optimizer before any load
        # (the groups cannot be rebuilt after ZeRO-3 has partitioned the parameters).
        self._recipe_groups = [(g["initial_lr"], g["weight_decay"]) for g in self.scheduler.optimizer.param_groups]
        if choice is None:
            if fresh:
                log.info("--fresh: new run %s at step 0; checkpoints already in %s are kept", self.run_id,
                         self.ckpt_dir)
            return
        tag_dir, meta = Path(choice["tag_dir"]), choice["meta"]
        old_world, old_stage = meta["world_size"], meta["zero_stage"]
        named = self.task.params.named
        if regrouped_since(meta.get("schedule", {}), self.cfg.optim):
            log.warning("%s was saved with other layer decays (optim.layer_decay / text_layer_decay): its "
                        "optimizer groups differ, loading it by name", tag_dir.name)
            reshard.load(self.engine, named, tag_dir, self.dist.rank, self.zero_stage)
        elif predates_temporal_group(meta.get("schedule", {}), self.module.student):
            # DeepSpeed pairs optimizer groups by position, which this split would misalign
            log.warning("%s predates the temporal embedding's own optimizer group: loading it by name; the "
                        "table trains at optim.temporal_lr_mult=%s from here", tag_dir.name, self.cfg.optim.temporal_lr_mult)
            reshard.load(self.engine, named, tag_dir, self.dist.rank, self.zero_stage)
        elif reshard.needs_reshard(tag_dir, old_world, old_stage, self.dist.world_size, self.zero_stage):
            log.info("resuming %s saved on %d ranks (ZeRO-%d) on %d ranks (ZeRO-%d): resharding", tag_dir.name,
                     old_world, old_stage, self.dist.world_size, self.zero_stage)
            reshard.load(self.engine, named, tag_dir, self.dist.rank, self.zero_stage)
        else:
            path, _ = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_module_strict=False,
                                                  load_optimizer_states=True, load_lr_scheduler_states=True)
            if path is None:
                raise checkpoint.CheckpointError(f"DeepSpeed could not load checkpoint {tag_dir}")
        checkpoint.load_module_state(self.module, tag_dir, self.dist.rank, old_world)
        if not checkpoint.load_rng(tag_dir, self.dist.rank):
            torch.manual_seed(self.cfg.run.seed + 1_000_003 * self.dist.rank + meta["step"])
        self.step = meta["step"]
        # The line this run saves on: the checkpoint's run id (it may prune its own older tags), or a
        # new one that branches off where --resume pointed (never touching the run's newer tags).
        self.line = choice["line"]
        self.run_id = self.line["run_id"]
        self.best = meta.get("best", {})
        self.engine.global_steps = self.step
        self.engine.global_samples = self.step * self.engine.train_batch_size()
        self._skipped_counts = meta.get("optim_skipped", {})  # absent: saved by a run that never skipped
        if self.unused is not None:
            self.unused.load_state_dict(self._skipped_counts)
        if self.weights_only:
            log.info("loaded the weights of %s (step %d)", tag_dir, self.step)
            return
        self._apply_schedule(meta.get("schedule", {}))
        checkpoint.load_data_state(self.loader, meta, self.data_resume, tag_dir.name)
        log.info("resumed from %s at step %d (%s)", tag_dir, self.step, lineage.describe(self.line))
        if choice["off_line"]:
            log.warning("newer checkpoints that this run does not continue (kept, never pruned by it): %s",
                        ", ".join(choice["off_line"]))

    def _schedule_settings(self) -> dict:
        o = self.cfg.optim
        return {"lr": o.lr, "warmup_steps": o.warmup_steps, "schedule": o.schedule, "min_lr_ratio": o.min_lr_ratio,
                "fusion_lr_mult": o.fusion_lr_mult, "temporal_lr_mult": o.temporal_lr_mult,
                "layer_decay": o.layer_decay, "text_layer_decay": o.text_layer_decay,
                "weight_decay": o.weight_decay, "max_steps": self.cfg.run.max_steps}

    def _apply_schedule(self, saved: dict) -> None:
        """The recipe's schedule at the resumed step, for every group: base lr x multiplier, weight
        decay, warm-up, decay over run.max_steps (the teacher momentum follows the same max_steps).

        DeepSpeed restores the old base rates (and ZeRO-3's universal path would copy group 0's to
        all); a changed optim.lr / warm-up / run.max_steps would then be half applied."""
        current = self._schedule_settings()
        changed = {k: (saved[k], v) for k, v in current.items() if k in saved and saved[k] != v}
        if changed:
            log.warning("schedule changed since the checkpoint, applying the new one from step %d: %s", self.step,
                        ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()))
        groups = self.scheduler.optimizer.param_groups  # the torch AdamW that DeepSpeed steps
        for group, (lr, weight_decay) in zip(groups, self._recipe_groups, strict=True):
            group["initial_lr"], group["weight_decay"] = lr, weight_decay
        self.scheduler.base_lrs = [lr for lr, _ in self._recipe_groups]
        self.scheduler.last_epoch = self.step - 1
        self.scheduler.step()  # last_epoch = step: each group's lr = base x lr_factor(step)

    def save(self) -> None:
        meta = {"data": self.loader.state_dict(), "schedule": self._schedule_settings(), "best": self.best,
                "task_state": self.task.extra_state, "lineage": self.line["lineage"],
                "optim_skipped": self.unused.state_dict() if self.unused is not None else self._skipped_counts}
        info = checkpoint_save.SaveInfo(run_id=self.run_id, world_size=self.dist.world_size, zero_stage=self.zero_stage,
                                   keep=self.cfg.run.keep_checkpoints,
                                   config_yaml=yaml.safe_dump(to_dict(self.cfg), sort_keys=False))
        checkpoint_save.save(self.engine, self.module, self.ckpt_dir, self.step, self.dist.rank, meta, info)

    # -------------------------------------------------------------------------------- eval
    def evaluate(self, split: str, when: str = "during") -> dict:
        """The task's metrics on `split`, logged (a collective); when: start | during | end."""
        self.traces.use("eval")
        metrics = self.task.evaluate(split)
        if self.task.report is not None:
            scalars, line = self.task.report(split, metrics, when)
        else:
            scalars = {f"{split}/{k}": v for k, v in metrics.items()}
            line = f"{self.task.name} {split} " + " ".join(f"{k} {v:.2f}" for k, v in metrics.items())
        self.monitor.scalars(self.step, scalars)
        self.monitor.message(f"step {self.step}: {line}")
        return metrics

    def _evaluate_val(self, when: str) -> dict:
        """Evaluate "val"; a new maximum of the task's best metric is exported to <output_dir>/best."""
        metrics = self.evaluate("val", when)
        key = self.task.best_metric
        if key is not None and key in metrics and metrics[key] > self.best.get(key, float("-inf")):
            self.best = {**metrics, "step": self.step}
            export_best(self.module, self.output_dir / "best", self.zero_stage, self.dist.is_main, to_dict(self.cfg),
                        self.task.extra_state, self.task.training_only)
        return metrics

    def final_evaluation(self) -> dict:
        out: dict = {}
        if self.task.has_val:
            out["val"] = self._evaluate_val("end")
            if self.task.best_metric is not None:
                out["best"] = self.best
        if self.task.has_test:
            out["test"] = self.evaluate("test", "end")
            if self.task.write_results:
                out["result_files"] = self.task.write_results("test", str(self.output_dir / "results"))
        if self.dist.is_main:
            (self.output_dir / "metrics.json").write_text(json.dumps(out, indent=2))
        return out

    # -------------------------------------------------------------------------------- loop
    def train(self) -> dict:
        run, task = self.cfg.run, self.task
        results: dict = {"start_step": self.step, "step_losses": {}}
        if task.evaluate_first and task.has_val and self.step == 0 and run.eval_every >= 0:
            results["eval_before"] = self.evaluate("val", "start")  # the "before" figure
        batches = iter(self.loader)
        timer = StepTimer(self.device)  # device time on CUDA: honest samples/s and MFU
        preempted = False
        while self.step < run.max_steps:
            plan = task.before_step(self.step) if task.before_step else StepPlan()
            losses_sum: dict[str, torch.Tensor] = {}
            self.traces.use(plan.trace_kind)
            timer.start_step()
            for micro in range(run.grad_accum):
                host_batch = timer.next_batch(batches)
                if run.log_sample_keys and "keys" in host_batch:
                    self._log_sample_keys(micro, plan, host_batch["keys"])
                batch = to_device(host_batch, self.device, self.dtype)
                generator = step_generator(run.seed, self.step, micro, self.device)
                total, losses = self.engine(batch, generator=generator, **plan.forward_args)
                self.engine.backward(total)
                last = micro == run.grad_accum - 1
                if last:
                    if self.unused is None:  # every stage alike: zero gradients, AdamW steps them
                        zero_fill_unused_grads(task.params, self.zero_stage)
                    if self._logs_at(self.step + 1):
                        self._grad_norm_fallback = self._plain_grad_norm()
                    if self.unused is not None:
                        self.unused.before_step(self.step)
                self.engine.step()
                if task.after_optimizer_step:  # e.g. the temperature bounds, in the fp32 master too
                    task.after_optimizer_step()
                if last:
                    clear_zero3_grad_partitions(self.engine, self.zero_stage)
                    if self.unused is not None:
                        self.unused.after_step()
                for name, value in {"total": total, **losses}.items():
                    losses_sum[name] = losses_sum.get(name, 0) + value.detach() / run.grad_accum
            step_scalars = task.after_step(self.step) if task.after_step else {}
            self.step += 1
            timer.step_done()
            self._log_step(plan, losses_sum, step_scalars, timer, batch, results)
            if task.visualize and run.image_log_every and self.step % run.image_log_every == 0:
                task.visualize(self.step, plan, batch, self.monitor)
            if task.has_val and run.eval_every > 0 and self.step % run.eval_every == 0 and self.step < run.max_steps:
                self._evaluate_val("during")
            stop = self.stop.agreed_at(self.step, run.stop_check_every, self.device)
            if stop or self.step % run.checkpoint_every == 0 or self.step == run.max_steps:
                self.save()
            if stop:
                self.monitor.message(f"stop signal: checkpoint saved at step {self.step}; exiting")
                preempted = results["preempted"] = True
                break
        if not preempted and run.eval_every >= 0:
            results.update(self.final_evaluation())
        results["end_step"] = self.step
        self.monitor.close()
        return results

    def _logs_at(self, step: int) -> bool:
        return step % self.cfg.run.log_every == 0 or step == self.cfg.run.max_steps

    def _plain_grad_norm(self) -> float | None:
        """DeepSpeed reports the global grad norm for ZeRO >= 1 and bf16; for fp32 ZeRO-0 it clips
        without keeping the norm, so compute it from the (already all-reduced) gradients."""
        if self.zero_stage != 0 or self.precision != "fp32":
            return None
        grads = [p.grad for _, p in self.task.params.named if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _log_sample_keys(self, micro: int, plan: StepPlan, keys: list[str]) -> None:
        """run.log_sample_keys: this rank's sample keys per micro-step, one JSON line each (step is
        1-based, as the loss scalars), flushed at once so a killed run keeps what it trained on."""
        path = self.output_dir / "sample_keys" / f"rank{self.dist.rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps({"step": self.step + 1, "micro": micro, "modality": plan.info.get("modality"),
                                "keys": keys}) + "\n")

    def _log_step(self, plan: StepPlan, losses_sum: dict, step_scalars: dict, timer: StepTimer, batch: dict,
                  results: dict) -> None:
        cfg, run = self.cfg, self.cfg.run
        self.monitor.scalars(self.step, plan.every_step_scalars)
        if not self._logs_at(self.step):
            return
        values = mean_over_ranks(losses_sum)
        results["step_losses"][self.step] = values
        per_step = timer.seconds_per_step
        world = self.dist.world_size
        samples = cfg.data.batch_size * run.grad_accum * world
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = self._grad_norm_fallback if grad_norm is None else grad_norm
        scalars = {f"loss/{k}": v for k, v in values.items()}
        scalars.update({
            "train/lr": self.scheduler.get_last_lr()[0],  # group 0: the towers' (base) rate
            "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
            **plan.log_scalars, **step_scalars,
            "perf/samples_per_sec": samples / per_step,
            "perf/data_wait": timer.data_wait,
            "mem/peak_gb": peak_memory_gb(self.device),
        })
        if self.task.step_flops is not None:
            flops = self.task.step_flops(plan, batch, samples)
            scalars["perf/tflops"] = flops / per_step / 1e12 / world
            if self.peak is not None:
                scalars.update({"perf/mfu": mfu(flops, per_step, world, self.peak.flops),
                                "perf/mfu_peak_tflops": self.peak.flops / 1e12,
                                "perf/mfu_peak_probed": float(self.peak.probed)})
        if self.task.log_scalars is not None:
            scalars.update(self.task.log_scalars(plan, batch))
        scalars.update({f"data/skipped/{r}": n for r, n in sum_skips(self.loader.skip_counts(), self.device).items()})
        self.monitor.scalars(self.step, scalars)
        self.monitor.progress(self.step, {"loss": values["total"], **plan.progress, "samples/s": samples / per_step})
        timer.reset()
